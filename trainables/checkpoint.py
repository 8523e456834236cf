"""Trial checkpoints: atomic, loadable with ``torch.load(weights_only=True)``.

A trial keeps two files in ``out_dir/checkpoints/``: ``latest.pt`` (every epoch) and ``best.pt``
(the epoch with the best objective so far). A checkpoint is a dict::

    {"format": 1, "epoch", "metrics", "params", "base_sha256", "trainable_only",
     "model": {name: tensor}, "optimizer", "scheduler", "rng", "extra"}

``trainable_only=True`` stores exactly:
  * every parameter with ``requires_grad=True``;
  * every persistent buffer (e.g. BatchNorm ``running_mean``, ``running_var``,
    ``num_batches_tracked``) of a non-frozen module: one that directly owns a parameter with
    ``requires_grad=True``, or that owns no parameter itself (e.g. a BatchNorm without affine
    parameters, FrozenBatchNorm2d) while its parent module has a trainable parameter. This is a
    superset of what :func:`trainables.freeze.train_mode` lets change in training.
  * the frozen tensors named by ``save(keep=...)``: those a rebuild from the base does not give
    back (a randomly initialised neck or head left frozen; see ``trainables.trial``).
Everything else (frozen parameters, buffers of frozen modules such as frozen norms, which
``train_mode`` keeps in eval so they never change) equals the base weights, identified by
``base_sha256`` (of the weights file: a given path or an enum's hub-cache file; None for a random
init, where the trial keeps full checkpoints): rebuilding the model from the same base and
loading ``model`` with ``strict=False`` gives the trained model. ``trainable_only=False`` stores the
full ``state_dict``.

RNG states are stored as tensors and lists of ints so that ``weights_only`` loading accepts them.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainables.testhooks import pause_point

FORMAT = 1
LATEST, BEST = "latest.pt", "best.pt"


def _trainable_items(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of what a trainable-only checkpoint keeps (see the module docstring): the
    parameters that train and the persistent buffers of every module with one."""
    modules = dict(model.named_modules())
    for mname, module in modules.items():
        own = list(module.named_parameters(recurse=False))
        prefix = f"{mname}." if mname else ""
        yield from ((prefix + name, p) for name, p in own if p.requires_grad)
        if own:
            live = any(p.requires_grad for _, p in own)
        else:
            parent = modules[mname.rpartition(".")[0]] if mname else module
            live = any(p.requires_grad for p in parent.parameters())
        if live:
            yield from (
                (prefix + name, b)
                for name, b in module.named_buffers(recurse=False)
                if b is not None and name not in module._non_persistent_buffers_set
            )


def trainable_keys(model: torch.nn.Module) -> list[str]:
    """The state-dict keys of :func:`trainable_state`, nothing copied."""
    return [k for k, _ in _trainable_items(model)]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a trainable-only checkpoint keeps, as detached copies."""
    return {k: t.detach().clone() for k, t in _trainable_items(model)}


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA when present) RNG states in a weights_only-safe form."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in mt.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Writes:
    """A file for ``torch.save`` that keeps the OSError its write raised: torch's zip writer turns
    a full disk into 'enforce fail at inline_container.cc ... unexpected pos'."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> Any:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def save_state(obj: Any, f: Any) -> None:
    """``torch.save(obj, f)``, streamed; a full disk raises its OSError (ENOSPC: search.failures
    tells it from a trial's own failure) instead of torch's RuntimeError."""
    out = _Writes(f)
    try:
        torch.save(obj, out)
    except RuntimeError:
        if out.error is not None:
            raise out.error from None
        raise


def atomic_write(path: Path, write: Any) -> None:
    """Write via ``write(file)`` to ``path.tmp`` in the same folder, fsync, then ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        pause_point("checkpoint_write")  # test hook: the file is written, not yet in place
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    epoch: int,
    metrics: dict[str, Any],
    params: dict[str, Any],
    base_sha256: str | None,
    rng: bool = True,
    trainable_only: bool = True,
    keep: tuple[str, ...] = (),
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (``path.tmp`` in the same folder, fsync, ``os.replace``).

    ``extra`` holds plain data the caller needs to resume (history, best so far, ...); ``keep``
    names frozen tensors a trainable-only checkpoint stores as well.
    """
    path = Path(path)
    if trainable_only:
        weights = trainable_state(model)
        full = model.state_dict()
        weights.update({k: full[k].detach().clone() for k in keep if k not in weights})
    else:
        weights = model.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "epoch": int(epoch),
        "metrics": dict(metrics),
        "params": dict(params),
        "base_sha256": base_sha256,
        "trainable_only": bool(trainable_only),
        "model": weights,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state() if rng else None,
        "extra": dict(extra or {}),
    }
    atomic_write(path, lambda f: save_state(state, f))
    return path


def copy(src: Path, dst: Path) -> Path:
    """Atomic copy (e.g. ``latest.pt`` -> ``best.pt``)."""
    dst = Path(dst)
    with open(src, "rb") as s:
        atomic_write(dst, lambda f: shutil.copyfileobj(s, f))
    return dst


def find(path: Path) -> Path:
    """The checkpoint file to resume from: ``path`` itself, or ``latest.pt`` in ``path`` or in
    ``path/checkpoints``."""
    path = Path(path)
    for cand in (path, path / LATEST, path / "checkpoints" / LATEST):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"no checkpoint at {path} (looked for {LATEST} there and in checkpoints/)")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file."""


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU with ``weights_only=True``: a file holding more than tensors and
    plain containers (a pickle that could run code) is refused, unread, with :class:`CheckpointError`."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch's warnings on a file it then refuses: the error says it
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")
        raise CheckpointError(
            f"checkpoint {path} was refused by torch.load(weights_only=True): it holds more than tensors and "
            f"plain containers (a pickle that could run code), so it was not loaded ({why[:200]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise CheckpointError(f"checkpoint {path} cannot be read: {str(exc).splitlines()[0][:300]}") from None


def restore(model: torch.nn.Module, optimizer: Any, scheduler: Any, ckpt: dict[str, Any]) -> int:
    """Load model/optimizer/scheduler/RNG states from ``ckpt``; return its epoch.

    The model must be rebuilt from the same base first (``base_sha256``); a trainable-only
    checkpoint is loaded with ``strict=False`` but any key it has that the model lacks is an error.
    """
    result = model.load_state_dict(ckpt["model"], strict=not ckpt["trainable_only"])
    if result.unexpected_keys:
        raise RuntimeError(f"checkpoint keys not in the model: {result.unexpected_keys[:10]}")
    if optimizer is not None and ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("rng") is not None:
        set_rng_state(ckpt["rng"])
    return int(ckpt["epoch"])


def load_trained(cfg: Any, params: dict[str, Any], num_classes: int, path: Path) -> torch.nn.Module:
    """The trained model of a checkpoint: rebuilt from the trial's base (``cfg.weights``), then
    the checkpoint's tensors loaded over it. ``params`` must be the trial's resolved params (loss
    and activation choices shape the model). Refuses a trainable-only checkpoint whose base file
    changed since (sha256 differs)."""
    from trainables import models

    ckpt = load(find(path))
    model, info = models.build_model(cfg, params, num_classes)
    recorded = ckpt.get("base_sha256")
    if ckpt.get("trainable_only") and recorded and info.get("sha256") not in (None, recorded):
        raise RuntimeError(
            f"the base weights changed since the checkpoint was written: sha256 {info.get('sha256')} "
            f"!= recorded {recorded}"
        )
    result = model.load_state_dict(ckpt["model"], strict=not ckpt.get("trainable_only"))
    if result.unexpected_keys:
        raise RuntimeError(f"checkpoint keys not in the model: {result.unexpected_keys[:10]}")
    return model.eval()


def save_weights(model: torch.nn.Module, path: Path, half: bool = False) -> Path:
    """A plain state_dict file (atomic), floating tensors in fp16 when ``half`` (loading into an
    fp32 model converts them back)."""
    state = {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu().clone()
        for k, v in model.state_dict().items()
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), lambda f: save_state(state, f))
    return Path(path)
