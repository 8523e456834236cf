"""Trust guards (issue 14): no secret in a tracking URI, no output over the inputs, one writer
per study folder. Every check raises :class:`~search.errors.SpecError` (the CLI exits 2) before
any work is done; nothing here imports Ray, MLflow or torch.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import socket
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from search.errors import SpecError
from search.spec.schema import file_store, sqlite_file
from trainables.files import pid_alive

# a query parameter whose lower-cased name holds one of these carries a secret (X-Amz-Signature,
# X-Amz-Credential, Azure's sig, api_key, access_token, ...)
_SECRET_QUERY = ("pass", "pwd", "token", "secret", "key", "sig", "credential", "auth")
_ENV_FIX = {
    "http": "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the "
    "environment instead; they are read at run time and never written",
    "databricks": "use a Databricks profile (DATABRICKS_HOST and DATABRICKS_TOKEN in the environment, "
    "or ~/.databrickscfg) with tracking.uri databricks or databricks://PROFILE",
    "db": "give the database password through its driver's environment (e.g. PGPASSWORD, MYSQL_PWD) or "
    "its password file (e.g. ~/.pgpass) instead; it is never written there",
}


def check_uri_secrets(uri: str | None, key: str = "tracking.uri") -> None:
    """Refuse a URI that carries a password or a token: it would be written to the experiment's
    spec.yaml, Ray's state and MLflow. A user name alone is allowed."""
    if not uri:
        return
    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:
        return  # not a URL: the tracking checks report it
    secret_query = [k for k, _ in parse_qsl(parts.query) if any(w in k.lower() for w in _SECRET_QUERY)]
    if password is None and not secret_query:
        return
    what = (
        "a password (user:PASSWORD@)"
        if password is not None
        else f"a secret query parameter {secret_query[0]!r}"
    )
    scheme = parts.scheme.lower()
    fix = _ENV_FIX["http" if scheme in ("http", "https") else scheme if scheme in _ENV_FIX else "db"]
    safe = parts._replace(netloc=parts.netloc.rpartition("@")[2], query="").geturl()  # host:port kept
    raise SpecError(key, f"{safe!r} carries {what}: it would be written to disk and to MLflow.", f"{fix}.")


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def protected(files: Iterable[str | os.PathLike | None], folders: Iterable[str | os.PathLike | None] = ()):
    """The files an output must not replace, the folders it must not write into (the folders
    holding those files, and the given folders) and the trees it must not write below (the given
    folders: image folders, a bundle); all with symlinks resolved."""
    fs = {_resolved(f) for f in files if f}
    trees = {_resolved(d) for d in folders if d}
    return fs, trees | {f.parent for f in fs}, trees


def spec_inputs(spec: Any) -> tuple[set[Path], set[Path], set[Path]]:
    """A spec's inputs: its weights files and annotation files, and its image folders."""
    files = [spec.data.train.annotations, spec.data.val.annotations]
    for w in (spec.model.weights, spec.model.weights_backbone):
        if w and Path(str(w)).is_file():
            files.append(w)
    return protected(files, [spec.data.train.images, spec.data.val.images])


def check_spec_outputs(spec: Any) -> None:
    """The spec's own outputs (``output_dir`` and the experiment folder ``<output_dir>/<name>``)
    are none of its inputs (:func:`spec_inputs`)."""
    inputs = spec_inputs(spec)
    # not whether it is writable: every command reads a study's spec, also from a read-only copy
    check_output(spec.output_dir, inputs, "output_dir", folder=True, writable=False)
    check_output(spec.output_dir / spec.name, inputs, "name", folder=True, writable=False)
    store, folder = _local_store(spec.tracking.uri)
    check_output(store, inputs, "tracking.uri", folder=folder, writable=False)


def _local_store(uri: str | None) -> tuple[Path | None, bool]:
    """The file (SQLite) or folder (``file:`` or a plain path: a file store) that a tracking URI
    writes on this machine, with whether it is a folder; None for a server or database."""
    if not uri:
        return None, False  # the default store, <output_dir>/mlflow.db, checked with output_dir
    if (db := sqlite_file(uri)) is not None:
        return db, False
    folder = file_store(uri)
    return folder, folder is not None


def check_output(
    path: str | os.PathLike | None,
    inputs: tuple[set[Path], set[Path], set[Path]],
    key: str,
    folder: bool,
    writable: bool = True,
) -> None:
    """Refuse an output (a file, or with ``folder`` a folder written into) that is one of the
    protected files, or a protected folder, or (for a file) inside one, or anywhere below a
    protected tree (:func:`protected`), or that cannot be made (``writable``: nor written)."""
    if path is None:
        return
    out = _resolved(path)
    files, folders, trees = inputs
    below = next((d for d in sorted(trees) if out != d and out.is_relative_to(d)), None)
    hit = None
    if out in files:
        hit = f"is the input file {str(out)!r}"
    elif out in folders:
        hit = f"is the input folder {str(out)!r}"
    elif below is not None:
        hit = f"is inside the input folder {str(below)!r}"
    elif not folder and out.parent in folders:
        hit = f"would be written into the input folder {str(out.parent)!r}"
    elif folder and any(f.parent == out for f in files):
        hit = f"is the folder holding the input {str(next(f for f in files if f.parent == out))!r}"
    if hit:
        raise SpecError(
            key,
            f"{str(path)!r} {hit}; base weights and data are read-only to this tool.",
            "choose an output path outside the inputs' folders.",
        )
    _check_writable(out, str(path), key, folder, writable)


def _check_writable(out: Path, given: str, key: str, folder: bool, writable: bool) -> None:
    """``out`` can be made: a folder output is not an existing file, a file output not an
    existing folder, and the nearest existing folder above it is a folder, with ``writable`` a
    writable one (so that a trial does not train for an hour and then fail to save)."""
    if folder and out.exists() and not out.is_dir():
        raise SpecError(key, f"{given!r} is a file, and a folder is written there.", "pass a folder path.")
    if not folder and out.is_dir():
        raise SpecError(key, f"{given!r} is a folder, and a file is written there.", "pass a file path.")
    above = out if folder and out.is_dir() else out.parent  # an existing folder is written into itself
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise SpecError(
            key, f"{given!r}: {str(above)!r} above it is a file, not a folder.", "pass a path under a folder."
        )
    if writable and not os.access(above, os.W_OK | os.X_OK):
        raise SpecError(
            key, f"{given!r}: the folder {str(above)!r} is not writable.", "pass a path you can write to."
        )


def check_weights_out(path: str | os.PathLike | None, spec_file: Path | None) -> None:
    """``trial --weights-out`` replaces only a weights file: not the spec, not an existing file
    torch did not write (a zip archive or a pickle, by their first bytes)."""
    if path is None or not Path(path).is_file():
        return
    out = _resolved(path)
    if spec_file is not None and out == _resolved(spec_file):
        raise SpecError("--weights-out", f"{str(path)!r} is the spec file.", "pass a new .pt file path.")
    with open(out, "rb") as f:
        head = f.read(2)
    if head != b"PK" and head[:1] != b"\x80":
        raise SpecError(
            "--weights-out",
            f"{str(path)!r} exists and is not a weights file (torch writes a zip archive or a pickle).",
            "pass a new .pt file path, or remove that file first.",
        )


# ---------------------------------------------------------------- who could have written a study

RAY_STATE_GLOBS = (
    "tuner.pkl",
    "*.pkl",
    "experiment_state-*.json",
    "search_gen_state-*.json",
    "trial_*/*.pkl",
)


def check_folder_trust(exp_dir: Path) -> None:
    """``resume`` unpickles Ray's state files: refuse when the study folder, a trial's folder (Ray
    writes pickles there) or one of those files is writable by the group or by others, or owned by
    another user (a crafted pickle would run as you). ``resume --trust-folder`` skips this check."""
    exp_dir = Path(exp_dir)
    me = os.getuid()
    dirs = [exp_dir, *sorted(p for p in exp_dir.glob("trial_*") if p.is_dir() or p.is_symlink())]
    paths = dirs + sorted({p for g in RAY_STATE_GLOBS for p in exp_dir.glob(g)})
    for path in paths:
        st = path.lstat()
        who = "others" if st.st_mode & 0o002 else "its group"
        why = None
        if path.is_symlink():
            why = "is a symbolic link"
        elif st.st_uid != me:
            why = f"is owned by uid {st.st_uid}, not you (uid {me})"
        elif st.st_mode & 0o022:
            why = f"is writable by {who} (mode {st.st_mode & 0o777:o})"
        if why:
            raise SpecError(
                "resume",
                f"{str(path)!r} {why}: resume unpickles Ray's state files from this folder, and a file "
                "someone else wrote could run code as you.",
                f"make it yours and not group/world-writable (chmod -R go-w {str(exp_dir)!r}), or pass "
                "--trust-folder if you trust everyone who can write there.",
            )


# ---------------------------------------------------------------- one writer per study folder

LOCK_FILE = ".search.lock"


class StudyLocked(SpecError):
    """Another launch/resume holds the experiment folder."""


def lock_holder_alive(exp_dir: Path) -> bool | None:
    """Whether the process the study's lock file names (:class:`StudyLock`) still runs: True or
    False for a process on this host, None when that cannot be told (no file, another host)."""
    holder = _holder(exp_dir)
    if holder is None or holder[0] != socket.gethostname():
        return None
    return pid_alive(holder[1])


def _holder(exp_dir: Path) -> tuple[str, int] | None:
    """(host, pid) that the study's lock file names, or None."""
    try:
        text = (Path(exp_dir) / LOCK_FILE).read_text()
    except OSError:
        return None
    found = re.fullmatch(r"host (\S+) pid (\d+)\s*", text)
    return (found.group(1), int(found.group(2))) if found else None


def held_elsewhere(exp_dir: Path) -> bool:
    """Whether a launch or resume other than this process holds the study's lock now."""
    return lock_held(exp_dir) and _holder(exp_dir) != (socket.gethostname(), os.getpid())


def lock_held(exp_dir: Path) -> bool:
    """Whether a launch or resume holds the study's lock now (a non-blocking shared ``flock``
    on it fails: no guess from a pid, which may be reused or belong to a process done with it)."""
    import fcntl

    try:
        fd = os.open(Path(exp_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's shared lock
    return False


class StudyLock:
    """An exclusive ``fcntl`` lock on ``<exp>/.search.lock`` for the life of a launch or resume.

    The file names the holder (host and pid). The lock goes with the holder's process (the kernel
    releases it when the process ends, however it ends), so a stale file never blocks.
    """

    def __init__(self, exp_dir: Path, fix: str = "wait for it to end, or launch with --name NEW_NAME."):
        self.path, self.fix = Path(exp_dir) / LOCK_FILE, fix
        self._fd: int | None = None
        self._previous = b""
        self.created: list[Path] = []  # what acquire() created: the lock file, then new folders

    def acquire(self) -> StudyLock:
        import fcntl

        missing = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.created = ([] if existed else [self.path]) + missing
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            try:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            except OSError:
                pass
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise StudyLocked(
                "experiment folder",
                f"{str(self.path.parent)!r} is in use by another launch or resume "
                f"({holder or 'unknown holder'}).",
                self.fix,
            ) from None
        self._previous = os.pread(fd, 200, 0)  # a killed holder's name: status reads it
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self, cleanup: bool = False, restore: bool = False) -> None:
        """Drop the lock; with ``cleanup`` (nothing was written), also remove what acquire()
        created: the lock file and the folders that did not exist, when they are empty; with
        ``restore`` (a command refused before it took the study over), put back the holder the
        file named: a killed launch's pid, which ``status`` reads (a refused resume's own pid
        made it look alive or named a process long gone)."""
        if self._fd is None:
            return
        if restore:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
                os.pwrite(self._fd, self._previous, 0)
        if cleanup:
            for path in self.created:
                try:
                    path.unlink() if path == self.path else path.rmdir()
                except OSError:
                    break  # not empty (or gone): keep it and its parents
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None

    def __enter__(self) -> StudyLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ---------------------------------------------------------------- YAML that cannot hurt

MAX_YAML_NODES = 100_000  # after alias expansion
MAX_YAML_DEPTH = 64


_BOOL_TAG = "tag:yaml.org,2002:bool"
_BOOL_12 = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_INT_TAG = "tag:yaml.org,2002:int"
_INT_12 = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")


class YamlRefused(ValueError):
    """A YAML document refused before it is used: duplicate keys, alias bombs, deep nesting.
    ``key``: the dotted key path it concerns, when there is one (a duplicate key); ``fix``: the fix,
    when the refusal has its own."""

    def __init__(self, message: str, key: str | None = None, fix: str | None = None):
        super().__init__(message)
        self.key = key
        self.fix = fix


@functools.cache
def _loader_class() -> type:
    """PyYAML's SafeLoader with YAML 1.2 floats and booleans (built once)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    # YAML 1.2's floats: PyYAML (YAML 1.1) reads ``1e-4`` (no dot) as a string, and lr: 1e-4 is
    # how everyone writes a learning rate. Appended after the int resolver, so 10 stays an int.
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))
    # and YAML 1.2's booleans: only true/false; YAML 1.1 also reads yes/no/on/off, so amp: off
    # was False (refused: "input should be 'auto', 'off', ...").
    # and YAML 1.2's integers: decimal (010 is ten, not YAML 1.1's octal 8), 0o octal, 0x hex;
    # 0b11, 1_000 and 1:30 (YAML 1.1's base 60) are strings, as in YAML 1.2.
    for resolvers in Loader.yaml_implicit_resolvers.values():  # add_ above made these lists our own
        resolvers[:] = [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL_TAG, _INT_TAG)]
    Loader.add_implicit_resolver(_BOOL_TAG, _BOOL_12, list("tTfF"))
    Loader.add_implicit_resolver(_INT_TAG, _INT_12, list("-+0123456789"))
    Loader.add_constructor(_INT_TAG, _construct_int_12)

    return Loader


def _construct_int_12(loader: Any, node: Any) -> int:
    import yaml

    value = loader.construct_scalar(node)
    if not _INT_12.match(value):  # an explicit !!int on another form
        raise yaml.constructor.ConstructorError(
            None, None, f"{value!r} is not a YAML 1.2 int", node.start_mark
        )
    if value.startswith(("0o", "0x")):  # Python limits only base 10: the same cap for these
        if len(value) > sys.get_int_max_str_digits():
            raise ValueError(f"Exceeds the limit ({sys.get_int_max_str_digits()} digits) for an integer")
        return int(value[2:], 8 if value[1] == "o" else 16)
    return int(value, 10)  # ValueError past Python's digit limit: load_yaml says it


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate mapping keys, merge keys (``<<``), documents whose
    aliases expand to more than :data:`MAX_YAML_NODES` nodes (a "billion laughs"), nesting deeper
    than :data:`MAX_YAML_DEPTH`, and integers too long to convert. Raises :class:`YamlRefused` (with the
    line) or ``yaml.YAMLError``; never builds or prints the expanded value."""
    loader = _loader_class()(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise YamlRefused(f"nested deeper than {MAX_YAML_DEPTH} levels") from None
        if node is None:
            return None
        _check_size(node)
        _check_duplicates(loader, node)
        try:
            return loader.construct_document(node)
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            if isinstance(exc, YamlRefused):
                raise
            raise YamlRefused(f"a value cannot be read: {str(exc)[:120]}") from None
    finally:
        loader.dispose()


def _check_size(root: Any) -> None:
    """Expanded node count and depth of a composed YAML graph, shared (aliased) nodes counted
    every time they are used; linear in the number of distinct nodes."""
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        children = _children(node)
        if not done:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
            continue
        sizes[id(node)] = min(MAX_YAML_NODES + 1, 1 + sum(sizes.get(id(c), 1) for c in children))
        depths[id(node)] = 1 + max((depths.get(id(c), 1) for c in children), default=0)
    if sizes[id(root)] > MAX_YAML_NODES:
        raise YamlRefused(f"its aliases expand to more than {MAX_YAML_NODES:,} values (an alias bomb?)")
    if depths[id(root)] > MAX_YAML_DEPTH:
        raise YamlRefused(f"nested deeper than {MAX_YAML_DEPTH} levels")


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _check_duplicates(loader: Any, root: Any) -> None:
    """A mapping key given twice (YAML would keep the last one silently; ``1`` and ``0x1`` are one
    key, ``1`` and ``'1'`` two), named by its dotted key path; each node once (aliases are shared).
    A merge key (``<<``, YAML 1.1 only) is refused too: YAML 1.2, as specs are read, has none."""
    seen_nodes: set[int] = set()
    stack: list[tuple[Any, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in seen_nodes or not isinstance(getattr(node, "value", None), list):
            continue
        seen_nodes.add(id(node))
        lines: dict[Any, int] = {}
        for i, item in enumerate(node.value):
            if not isinstance(item, tuple):  # a sequence's item
                stack.append((item, f"{path}[{i}]"))
                continue
            key_node, value_node = item
            if key_node.tag == _MERGE_TAG:  # PyYAML (YAML 1.1) merges; YAML 1.2 has no merge key
                line = key_node.start_mark.line + 1
                raise YamlRefused(
                    f"uses a YAML merge key (<<) at line {line}; merge keys are not supported (specs are "
                    "read as YAML 1.2, which has none)",
                    key=path[:200] or None,
                    fix="write the keys out in this mapping (an alias *name still repeats a whole value).",
                )
            key = loader.construct_object(key_node, deep=True)
            where = f"{path}.{key}" if path else str(key)
            try:
                if key in lines:
                    line = key_node.start_mark.line + 1
                    raise YamlRefused(f"given twice, at line {lines[key]} and line {line}", key=where[:200])
                lines[key] = key_node.start_mark.line + 1
            except TypeError:
                pass  # an unhashable key: the constructor reports it
            stack.append((value_node, where))


def _children(node: Any) -> list[Any]:
    value = getattr(node, "value", None)
    if not isinstance(value, list):
        return []
    out = []
    for item in value:
        out.extend(item if isinstance(item, tuple) else (item,))
    return out
