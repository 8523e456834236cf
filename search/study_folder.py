"""Which study folder a launch or resume may use: ``launch`` never into one that holds a study,
``resume`` only in the folder the study ran in and only from Ray state this user signed
(:mod:`search.durable`), with nothing else in the folder that Ray would unpickle."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from search import durable, guards
from search import study as S
from search.errors import SpecError

log = logging.getLogger(__name__)

# Ray pickles an errored trial's exception here and unpickles it when it builds the results; no
# snapshot signs it (Ray writes it between snapshots), so resume removes it (error.txt stays).
UNSIGNED_PICKLES = ("trial_*/error.pkl",)


class ExperimentExists(Exception):
    """``launch`` into a folder that already holds a study (use ``resume`` or ``--name``)."""


def resume_command(exp_dir: Path, keep_top: int | None = None) -> str:
    keep = f" --keep-top {keep_top}" if keep_top is not None else ""
    return f"python -m search resume {exp_dir}{keep}"


def refuse_existing(exp_dir: Path, ours: bool = False) -> None:
    """:class:`ExperimentExists` when ``exp_dir`` already holds a study (launch never overwrites;
    ``ours``: this process holds the folder's lock, so the one that wrote it has ended)."""
    if (exp_dir / S.STUDY_FILE).exists() or (exp_dir / "tuner.pkl").exists():
        then = f"Resume it with '{resume_command(exp_dir)}'"
        if not ours and guards.lock_held(exp_dir):  # its launch or resume runs now: a resume would be refused
            then = "A launch or resume of it is running now"
        raise ExperimentExists(
            f"experiment folder {exp_dir} already holds a study. {then}, or launch with --name NEW_NAME."
        )


def refuse_elsewhere(spec: Any, exp_dir: Path) -> None:
    """A study resumes only in the folder it was launched in: a copy's or a moved folder's
    records (Ray's, the MLflow store's, the spec's output_dir) point there, so a resume of a copy
    wrote into the original (and ``--keep-top`` deleted the original's checkpoints)."""
    ran, here = spec.experiment_dir.resolve(), Path(exp_dir).resolve()
    if ran == here:
        return
    if (ran / S.STUDY_FILE).is_file():
        what, fix = f"a copy of the study in {ran}", f"resume {ran} itself, or launch anew with --name"
    else:
        what, fix = f"moved here from {ran}", f"move it back to {ran} and resume it there"
    raise SpecError("resume", f"{here} is {what}; its records point there.", f"{fix}.")


def install_state(exp_dir: Path, trust_folder: bool) -> None:
    """The newest signed snapshot of Ray's state in place (see ``search.durable``), and the
    pickles no snapshot signs removed, unless ``trust_folder``."""
    try:
        durable.install_snapshot(exp_dir)
    except durable.UntrustedState as exc:
        if not trust_folder:
            raise SpecError(
                "resume",
                f"{exc}; resume would unpickle these files.",
                "resume only studies you launched, or pass --trust-folder if you trust whoever wrote it.",
            ) from None
        log.warning("resuming unsigned Ray state (--trust-folder): %s", exc)
    if not trust_folder:
        for path in sorted({p for g in UNSIGNED_PICKLES for p in Path(exp_dir).glob(g)}):
            path.unlink(missing_ok=True)
