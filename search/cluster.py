"""The Ray cluster a study runs on: the address check (a Ray head answers gRPC), ``ray.init``,
and the storage check (nodes on other hosts need a shared experiment folder)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from search import gcs_probe

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


class ClusterError(Exception):
    """The cluster cannot run this study as configured (unreachable address, local-only storage on
    a multi-node cluster). A user error: the CLI exits 2."""


def given_address(address: str | None, spec_address: str | None) -> tuple[str | None, str]:
    """The cluster a study joins and where it was named: ``--address``, else ``resources.address``,
    else ``RAY_ADDRESS`` (which ``ray.init`` would join anyway: a stale one hung the launch while it
    retried, SIGTERM blocked, as if it started its own Ray)."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if address:
        return address, "--address"
    if spec_address:
        return spec_address, "resources.address"
    return (env, "RAY_ADDRESS") if env and env != "local" else (None, "--address")


def check_reachable(address: str, timeout: float = 3.0, key: str = "--address") -> None:
    """The Ray head's GCS answers at ``address`` (HOST:PORT, or ``auto``: ``RAY_ADDRESS`` or the
    last ``ray start`` here); else a :class:`ClusterError` within seconds."""
    if address == "local":
        return
    if address == "auto":  # RAY_ADDRESS, else the last 'ray start' here, else ray.init looks further
        found = os.environ.get("RAY_ADDRESS", "").strip() or _last_started()
        if not found or found in ("auto", "local"):
            return
        address, key = found, f"{key} auto (RAY_ADDRESS or the last 'ray start')"
    scheme, sep, rest = address.partition("://")
    hostport = rest if sep else address
    if "@" in hostport:  # user:password@ is never echoed
        address = address.replace(hostport.rpartition("@")[0], "***")
        hostport = hostport.rpartition("@")[2]
    if sep and scheme.lower() in ("http", "https", "ray"):
        what = "a Ray Client address" if scheme.lower() == "ray" else "an HTTP address (the dashboard's)"
        raise ClusterError(
            f"{key} {address!r} is {what}; a study's driver joins the head's GCS. Run it on a node of the "
            "cluster with --address HOST:PORT (the port 'ray start --head' printed, default 6379) or auto."
        )
    host, _, port = hostport.rstrip("/").rpartition(":")
    bare = host.strip("[]")
    if not bare or not port.isdigit() or host != host.strip() or (":" in bare and not host.startswith("[")):
        raise ClusterError(f"{key} {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379, or auto).")
    try:
        with socket.create_connection((bare, int(port)), timeout=timeout) as sock:
            found = gcs_probe.probe(sock, f"{host}:{port}", timeout)
    except OSError as exc:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}). Start it "
            f"with 'ray start --head --port {port}' or fix {key.split(' ')[0]}."
        ) from None
    if found in (gcs_probe.OTHER, gcs_probe.GRPC):
        which = "its GCS speaks gRPC, this port does not"
        if found == gcs_probe.GRPC:
            which = "this port serves gRPC but not a GCS's calls: another Ray process's port?"
        raise ClusterError(
            f"{key} {address!r} accepts connections but is not a Ray head node ({which}). Point it at "
            "the head's GCS port ('ray start --head' prints it; default 6379)."
        )


def _last_started() -> str | None:
    """The GCS address of the last ``ray start`` on this machine (what ``ray.init("auto")`` joins)."""
    try:
        from ray._private.utils import read_ray_address

        return read_ray_address()
    except Exception:  # noqa: BLE001 - Ray's private helper moved: let ray.init decide
        return "auto"


# What a local Ray's longest socket path adds to its temp folder (and the driver's pid), and the
# bytes the OS allows (Ray's validate_socket_filepath).
_SOCKET_TAIL = "/ray/session_2026-12-07_08-19-08_833426_{pid}/sockets/plasma_store"
SOCKET_MAX = 103 if sys.platform == "darwin" else 107


def check_socket_room() -> None:
    """A local Ray's socket paths fit under its temp folder (``RAY_TMPDIR``, else ``TMPDIR``,
    else /tmp, as Ray picks it): a long one failed after the study folder was made, with Ray's
    "AF_UNIX path length cannot exceed 107 bytes" and no fix. Raises :class:`ClusterError`."""
    try:
        from ray._common.utils import get_default_system_temp_dir

        temp = get_default_system_temp_dir()
    except Exception:  # noqa: BLE001 - Ray's private helper moved: Ray's own error then
        return
    room = SOCKET_MAX - len(_SOCKET_TAIL.format(pid=os.getpid()))
    if len(os.fsencode(temp)) > room:
        key = "RAY_TMPDIR" if "RAY_TMPDIR" in os.environ else "TMPDIR"
        raise ClusterError(
            f"{key}={temp} is too long for a local Ray: its socket paths under it would pass the "
            f"{SOCKET_MAX} bytes the OS allows (the folder may be at most {room}). "
            "Fix: set RAY_TMPDIR to a short folder, e.g. RAY_TMPDIR=/tmp."
        )


def connect(address: str | None) -> bool:
    """``ray.init``: join ``address`` (an existing cluster) or start a local one. Returns whether
    this call started Ray (the caller then shuts it down)."""
    import ray

    quiet()
    if address:
        check_reachable(address)
    if ray.is_initialized():  # e.g. a test's or a notebook's Ray: use it as it is
        return False
    before = {sig: signal.getsignal(sig) for sig in stop_signals()}
    if address:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        except (ConnectionError, RuntimeError, TimeoutError) as exc:
            why = " ".join(str(exc).split())[:300]
            raise ClusterError(f"cannot join the Ray cluster at {address}: {why}") from None
        _catch_sigterm(before)
        return True
    try:
        with _sigterm_blocked():
            ray.init(logging_level=logging.WARNING, include_dashboard=False)
            _BLOCKED["node"] = getattr(ray._private.worker, "_global_node", None)
            _catch_sigterm(before)
    except KeyboardInterrupt:  # a SIGTERM held back while Ray started, delivered now: stop it again
        shutdown()
        raise
    return True


_BLOCKED: dict[str, Any] = {}  # "node": the local Ray node whose processes block SIGTERM


def stop_signals() -> tuple[int, ...]:
    """The signals that stop a study as Ctrl-C does: SIGTERM (``kill``, ``timeout``, a pod's
    deletion) and SIGHUP (the ssh session or terminal closed, which killed the launch at once:
    no state saved, no resume command), unless SIGHUP is ignored (``nohup``: the study goes on)."""
    hup = getattr(signal, "SIGHUP", None)
    ignored = hup is None or signal.getsignal(hup) == signal.SIG_IGN
    return (signal.SIGTERM,) if ignored else (signal.SIGTERM, hup)


def as_ctrl_c(*_: Any) -> None:
    """A SIGTERM or SIGHUP handler (:func:`stop_signals`): one Ctrl-C. Under Tune, its
    SIGINT handler stops the study gracefully; else (or with SIGINT ignored, a background job of
    a script) KeyboardInterrupt, which the CLI ends with exit 130."""
    if callable(signal.getsignal(signal.SIGINT)):
        signal.raise_signal(signal.SIGINT)
    else:
        raise KeyboardInterrupt


def _catch_sigterm(before: dict[int, Any]) -> None:
    """``ray.init`` made SIGTERM ``sys.exit(15)`` in the driver: from there to the study's run a
    SIGTERM ended the launch with exit 15 and Ray's C++ dump. It (and SIGHUP) is :func:`as_ctrl_c`
    until :func:`shutdown` puts ``before`` back."""
    if threading.current_thread() is threading.main_thread():
        for sig in before:
            signal.signal(sig, as_ctrl_c)
        _BLOCKED["sigterm"] = before


def shutdown() -> None:
    """``ray.shutdown``. Ray's local processes started by :func:`connect` block SIGTERM, so Ray's
    graceful stop (SIGTERM, then SIGKILL a second later, process by process) would wait 4 s for
    nothing: they are killed at once (their state is in memory; the study's is on disk)."""
    import ray

    before = _BLOCKED.pop("sigterm", {})
    node = _BLOCKED.pop("node", None)
    kill = getattr(node, "kill_all_processes", None)
    if node is not None and kill is not None and node is getattr(ray._private.worker, "_global_node", None):

        def at_once(check_alive: bool = True, allow_graceful: bool = False, wait: bool = False) -> None:
            roots = {p.process.pid for procs in getattr(node, "all_processes", {}).values() for p in procs}
            started_by_them = _descendants(roots)  # raylet's agents: they block SIGTERM too, and
            kill(check_alive=check_alive, allow_graceful=False, wait=wait)  # outlived it 1-2 min
            for pid in started_by_them:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

        node.kill_all_processes = at_once
    for sig in before:  # the study is over: a stop signal now killed the launch at its exit (143)
        signal.signal(sig, signal.SIG_IGN)
    try:
        ray.shutdown()
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _descendants(roots: set[int]) -> set[int]:
    """The processes under ``roots`` (Linux ``/proc``; none elsewhere)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            parent[int(stat.parent.name)] = int(text[text.rindex(")") + 2 :].split()[1])
    found, frontier = set(), set(roots)
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - found
        found |= frontier
    return found


@contextlib.contextmanager
def _sigterm_blocked() -> Iterator[None]:
    """SIGTERM blocked in this thread while it starts Ray's local processes, which inherit the
    mask, as Ray blocks SIGINT in them: a SIGTERM sent to every process of the launch (``timeout``
    signals its process group; systemd and Slurm a job's processes) reaches the launch alone,
    which stops the study gracefully, instead of also killing Ray's GCS and raylet under it
    (the launch then hung a minute and died, exit 1, without saving). :func:`shutdown` ends
    those processes with SIGKILL."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, set(stop_signals()))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def quiet() -> None:
    """Ray's own progress table and repeated warnings off (the launcher prints its own)."""
    import optuna

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if not sys.stderr.isatty():  # a log file or a pipe: no colour codes around Ray's prefixes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tune_log = logging.getLogger("ray.tune.tune")
    if not any(isinstance(f, _NoRayResumeHint) for f in tune_log.filters):
        tune_log.addFilter(_NoRayResumeHint())


class _NoRayResumeHint(logging.Filter):
    """Drop Ray's "Resume experiment with: Tuner.restore(...)" after Ctrl-C: the launcher prints
    the command that resumes a study (``python -m search resume ...``), Ray's would skip its
    checks and callbacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Resume experiment with" not in record.getMessage()


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


def check_cluster_storage(
    exp_dir: Path, nodes: list[dict[str, Any]] | None = None, here: str | None = None
) -> dict[str, Any]:
    """Raise :class:`ClusterError` when the cluster has nodes on other hosts and ``exp_dir`` is
    local-only. ``nodes`` (``ray.nodes()``'s shape) and ``here`` (this host's IP) default to the
    connected Ray cluster's. Returns {"nodes", "hosts"} for the summary."""
    if nodes is None or here is None:
        import ray

        nodes = ray.nodes() if nodes is None else nodes
        here = ray.util.get_node_ip_address() if here is None else here
    nodes = [n for n in nodes if n.get("Alive")]
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


def check_trial_fits(
    cpu: float, gpu: float, local: bool, nodes: list[dict[str, Any]] | None = None
) -> str | None:
    """One trial's request (``resources.cpu``/``resources.gpu``) against the alive nodes' totals
    (``ray.nodes()``'s shape). On a local cluster this tool started, no node will ever appear, so a
    request no node can hold raises :class:`ClusterError` (Ray would wait for ever, 0 trials
    running); on a cluster joined by address (an autoscaler may add nodes) it returns a warning."""
    if nodes is None:
        import ray

        nodes = ray.nodes()
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    if any(r.get("CPU", 0) >= cpu and r.get("GPU", 0) >= gpu for r in alive):
        return None
    have = ", ".join(f"{r.get('CPU', 0):g} CPU / {r.get('GPU', 0):g} GPU" for r in alive) or "none"
    what = f"a trial asks for {cpu:g} CPU and {gpu:g} GPU (resources.cpu, resources.gpu) but no node has that"
    if local:
        raise ClusterError(
            f"resources: {what} (this machine's Ray: {have}), so no trial could ever start. Fix: lower "
            "resources.gpu / resources.cpu, or launch with --address on a cluster that has them."
        )
    return f"warning: {what} yet (nodes: {have}); trials wait until the cluster adds such a node."


def check_local_room(resources: Any) -> None:
    """Before this process starts a local Ray: a trial no node of it could hold is refused with
    nothing started (the check on the connected cluster refused it after Ray had started and the
    study's store had been touched). The node's resources are Ray's own resolution (the CPUs of
    this container, the visible GPUs); where Ray's helper for it is not there, the check after
    ``ray.init`` still refuses."""
    import ray

    if ray.is_initialized():  # a test's or a notebook's Ray: checked as the connected cluster
        return
    try:
        from ray._private.resource_and_label_spec import ResourceAndLabelSpec

        node = ResourceAndLabelSpec().resolve(is_head=True, node_ip_address="127.0.0.1").to_resource_dict()
    except Exception:  # noqa: BLE001 - a private helper of Ray's; the later check stands
        return
    check_trial_fits(resources.cpu, resources.gpu, local=True, nodes=[{"Alive": True, "Resources": node}])


def fit_or_warn(resources: Any, local: bool) -> None:
    """:func:`check_trial_fits` of the spec's ``resources`` on the connected cluster, its warning
    printed to stderr."""
    import sys

    warning = check_trial_fits(resources.cpu, resources.gpu, local)
    if warning:
        print(warning, file=sys.stderr, flush=True)


def check_connected(resources: Any, address: str | None, started: bool, exp_dir: Path) -> dict[str, Any]:
    """The connected cluster's checks for a study in ``exp_dir``: storage every node can reach
    (:func:`check_cluster_storage`), a node that can hold a trial (:func:`fit_or_warn`: refused on
    a Ray this process started, a warning on a joined one). Returns the storage check's dict."""
    cluster = check_cluster_storage(exp_dir.parent)
    fit_or_warn(resources, local=started and not address)
    return cluster


def check_device(device: str) -> None:
    """``train.device`` against this machine's GPUs, for what runs here without Ray (``trial``,
    ``--dry-run``; a study's trials are checked by the spec, :func:`search.spec.checks.check_spec`).
    A :class:`~search.errors.SpecError` instead of the trial failing in torch."""
    from search.errors import SpecError

    if not device.startswith("cuda"):
        return
    index = int(device.partition(":")[2] or 0)
    import torch

    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= here:
        raise SpecError(
            "train.device",
            f"{device!r}, but torch sees {here} CUDA device(s) on this machine.",
            "use train.device auto (the GPU when there is one) or cpu.",
        )


@contextlib.contextmanager
def gcs_watch(
    again: str, before_exit: Any = None, every: float = 5.0, misses: int | None = None, gcs: str | None = None
) -> Iterator[None]:
    """While the study runs: Ray's GCS (the cluster's head, or the local Ray this launch started)
    answers at its address. When it went down, Ray's core worker ended the driver 60 s later with
    its own C++ text (exit 1, Ctrl-C ignored meanwhile) and no resume command. After ``misses``
    checks ``every`` seconds apart without an answer, this says what happened and the command
    that continues (``again``), runs ``before_exit`` (MLflow's queue to its pending file) and
    exits 1: the trials keep their last checkpoints, the study its signed state. ``misses``: 15 s
    worth, or, when ``RAY_gcs_rpc_server_reconnect_timeout_s`` raises Ray's own limit (GCS fault
    tolerance: the study outlives a head restart), 10 s less than it. ``SEARCH_GCS_WATCH=0``: off."""
    if os.environ.get("SEARCH_GCS_WATCH", "1") == "0":
        yield
        return
    if misses is None:
        limit = os.environ.get("RAY_gcs_rpc_server_reconnect_timeout_s", "")
        wait = max(15.0, float(limit) - 10.0) if limit.strip().isdigit() else 15.0
        misses = max(1, int(wait // every))
    if gcs is None:
        with contextlib.suppress(Exception):
            import ray

            gcs = ray._private.worker.global_worker.node.gcs_address
    if not gcs or ":" not in gcs:
        yield
        return
    host, _, port = gcs.rpartition(":")
    stop = threading.Event()

    def watch() -> None:
        missed = 0
        while not stop.wait(every):
            try:
                socket.create_connection((host.strip("[]"), int(port)), timeout=2.0).close()
                missed = 0
            except (ConnectionRefusedError, TimeoutError):
                missed += 1
            except OSError as exc:  # a name lookup, no file handle left: not the GCS's answer
                unreachable = exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNRESET)
                missed = missed + 1 if unreachable else missed
            if missed >= misses and not stop.is_set():
                print(
                    f"error: the Ray cluster's GCS at {gcs} stopped answering (its head node or Ray went "
                    f"down), so the study stopped; its trials keep their last checkpoints. Once the "
                    f"cluster is back, continue with: {again}",
                    file=sys.stderr,
                    flush=True,
                )
                with contextlib.suppress(Exception):
                    if before_exit is not None:
                        before_exit()
                os._exit(1)

    thread = threading.Thread(target=watch, name="gcs-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
