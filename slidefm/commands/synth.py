"""`slidefm synth OUT`: write a synthetic cohort with planted biology (docs/synthetic-cohort.md)."""

from __future__ import annotations

import argparse
import time

from slidefm.config_cli import add_dataclass_arguments, dataclass_from_args

HELP = "write a synthetic cohort with planted biology"


def add_parser(subparsers) -> argparse.ArgumentParser:
    from slidefm.cohort.synth import SynthConfig

    p = subparsers.add_parser(
        "synth",
        help=HELP,
        description="Write a synthetic cohort in the cohort-contract layout (slides.csv, features/*.h5, "
                    "reports.csv, expression.h5ad, clinical.csv, tasks.yaml, cohort.yaml) plus truth/ "
                    "with the latent regions. Deterministic for a given --seed.",
    )
    p.add_argument("out", help="output cohort directory")
    add_dataclass_arguments(p, SynthConfig)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from slidefm.cohort.synth import SynthConfig, generate_cohort

    cfg = dataclass_from_args(SynthConfig, args)
    t0 = time.perf_counter()
    s = generate_cohort(args.out, cfg, overwrite=args.overwrite)
    print(f"wrote {s.path}: {s.patients} patients, {s.slides} slides, {s.patches} patches (D={cfg.dim}), "
          f"{s.reports} reports, {s.expression} expression profiles in {time.perf_counter() - t0:.1f} s")
    return 0
