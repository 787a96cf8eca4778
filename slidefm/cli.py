"""`slidefm` command line: one subcommand per module in ``slidefm.commands``.

Each command module defines ``add_parser(subparsers)`` that returns a parser whose
``func(args) -> int`` runs the command, and imports what it needs lazily. Only the chosen
command's parser is built (``slidefm --help`` imports no torch). ``train`` hands its arguments to
Hydra after its own checks. User mistakes are one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from slidefm import __version__
from slidefm.errors import CohortError, SlidefmError

COMMANDS = ["synth", "import_bags", "check", "pack", "train", "export", "eval", "demo"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # argparse prints a usage block first; one line says the same and names --help
        print(f"{self.prog}: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _cli_name(module: str) -> str:
    return module.replace("_", "-")


def _summary(mod) -> str:
    """The command's one-line help: its ``HELP``, else the first line of its docstring after the usage."""
    text = getattr(mod, "HELP", None)
    if text:
        return text
    first = (mod.__doc__ or "").strip().splitlines()[0] if (mod.__doc__ or "").strip() else ""
    return first.split("`: ", 1)[-1].rstrip(".")


def build_parser(command: str | None = None, every: bool = False) -> argparse.ArgumentParser:
    """The ``slidefm`` parser with ``command``'s own parser (every command's with ``every``); the others are
    one-line entries, so that ``slidefm --help`` imports no command's dependencies."""
    parser = _Parser(prog="slidefm", description="Train and use slide/patient foundation models.")
    parser.add_argument("--version", action="version", version=f"slidefm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"slidefm.commands.{name}")
        except ModuleNotFoundError as e:  # command not built yet in this checkout
            if e.name == f"slidefm.commands.{name}":
                continue
            raise
        if every or command == _cli_name(name):
            mod.add_parser(sub)
        else:
            sub.add_parser(_cli_name(name), help=_summary(mod), add_help=False)
    return parser


def error_line(e: SlidefmError) -> str:
    """A user error as printed: one line (a cohort with several problems lists them below it)."""
    if isinstance(e, CohortError) and len(e.problems) == 1:
        return str(e.problems[0])
    return str(e)


# Long-running commands whose step allocates large tensors of changing sizes: glibc's malloc as it comes faults
# them in anew each time (a 10k x 1536 export batch: 15k faults per slide, benchmarks/slide_loader.py).
REEXEC_COMMANDS = ("train", "export")


def main(argv: list[str] | None = None) -> int:
    """Run a command. Called without ``argv`` (a real ``slidefm`` process), ``train`` and ``export`` first
    re-execute themselves under jemalloc when it is installed, else under tuned glibc (``slidefm.allocator``); a
    call with ``argv`` never does."""
    own_process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and not argv[0].startswith("-") else None
    try:
        if command in REEXEC_COMMANDS and own_process:
            from slidefm.allocator import reexec_with_allocator

            reexec_with_allocator()
        if command == "train":
            # Hydra parses its own overrides (recipe=..., -m, hydra/launcher=...).
            from slidefm.commands.train import hydra_main

            return hydra_main(argv[1:])
        parser = build_parser(command)
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help, --version, or a usage error already printed in one line
            return e.code if isinstance(e.code, int) else 0
        if not getattr(args, "func", None):
            parser.print_help()
            return 1
        return int(args.func(args) or 0)
    except SlidefmError as e:
        print(f"slidefm {command}: {error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"slidefm {command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permissions, a path that is not what it should be
        print(f"slidefm {command}: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a bug: say so in one line, the traceback on request
        if os.environ.get("SLIDEFM_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"slidefm {command}: internal error: {type(e).__name__}: {first} "
              "(set SLIDEFM_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
