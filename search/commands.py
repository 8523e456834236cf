"""The CLI's command table: a command is a name → :class:`Command` (its help line, a function
adding its arguments, the function running it). ``search/cli.py`` builds its parser from the
tables of its command modules (``cli.COMMANDS`` and ``commands_tracking.COMMANDS``); imports go
one way, cli → command modules → this module."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple


class Command(NamedTuple):
    help: str
    args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    verbose_log: bool = False  # True: the command's own INFO lines are shown without -v


def add_name_args(p: argparse.ArgumentParser) -> None:
    """NAME (a study name or its experiment folder) and --output-dir, for commands on a study."""
    p.add_argument("name", help="experiment NAME or folder path")
    p.add_argument("--output-dir", type=Path, default=None, help="where NAME lives (default ./runs)")


def register(sub: argparse._SubParsersAction, table: dict[str, Command]) -> None:
    """Add every command of ``table`` to the subparsers ``sub``."""
    for name, cmd in table.items():
        p = sub.add_parser(name, help=cmd.help)
        cmd.args(p)
        p.set_defaults(func=cmd.run, verbose_log=cmd.verbose_log)
