"""`slidefm check COHORT`: validate a cohort directory and summarise it."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

from slidefm.config_cli import add_dataclass_arguments, dataclass_from_args
from slidefm.errors import CohortError, Problem


@dataclass
class CheckConfig:
    quick: bool = field(default=False, metadata={"help": "skip the NaN/Inf scan of feature values"})
    json: bool = field(default=False, metadata={"help": "print one JSON object instead of text"})
    workers: int | None = field(default=None, metadata={"help": "processes checking slide files "
                                                        "(default: up to 8 when there are many slides)"})


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("check", help="validate a cohort directory and print a summary",
                              description="Check COHORT against the cohort contract; exit 0 if there are no errors.")
    p.add_argument("cohort", help="cohort directory")
    add_dataclass_arguments(p, CheckConfig)
    p.set_defaults(func=run)
    return p


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_summary(s: dict) -> list[str]:
    lines = [f"cohort {s['root']}: {s['slides']} slides, {s['patients']} patients"]
    if "patches_per_slide" in s:
        p = s["patches_per_slide"]
        lines.append(f"  patches per slide: min {p['min']}, median {p['median']:g}, max {p['max']} "
                     f"(total {p['total']})")
        dtypes = ", ".join(f"{k} x{v}" for k, v in s["dtypes"].items())
        lines.append(f"  feature dim D: {s['feature_dim']} ({dtypes})")
    for key, value in s.items():
        if key.startswith("share_with_") and key != "share_with_label":
            extra = f" ({s['expression_units']})" if key == "share_with_expression" else ""
            lines.append(f"  patients with {key[len('share_with_'):]}: {_pct(value)}{extra}")
    for name, share in s.get("share_with_label", {}).items():
        lines.append(f"  labelled for task {name}: {_pct(share)}")
    if "slides_per_site" in s:
        lines.append("  slides per site: " + ", ".join(f"{k} {v}" for k, v in s["slides_per_site"].items()))
    return lines


def _emit(args, ok: bool, summary: dict | None, problems: list[Problem]) -> None:
    if args.json:
        print(json.dumps({"ok": ok, "summary": summary, "problems": [
            {"level": p.level, "file": p.file, "where": p.where, "message": p.message} for p in problems]}, indent=2))
        return
    if summary is not None:
        print("\n".join(format_summary(summary)))
    for p in sorted(problems, key=lambda p: p.level != "error"):
        print(f"  {p}")
    n_err = sum(p.level == "error" for p in problems)
    n_warn = len(problems) - n_err
    print(f"{'OK' if ok else 'FAILED'}: {n_err} error(s), {n_warn} warning(s)")


def run(args: argparse.Namespace) -> int:
    from slidefm.cohort import Cohort, summarize, validate_cohort

    cfg = dataclass_from_args(CheckConfig, args)
    try:
        cohort = Cohort.open(args.cohort, store=False)
    except CohortError as e:
        _emit(cfg, False, None, e.problems)
        return 1
    report = validate_cohort(cohort, scan_values=not cfg.quick, workers=cfg.workers)
    _emit(cfg, report.ok, summarize(cohort, report), report.problems)
    return 0 if report.ok else 1
