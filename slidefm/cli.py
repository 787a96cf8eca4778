"""`slidefm` command line: one subcommand per module in ``slidefm.commands``.

Each command module defines ``add_parser(subparsers)`` that returns a parser whose
``func(args) -> int`` runs the command. ``train`` hands its arguments to Hydra unchanged.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from slidefm import __version__
from slidefm.errors import SlidefmError

COMMANDS = ["synth", "import_bags", "check", "pack", "train", "export", "eval", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slidefm", description="Train and use slide/patient foundation models.")
    parser.add_argument("--version", action="version", version=f"slidefm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"slidefm.commands.{name}")
        except ModuleNotFoundError as e:  # command not built yet in this checkout
            if e.name == f"slidefm.commands.{name}":
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        # Hydra parses its own overrides (recipe=..., -m, hydra/launcher=...).
        from slidefm.commands.train import hydra_main

        return hydra_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except SlidefmError as e:
        print(f"slidefm {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
