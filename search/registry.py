"""Registry URIs as base weights: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` and
``runs:/RUN_ID/PATH`` resolved to a local weights file (downloaded once into a cache per store).
Called by the launch preflight, never by the spec."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

from search.errors import SpecError
from search.mlflow_store import client, redact, tracking_uri
from search.spec.schema import is_registry_uri, sqlite_file
from search.write_queue import clean_key
from trainables.files import sha256_file


class RegistryError(ValueError):
    """A ``models:/`` or ``runs:/`` URI that cannot be resolved to a weights file."""


WEIGHT_FILES = ("weights.pt", "model.pt", "best.pt")


def _parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, alias, version)."""
    rest = uri[len("models:/") :].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return name, alias, None
    name, _, version = rest.rpartition("/")
    if not name or not version.isdigit():
        raise RegistryError(f"{uri!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")
    return name, None, version


def resolve_model_uri(uri: str, tracking: str, cache_dir: Path | None = None) -> Path:
    """A local weights file for ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or
    ``runs:/RUN_ID/PATH`` on the store ``tracking``.

    The artifact is downloaded once into ``cache_dir`` (default ``~/.cache/search/registry``), under
    a folder per tracking store (a hash of its URI without credentials);
    a folder (a bundle from ``promote``) yields its ``weights.pt`` (a full state_dict), checked
    against the bundle's ``SHA256SUMS``. Raises :class:`RegistryError` with a one-line reason.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    cache = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "search" / "registry"
    root = next(p for p in (cache, *cache.parents) if p.exists() or p == p.parent)  # exists already
    # one cache per tracking store: the same name and version on two stores are different models
    cache = cache / hashlib.sha256(redact(tracking).encode()).hexdigest()[:16]
    mlc, tmp = client(tracking), None
    try:
        if uri.startswith("models:/"):
            name, alias, version = _parse_models_uri(uri)
            mv = (
                mlc.get_model_version_by_alias(name, alias) if alias else mlc.get_model_version(name, version)
            )
            source, dest = mv.source, cache / "models" / clean_key(name).replace("/", "_") / f"v{mv.version}"
        elif uri.startswith("runs:/"):
            source = uri
            dest = cache / "runs" / uri[len("runs:/") :].strip("/").replace("/", "__")
        else:
            raise RegistryError(f"{uri!r} is not a models:/ or runs:/ URI")
        if not (dest / ".source").is_file():
            import shutil

            import mlflow.artifacts

            shutil.rmtree(dest, ignore_errors=True)
            tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            got = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=source, dst_path=str(tmp), tracking_uri=tracking
                )
            )
            (tmp / ".source").write_text(f"{got.relative_to(tmp)}\n")
            os.replace(tmp, dest)
    except RegistryError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line for the spec error
        _remove_new(tmp, root)  # a refused lookup leaves no folder behind
        reason = " ".join(str(exc).split())
        if re.search(r"Response body: '?\s*<", reason):  # a web page: not MLflow's JSON
            reason = (
                reason.split(" Response body:")[0]
                + " (the answer is a web page, not MLflow's: is it an MLflow server?)"
            )
        reason = reason[:300]
        raise RegistryError(f"cannot resolve {uri} on {redact(tracking)}: {reason}") from None
    rel = (dest / ".source").read_text().strip() if (dest / ".source").is_file() else "."
    got = dest / rel
    if got.is_file():
        return got
    for fname in WEIGHT_FILES:
        if (got / fname).is_file():
            _check_sums(got, fname)
            return got / fname
    found = sorted(p for p in got.rglob("*") if p.suffix in (".pt", ".pth"))
    if len(found) == 1:
        return found[0]
    raise RegistryError(f"{uri} holds no single weights file (looked for {', '.join(WEIGHT_FILES)})")


def _remove_new(tmp: Path | None, root: Path) -> None:
    """Remove a failed download's ``tmp`` folder and the parents made for it, up to ``root``."""
    import shutil

    if tmp is None:
        return
    shutil.rmtree(tmp, ignore_errors=True)
    for parent in tmp.parents:
        if parent == root or not parent.is_relative_to(root):
            break
        try:
            parent.rmdir()  # only while empty: another download's files stay
        except OSError:
            break


def _check_sums(folder: Path, fname: str) -> None:
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        return
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if name.strip() == fname and sha256_file(folder / fname) != digest.strip():
            raise RegistryError(f"{folder / fname} does not match its SHA256SUMS entry (damaged download)")


def resolve_spec_weights(spec: Any) -> None:
    """Replace the spec's ``models:/``/``runs:/`` weights by their local files (downloaded once
    into ``<output_dir>/.registry``), then check again that no output of the spec is one of its
    inputs. The commands' preflight calls it after loading the spec; SpecError on
    ``model.weights``/``model.weights_backbone``."""
    from search import guards

    uris = [a for a in ("weights", "weights_backbone") if is_registry_uri(getattr(spec.model, a))]
    if not uris:
        return
    store = tracking_uri(spec)
    for name in ("mlflow", "alembic"):  # their INFO lines would break one-line errors
        logging.getLogger(name).setLevel(logging.WARNING)
    for attr in uris:
        uri = getattr(spec.model, attr)
        if (db := sqlite_file(store)) is not None and not db.is_file():
            raise SpecError(
                f"model.{attr}",
                f"cannot resolve {uri}: the tracking store {store} does not exist.",
                "set tracking.uri to the store the model was promoted in.",
            )
        try:
            path = resolve_model_uri(uri, store, cache_dir=spec.output_dir / ".registry")
        except RegistryError as exc:
            raise SpecError(
                f"model.{attr}", str(exc), "promote a model first, or fix the URI or tracking.uri."
            ) from None
        setattr(spec.model, attr, str(path))
    guards.check_spec_outputs(spec)
