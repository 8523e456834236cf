"""``launch``/``resume``/``--dry-run``: a study as a Ray Tune run with Optuna proposals.

One trial = :func:`train_trial` (a Ray function trainable) calling
``trainables.trial.run_trial``; its ``report`` goes to ``ray.tune.report`` with the epoch's
``latest.pt`` as a Ray checkpoint (one file, ``model.pt``). Ray keeps each trial's best checkpoint
(by the objective) and its latest (for resume). The experiment folder is
``<output_dir>/<name>/`` (DESIGN.md): Ray's storage, ``spec.yaml``, ``space.json``,
``optuna.journal``, ``study.json``.

Assumptions: the driver and every Ray node import the same ``search``/``trainables`` code and
see the spec's data at the same absolute paths; on a multi-node cluster ``output_dir`` is a shared
mount (checked before any trial starts). Errors are raised, never ``sys.exit``: the CLI picks exit
codes (:class:`ClusterError` is a user error).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from ray.tune.stopper import Stopper

from search import study as S
from search import tracking
from search.errors import SpecError, short
from search.guards import StudyLock
from search.schedulers import make_scheduler
from search.spec import MAX_NAME, NAME, Spec, build_spec, check_weights

log = logging.getLogger(__name__)

SHARED_FS = (
    "nfs",
    "nfs4",
    "cifs",
    "smb",
    "smb2",
    "smb3",
    "smbfs",
    "lustre",
    "gpfs",
    "beegfs",
    "ceph",
    "glusterfs",
    "9p",
    "virtiofs",
)
TEST_FAIL_ENV = "SEARCH_TEST_FAIL_WHEN"  # test hook: "param>value" / "param<value" / "param=value"


class ClusterError(Exception):
    """The cluster cannot run this study as configured (unreachable address, local-only storage on
    a multi-node cluster). A user error: the CLI exits 2."""


class TrialError(RuntimeError):
    """A retry of a trial whose own code raised: not run again (it would fail the same way)."""


ERROR_MARK = ".trial_error"  # in <exp>/trial_<id>/: the error a trial's own code raised


class ExperimentExists(Exception):
    """``launch`` into a folder that already holds a study (use ``resume`` or ``--name``)."""


# ---------------------------------------------------------------- the trial (runs in a Ray worker)


def _fail_hook(rule: str | None, params: dict[str, Any]) -> bool:
    """Whether the test hook rule (``lr>0.05``) matches these params."""
    if not rule:
        return False
    for op in (">", "<", "="):
        if op in rule:
            name, _, raw = rule.partition(op)
            if name.strip() not in params:
                return False
            have, want = params[name.strip()], yaml.safe_load(raw.strip())
            try:
                return {">": have > want, "<": have < want, "=": have == want}[op]
            except TypeError:
                return False
    return False


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """Report-safe metrics: numbers, strings, and dicts of numbers (Ray flattens dicts)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values()):
            out[k] = dict(v)
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def train_trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """Ray function trainable: one trial of ``setup["trial_config"]`` with ``config`` as params.

    Works in the trial's local working directory; each epoch's ``latest.pt`` is handed to Ray as
    the checkpoint (Ray copies it to the experiment folder). A diverged trial returns normally.
    ``search.max_failures`` retries are for a worker that died (killed, out of memory, node lost):
    an exception raised by the trial itself is written to ``<exp>/trial_<id>/.trial_error``, and
    Ray's retry of that trial raises :class:`TrialError` at once instead of training again.
    """
    import ray
    import torch
    from ray import tune

    from trainables import params as P
    from trainables.trial import run_trial

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # "Checkpoint successfully created" per epoch
    threads = max(1, int(setup["cpu"]))
    torch.set_num_threads(threads)
    work = Path(os.getcwd()) / "trial"
    cfg = dataclasses.replace(setup["trial_config"], out_dir=work, threads=threads)
    params = P.resolve(dict(config))
    node_id = ray.get_runtime_context().get_node_id()
    fail = _fail_hook(setup.get("fail_when"), params)
    mark = None
    if setup.get("exp_dir"):
        mark = Path(setup["exp_dir"]) / f"trial_{tune.get_context().get_trial_id()}" / ERROR_MARK
        if mark.is_file():
            raise TrialError(f"not retried (retries are for workers that died): {mark.read_text().strip()}")

    resume_from = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        local = work.parent / "resume"
        shutil.rmtree(local, ignore_errors=True)
        checkpoint.to_directory(str(local))
        resume_from = local / S.MODEL_FILE

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        out = _scalars(metrics)
        out["node_id"] = node_id
        if fail and out.get("epoch", 0) >= 1:
            raise RuntimeError(f"{TEST_FAIL_ENV} matched {setup['fail_when']!r} (test hook)")
        if checkpoint_dir is None:
            tune.report(out)
            return
        stage = work.parent / "persist" / f"epoch_{int(out.get('epoch', 0)):04d}"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        _link_or_copy(Path(checkpoint_dir) / "latest.pt", stage / S.MODEL_FILE)
        tune.report(out, checkpoint=tune.Checkpoint.from_directory(str(stage)))
        shutil.rmtree(stage, ignore_errors=True)  # Ray has copied it to storage

    try:
        result = run_trial(cfg, params, report=report, resume_from=resume_from)  # metrics went through report
    except Exception as exc:
        if mark is not None and not type(exc).__module__.startswith("ray"):
            mark.parent.mkdir(parents=True, exist_ok=True)
            S.atomic_write_text(mark, f"{type(exc).__name__}: {' '.join(str(exc).split())[:1000]}")
        raise
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.info("trial finished: %s", result.get("status"))


# ---------------------------------------------------------------- budgets and schedulers


class BudgetStopper(Stopper):
    """Ray stopper for the time budget: after ``deadline`` each running trial stops at its next
    report (right after its epoch checkpoint); the searcher starts no new trial."""

    def __init__(self, deadline: float | None):
        self.deadline = deadline

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return self.deadline is not None and time.time() >= self.deadline

    def stop_all(self) -> bool:
        return False


def make_searcher(spec: Spec, exp_dir: Path, deadline: float | None):
    from search.searcher import StudySearch, journal_storage, make_sampler

    s, space = spec.search, spec.search_space
    grid = space.grid() if s.algorithm == "grid" else None
    sampler = make_sampler(s.algorithm, s.seed, s.num_trials, s.n_startup_trials, grid)
    storage = journal_storage(exp_dir / S.JOURNAL_FILE)
    return StudySearch(
        space=space.define_by_run,
        metric=spec.objective.metric,
        mode=spec.objective.mode,
        sampler=sampler,
        study_name=spec.name,
        storage=storage,
        epochs=spec.train.epochs,
        deadline=deadline,
    )


def num_samples(spec: Spec) -> int:
    """num_trials, capped at the grid size for grid search."""
    if spec.search.algorithm == "grid":
        from search.searcher import grid_size

        return min(spec.search.num_trials, grid_size(spec.search_space.grid()))
    return spec.search.num_trials


# ---------------------------------------------------------------- cluster and storage


def _check_reachable(address: str, timeout: float = 3.0, key: str = "--address") -> None:
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"{key} {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379, or auto).")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            speaks_grpc = _speaks_http2(sock, timeout)
    except OSError as exc:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}). Start it "
            f"with 'ray start --head --port {port}' or fix --address/resources.address."
        ) from None
    if not speaks_grpc:
        raise ClusterError(
            f"{key} {address!r} accepts connections but is not a Ray head node (its GCS speaks gRPC, this "
            f"port does not). Point it at the head's GCS port ('ray start --head' prints it; default 6379)."
        )


_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _speaks_http2(sock: socket.socket, timeout: float) -> bool:
    """Whether the peer answers an HTTP/2 client preface with a SETTINGS frame, as every gRPC
    server (Ray's GCS) does; a server of another protocol answers otherwise, closes, or stays
    silent until ``timeout``."""
    sock.settimeout(timeout)
    try:
        sock.sendall(_HTTP2_PREFACE)
        head = b""
        while len(head) < 9:
            chunk = sock.recv(9 - len(head))
            if not chunk:
                return False
            head += chunk
    except OSError:
        return False
    return head[3] == 0x04  # frame type SETTINGS


def preflight(spec: Spec, address: str | None, weights: bool = True) -> None:
    """Checks run before Ray starts or anything is written, cheapest first: the Ray address
    answers (:class:`ClusterError`); the base weights load with ``weights_only`` and fit the model
    (:class:`SpecError`); the MLflow store answers (SpecError on ``tracking.uri``). The store check
    comes last because for SQLite it creates the folder of ``mlflow.db``."""
    if address or spec.resources.address:
        key = "--address" if address else "resources.address"
        _check_reachable(address or spec.resources.address, key=key)
    if weights and (spec.model.weights or spec.model.weights_backbone):
        check_weights(spec)
    tracking.check_tracking(spec)


def connect(address: str | None) -> bool:
    """``ray.init``: join ``address`` (an existing cluster) or start a local one. Returns whether
    this call started Ray (the caller then shuts it down)."""
    import ray

    quiet()
    if address:
        _check_reachable(address)
    if ray.is_initialized():  # e.g. a test's or a notebook's Ray: use it as it is
        return False
    if address:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        except (ConnectionError, RuntimeError, TimeoutError) as exc:
            why = " ".join(str(exc).split())[:300]
            raise ClusterError(f"cannot join the Ray cluster at {address}: {why}") from None
        return True
    ray.init(logging_level=logging.WARNING, include_dashboard=False)
    return True


def quiet() -> None:
    """Ray's own progress table and repeated warnings off (the launcher prints its own)."""
    import optuna

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def trial_dirname(trial: Any) -> str:
    """Short trial folder names: ``trial_<id>``."""
    return f"trial_{trial.trial_id}"


def mount_fstype(path: Path) -> str | None:
    """The filesystem type of the mount holding ``path`` (from /proc/mounts), or None."""
    path = Path(os.path.realpath(path))
    best, fstype = "", None
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, fstype = mnt, parts[2]
    return fstype


def is_shared_storage(path: str | Path) -> bool:
    """s3://, gs://, or a network/cluster filesystem mount; ``SEARCH_SHARED_STORAGE=1`` asserts it."""
    text = str(path)
    if "://" in text and not text.startswith("file://"):
        return True
    if os.environ.get("SEARCH_SHARED_STORAGE") == "1":
        return True
    fstype = mount_fstype(Path(text))
    return bool(fstype) and (fstype in SHARED_FS or fstype.startswith("fuse."))


def check_cluster_storage(exp_dir: Path) -> dict[str, Any]:
    """Raise :class:`ClusterError` when the cluster has nodes on other hosts and ``exp_dir`` is
    local-only. Returns {"nodes", "hosts"} for the summary."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.util.get_node_ip_address()
    hosts = sorted({n.get("NodeManagerAddress") for n in nodes})
    others = [h for h in hosts if h != here]
    if others and not is_shared_storage(exp_dir):
        raise ClusterError(
            f"the Ray cluster has nodes on other hosts ({', '.join(others)}) but the experiment folder "
            f"{exp_dir} is on a local filesystem ({mount_fstype(exp_dir)}): trials there could not write "
            "checkpoints the driver reads. Set output_dir to a shared mount (NFS, Lustre, GPFS, CIFS, a FUSE "
            "bucket mount) mounted at the same path on every node, or set SEARCH_SHARED_STORAGE=1 if it is "
            "shared."
        )
    return {"nodes": len(nodes), "hosts": hosts}


# ---------------------------------------------------------------- experiment folder


def experiment_dir(spec: Spec) -> Path:
    return Path(spec.output_dir).resolve() / spec.name


def resume_command(exp_dir: Path) -> str:
    return f"python -m search resume {exp_dir}"


def write_spec(spec: Spec, exp_dir: Path) -> None:
    # Only what differs from the defaults: the reloaded spec then sees the keys the user set
    # (model_fields_set), as the original did.
    raw = spec.model_dump(mode="json", exclude_defaults=True)
    S.atomic_write_text(exp_dir / S.SPEC_FILE, yaml.safe_dump(raw, sort_keys=False))
    space = json.dumps(spec.search_space.describe(), indent=1, default=str)
    S.atomic_write_text(exp_dir / S.SPACE_FILE, space)


def read_spec(exp_dir: Path) -> Spec:
    """The spec saved in an experiment folder (paths in it are absolute)."""
    from search.spec import read_yaml

    return build_spec(read_yaml(exp_dir / S.SPEC_FILE), exp_dir, source=exp_dir / S.SPEC_FILE)


def _tracking_callbacks(spec: Spec, exp_dir: Path, resume: bool) -> list:
    """The MLflow callback (none when ``SEARCH_NO_MLFLOW=1``)."""
    cb = tracking.make_callback(spec, exp_dir, resume)
    return [] if cb is None else [cb]


def _trainable(spec: Spec, exp_dir: Path | None = None):
    from ray import tune

    cfg = spec.trial_config(out_dir=Path("."), threads=max(1, int(spec.resources.cpu)))
    if exp_dir is not None:
        cfg = dataclasses.replace(cfg, base_eval_dir=Path(exp_dir) / S.BASE_EVAL_DIR)
    setup = {
        "trial_config": cfg,
        "cpu": spec.resources.cpu,
        "fail_when": os.environ.get(TEST_FAIL_ENV),
        "exp_dir": str(exp_dir) if exp_dir is not None else None,
    }
    fn = tune.with_parameters(train_trial, setup=setup)
    return tune.with_resources(fn, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})


def _key_params(spec: Spec) -> list[str]:
    return [d.name for d in spec.search_space.searched]


def _callbacks(spec: Spec, exp_dir: Path, resume: bool, previous: dict | None, extra: Iterable) -> list:
    from search.progress import Progress, StudyState

    state = StudyState(
        exp_dir, spec.name, spec.objective.metric, spec.objective.mode, spec.train.epochs, previous
    )
    progress = Progress(state, num_samples(spec), _key_params(spec))
    return [state, progress, *_tracking_callbacks(spec, exp_dir, resume), *extra]


# ---------------------------------------------------------------- launch / resume


def launch(
    spec: Spec,
    *,
    name: str | None = None,
    address: str | None = None,
    extra_callbacks: Iterable = (),
    keep_top: int | None = None,
) -> dict[str, Any]:
    """Run a study; returns the summary (see :func:`summarize`). ``interrupted`` in the summary
    means Ctrl-C stopped it (state saved; resume with the printed command)."""
    from ray import tune

    if name:
        if not NAME.fullmatch(name) or len(name) > MAX_NAME:
            raise SpecError(
                "--name",
                f"must be at most {MAX_NAME} letters, digits, '_', '-' or '.', starting with a letter or "
                f"digit, but got {short(name)}.",
                "choose another experiment name.",
            )
        spec.name = name
    exp_dir = experiment_dir(spec)
    _refuse_existing(exp_dir)
    preflight(spec, address, weights=True)  # bad input fails before Ray starts or anything is written
    lock = StudyLock(exp_dir).acquire()  # one writer per study folder (exit 2 names the holder)
    started = False
    try:
        _refuse_existing(exp_dir)  # again under the lock: another launch may have won the race
        tracking.warm_up(spec)  # MLflow's import and store creation overlap ray.init
        started = connect(address or spec.resources.address)
        cluster = check_cluster_storage(exp_dir.parent)
        write_spec(spec, exp_dir)
        budget = spec.search.time_budget
        deadline = time.time() + budget if budget else None
        searcher = make_searcher(spec, exp_dir, deadline)
        reference = spec.reference_params()
        if reference is not None:
            searcher.enqueue_reference(reference)
        scheduler = make_scheduler(spec)
        callbacks = _callbacks(spec, exp_dir, False, None, extra_callbacks)
        state = callbacks[0]
        state.searcher, state.scheduler, state.deadline = searcher, scheduler, deadline
        state.state["reference_params"] = reference
        state.state["budget_s"] = budget
        state.state["num_trials"] = num_samples(spec)
        state.save()
        _print_header(spec, exp_dir, cluster)
        tuner = tune.Tuner(
            _trainable(spec, exp_dir),
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=scheduler,
                metric=spec.objective.metric,
                mode=spec.objective.mode,
                num_samples=num_samples(spec),
                max_concurrent_trials=spec.search.max_concurrent,
                reuse_actors=True,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=_run_config(spec, exp_dir, callbacks, deadline),
        )
        return _fit(tuner, spec, exp_dir, state, searcher, keep_top)
    finally:
        if started:
            _shutdown()
        lock.release(
            cleanup=not (exp_dir / S.SPEC_FILE).exists()
        )  # a launch that wrote nothing leaves nothing


def _refuse_existing(exp_dir: Path) -> None:
    if (exp_dir / S.STUDY_FILE).exists() or (exp_dir / "tuner.pkl").exists():
        raise ExperimentExists(
            f"experiment folder {exp_dir} already holds a study. Resume it with "
            f"'{resume_command(exp_dir)}', or launch with --name NEW_NAME."
        )


def resume(
    exp_dir: Path,
    *,
    restart_errored: bool = False,
    address: str | None = None,
    extra_callbacks: Iterable = (),
    keep_top: int | None = None,
) -> dict[str, Any]:
    """Continue a study: ``Tuner.restore`` (unfinished trials from their checkpoints, pending ones
    run, the searcher keeps its place); errored trials restart only with ``restart_errored``."""
    from ray import tune

    exp_dir = Path(exp_dir).resolve()
    if not (exp_dir / "tuner.pkl").is_file():
        raise FileNotFoundError(f"{exp_dir} holds no Ray experiment state (tuner.pkl): nothing to resume.")
    spec = read_spec(exp_dir)
    previous = S.read_study(exp_dir) or None
    if previous and restart_errored:  # Ray reruns them as new trials (new ids, same config)
        errored = [k for k, t in previous["trials"].items() if t.get("failure") == S.ERROR]
        previous.setdefault("restarted_errored", []).extend(previous["trials"].pop(k) for k in errored)
    if restart_errored:  # asked for: the trials' own errors no longer block their retries
        for mark in exp_dir.glob(f"trial_*/{ERROR_MARK}"):
            mark.unlink(missing_ok=True)
    preflight(spec, address, weights=False)
    lock = StudyLock(exp_dir).acquire()
    started = False
    try:
        tracking.warm_up(spec)
        started = connect(address or spec.resources.address)
        cluster = check_cluster_storage(exp_dir.parent)
        budget = spec.search.time_budget
        elapsed = float((previous or {}).get("elapsed_s") or 0.0)
        deadline = time.time() + max(0.0, budget - elapsed) if budget else None
        tuner = tune.Tuner.restore(
            str(exp_dir),
            trainable=_trainable(spec, exp_dir),
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=restart_errored,
        )
        local = tuner._local_tuner  # the restored TunerInternal: swap in this run's callbacks/stopper
        searcher = local._tune_config.search_alg
        searcher.deadline = deadline
        callbacks = _callbacks(spec, exp_dir, True, previous, extra_callbacks)
        state = callbacks[0]
        state.searcher, state.deadline = searcher, deadline
        state.scheduler = local._tune_config.scheduler
        run_config = local.get_run_config()
        run_config.callbacks = callbacks
        run_config.stop = BudgetStopper(deadline)
        state.state["resumed"] = int(state.state.get("resumed") or 0) + 1
        state.save()
        _print_header(spec, exp_dir, cluster, resumed=True)
        return _fit(tuner, spec, exp_dir, state, searcher, keep_top)
    finally:
        if started:
            _shutdown()
        lock.release()


def _run_config(spec: Spec, exp_dir: Path, callbacks: list, deadline: float | None):
    from ray import tune

    return tune.RunConfig(
        name=exp_dir.name,
        storage_path=str(exp_dir.parent),
        callbacks=callbacks,
        stop=BudgetStopper(deadline),
        verbose=0,
        # num_to_keep=1 with a score: Ray keeps the best checkpoint and, always, the latest one
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=1,
            checkpoint_score_attribute=spec.objective.metric,
            checkpoint_score_order=spec.objective.mode,
        ),
        failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
    )


def _shutdown() -> None:
    import ray

    try:
        ray.shutdown()
    except Exception:  # noqa: BLE001 - best effort at exit
        pass


def _fit(tuner, spec: Spec, exp_dir: Path, state, searcher, keep_top: int | None) -> dict[str, Any]:
    try:
        tuner.fit()
    except KeyboardInterrupt:  # a second Ctrl-C: Ray stops at once; the last checkpoints remain
        state.finish("interrupted")
        print(
            f"\nstopped immediately. Resume with:\n  {resume_command(exp_dir)}", file=sys.stderr, flush=True
        )
        raise
    trials = state.state["trials"]
    unfinished = [t for t in trials.values() if t["state"] not in S.FINISHED_STATES]
    budget_hit = searcher.deadline is not None and time.time() >= searcher.deadline
    interrupted = bool(unfinished) or (len(trials) < num_samples(spec) and not budget_hit)
    state.state["budget_reached"] = budget_hit
    state.finish("interrupted" if interrupted else "finished")
    if keep_top is not None and not interrupted:
        removed = remove_outside_top(exp_dir, keep_top)
        if removed:
            state.save()
    summary = summarize(exp_dir)
    summary["mlflow"] = mlflow_hint(spec)
    summary["interrupted"] = interrupted
    summary["budget_reached"] = budget_hit
    print_summary(summary, spec)
    return summary


# ---------------------------------------------------------------- summary and cleanup


def summarize(exp_dir: Path) -> dict[str, Any]:
    """The ``status --json`` object plus counts and the MLflow hint."""
    out = S.status_object(exp_dir)
    counts: dict[str, int] = {}
    for t in out["trials"]:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    out["counts"] = counts
    out["experiment_dir"] = str(exp_dir)
    return out


def mlflow_hint(spec: Spec) -> str:
    """How to open the study's MLflow records."""
    uri = tracking.tracking_uri(spec)
    if uri.split(":", 1)[0].lower() in ("http", "https"):
        return f"open {uri} (experiment {spec.tracking.experiment or spec.name})"
    return f"python -m search ui {experiment_dir(spec)}"


def print_summary(summary: dict[str, Any], spec: Spec | None = None) -> None:
    exp_dir = summary["experiment_dir"]
    print("", flush=True)
    print(
        f"study {summary['name']}: {summary['status']}, {S.count_text(summary['counts'])}"
        + (" (time budget reached)" if summary.get("budget_reached") else "")
    )
    print(f"{'trial':<13} {'state':<10} {'epochs':>6} {'best':>9}  {'disk':>9}  checkpoint")
    for t in summary["trials"]:
        best = t.get("best_metric")
        print(
            f"{t['id']:<13} {t['state']:<10} {t.get('epochs', 0):>6} "
            f"{(f'{best:.4f}' if isinstance(best, (int, float)) else '-'):>9}  "
            f"{S.human_bytes(t.get('disk_bytes')):>9}  {t.get('checkpoint') or '-'}"
            + (f"  [{t['error']}]" if t.get("error") else "")
        )
    best, base = summary.get("best"), summary.get("base_metric")
    metric = summary["metric"]
    if best:
        delta = ""
        if isinstance(base, (int, float)) and isinstance(best["best_metric"], (int, float)):
            delta = f" vs base model (epoch 0) {base:.4f} ({best['best_metric'] - base:+.4f})"
        print(
            f"best trial: {best['id']} {metric}={best['best_metric']:.4f} at epoch "
            f"{best.get('best_epoch')}{delta}"
        )
        ref = S.reference_text(summary.get("reference"), metric)
        if ref:
            print(f"  {ref}")
        print(f"  params: {json.dumps(best.get('params', {}), default=str)}")
        print(f"  checkpoint: {best.get('checkpoint')}")
    else:
        print("no trial produced a result.")
    print(f"status: python -m search status {exp_dir}")
    print(f"MLflow: {summary['mlflow']}")
    if summary.get("interrupted"):
        print(f"\ninterrupted: state saved. Resume with:\n  {resume_command(Path(exp_dir))}", flush=True)


def remove_outside_top(exp_dir: Path, k: int) -> list[str]:
    """Delete the Ray checkpoints of every trial outside the top ``k`` (by best metric); the
    trials' records stay. Returns the removed trial ids."""
    state = S.read_study(exp_dir)
    mode = state.get("mode", "max")
    keep = {t["id"] for t in S.ranked(list(state.get("trials", {}).values()), mode)[: max(0, k)]}
    removed = []
    for t in state.get("trials", {}).values():
        if t["id"] in keep or not t.get("trial_dir"):
            continue
        trial_dir = Path(t["trial_dir"])
        gone = False
        for ckpt in trial_dir.glob("checkpoint_*"):
            shutil.rmtree(ckpt, ignore_errors=True)
            gone = True
        if gone or t.get("checkpoint"):
            t["checkpoint"] = t["latest_checkpoint"] = None
            t["checkpoints_removed"] = True
            t["disk_bytes"] = S.dir_size(trial_dir)
            removed.append(t["id"])
    if removed:
        S.write_study(exp_dir, state)
    return removed


def _print_header(spec: Spec, exp_dir: Path, cluster: dict[str, Any], resumed: bool = False) -> None:
    s = spec.search
    what = "resuming" if resumed else "launching"
    budget = f", time budget {s.time_budget:.0f}s" if s.time_budget else ""
    print(
        f"{what} study {spec.name}: {s.algorithm} + {s.scheduler}, {num_samples(spec)} trials x "
        f"{spec.train.epochs} epochs, {s.max_concurrent} at a time ({spec.resources.cpu:g} CPU"
        f"{f', {spec.resources.gpu:g} GPU' if spec.resources.gpu else ''} each){budget}; "
        f"objective {spec.objective.metric} ({spec.objective.mode})",
        flush=True,
    )
    print(
        f"  experiment folder: {exp_dir}  (cluster: {cluster['nodes']} node(s) on {len(cluster['hosts'])} "
        f"host(s))",
        flush=True,
    )
    ref = spec.reference_params()
    if ref and not resumed:
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in ref.items())
        print(f"  trial 1 is the reference (torchvision's recipe for this architecture): {shown}", flush=True)


# ---------------------------------------------------------------- dry run


def dry_run(spec: Spec) -> dict[str, Any]:
    """Build every categorical branch's model and run one training batch and one evaluation batch
    (no Ray); returns the plan with a time estimate from the measured steps."""
    import torch

    from trainables import coco
    from trainables import params as P
    from trainables.trial import run_trial

    threads = max(1, int(spec.resources.cpu))
    torch.set_num_threads(threads)
    bs = spec.train.batch_size
    n_train = len(coco.load_coco(spec.data.train.annotations, spec.data.train.images, task=spec.task).images)
    n_val = len(coco.load_coco(spec.data.val.annotations, spec.data.val.images, task=spec.task).images)
    n_train = min(n_train, spec.train.limit_train or n_train)
    n_val = min(n_val, spec.train.limit_val or n_val)
    branches = []
    with tempfile.TemporaryDirectory(prefix="search-dry-") as tmp:
        for i, values in enumerate(spec.search_space.branch_configs()):
            cfg = dataclasses.replace(
                spec.trial_config(out_dir=Path(tmp) / str(i), threads=threads),
                epochs=1,
                limit_train=2 * bs,
                limit_val=bs,
                eval_base=True,
            )
            marks: list[tuple[float, dict]] = []

            def mark(metrics: dict, _dir: Any, marks: list = marks) -> None:
                marks.append((time.perf_counter(), metrics))

            t0 = time.perf_counter()
            result = run_trial(cfg, P.resolve(values), report=mark)
            total = time.perf_counter() - t0
            step_s = eval_s = None
            if len(marks) >= 2 and "epoch_seconds" in marks[1][1]:  # 2 steps, then eval of bs images
                step_s = float(marks[1][1]["epoch_seconds"]) / 2
                eval_s = max(0.0, (marks[1][0] - marks[0][0]) - 2 * step_s) / bs
            branches.append(
                {
                    "params": {k: v for k, v in values.items()},
                    "status": result.get("status"),
                    "trainable_params": result.get("trainable_params"),
                    "step_s": step_s,
                    "eval_s_per_image": eval_s,
                    "seconds": round(total, 2),
                }
            )
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
        "experiment_dir": str(experiment_dir(spec)),
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
    if plan["estimated_s"] is not None:
        print(
            f"estimate: {plan['trial_s'] / 60:.1f} min per full trial, about "
            f"{plan['estimated_s'] / 60:.1f} min for the study without early stopping (the scheduler stops "
            "some trials sooner)"
        )
    print(f"experiment folder: {plan['experiment_dir']}")
