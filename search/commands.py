"""The CLI's command table: a command is a name → :class:`Command` (its help line, a function
adding its arguments, the function running it). ``search/cli.py`` builds its parser from the
tables of its command modules (``cli.COMMANDS`` and ``commands_tracking.COMMANDS``); imports go
one way, cli → command modules → this module. :class:`Parser` is the CLI's argparse parser."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from search.errors import did_you_mean


class Command(NamedTuple):
    help: str
    args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    verbose_log: bool = False  # True: the command's own INFO lines are shown without -v


def user_path(value: str) -> Path:
    """A path argument, ``~`` expanded as in the spec: the shell leaves ``--out=~/x`` and a quoted
    ``'~/x'`` as they are, which wrote to a folder named ``~`` under the current one."""
    return Path(value).expanduser()


def add_name_args(p: argparse.ArgumentParser) -> None:
    """NAME (a study name or its experiment folder) and --output-dir, for commands on a study."""
    p.add_argument("name", type=os.path.expanduser, help="experiment NAME or folder path")
    p.add_argument("--output-dir", type=user_path, default=None, help="where NAME lives (default ./runs)")


def register(sub: argparse._SubParsersAction, table: dict[str, Command]) -> None:
    """Add every command of ``table`` to the subparsers ``sub``."""
    for name, cmd in table.items():
        p = sub.add_parser(name, help=cmd.help)
        cmd.args(p)
        p.set_defaults(func=cmd.run, verbose_log=cmd.verbose_log)


class Parser(argparse.ArgumentParser):
    """argparse's refusals as ONE line (exit 2) naming the command, the rule and the fix (argparse
    prints its usage and the error: 2 to 4 lines); ``--help`` is argparse's own."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("search").strip()
        where, help_of = (f"{command}: ", f"{command} ") if command else ("", "")
        fix = f"see python -m search {help_of}--help."
        if re.match(r"argument COMMAND: invalid choice: ", message):
            value = re.search(r"invalid choice: '([^']*)'", message)
            valid = list(self._subcommands().choices)
            name = value.group(1) if value else ""
            message = f"unknown command {name!r}.{did_you_mean(name, valid)}"
            fix = f"use one of: {', '.join(valid)} (python -m search --help)."
        text = message.strip() if message.strip().endswith((".", "?")) else f"{message.strip()}."
        self.exit(2, f"error: {where}{' '.join(text.split())} Fix: {fix}\n")

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        """Unknown options are refused by the command's parser, with the closest option it has."""
        known, extra = self.parse_known_args(args, namespace)
        if extra:
            command = getattr(known, "command", None)
            parser = self._subcommands().choices.get(command, self) if command else self
            options = [o for o in parser._option_string_actions if o.startswith("--")]
            first = next((e.partition("=")[0] for e in extra if e.startswith("-")), "")
            close = did_you_mean(first, options) if first else ""
            parser.error(f"unrecognized arguments: {' '.join(extra)}.{close}")
        return known

    def _subcommands(self) -> argparse._SubParsersAction:
        return next(a for a in self._actions if isinstance(a, argparse._SubParsersAction))
