"""`slidefm eval --embeddings FILE.h5ad --cohort PATH --out DIR`: probes, survival, retrieval, robustness."""

from __future__ import annotations

import argparse

from slidefm.config_cli import add_dataclass_arguments, dataclass_from_args

HELP = "evaluate slide/patient embeddings on a cohort's tasks"


def add_parser(subparsers) -> argparse.ArgumentParser:
    from slidefm.evals.config import EvalConfig

    p = subparsers.add_parser(
        "eval",
        help=HELP,
        description="Linear/few-shot/k-NN probes, penalised Cox survival, retrieval and site robustness on "
                    "the embeddings and on mean-pooled patch features (model 'mean_pool'), with patient-level "
                    "bootstrap CIs. Writes results.csv, summary.md and plots/ to --out (docs/evaluation.md).",
    )
    p.add_argument("--embeddings", required=True, help="AnnData .h5ad; obs names are slide_ids or patient_ids")
    p.add_argument("--cohort", required=True, help="cohort directory")
    p.add_argument("--tasks", default=None, help="tasks.yaml (default: the cohort's)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the mean-pool baseline")
    add_dataclass_arguments(p, EvalConfig, skip=("baseline",))
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from slidefm.evals import evaluate
    from slidefm.evals.config import EvalConfig

    cfg = dataclass_from_args(EvalConfig, args)
    res = evaluate(args.embeddings, args.cohort, tasks=args.tasks, out=args.out, config=cfg)
    print(f"wrote {args.out}/results.csv ({len(res.results)} rows) and {args.out}/summary.md")
    for n in res.artifacts.notes:
        print(f"note: {n}")
    return 0
