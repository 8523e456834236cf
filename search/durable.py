"""Ray's experiment state, saved before anything else records a change, and signed.

A study has four records that must agree after a crash: Ray's experiment state (what ``resume``
continues from: trials, their checkpoints, the searcher), ``study.json``, the Optuna journal and
MLflow. Ray saves its state every few seconds in a background thread, so a SIGKILL could leave
``study.json`` ahead of it: a running trial Ray has never heard of, whose configuration the restored
searcher then proposes again. Here the order is fixed instead:

1. :class:`DurableController` (Ray's ``TuneController`` with one change) saves and syncs its state
   synchronously, in the same loop step, whenever a trial was added or a callback asked
   (:meth:`Durability.request`);
2. after that step, :meth:`Durability.snapshot` copies the saved files into
   ``<exp>/.search-state/<generation>/`` with a manifest of their sha256, signed with HMAC-SHA256
   under a key only the user can read (``~/.config/search/state.key``, mode 0600), and points
   ``.search-state/current`` at it (atomic rename);
3. only then does ``study.json`` change (``progress.StudyState``).

So the newest signed snapshot is never behind ``study.json``. ``resume`` installs that snapshot
(:func:`install_snapshot`) over whatever Ray's background thread wrote later, after checking its
signature: a pickle someone else put in the folder is never unpickled (exit 2), unless the user
passes ``--trust-folder``. What can still be ahead of the snapshot is idempotent on replay: an
Optuna trial asked but never saved is handed to the next trial (``StudySearch``), an MLflow run is
found by its ``search.run_key`` tag, and metric steps already in MLflow are not logged twice.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import hmac
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from search import study as S
from trainables.files import sha256_file
from trainables.testhooks import pause_point

STATE_DIR = ".search-state"
CURRENT = "current"
MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
KEY_ENV = "SEARCH_STATE_KEY_FILE"  # where the signing key lives (default: the user's config folder)
# The files Ray's Tuner.restore reads from the experiment folder (all of them pickles or
# JSON holding pickles).
RAY_STATE = (
    "tuner.pkl",
    "experiment_state-*.json",
    "search_gen_state-*.json",
    "searcher-state-*.pkl",
    "callback-states-*.pkl",
)


class UntrustedState(ValueError):
    """The study folder's Ray state is not what this user's launcher saved (exit 2)."""


class SigningKeyError(UntrustedState):
    """The signing key cannot be used: ``why`` it cannot, and the ``fix``."""

    def __init__(self, why: str, fix: str):
        super().__init__(f"{why}; {fix}")
        self.why, self.fix = why, fix


# ---------------------------------------------------------------- the signing key


def key_path() -> Path:
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV])
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "search" / "state.key"


def signing_key(create: bool = True) -> bytes:
    """The user's 32-byte HMAC key, created 0600 (its folder 0700) on first use. A key file that
    others can read, or that is not the user's, is refused: anyone who can read it can sign."""
    path = key_path()
    if not path.exists() and create:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it first
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
    if not path.is_file():
        raise SigningKeyError(
            f"no signing key at {path}: this user never launched a study here",
            "launch a study, or resume with --trust-folder if you trust whoever wrote it",
        )
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise SigningKeyError(
            f"signing key {path} is readable by others or not yours (mode {st.st_mode & 0o777:o})",
            f"chmod 600 {path}",
        )
    key = path.read_bytes()
    if len(key) < 32:
        raise SigningKeyError(
            f"signing key {path} is too short ({len(key)} bytes)",
            "remove it (a new key is made; studies it signed then resume with --trust-folder)",
        )
    return key


def _sign(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


# ---------------------------------------------------------------- snapshots


def ray_state_files(exp_dir: Path, newest: bool = False) -> list[Path]:
    """Ray's state files at the top of ``exp_dir`` (see :data:`RAY_STATE`); ``newest``: of each
    timestamped kind only the one Ray restores from, the greatest name (each launch and resume
    writes its own; the earlier ones, dead, were copied and hashed at every snapshot)."""
    found = []
    for pattern in RAY_STATE:
        files = sorted(p for p in Path(exp_dir).glob(pattern) if p.is_file())
        found += files[-1:] if newest and "*" in pattern else files
    return sorted(set(found))


class Durability:
    """The flag between the callbacks and :class:`DurableController`, and the snapshots."""

    def __init__(self, exp_dir: Path):
        self.exp_dir = Path(exp_dir)
        self.pending = False  # a change waits for Ray's synchronous save
        self.saved = False  # Ray saved synchronously since the last snapshot
        self.key = signing_key()

    def request(self) -> None:
        self.pending = True

    def snapshot(self, study: dict[str, Any] | None = None, again: bool = False) -> Path | None:
        """Copy Ray's saved state, and ``study`` (study.json's content as of the same loop step),
        into a new signed generation and make it current (``again``: also when Ray saved nothing
        since the last one, for records changed after the run, e.g. by ``--keep-top``)."""
        if not (self.saved or again):
            return None
        self.saved = False
        root = self.exp_dir / STATE_DIR
        root.mkdir(exist_ok=True, mode=0o700)
        gen = f"{time.time_ns():020d}"
        tmp = root / f".{gen}.tmp"
        tmp.mkdir(mode=0o700)
        files = {}
        for src in ray_state_files(self.exp_dir, newest=True):
            shutil.copyfile(src, tmp / src.name)
        if study is not None:
            S.write_study(tmp, study)
        for path in sorted(tmp.iterdir()):
            files[path.name] = sha256_file(path)
        manifest = json.dumps({"study": self.exp_dir.name, "files": files}, sort_keys=True).encode()
        (tmp / MANIFEST).write_bytes(manifest)
        (tmp / SIGNATURE).write_text(_sign(self.key, manifest))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        pause_point("snapshot")  # test hook: the new generation is written, not yet in place
        os.replace(tmp, root / gen)
        pointer = root / f".{CURRENT}.tmp"
        pointer.write_text(gen)
        os.replace(pointer, root / CURRENT)
        for old in root.iterdir():  # older generations, and temporaries a crash left
            if old.name not in (gen, CURRENT):
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        return root / gen


def current_snapshot(exp_dir: Path) -> Path | None:
    pointer = Path(exp_dir) / STATE_DIR / CURRENT
    if not pointer.is_file():
        return None
    gen = pointer.read_text().strip()
    if not gen.isdigit():
        raise UntrustedState(f"{pointer} names {gen[:40]!r}, not a snapshot")
    return pointer.parent / gen


def verify_snapshot(exp_dir: Path) -> tuple[Path, list[str]]:
    """The current snapshot's folder and the names of its files, once its manifest's signature and
    every file's sha256 match; :class:`UntrustedState` naming what does not."""
    snap = current_snapshot(exp_dir)
    if snap is None or not (snap / MANIFEST).is_file():
        raise UntrustedState(
            f"{Path(exp_dir) / STATE_DIR} holds no signed Ray state (the launch stopped before its first "
            "trial was saved, or a version without signing wrote it)"
        )
    manifest = (snap / MANIFEST).read_bytes()
    sig = (snap / SIGNATURE).read_text().strip() if (snap / SIGNATURE).is_file() else ""
    if not hmac.compare_digest(sig, _sign(signing_key(create=False), manifest)):
        raise UntrustedState(
            f"{snap / SIGNATURE} does not match {snap / MANIFEST} under your key: another user (or "
            "another key) wrote this state, or it was changed"
        )
    signed = json.loads(manifest)
    if signed.get("study") != Path(exp_dir).name:
        raise UntrustedState(
            f"{snap / MANIFEST} was signed for study {str(signed.get('study'))[:80]!r}, not "
            f"{Path(exp_dir).name!r}: another study's state was put here"
        )
    files = signed["files"]
    for name, digest in files.items():
        path = snap / name
        known = name == S.STUDY_FILE or any(fnmatch.fnmatchcase(name, pattern) for pattern in RAY_STATE)
        if not known or Path(name).name != name:
            raise UntrustedState(f"{snap / MANIFEST} names {name[:80]!r}, not a state file")
        if not path.is_file() or sha256_file(path) != digest:
            raise UntrustedState(f"{path} is missing or differs from its signed sha256")
    return snap, sorted(files)


def install_snapshot(exp_dir: Path) -> list[str]:
    """Put the verified snapshot's files in place of Ray's state files (those newer than it, or
    not in it, go) and of study.json (which may be a step behind it); returns the names installed."""
    exp_dir = Path(exp_dir)
    snap, names = verify_snapshot(exp_dir)
    for path in ray_state_files(exp_dir):
        if path.name not in names:
            path.unlink()
    for name in names:
        tmp = exp_dir / f".{name}.install"
        shutil.copyfile(snap / name, tmp)
        os.replace(tmp, exp_dir / name)
    return names


# ---------------------------------------------------------------- Ray's controller, saving in step


@contextlib.contextmanager
def durable_controller(durability: Durability) -> Iterator[None]:
    """While active, ``tune.Tuner.fit`` runs a :class:`DurableController` bound to ``durability``.
    Ray builds its controller in ``ray.tune.tune.run``; this swaps that module's name for the
    subclass and puts it back afterwards."""
    import ray.tune.tune as tune_module

    base = tune_module.TuneController

    class DurableController(base):  # type: ignore[misc, valid-type]
        """Ray's ``TuneController`` that saves (and waits for the copy to storage) in the step in
        which a trial was added or a callback requested it."""

        def add_trial(self, trial: Any) -> None:
            super().add_trial(trial)
            durability.request()

        def checkpoint(self, force: bool = False, wait: bool = False) -> None:
            durable = durability.pending
            durability.pending = False
            super().checkpoint(force=force or durable, wait=wait or durable)
            if durable or (force and wait):
                durability.saved = True

    tune_module.TuneController = DurableController
    try:
        yield
    finally:
        tune_module.TuneController = base
