"""The study-wide epoch-0 base evaluation: cache key, lock, and run_trial sharing it (CPU, tiny)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from torch import nn

from tests.tinydata import tiny_split, trial_config, without_timing
from trainables import base_eval, engine
from trainables.base_eval import BaseEvalCache, model_key
from trainables.trial import run_trial

ARCH = "ssdlite320_mobilenet_v3_large"


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return tiny_split(tmp_path_factory.mktemp("tiny"))


_cfg, _strip = trial_config, without_timing


class _Counting:
    """Counts engine.evaluate calls (run_trial calls it through the module)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = engine.evaluate

        def evaluate(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(engine, "evaluate", evaluate)


# --- key ----------------------------------------------------------------------------------------
def test_key_follows_tensors_structure_and_eval_settings(split, tmp_path):
    cpu = torch.device("cpu")
    cfg = _cfg(split, tmp_path)
    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    b = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    b.load_state_dict(a.state_dict())
    key = model_key(a, cfg, cpu)
    assert len(key) == 64 and model_key(b, cfg, cpu) == key  # same tensors and structure
    b[2] = nn.SiLU()  # an activation swap: same tensors, another model
    assert model_key(b, cfg, cpu) != key
    b[2] = nn.ReLU()
    with torch.no_grad():
        b[0].bias[0] += 1e-3
    assert model_key(b, cfg, cpu) != key
    b.load_state_dict(a.state_dict())
    b[1].num_batches_tracked.fill_(7)  # 0-dim integer buffers count too
    assert model_key(b, cfg, cpu) != key
    changes = ({"limit_val": 2}, {"image_size": 96}, {"batch_size": 1}, {"task": "instance_segmentation"})
    for change in changes:
        assert model_key(a, dataclasses.replace(cfg, **change), cpu) != key, change
    assert model_key(a, dataclasses.replace(cfg, epochs=9, seed=3, limit_train=2), cpu) == key  # not read


# --- cache and lock -----------------------------------------------------------------------------
def test_cache_claim_put_get_release(tmp_path):
    cache, other = BaseEvalCache(tmp_path / "be"), BaseEvalCache(tmp_path / "be")
    assert cache.get("k") is None
    assert cache.claim("k") is True
    assert other.claim("k") is False  # held by a live process (this one)
    cache.put("k", {"map": 0.25, "map50": 0.5})
    assert other.get("k") == {"map": 0.25, "map50": 0.5}
    assert not (tmp_path / "be" / "k.lock").exists()
    assert sorted(p.name for p in (tmp_path / "be").iterdir()) == ["k.json"]  # no temp file left
    assert other.claim("k2") is True
    other.release("k2")
    assert not (tmp_path / "be" / "k2.lock").exists()


def test_lock_of_a_dead_process_or_too_old_is_taken_over(tmp_path):
    folder = tmp_path / "be"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    (folder / "a.lock").write_text(json.dumps({"host": host, "pid": dead.pid, "time": time.time()}))
    (folder / "b.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "time": time.time()}))
    (folder / "c.lock").write_text(
        json.dumps({"host": "elsewhere", "pid": 1, "time": time.time() - base_eval.STALE_AFTER_S - 1})
    )
    (folder / "d.lock").write_text("not json")  # a torn write: judged by its age (new: kept)
    (folder / "e.lock").write_text("")  # left empty by a holder that died writing it (a full disk)
    torn = time.time() - base_eval.TORN_AFTER_S - 1
    os.utime(folder / "e.lock", (torn, torn))  # was waited on for STALE_AFTER_S (2 minutes)
    cache = BaseEvalCache(folder)
    assert cache.claim("a") is True  # its process is gone
    assert cache.claim("b") is False  # another host's: cannot tell, and it is recent
    assert cache.claim("c") is True  # too old
    assert cache.claim("d") is False
    assert cache.claim("e") is True
    old = time.time() - base_eval.STALE_AFTER_S - 1
    os.utime(folder / "d.lock", (old, old))
    assert cache.claim("d") is True
    holder = json.loads((folder / "a.lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == host


# --- run_trial sharing it -----------------------------------------------------------------------
def test_second_trial_reads_the_first_trials_base_evaluation(split, tmp_path, monkeypatch):
    counter = _Counting(monkeypatch)
    shared = tmp_path / "base_eval"
    reports_a, reports_b = [], []
    a = run_trial(
        _cfg(split, tmp_path / "a", base_eval_dir=shared),
        {"lr": 0.01},
        report=lambda m, d: reports_a.append(m),
    )
    assert counter.calls == 3  # base + 2 epochs
    assert len(list(shared.glob("*.json"))) == 1 and not list(shared.glob("*.lock"))
    b = run_trial(
        _cfg(split, tmp_path / "b", base_eval_dir=shared),
        {"lr": 0.01},
        report=lambda m, d: reports_b.append(m),
    )
    assert counter.calls == 5  # b evaluated its 2 epochs only
    assert b["base_metric"] == a["base_metric"] is not None
    assert _strip(b["history"]) == _strip(a["history"])  # reading it changes nothing downstream
    assert [r["epoch"] for r in reports_b] == [0, 1, 2] and reports_b[0] == reports_a[0]
    # a trial without the cache evaluates for itself and gets the same numbers
    c = run_trial(_cfg(split, tmp_path / "c"), {"lr": 0.01})
    assert counter.calls == 8 and _strip(c["history"]) == _strip(a["history"])


def test_claiming_trial_evaluates_its_starting_weights_before_it_trains(split, tmp_path, monkeypatch):
    calls = []
    real_train, real_eval = engine.train_one_epoch, engine.evaluate
    monkeypatch.setattr(
        engine, "train_one_epoch", lambda *a, **k: calls.append("train") or real_train(*a, **k)
    )
    monkeypatch.setattr(engine, "evaluate", lambda *a, **k: calls.append("eval") or real_eval(*a, **k))
    reports = []
    got = run_trial(
        _cfg(split, tmp_path / "a", base_eval_dir=tmp_path / "be"),
        {"lr": 0.01},
        report=lambda m, d: reports.append((m["epoch"], d is not None)),
    )
    # the base is evaluated (and stored) before the first step, reported first, without checkpoint
    assert calls == ["eval", "train", "eval", "train", "eval"]
    assert reports == [(0, False), (1, True), (2, True)]
    monkeypatch.setattr(engine, "train_one_epoch", real_train)
    monkeypatch.setattr(engine, "evaluate", real_eval)
    alone = run_trial(_cfg(split, tmp_path / "b"), {"lr": 0.01})  # evaluates the base before training
    assert _strip(got["history"]) == _strip(alone["history"])  # same numbers, base and trained
    ckpt = torch.load(tmp_path / "a" / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["extra"]["base_metric"] == alone["base_metric"]


def test_activation_swap_is_another_base(split, tmp_path, monkeypatch):
    counter = _Counting(monkeypatch)
    shared = tmp_path / "base_eval"
    for name in ("a", "b"):
        run_trial(
            _cfg(split, tmp_path / name, base_eval_dir=shared, epochs=1),
            {"lr": 0.01, "activation": "keep" if name == "a" else "silu"},
        )
    assert counter.calls == 4 and len(list(shared.glob("*.json"))) == 2


def test_trials_that_differ_only_in_their_losses_share_the_base(split, tmp_path, monkeypatch):
    """SSDlite's loss swap (a subclass with its own ``compute_loss``) changes training, not evaluation."""
    counter = _Counting(monkeypatch)
    shared = tmp_path / "base_eval"
    losses = ({}, {"loss.cls": "focal", "loss.focal_gamma": 1.0}, {"loss.box": "giou"})
    runs = [
        run_trial(_cfg(split, tmp_path / str(i), base_eval_dir=shared, epochs=1), {"lr": 0.01, **chosen})
        for i, chosen in enumerate(losses)
    ]
    assert counter.calls == 4 and len(list(shared.glob("*.json"))) == 1  # one base, three epochs
    assert len({r["base_metric"] for r in runs}) == 1
    assert runs[1]["build"]["losses"]["cls"] == "focal" and runs[2]["build"]["losses"]["box"] == "giou"


def test_trial_trains_without_waiting_while_another_evaluates(split, tmp_path, monkeypatch):
    """The lock is held (by this live process, as a concurrent trial would): the trial trains at
    once, and picks the base metrics up after its first epoch when the holder has stored them."""
    counter = _Counting(monkeypatch)
    shared = tmp_path / "base_eval"
    cfg = _cfg(split, tmp_path / "b", base_eval_dir=shared)
    ref = run_trial(_cfg(split, tmp_path / "ref"), {"lr": 0.01})  # what the other trial computes
    assert counter.calls == 3
    holder = BaseEvalCache(shared)
    key_box = {}
    real_key = base_eval.model_key

    def key(model, c, device):
        key_box["k"] = real_key(model, c, device)
        assert holder.claim(key_box["k"]) is True  # "the other trial" starts evaluating first
        return key_box["k"]

    monkeypatch.setattr(base_eval, "model_key", key)
    real_train = engine.train_one_epoch

    def train(*args, **kwargs):
        out = real_train(*args, **kwargs)
        if not holder.get(key_box["k"]):  # the other trial finishes during our first epoch
            holder.put(key_box["k"], {k: v for k, v in ref["history"][0].items() if k != "epoch"})
        return out

    monkeypatch.setattr(engine, "train_one_epoch", train)
    reports = []
    b = run_trial(cfg, {"lr": 0.01}, report=lambda m, d: reports.append(m))
    assert counter.calls == 5  # no base evaluation here: 2 epochs
    assert [r["epoch"] for r in reports] == [0, 1, 2]  # epoch 0 reported as soon as it is known
    assert reports[0]["base_metric"] == ref["base_metric"] == b["base_metric"]
    assert _strip(b["history"]) == _strip(ref["history"])  # epoch 0 row in its place, training unchanged


def test_trial_waits_at_its_first_report_for_the_holders_epoch_0(split, tmp_path, monkeypatch):
    """The holder stores the base metrics only after this trial evaluated its first trained epoch:
    the trial waits for them, so that epoch 0 is reported before epoch 1 (a scheduler may stop a
    trial at its first trained report, and it would never report epoch 0 then)."""
    shared = tmp_path / "base_eval"
    holder = BaseEvalCache(shared)
    real_key, real_eval, box = base_eval.model_key, engine.evaluate, {}

    def key(model, c, device):
        box["k"] = real_key(model, c, device)
        assert holder.claim(box["k"]) is True  # "the other trial" is evaluating it
        return box["k"]

    def evaluate(*args, **kwargs):  # this trial's epoch-1 evaluation: the holder stores 1 s later
        out = real_eval(*args, **kwargs)
        if "timer" not in box:
            box["timer"] = threading.Timer(1.0, lambda: holder.put(box["k"], {"map": 0.25, "map50": 0.5}))
            box["timer"].start()
        return out

    monkeypatch.setattr(base_eval, "model_key", key)
    monkeypatch.setattr(engine, "evaluate", evaluate)
    reports = []
    got = run_trial(
        _cfg(split, tmp_path / "w", base_eval_dir=shared), {"lr": 0.01}, report=lambda m, d: reports.append(m)
    )
    assert [r["epoch"] for r in reports] == [0, 1, 2]
    assert reports[0]["map"] == 0.25 and got["base_metric"] == reports[0]["base_metric"] == 0.25
    assert [r["epoch"] for r in got["history"]] == [0, 1, 2]


def test_holder_that_fails_releases_the_lock(split, tmp_path, monkeypatch):
    shared = tmp_path / "base_eval"

    def boom(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(engine, "evaluate", boom)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run_trial(_cfg(split, tmp_path / "a", base_eval_dir=shared, epochs=1), {"lr": 0.01})
    assert not list(shared.glob("*.lock")) and not list(shared.glob("*.json"))


def test_claiming_trial_that_diverges_still_reports_and_stores_the_base(split, tmp_path):
    shared = tmp_path / "base_eval"
    reports = []
    got = run_trial(
        _cfg(split, tmp_path / "a", base_eval_dir=shared), {"lr": 1e20}, report=lambda m, d: reports.append(m)
    )
    assert got["status"] == "diverged"
    assert [r["epoch"] for r in reports] == [0, 1] and reports[1]["diverged"] == 1
    stored = BaseEvalCache(shared).get(next(shared.glob("*.json")).stem)
    assert stored["map"] == reports[0]["map"] == got["base_metric"]  # the starting weights, not the NaNs
    assert not list(shared.glob("*.lock"))


# --- a holder that dies -------------------------------------------------------------------------
def test_heartbeat_keeps_a_live_claim_fresh_and_stops_with_it(tmp_path, monkeypatch):
    monkeypatch.setattr(base_eval, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(base_eval, "STALE_AFTER_S", 1.5)
    folder = tmp_path / "be"
    cache = BaseEvalCache(folder)
    assert cache.claim("k") is True
    claimed = json.loads((folder / "k.lock").read_text())["time"]
    time.sleep(2.0)  # longer than STALE_AFTER_S: only the heartbeat keeps it fresh
    assert json.loads((folder / "k.lock").read_text())["time"] > claimed + 1.5
    assert not cache._stale(folder / "k.lock")
    cache.release("k")
    time.sleep(0.3)
    assert not (folder / "k.lock").exists()  # released, and no heartbeat wrote it back
    assert sorted(p.name for p in folder.iterdir()) == []  # no heartbeat temp file left

    # a claim whose thread ended without put or release (an abandoned trial thread) goes stale
    other = BaseEvalCache(folder)
    t = threading.Thread(target=lambda: other.claim("j"))
    t.start()
    t.join()
    written = json.loads((folder / "j.lock").read_text())["time"]
    assert cache.claim("j") is False  # fresh, and this (live) process holds it
    time.sleep(1.8)
    assert json.loads((folder / "j.lock").read_text())["time"] == written  # no beats after the thread
    assert cache.claim("j") is True  # older than STALE_AFTER_S: taken over though the pid lives


def _hold_lock(shared, key: str) -> subprocess.Popen:
    """A live process on this host holding ``key``'s lock, as a concurrent trial would."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    shared.mkdir(parents=True, exist_ok=True)
    lock = {"host": socket.gethostname(), "pid": holder.pid, "time": time.time()}
    (shared / f"{key}.lock").write_text(json.dumps(lock))
    return holder


def _holder_dies_in_training(monkeypatch, box: dict) -> None:
    """``box["holder"]`` (a :func:`_hold_lock` process) is killed at the end of each training epoch."""
    real_train = engine.train_one_epoch

    def train(*args, **kwargs):
        out = real_train(*args, **kwargs)
        box["holder"].kill()
        box["holder"].wait()
        return out

    monkeypatch.setattr(engine, "train_one_epoch", train)


def test_trial_evaluates_the_base_itself_when_the_holder_dies(split, tmp_path, monkeypatch):
    """The holder dies during this trial's first epoch: at its first report the trial claims the
    key, rebuilds its starting weights (same key), evaluates them and stores the result; its
    training trajectory is the same as a trial's that never shared."""
    shared = tmp_path / "base_eval"
    ref = run_trial(_cfg(split, tmp_path / "ref", epochs=3), {"lr": 0.01})
    counter = _Counting(monkeypatch)
    real_key, box = base_eval.model_key, {}

    def key(model, c, device):
        k = real_key(model, c, device)
        if "holder" not in box:  # the first call: the trial's own model, before training
            box["holder"] = _hold_lock(shared, k)
        return k

    monkeypatch.setattr(base_eval, "model_key", key)
    _holder_dies_in_training(monkeypatch, box)  # during this trial's first epoch
    reports = []
    try:
        got = run_trial(
            _cfg(split, tmp_path / "b", base_eval_dir=shared, epochs=3),
            {"lr": 0.01},
            report=lambda m, d: reports.append(m),
        )
    finally:
        box["holder"].kill()
    assert [r["epoch"] for r in reports] == [0, 1, 2, 3]  # epoch 0 evaluated here, reported first
    assert counter.calls == 4  # 3 epochs and the base, once
    assert reports[0]["base_metric"] == ref["base_metric"] == got["base_metric"] is not None
    assert _strip(got["history"]) == _strip(ref["history"])  # the rebuild drew no training randomness
    (stored,) = shared.glob("*.json")
    assert BaseEvalCache(shared).get(stored.stem)["map"] == ref["history"][0]["map"]
    assert not list(shared.glob("*.lock"))


@pytest.mark.parametrize("failure", ["differs", "raises"])
def test_rebuild_that_differs_or_fails_is_not_evaluated(split, tmp_path, monkeypatch, failure):
    """The holder dies during the last epoch; the takeover's rebuild has another key (as if the
    build were not reproducible) or raises: the trial ends normally, without epoch-0 metrics rather
    than wrong ones, and releases the key it claimed."""
    shared = tmp_path / "base_eval"
    counter = _Counting(monkeypatch)
    real_key, box = base_eval.model_key, {}

    def key(model, c, device):
        if "holder" in box:
            if failure == "raises":
                raise OSError("the weights file went away")
            return "not-" + real_key(model, c, device)
        k = real_key(model, c, device)
        box["holder"] = _hold_lock(shared, k)
        return k

    monkeypatch.setattr(base_eval, "model_key", key)
    _holder_dies_in_training(monkeypatch, box)  # during the trial's (last) epoch
    try:
        got = run_trial(_cfg(split, tmp_path / "b", base_eval_dir=shared, epochs=1), {"lr": 0.01})
    finally:
        box["holder"].kill()
    assert got["status"] == "ok" and got["base_metric"] is None  # no wrong base metric
    assert counter.calls == 1 and [r["epoch"] for r in got["history"]] == [1]  # the epoch only
    assert not list(shared.glob("*.lock")) and not list(shared.glob("*.json"))


def test_trial_that_diverges_while_another_evaluates_waits_for_epoch_0(split, tmp_path, monkeypatch):
    """The lock is held by "another trial" that stores the base metrics only after a while; a trial
    that diverges at once still reports epoch 0 (waiting for it) before its diverged row."""
    import threading

    shared = tmp_path / "base_eval"
    holder = BaseEvalCache(shared)
    key_box = {}
    real_key = base_eval.model_key

    def key(model, c, device):
        key_box["k"] = real_key(model, c, device)
        assert holder.claim(key_box["k"]) is True
        threading.Timer(3.0, lambda: holder.put(key_box["k"], {"map": 0.25, "map50": 0.5})).start()
        return key_box["k"]

    monkeypatch.setattr(base_eval, "model_key", key)
    reports = []
    got = run_trial(
        _cfg(split, tmp_path / "d", base_eval_dir=shared), {"lr": 1e20}, report=lambda m, d: reports.append(m)
    )
    assert got["status"] == "diverged"
    assert [r["epoch"] for r in reports] == [0, 1] and reports[1]["diverged"] == 1
    assert reports[0]["map"] == 0.25 and reports[0]["base_metric"] == got["base_metric"]


def test_a_lock_taken_over_meanwhile_stays_with_its_new_holder(tmp_path, monkeypatch):
    """Two trials judged the same dead holder's lock stale; the second then deleted the lock the
    first had just taken and claimed it too: both ran the base evaluation."""
    folder = tmp_path / "be"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = folder / "k.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "time": time.time()}))
    first, second = BaseEvalCache(folder), BaseEvalCache(folder)
    judged = BaseEvalCache._stale

    def stale_then_taken(self, path):
        verdict = judged(self, path)  # stale: the holder is dead
        monkeypatch.setattr(BaseEvalCache, "_stale", judged)
        assert first.claim("k") is True  # the other trial takes it over in between
        return verdict

    monkeypatch.setattr(BaseEvalCache, "_stale", stale_then_taken)
    assert second.claim("k") is False
    assert json.loads(lock.read_text())["pid"] == os.getpid() and sorted(os.listdir(folder)) == ["k.lock"]
