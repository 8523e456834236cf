"""One trial with fixed params, no Ray: data, model, freeze, loop, checkpoints, metrics.

``run_trial`` only wires the other modules together. It writes only under ``cfg.out_dir``
(``checkpoints/latest.pt``, ``checkpoints/best.pt``, ``trial.json``); a base weights file is read,
hashed before and after, and never written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainables import base_eval, checkpoint, coco, data, engine, families, freeze, models, optim
from trainables import params as P
from trainables.config import TrialConfig
from trainables.files import better, plain, sha256_file

log = logging.getLogger(__name__)
NEW_BEST = "new_best"  # an epoch report's flag: its checkpoint is the best so far (run_trial)

Report = Callable[[dict[str, Any], "Path | None"], None]
TIMING_KEYS = ("epoch_seconds", "images_per_s")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices); deterministic cuDNN."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: only on CUDA; ``auto`` = bf16 where supported, else fp16."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _weight_files(cfg: TrialConfig) -> dict[str, Path]:
    out = {}
    for key in ("weights", "weights_backbone"):
        value = getattr(cfg, key)
        if value and Path(value).is_file():
            out[key] = Path(value)
    return out


def _generators(loader: Any) -> list[torch.Generator]:
    """The torch generators driving a loader's shuffling/worker seeds (state saved for resume)."""
    found: dict[int, torch.Generator] = {}
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        for holder in (obj, getattr(obj, "sampler", None)):
            g = getattr(holder, "generator", None)
            if isinstance(g, torch.Generator):
                found.setdefault(id(g), g)
    return list(found.values())


def _build_data(cfg: TrialConfig, params: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    train_index = coco.load_coco(cfg.train.annotations, cfg.train.images, task=cfg.task)
    val_index = coco.load_coco(cfg.val.annotations, cfg.val.images, task=cfg.task)
    loaders = []
    for index, train, limit in ((train_index, True, cfg.limit_train), (val_index, False, cfg.limit_val)):
        tf = data.build_transforms(cfg.task, train, cfg.image_size, params)
        if cfg.task == "semantic_segmentation":
            ds = data.CocoSemantic(index, tf, limit=limit, full_masks=not train)  # scored at full size
        else:
            ds = data.CocoDetection(index, tf, with_masks=cfg.task == "instance_segmentation", limit=limit)
        loaders.append(
            data.make_loader(
                ds,
                cfg.batch_size,
                shuffle=train,
                workers=cfg.workers,
                seed=cfg.seed,
                pin_memory=pick_device(cfg.device).type == "cuda",
            )
        )
    return train_index, val_index, loaders[0], loaders[1]


@dataclasses.dataclass
class _Run:
    """What the steps of :func:`run_trial` share: the set-up (fixed once built) and the progress."""

    cfg: TrialConfig
    params: dict[str, Any]
    report: Report
    device: torch.device
    amp_dtype: torch.dtype | None
    ckpt_dir: Path
    files: dict[str, Path]
    shas: dict[str, str]
    train_index: Any
    val_index: Any
    train_loader: Any
    val_loader: Any
    num_classes: int
    family: Any
    model: Any = None
    build: dict[str, Any] = dataclasses.field(default_factory=dict)
    rebuild: Callable[[], torch.nn.Module] | None = None
    freeze_info: dict[str, Any] = dataclasses.field(default_factory=dict)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)  # in every report
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    groups_log: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    base_sha: str | None = None
    trainable_only: bool = False
    keep_frozen: tuple[str, ...] = ()  # frozen tensors a rebuild does not give back: checkpoints keep them
    gens: list[torch.Generator] = dataclasses.field(default_factory=list)
    # progress
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    base_metric: float | None = None
    best_metric: float | None = None
    best_epoch: int | None = None
    base: base_eval.BaseEval | None = None  # set while the epoch-0 metrics are still to come
    start: int = 1
    status: str = "ok"
    diverged: dict[str, Any] | None = None


def _prepare(cfg: TrialConfig, params: dict[str, Any], report: Report) -> _Run:
    """Seeds, device, output folder, the base files' hashes (before), the data."""
    seed_everything(cfg.seed)
    torch.set_num_threads(max(1, cfg.threads))
    device = pick_device(cfg.device)
    ckpt_dir = Path(cfg.out_dir) / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    files = _weight_files(cfg)
    shas = {k: sha256_file(p) for k, p in files.items()}
    train_index, val_index, train_loader, val_loader = _build_data(cfg, params)
    return _Run(
        cfg=cfg,
        params=params,
        report=report,
        device=device,
        amp_dtype=pick_amp(cfg.amp, device),
        ckpt_dir=ckpt_dir,
        files=files,
        shas=shas,
        train_index=train_index,
        val_index=val_index,
        train_loader=train_loader,
        val_loader=val_loader,
        num_classes=len(train_index.class_names) + 1,
        family=families.family_of(cfg.arch),
    )


def _build_model(run: _Run) -> None:
    """The model (frozen as the trainable set says) and how to rebuild its starting state."""
    cfg, params, family, num_classes = run.cfg, run.params, run.family, run.num_classes
    build_rng = torch.random.get_rng_state()  # random head initialisations: rebuild() repeats them
    model, run.build = models.build_model(cfg, params, num_classes)
    frep = freeze.apply_trainable(
        model, family, params["trainable"], params["trainable_k"], cfg.trainable_sets
    )

    def rebuild() -> torch.nn.Module:  # the starting model again, the trial's random state untouched
        rng = torch.random.get_rng_state()
        torch.random.set_rng_state(build_rng)
        try:
            again, _ = models.build_model(cfg, params, num_classes)
        finally:
            torch.random.set_rng_state(rng)
        freeze.apply_trainable(again, family, params["trainable"], params["trainable_k"], cfg.trainable_sets)
        return again

    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    run.freeze_info = {k: v for k, v in dataclasses.asdict(frep).items() if k != "trainable_names"}
    log.info(
        "trainable set %r: %d params trainable, %d frozen (%d/%d tensors)",
        params["trainable"],
        n_train,
        n_frozen,
        frep.trainable_tensors,
        frep.frozen_tensors,
    )
    run.model, run.rebuild = model, rebuild
    if not cfg.keep_full_checkpoint and (cfg.weights or cfg.weights_backbone):
        run.keep_frozen = _not_from_base(model, lambda: models.build_model(cfg, params, num_classes)[0])
    run.counts = {"trainable_params": n_train, "frozen_params": n_frozen}


def _not_from_base(model: torch.nn.Module, build: Callable[[], torch.nn.Module]) -> tuple[str, ...]:
    """The frozen tensors that a rebuild from the base weights does not give back.

    A second build from the random state that follows the first differs from it exactly where the
    initialisation is random (a new neck or head): when such a part is frozen, a trainable-only
    checkpoint must store it, or ``load_trained``, ``export`` and bundles would rebuild another one.
    """
    trained, ours = set(checkpoint.trainable_keys(model)), model.state_dict()
    if not ours.keys() - trained:
        return ()  # nothing frozen: no second build
    with torch.random.fork_rng(devices=[]):
        twin = build().state_dict()
    return tuple(
        k
        for k, t in ours.items()
        if k not in trained and k in twin and (t.shape != twin[k].shape or not torch.equal(t, twin[k]))
    )


def _build_optimizer(run: _Run) -> None:
    """The model on its device, optimizer, schedule, grad scaler; the base sha256 of checkpoints."""
    cfg, model = run.cfg, run.model
    model.to(run.device)
    if run.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    run.optimizer, run.groups_log = optim.build_optimizer(model, run.params, run.family)
    run.scheduler = optim.build_scheduler(run.optimizer, run.params, cfg.epochs, len(run.train_loader))
    run.scaler = torch.amp.GradScaler("cuda") if run.amp_dtype == torch.float16 else None
    if "weights" in run.shas and run.build.get("sha256") not in (None, run.shas["weights"]):
        raise RuntimeError(f"{run.files['weights']} changed while the model was built")
    run.base_sha = run.build.get("sha256") or run.shas.get("weights")  # an enum's cached file or ours
    # Trainable-only checkpoints need a base that rebuilds the frozen part; random init does not.
    run.trainable_only = not cfg.keep_full_checkpoint and bool(cfg.weights or cfg.weights_backbone)
    run.gens = _generators(run.train_loader)


def _resume(run: _Run, resume_from: Path) -> None:
    """Continue from a checkpoint's ``latest.pt``: state, history, best so far, loader RNG."""
    src = checkpoint.find(Path(resume_from))
    ckpt = checkpoint.load(src)
    if ckpt["base_sha256"] != run.base_sha:
        raise ValueError(f"{src} was trained from base sha256 {ckpt['base_sha256']}, not {run.base_sha}")
    run.start = checkpoint.restore(run.model, run.optimizer, run.scheduler, ckpt) + 1
    extra = ckpt["extra"]
    run.history, run.base_metric = list(extra["history"]), extra["base_metric"]
    run.best_metric, run.best_epoch = extra["best_metric"], extra["best_epoch"]
    for g, state in zip(run.gens, extra.get("loader_rng", []), strict=False):
        g.set_state(state)
    if run.scaler is not None and extra.get("scaler"):
        run.scaler.load_state_dict(extra["scaler"])
    best = run.ckpt_dir / checkpoint.BEST
    if (src.parent / checkpoint.BEST).is_file() and not best.is_file():
        checkpoint.copy(src.parent / checkpoint.BEST, best)
    log.info("resumed from %s at epoch %d", src, run.start - 1)


def _report_base(run: _Run, metrics: dict[str, Any] | None) -> None:
    """Report epoch 0 first, whenever its metrics are known."""
    if metrics is not None:
        run.base, run.base_metric = None, metrics[run.cfg.metric]
        run.history.insert(0, {"epoch": 0, **metrics})
        run.report({"epoch": 0, **metrics, "base_metric": run.base_metric, **run.counts}, None)


def _epochs(run: _Run) -> None:
    """Train, evaluate, checkpoint and report each epoch; a non-finite loss ends the loop."""
    cfg = run.cfg
    for epoch in range(run.start, cfg.epochs + 1):
        try:
            stats = engine.train_one_epoch(
                run.model,
                run.train_loader,
                run.optimizer,
                run.scheduler,
                device=run.device,
                params=run.params,
                amp_dtype=run.amp_dtype,
                scaler=run.scaler,
            )
        except engine.Diverged as exc:
            _report_diverged(run, epoch, exc)
            break
        metrics = base_eval.evaluate_metrics(cfg, run.model, run.val_loader, run.val_index, run.device)
        row = {"epoch": epoch, **metrics, **stats}
        if run.base is not None:  # another trial evaluates it: epoch 0 comes before any trained epoch
            _report_base(run, run.base.wait_collect(run.model))
        run.history.append(row)
        is_best = better(metrics[cfg.metric], run.best_metric, cfg.mode)
        if is_best:
            run.best_metric, run.best_epoch = metrics[cfg.metric], epoch
        latest = _save_latest(run, epoch, row)
        if is_best:
            checkpoint.copy(latest, run.ckpt_dir / checkpoint.BEST)
        run.report({**row, **run.counts, NEW_BEST: is_best}, run.ckpt_dir)


def _report_diverged(run: _Run, epoch: int, exc: engine.Diverged) -> None:
    """The trial's last report: the epoch diverged, with the objective at its worst value."""
    log.warning("epoch %d diverged: %s", epoch, exc)
    run.status, run.diverged = "diverged", {"epoch": epoch, "step": exc.step, "losses": exc.losses}
    worst = -math.inf if run.cfg.mode == "max" else math.inf
    if run.base is not None:  # its first report too, maybe: epoch 0 comes first
        _report_base(run, run.base.wait_collect(run.model))
    row = {"epoch": epoch, "diverged": 1, run.cfg.metric: worst, "step": exc.step, **exc.losses}
    run.report({**row, **run.counts}, None)


def _save_latest(run: _Run, epoch: int, row: dict[str, Any]) -> Path:
    extra = {
        "history": run.history,
        "base_metric": run.base_metric,
        "best_metric": run.best_metric,
        "best_epoch": run.best_epoch,
        "loader_rng": [g.get_state() for g in run.gens],
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
    }
    return checkpoint.save(
        run.ckpt_dir / checkpoint.LATEST,
        model=run.model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        epoch=epoch,
        metrics=row,
        params=run.params,
        base_sha256=run.base_sha,
        trainable_only=run.trainable_only,
        keep=run.keep_frozen,
        extra=extra,
    )


def _finish(run: _Run) -> dict[str, Any]:
    """A late epoch 0 kept, the base files verified unchanged, ``trial.json`` written."""
    if run.base is not None and (late := run.base.collect(run.model)) is not None:  # after the last report
        run.base_metric = late[run.cfg.metric]
        run.history.insert(0, {"epoch": 0, **late})
    converted = data.converted_images()
    if converted:
        log.info(
            "images decoded as RGB from other modes: %s",
            " ".join(f"{mode}={n}" for mode, n in converted.items()),
        )
    for key, path in run.files.items():
        if sha256_file(path) != run.shas[key]:
            raise RuntimeError(f"base weights file {path} changed during the trial ({key})")
    result = plain(_result(run))
    text = json.dumps(result, indent=2)
    checkpoint.atomic_write(Path(run.cfg.out_dir) / "trial.json", lambda f: f.write(text.encode()))
    return result


def _result(run: _Run) -> dict[str, Any]:
    best_path = run.ckpt_dir / checkpoint.BEST
    amp = str(run.amp_dtype).removeprefix("torch.") if run.amp_dtype else "off"
    return {
        "status": run.status,
        "base_metric": run.base_metric,
        "best_metric": run.best_metric,
        "best_epoch": run.best_epoch,
        "history": run.history,
        "checkpoint": str(best_path) if best_path.is_file() else None,
        "params": run.params,
        **run.counts,
        "diverged": run.diverged,
        "build": {
            **run.build,
            "freeze": run.freeze_info,
            "num_classes": run.num_classes,
            "device": str(run.device),
            "amp": amp,
            "base_sha256": run.shas,
            "trainable_only_checkpoints": run.trainable_only,
        },
        "param_groups": run.groups_log,
    }


def run_trial(
    cfg: TrialConfig,
    params: dict[str, Any],
    report: Report | None = None,
    resume_from: Path | None = None,
) -> dict[str, Any]:
    """Train and evaluate one configuration; return (and write to ``out_dir/trial.json``) the result.

    ``report(metrics, checkpoint_dir)`` is called after the base evaluation (epoch 0, when
    ``cfg.eval_base``; checkpoint_dir None) and after every epoch, whose ``NEW_BEST`` says whether
    its checkpoint is the trial's best so far (strictly better: a tie keeps the earlier epoch). A
    non-finite loss ends the trial with status ``diverged`` (reported with ``diverged: 1`` and the
    objective at its worst value).
    ``resume_from`` (a checkpoint file or folder) continues a trial from its ``latest.pt``.
    """
    params = P.resolve(params)
    run = _prepare(cfg, params, report or (lambda metrics, ckpt_dir: None))
    _build_model(run)
    _build_optimizer(run)
    if resume_from is not None:
        _resume(run, resume_from)
    if cfg.eval_base and not any(r.get("epoch") == 0 for r in run.history):  # resumed: still owed
        start = run.model if resume_from is None else run.rebuild().to(run.device)
        run.base = base_eval.BaseEval(cfg, start, run.val_loader, run.val_index, run.device, run.rebuild)
    if run.base is not None:
        _report_base(run, run.base.metrics)
    try:
        _epochs(run)
    finally:
        if run.base is not None:
            run.base.release()
    return _finish(run)
