"""``bench/sampler_screen.py``'s mechanics on a made-up pool of curves: the surrogate answers from
the nearest recorded trial with the same categorical choices (the same draw for the same
configuration and seed), and a simulated study runs the real sampler and scheduler: without
stopping every trial runs every epoch, with ``curve`` the collapsing trials stop early and the
reference trial runs first and to the end."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import sampler_screen as SS  # noqa: E402

from search.spec.load import load_spec  # noqa: E402

EPOCHS = 8


def _curve(lr: float, good: bool) -> dict[int, float]:
    """Rises to 0.6 for a good trial; collapses after epoch 2 otherwise (lr only labels it)."""
    if good:
        return {e: 0.6 * e / EPOCHS + lr for e in range(1, EPOCHS + 1)}
    return {e: (0.3 if e <= 2 else 0.001) + lr for e in range(1, EPOCHS + 1)}


def _pool() -> list[dict]:
    out = []
    for opt, trainable, act in itertools.product(("sgd", "adamw"), ("all", "heads"), ("keep", "silu")):
        for lr in (0.0003, 0.003, 0.02):
            params = {"optimizer": opt, "lr": lr, "weight_decay": 1e-5, "trainable": trainable}
            params |= {"activation": act, **({"momentum": 0.9} if opt == "sgd" else {})}
            out.append({"params": params, "curve": _curve(lr, good=trainable == "all")})
    return out


@pytest.fixture(scope="module")
def world() -> SimpleNamespace:
    spec = load_spec(ROOT / "spaces/det.yaml", [f"train.epochs={EPOCHS}"], study=False)
    return SimpleNamespace(
        space=spec.search_space,
        reference=spec.reference_params(),
        surrogate=SS.Surrogate(_pool(), spec.search_space, k=1),
        trials=6,
        epochs=EPOCHS,
        slots=2,
    )


def test_surrogate_answers_from_the_nearest_trial_of_the_same_group(world):
    near = {"optimizer": "sgd", "lr": 0.0025, "momentum": 0.85, "weight_decay": 2e-5}
    near |= {"trainable": "all", "activation": "keep"}
    assert world.surrogate.curve(near, 0) == _curve(0.003, good=True)
    assert world.surrogate.curve(near | {"trainable": "heads"}, 0) == _curve(0.003, good=False)
    assert world.surrogate.curve(near | {"activation": "gelu"}, 0) is None  # nobody recorded it
    two = SS.Surrogate(_pool(), world.space, k=2)
    draws = {tuple(two.curve(near, s).values()) for s in range(20)}
    assert len(draws) == 2  # one of the 2 nearest, drawn per seed ...
    assert all(two.curve(near, s) == two.curve(near, s) for s in range(5))  # ... the same each time


def test_simulated_studies_run_the_real_sampler_and_scheduler(world):
    full = SS.simulate("random_full", 3, world)
    assert len(full) == world.trials * EPOCHS  # no stopping: every trial, every epoch
    stopped = SS.simulate("curve", 3, world)
    assert len(stopped) < world.trials * EPOCHS  # the collapsing heads-only trials stop
    ref = world.surrogate.curve(world.reference, 3)
    assert stopped[0] == ref[1]  # the reference trial is asked first ...
    assert set(ref.values()) <= set(stopped)  # ... and runs every epoch
    assert SS.simulate("curve", 3, world) == stopped  # seeded: the same study again


def test_p_met_counts_draws_that_meet_both_targets():
    assert SS.p_met([0.2] * 4, [0.0] * 4, 3) == 1.0
    assert SS.p_met([0.5] * 4, [0.0] * 4, 3) == 0.0  # reach above a third
    assert SS.p_met([0.2] * 4, [-0.02] * 4, 3) == 0.0  # every seed below R* - 0.01
