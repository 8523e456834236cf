"""A SQLite tracking store's files: a moved or copied store pointed at the artifacts beside it,
and a read-only one (an archive, another user's study) read through a mended temporary copy."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

from search.guards import LOCK_FILE, lock_held
from search.study import SPEC_FILE

log = logging.getLogger(__name__)

ARTIFACTS_DIR = "mlartifacts"


def store_writable(db: Path) -> bool:
    """Whether this user can write the SQLite store ``db`` (the file, and its folder for SQLite's
    journal); False on a read-only mount, for another user's store, or when it is not there."""
    return db.is_file() and os.access(db, os.W_OK) and os.access(db.parent, os.W_OK)


def readable_copy(db: Path) -> Path:
    """A temporary copy of a read-only store ``db``, its locations mended as :func:`mend_moved`
    would (the caller removes its folder). The UI serves it: the store itself cannot be mended,
    and MLflow's server reads its absolute artifact locations, which named the folder it ran in."""
    copy = Path(tempfile.mkdtemp(prefix="search-store-")) / db.name
    try:
        _copy_store(db, copy)
    except BaseException:  # a full disk, an unreadable store: no copy left behind
        shutil.rmtree(copy.parent, ignore_errors=True)
        raise
    here = _artifacts_to_mend(db)
    if here is not None:
        try:
            _mend_locations(copy, here, db)
        except sqlite3.Error as exc:
            log.warning("MLflow store copy %s: could not point it at %s: %s", copy, here, exc)
    return copy


def _copy_store(db: Path, copy: Path) -> None:
    try:
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as src:
            with contextlib.closing(sqlite3.connect(copy)) as dst:
                src.backup(dst)  # one consistent snapshot, whatever SQLite's journal mode
    except sqlite3.Error:
        shutil.copyfile(db, copy)


def mend_moved(db: Path) -> int:
    """Point a moved or copied SQLite store's experiments at the ``mlartifacts`` folder beside it.

    MLflow records absolute artifact locations: after ``mv``/``cp -a`` of an output folder its
    store still named the old folder's artifacts, so a promote of the copy wrote its bundle into
    the original's folder (or recreated a moved one's) and the UI listed no artifacts. Only this
    tool's experiments are mended (located at ``<db folder>/mlartifacts/<name>``, as
    :func:`artifact_location` makes them) and only when that folder came along; one seen through
    another path to the same store is left alone. Only a store with studies beside it (the
    default store) is mended, and not while one of them runs: a launch may be writing to it
    through another path (a bind mount, NFS mounted elsewhere), which a mend would turn from under
    it. Returns the number of experiments mended."""
    here = _artifacts_to_mend(db)
    if here is None or not store_writable(db):  # a read-only store is read as it is (ui: a copy)
        return 0
    try:
        mended = _mend_locations(db, here, db)
    except sqlite3.Error as exc:  # a busy store: read as it is
        log.warning("MLflow store %s: could not point it at %s: %s", db, here, exc)
        return 0
    if mended:
        log.info("MLflow store %s: artifact locations of %d experiment(s) moved to %s", db, mended, here)
    return mended


def _artifacts_to_mend(db: Path) -> Path | None:
    """The ``mlartifacts`` folder beside ``db`` when :func:`mend_moved` applies to it."""
    here = (db.parent / ARTIFACTS_DIR).resolve()
    if not here.is_dir() or not db.is_file() or not any(db.parent.glob(f"*/{SPEC_FILE}")):
        return None
    if any(lock_held(lock.parent) for lock in db.parent.glob(f"*/{LOCK_FILE}")):
        return None
    return here


def _mend_locations(db: Path, here: Path, original: Path) -> int:
    """Rewrite ``db``'s locations to ``here`` (``original``: the store ``db`` is, or is a copy of)."""

    mended = 0
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as con, con:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "experiments" not in tables:
            return 0
        rows = con.execute("SELECT experiment_id, name, artifact_location FROM experiments").fetchall()
        for eid, name, loc in rows:
            if not (loc or "").startswith("file://") or not name:
                continue
            old = Path(unquote(urlsplit(loc).path))
            root = Path(str(old)[: -len(name)]) if str(old).endswith(f"/{ARTIFACTS_DIR}/{name}") else None
            if root is None or root == here or _same_file(root.parent / original.name, original):
                continue
            new = (here / name).as_uri()
            con.execute("UPDATE experiments SET artifact_location=? WHERE experiment_id=?", (new, eid))
            for table, column in (("runs", "artifact_uri"), ("logged_models", "artifact_location")):
                if table in tables:
                    con.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) "  # noqa: S608 - fixed names
                        f"WHERE experiment_id=? AND substr({column}, 1, ?) = ?",
                        (new, len(loc) + 1, eid, len(loc), loc),
                    )
            mended += 1
    return mended


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False
