"""``launch --dry-run``: every categorical branch's model built and stepped once, no Ray; the
plan and a time estimate from the measured steps."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from search.errors import SpecError
from search.launch_text import recipe_plan_text, recipe_unused_text
from search.samplers import num_samples
from search.schedulers import scheduler_label
from search.spec import Spec
from search.spec.notes import spec_notes


def _step_branch(spec: Spec, values: dict[str, Any], out_dir: Path, threads: int) -> dict[str, Any]:
    """One categorical branch's model built and run for two training batches and one evaluation
    batch; its measured step and per-image evaluation times."""
    from trainables import params as P
    from trainables.trial import run_trial

    bs = spec.train.batch_size
    cfg = dataclasses.replace(
        spec.trial_config(out_dir=out_dir, threads=threads),
        epochs=1,
        limit_train=2 * bs,
        limit_val=bs,
        eval_base=True,
    )
    marks: list[tuple[float, dict]] = []

    def mark(metrics: dict, _dir: Any) -> None:
        marks.append((time.perf_counter(), metrics))

    t0 = time.perf_counter()
    result = run_trial(cfg, P.resolve(values), report=mark)
    total = time.perf_counter() - t0
    step_s = eval_s = None
    if len(marks) >= 2 and "epoch_seconds" in marks[1][1]:  # 2 steps, then eval of bs images
        step_s = float(marks[1][1]["epoch_seconds"]) / 2
        eval_s = max(0.0, (marks[1][0] - marks[0][0]) - 2 * step_s) / bs
    return {
        "params": dict(values.items()),
        "status": result.get("status"),
        "trainable_params": result.get("trainable_params"),
        "step_s": step_s,
        "eval_s_per_image": eval_s,
        "seconds": round(total, 2),
    }


def launch_plan(spec: Spec, name: str | None, address: str | None, source: Any) -> dict[str, Any]:
    """``launch --dry-run``: refused where the launch would be (a study already there, a device not
    here, launch's own preflight: the address, a trial this machine cannot hold, the base weights,
    the tracking store; it accepted all but the weights), then :func:`dry_run`."""
    from search import launcher, study_folder
    from search.cluster import check_device

    launcher.apply_name(spec, name)
    study_folder.refuse_existing(spec.experiment_dir)
    check_device(spec.train.device)  # the dry run's own (the spec checked the trials')
    try:
        launcher.preflight(spec, address)
    except SpecError as err:
        raise err.with_source(str(source)) from None
    return dry_run(spec)


def dry_run(spec: Spec) -> dict[str, Any]:
    """Build every categorical branch's model and run one training batch and one evaluation batch
    (no Ray); returns the plan with a time estimate from the measured steps."""
    import torch

    from trainables import coco

    threads = max(1, int(spec.resources.cpu))
    torch.set_num_threads(threads)
    bs = spec.train.batch_size
    n_train = len(coco.load_coco(spec.data.train.annotations, spec.data.train.images, task=spec.task).images)
    n_val = len(coco.load_coco(spec.data.val.annotations, spec.data.val.images, task=spec.task).images)
    n_train = min(n_train, spec.train.limit_train or n_train)
    n_val = min(n_val, spec.train.limit_val or n_val)
    with tempfile.TemporaryDirectory(prefix="search-dry-") as tmp:
        branches = [
            _step_branch(spec, values, Path(tmp) / str(i), threads)
            for i, values in enumerate(spec.search_space.branch_configs())
        ]
    steps = [b["step_s"] for b in branches if b["step_s"] is not None]
    evals = [b["eval_s_per_image"] for b in branches if b["eval_s_per_image"] is not None]
    step_s = sum(steps) / len(steps) if steps else None
    eval_img = sum(evals) / len(evals) if evals else 0.0
    trials, epochs, conc = num_samples(spec), spec.train.epochs, spec.search.max_concurrent
    per_trial = None
    if step_s is not None:
        per_epoch = math.ceil(n_train / bs) * step_s + n_val * eval_img
        per_trial = epochs * per_epoch
    waves = math.ceil(trials / conc)
    estimate = per_trial * waves if per_trial is not None else None
    if estimate is not None and spec.train.eval_base:  # once per starting model, shared (base_eval)
        swaps = [d for d in spec.search_space.searched if d.name == "activation"]
        starts = 1 + sum(len(d.choices or ()) - 1 for d in swaps)
        estimate += starts * n_val * eval_img / conc
    if estimate is not None and spec.search.time_budget:
        estimate = min(estimate, spec.search.time_budget)
    return {
        "name": spec.name,
        "trials": trials,
        "epochs": epochs,
        "max_concurrent": conc,
        "train_images": n_train,
        "val_images": n_val,
        "batch_size": bs,
        "branches": branches,
        "step_s": step_s,
        "eval_s_per_image": eval_img,
        "trial_s": per_trial,
        "estimated_s": estimate,
        "experiment_dir": str(spec.experiment_dir),
        "algorithm": spec.search.algorithm,
        "scheduler": spec.search.scheduler,
        "recipe_trials": [{"scaling": sc, "params": p} for sc, p in spec.recipe_trials()],
        "recipe_unused": spec.recipe_unused(),
        "recipe_overridden": spec.recipe_overridden(),
        "notes": spec_notes(spec),
    }


def print_plan(plan: dict[str, Any]) -> None:
    print(f"dry run of {plan['name']}: {len(plan['branches'])} branch configuration(s) built and stepped")
    for b in plan["branches"]:
        step = f"{b['step_s']:.2f}s/step" if b["step_s"] is not None else "no step"
        print(
            f"  {b['status']:<8} {step:>12}  {b['trainable_params']} trainable params  "
            f"{json.dumps(b['params'], default=str)}"
        )
    print(
        f"plan: {plan['trials']} trials x {plan['epochs']} epochs, {plan['max_concurrent']} at a time; "
        f"{plan['train_images']} train / {plan['val_images']} val images, batch {plan['batch_size']}"
    )
    print(f"search: {plan['algorithm']} + {scheduler_label(plan['scheduler'])}")
    for i, r in enumerate(plan["recipe_trials"]):
        print(f"  {recipe_plan_text(i, r['scaling'], r['params'])}")
    if unused := recipe_unused_text(plan["recipe_unused"], plan["recipe_overridden"]):
        print(f"  {unused}")
    for note in plan["notes"]:
        print(f"  note: {note}")
    if plan["estimated_s"] is not None:
        print(
            f"estimate: {plan['trial_s'] / 60:.1f} min per full trial, about "
            f"{plan['estimated_s'] / 60:.1f} min for the study without early stopping (the scheduler stops "
            "some trials sooner)"
        )
    print(f"experiment folder: {plan['experiment_dir']}")
