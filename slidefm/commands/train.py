"""`slidefm train [overrides]`: the Hydra application (recipes in ``slidefm.recipes``).

Before Hydra creates a run directory, the overrides are composed and checked here (unknown or
untyped keys, a missing ``data.cohort``, a cohort that cannot be opened): a mistake is one line and
exit code 2 with nothing written. ``--help`` lists every config group and option from the structured
configs (``slidefm.config_docs``).
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import sys
from pathlib import Path

from slidefm.errors import CohortError, SlidefmError

CONFIG_PATH = "pkg://slidefm.recipes"
HELP = "pretrain or fine-tune with a recipe (`slidefm train --help` lists every option)"


def add_parser(sub):
    p = sub.add_parser("train", help=HELP, add_help=False,
                       description="Hydra application; see `slidefm train --help` for the config groups and options.")
    p.set_defaults(func=lambda args: hydra_main(sys.argv[2:]))
    return p


def _hydra_args(argv: list[str]):
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def error(message: str):
        raise SlidefmError(f"{message} (`slidefm train --help` lists the options)")

    parser.error = error  # one line instead of argparse's usage block
    return parser.parse_args(argv)


def _first_of_sweeps(overrides: list[str]) -> list[str]:
    """Each sweep (``a=1,2``, ``range(..)``) replaced by its first value: what the first job will run."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            prefix = "++" if o.is_force_add() else "+" if o.is_add() else ""
            out.append(f"{prefix}{o.key_or_group}={next(iter(o.sweep_string_iterator()))}")
        else:
            out.append(o.input_line)
    return out


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_module

    from slidefm.config import register_configs

    register_configs()
    with initialize_config_module("slidefm.recipes", version_base="1.3"):
        return compose("config", overrides=overrides)


def _suggest(key: str) -> str:
    from slidefm.config import all_keys

    try:
        known = all_keys(_compose(["data.cohort=."]))
    except Exception:  # noqa: BLE001 - a suggestion is optional
        return ""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def explain(e: BaseException) -> str:
    """One line for a Hydra/OmegaConf composition error (their messages span lines and suggest `+key=`)."""
    text = str(e).strip()
    cause = e.__cause__
    m = re.match(r"Could not override '([^']+)'", text)
    if m:
        key = m.group(1)
        if cause is not None and "not in struct" not in str(cause) and "not in '" not in str(cause) \
                and "Key '" not in str(cause):
            return f"{key}: {str(cause).strip().splitlines()[0]}"
        return f"unknown option '{key}'{_suggest(key)}; `slidefm train --help` lists every option"
    m = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if m:
        group, choice = m.groups()
        avail = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
        return f"{group}={choice}: no such choice; available: {', '.join(avail) or '(none)'}"
    m = re.match(r"Error merging override (.+)", text)
    if m and cause is not None:
        return f"{m.group(1)}: {str(cause).strip().splitlines()[0]}"
    if type(e).__name__ == "OverrideParseException":
        lines = [s for s in text.splitlines() if s and not s.startswith("See https")]
        return ": ".join(lines) + " (overrides are key=value)"
    first = text.splitlines()[0] if text else type(e).__name__
    return first + (f": {str(cause).strip().splitlines()[0]}" if cause is not None and str(cause).strip() else "")


def preflight(overrides: list[str]):
    """Compose and check the config as the (first) job will see it; raise SlidefmError with one line."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from slidefm.config import missing_keys, unknown_keys

    try:
        cfg = _compose(_first_of_sweeps(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise SlidefmError(explain(e)) from None
    unknown = unknown_keys(cfg)
    if unknown:
        raise SlidefmError(f"unknown option '{unknown[0]}'{_suggest(unknown[0])}; "
                           "`slidefm train --help` lists every option")
    missing = missing_keys(cfg)
    if missing:
        hint = " (the cohort directory)" if missing[0] == "data.cohort" else ""
        value = "DIR" if hint else "VALUE"
        raise SlidefmError(f"missing required option {missing[0]}{hint}: add {missing[0]}={value}")
    if cfg.model.init_from and not Path(cfg.model.init_from).is_file():
        raise SlidefmError(f"model.init_from: checkpoint {cfg.model.init_from} does not exist")
    from slidefm.cohort import Cohort

    try:
        Cohort.open(cfg.data.cohort, store=cfg.data.store)
    except CohortError as e:
        p = e.problems[0]
        more = f" (and {len(e.problems) - 1} more: `slidefm check {cfg.data.cohort}`)" if len(e.problems) > 1 else ""
        where = f" [{p.where}]" if p.where else ""
        raise SlidefmError(f"data.cohort: {p.file}{where}: {p.message}{more}") from None
    except SlidefmError as e:
        raise SlidefmError(f"data.cohort={cfg.data.cohort}: {e}") from None
    return cfg


def _remove_scaffolding(run_dir: Path) -> None:
    """After a user error inside the job: remove what Hydra wrote (.hydra/, the job log) when that is all there is."""
    if not run_dir.is_dir():
        return
    entries = list(run_dir.iterdir())
    if all(p.name == ".hydra" or p.suffix == ".log" for p in entries):
        shutil.rmtree(run_dir, ignore_errors=True)


def hydra_main(argv: list[str]) -> int:
    """`slidefm train ARGV`: help, pre-flight checks, then the Hydra run; user errors raise SlidefmError."""
    args = _hydra_args(argv)
    if args.help:
        from slidefm.config_docs import render_text

        print(render_text(), end="")
        return 0
    hydra_only = (args.hydra_help or args.cfg or args.info or args.shell_completion or args.config_name
                  or args.config_path or args.config_dir or args.experimental_rerun)
    if not hydra_only:
        preflight(args.overrides)

    import hydra

    from slidefm.config import register_configs

    register_configs()
    pid = os.getpid()
    failures: list[SlidefmError] = []

    @hydra.main(config_path=CONFIG_PATH, config_name="config", version_base="1.3")
    def _main(cfg):
        from hydra.core.hydra_config import HydraConfig

        from slidefm.train.run import train

        try:
            return train(cfg)
        except SlidefmError as e:
            if os.getpid() != pid:  # a launcher's worker process (e.g. submitit): its log keeps the error
                raise
            failures.append(e)
            _remove_scaffolding(Path(HydraConfig.get().runtime.output_dir))
            return None

    saved = sys.argv
    sys.argv = ["slidefm train", *argv]
    try:
        _main()
    finally:
        sys.argv = saved
    if failures:
        raise failures[0]
    return 0
