"""Share the epoch-0 base-model evaluation between the trials of a study.

Every trial of a study starts from the same base model unless a searched parameter changes what
is built (an activation swap, say), so evaluating it once per distinct starting model is enough.
The cache is a folder of ``<key>.json`` files. The key is a sha256 over everything the evaluation
reads: the model's module structure (a class that changes only the training losses counts as the
torchvision class it extends) and every tensor of its state as built and frozen (random
head initialisations and swaps included), the validation split (annotation file hash, image root,
image limit), image size, batch size, task and device type. Two trials with the same key would
compute the same metrics, so the second reads the first's.

While one trial evaluates a key it holds ``<key>.lock`` (created with ``O_EXCL``); it evaluates
before it trains, as a trial without the cache does. Another trial that finds the lock trains at
once and, at its first report, waits for the stored result (:meth:`get`): the holder started first
and evaluated first, so the result is normally there already, and epoch 0 is always reported
before any trained epoch (a scheduler may stop a trial at its first trained report). The
holder's thread rewrites the lock's time every :data:`HEARTBEAT_S` while the claiming thread
lives. A lock whose process is gone (same host) or whose time is older than
:data:`STALE_AFTER_S` (a holder that died on another host), or an empty or torn lock file older
than :data:`TORN_AFTER_S` by its mtime (its holder died writing it, e.g. on a full disk), is
taken over; this assumes the hosts' clocks agree to well within that. Assumes the folder is
shared by the trials that should share results; on a node that cannot see it the trials just
evaluate for themselves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainables import engine, losses
from trainables.config import TrialConfig
from trainables.files import pid_alive, plain, sha256_file

log = logging.getLogger(__name__)

HEARTBEAT_S = 20.0  # how often a live holder rewrites its lock's time
STALE_AFTER_S = 120.0  # a lock not rewritten for this long has lost its holder
TORN_AFTER_S = 10.0  # an empty or cut lock this old: its holder died writing it (a full disk)


def model_key(model: torch.nn.Module, cfg: TrialConfig, device: torch.device) -> str:
    """sha256 of the model as it will be evaluated plus the evaluation settings (module docstring)."""
    h = hashlib.sha256()
    h.update(losses.evaluation_repr(model).encode())  # the training losses change no evaluation
    for name, tensor in model.state_dict().items():
        t = tensor.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    settings = {
        "task": cfg.task,
        "val_annotations": sha256_file(cfg.val.annotations),
        "val_images": str(Path(cfg.val.images).resolve()),
        "limit_val": cfg.limit_val,
        "image_size": cfg.image_size,
        "batch_size": cfg.batch_size,
        "device": device.type,
    }
    if cfg.task == "semantic_segmentation":  # since masks are scored at the image's size, not the input's
        settings["scored_at"] = "image size"
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


class BaseEvalCache:
    """The study's base-evaluation results, one JSON file per model key (module docstring)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._beats: dict[str, threading.Event] = {}  # key -> stops that lock's heartbeat
        self._mutex = threading.Lock()  # a heartbeat's rewrite never follows its release

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def _lock(self, key: str) -> Path:
        return self.folder / f"{key}.lock"

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored metrics of ``key``, or None."""
        try:
            return dict(json.loads(self._path(key).read_text())["metrics"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def claim(self, key: str) -> bool:
        """True when this process should evaluate ``key`` (it now holds the lock); False when
        another live process is evaluating it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = self._lock(key)
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                seen = _read(lock)
                if not self._stale(lock) or not _take_away(lock, seen):
                    return False
                continue
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(holder, f)
            except BaseException:  # e.g. a full disk: no empty lock that others wait on
                lock.unlink(missing_ok=True)
                raise
            self._start_heartbeat(key, holder)
            return True
        return False

    def _start_heartbeat(self, key: str, holder: dict[str, Any]) -> None:
        """Rewrite the lock's time every HEARTBEAT_S until put/release, or until the claiming
        thread ends (a trial thread that ended without either must not keep its claim alive)."""
        stop, owner, lock = threading.Event(), threading.current_thread(), self._lock(key)
        self._beats[key] = stop

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S) and owner.is_alive():
                with self._mutex:
                    if stop.is_set() or not _holds(lock):
                        return  # released, or taken over by a trial to which this one looked dead
                    tmp = self.folder / f".{key}.{os.getpid()}.lock.tmp"
                    try:
                        tmp.write_text(json.dumps({**holder, "time": time.time()}))
                        os.replace(tmp, lock)
                    except OSError:
                        return

        threading.Thread(target=beat, name=f"base-eval-lock-{key[:8]}", daemon=True).start()

    def _stale(self, lock: Path) -> bool:
        try:
            holder = json.loads(lock.read_text())
            age = time.time() - float(holder["time"])
        except FileNotFoundError:
            return True
        except (OSError, ValueError, KeyError, TypeError):
            try:
                age = time.time() - lock.stat().st_mtime
            except OSError:
                return True
            return age > TORN_AFTER_S  # its holder writes it at once: one left unread is dead
        if age > STALE_AFTER_S:
            return True
        return holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid", -1)))

    def pending(self, key: str) -> bool:
        """Whether a live process holds ``key``'s claim (its result may still come)."""
        lock = self._lock(key)
        return lock.exists() and not self._stale(lock)

    def put(self, key: str, metrics: dict[str, Any]) -> None:
        """Store ``key``'s metrics (atomically) and drop the lock."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"metrics": metrics, "time": time.time()}))
        os.replace(tmp, self._path(key))
        self.release(key)

    def release(self, key: str) -> None:
        """Drop the lock of ``key`` if this process holds it."""
        with self._mutex:
            beat = self._beats.pop(key, None)
            if beat is not None:
                beat.set()
            lock = self._lock(key)
            if _holds(lock):
                lock.unlink(missing_ok=True)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _take_away(lock: Path, seen: bytes | None) -> bool:
    """Remove a stale ``lock`` only while it still holds ``seen``: a trial that took it over
    between the staleness check and here keeps it (both once ran the base evaluation)."""
    grave = lock.with_name(f".{lock.name}.{os.getpid()}.{threading.get_ident()}.stale")
    try:
        os.rename(lock, grave)
    except FileNotFoundError:
        return True  # gone already: try to create it
    try:
        if _read(grave) == seen:
            return True
        try:
            os.link(grave, lock)  # another trial's fresh lock: put it back, unless a newer one is there
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links: by name, if none came meanwhile
            if not lock.exists():
                os.replace(grave, lock)
        return False
    finally:
        grave.unlink(missing_ok=True)


def _holds(lock: Path) -> bool:
    """Whether ``lock`` names this process (this host and pid)."""
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(holder, dict)
        and holder.get("pid") == os.getpid()
        and holder.get("host") == socket.gethostname()
    )


# ---------------------------------------------------------------- a trial's epoch 0


def evaluate_metrics(
    cfg: TrialConfig, model: torch.nn.Module, loader: Any, index: Any, device: torch.device
) -> dict[str, Any]:
    metrics = engine.evaluate(model, loader, index, device=device, task=cfg.task)
    if cfg.metric not in metrics:
        raise ValueError(f"metric {cfg.metric!r} is not one of {sorted(metrics)}")
    return metrics


class BaseEval:
    """A trial's epoch-0 evaluation of its starting model.

    Without ``cfg.base_eval_dir`` it evaluates at once (:attr:`metrics`). With one
    (:mod:`trainables.base_eval`), a stored result is used at once, and the trial that claims the
    model's key evaluates at once and stores the result. A trial whose key another trial has claimed
    trains, and at its first report waits for the store (:meth:`wait_collect`); when that claim goes
    stale (its trial died), it claims the key itself and evaluates ``rebuild()``'s starting weights,
    if their key matches (the trajectory is the same, as evaluation draws no random numbers).
    """

    def __init__(
        self,
        cfg: TrialConfig,
        model: torch.nn.Module,
        loader: Any,
        index: Any,
        device: torch.device,
        rebuild: Callable[[], torch.nn.Module] | None = None,
    ) -> None:
        self.cfg, self.loader, self.index, self.device = cfg, loader, index, device
        self._rebuild = rebuild
        self.metrics: dict[str, Any] | None = None
        self._initial: dict[str, torch.Tensor] | None = None
        self.cache = self.key = None
        if cfg.base_eval_dir is None:
            self.metrics = evaluate_metrics(cfg, model, loader, index, device)
            return
        self.cache = BaseEvalCache(cfg.base_eval_dir)
        self.key = model_key(model, cfg, device)
        cached = self.cache.get(self.key)
        if cached is not None and cfg.metric in cached:
            log.info("base model evaluation shared from %s", self.cache.folder)
            self.metrics = cached
        elif self.cache.claim(self.key):
            try:
                self.metrics = evaluate_metrics(cfg, model, loader, index, device)
            except BaseException:
                self.cache.release(self.key)
                raise
            self.cache.put(self.key, plain(self.metrics))
        else:
            log.info("another trial is evaluating this base model; training meanwhile")

    def collect(self, model: torch.nn.Module) -> dict[str, Any] | None:
        """At a report after training started: the epoch-0 metrics once known, else None."""
        if self._initial is None:
            found = self.cache.get(self.key) if self.cache is not None else None
            if found is not None and self.cfg.metric in found:
                return found
            if not self._take_over():
                return None
        trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self._initial)  # copies in place: the optimizer keeps its tensors
        try:
            metrics = evaluate_metrics(self.cfg, model, self.loader, self.index, self.device)
        finally:
            model.load_state_dict(trained)
        self._initial = None
        self.cache.put(self.key, plain(metrics))
        return metrics

    def wait_collect(self, model: torch.nn.Module, timeout: float = 900.0, poll: float = 0.5) -> dict | None:
        """:meth:`collect`, waiting (up to ``timeout`` s) while another live trial evaluates the
        base model, so that epoch 0 is reported before the trial's first trained epoch (a scheduler
        may stop the trial there). None when nobody can deliver it."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.collect(model)
            if got is not None or self.cache is None or time.monotonic() >= deadline:
                return got
            if not self.cache.pending(self.key):  # nobody evaluates it, and it could not be taken over
                return self.collect(model)  # (or it was stored just now)
            time.sleep(poll)

    def _take_over(self) -> bool:
        """Claim a key whose holder died, with starting weights rebuilt as this trial built them."""
        if self.cache is None or self._rebuild is None or not self.cache.claim(self.key):
            return False
        try:
            start = self._rebuild()
            why = None if model_key(start, self.cfg, self.device) == self.key else "it differs"
        except Exception as exc:  # best effort: the trial's own training must not fail for it
            why = f"{type(exc).__name__}: {exc}"
        if why is not None:
            log.warning("the starting model could not be rebuilt (%s): no epoch-0 metrics", why)
            self._rebuild = None
            self.cache.release(self.key)
            return False
        log.info("the trial evaluating this base model died; evaluating it here")
        self._initial = {k: v.detach().to(self.device) for k, v in start.state_dict().items()}
        return True

    def release(self) -> None:
        """Drop a claim this trial still holds (it failed before evaluating)."""
        if self._initial is not None:
            self._initial = None
            self.cache.release(self.key)
