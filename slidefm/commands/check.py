"""`slidefm check COHORT`: validate a cohort directory and summarise it."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from slidefm.config_cli import add_dataclass_arguments, dataclass_from_args
from slidefm.errors import CohortError, Problem


@dataclass
class CheckConfig:
    quick: bool = field(default=False, metadata={"help": "skip the NaN/Inf scan of feature values"})
    json: bool = field(default=False, metadata={"help": "print one JSON object instead of text"})
    verbose: bool = field(default=False, metadata={"help": "one line per slide: stride and its source, grid "
                                                   "size, occupancy, snapped and collided patches"})
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
        lines.extend(format_geometry(s.get("geometry") or {}))
    for key, value in s.items():
        if key.startswith("share_with_") and key != "share_with_label":
            extra = f" ({s['expression_units']})" if key == "share_with_expression" else ""
            lines.append(f"  patients with {key[len('share_with_'):]}: {_pct(value)}{extra}")
    for name, share in s.get("share_with_label", {}).items():
        lines.append(f"  labelled for task {name}: {_pct(share)}")
    if "slides_per_site" in s:
        sites = list(s["slides_per_site"].items())
        # Real cohorts have hundreds of sites (TCGA: ~500 tissue source sites): name the largest only.
        more = f" (+{len(sites) - _SITES_SHOWN} more sites)" if len(sites) > _SITES_SHOWN else ""
        lines.append(f"  slides per site ({len(sites)} sites): "
                     + ", ".join(f"{k} {v}" for k, v in sites[:_SITES_SHOWN]) + more)
    return lines


_SITES_SHOWN = 12


def format_geometry(g: dict) -> list[str]:
    """Summary lines on the slides' grids (slidefm.grid): what the model's positions will be."""
    lines = []
    if g.get("slides_without_coords"):
        lines.append(f"  features-only slides (no coords): {g['slides_without_coords']} of "
                     f"{g['slides_without_coords'] + g['slides_with_coords']} (position-free aggregators only)")
    if "stride_px" in g:
        strides = ", ".join(f"{k} px x{v}" for k, v in g["stride_px"].items())
        sources = ", ".join(f"{k} x{v}" for k, v in g["stride_source"].items())
        lines.append(f"  grid stride: {strides} (from {sources})")
        o, nb, gr = g["occupancy"], g["neighbour_share"], g["grid"]
        lines.append(f"  grid size: median {gr['median_w']:g} x {gr['median_h']:g} cells, largest {gr['largest']}; "
                     f"occupancy min {_pct(o['min'])}, median {_pct(o['median'])}, max {_pct(o['max'])}; "
                     f"patches with a neighbour: min {_pct(nb['min'])}, median {_pct(nb['median'])}")
        lines.append(f"  snapped to the slide's lattice: {g['snapped']['patches']} patches on {g['snapped']['slides']}"
                     f" slide(s); collided (moved to a free cell): {g['collided']['patches']} patches on "
                     f"{g['collided']['slides']} slide(s)")
    return lines


def _emit(args, ok: bool, summary: dict | None, problems: list[Problem], slide_lines: list[str] = ()) -> None:
    if args.json:
        print(json.dumps({"ok": ok, "summary": summary, "problems": [
            {"level": p.level, "file": p.file, "where": p.where, "message": p.message} for p in problems]}, indent=2))
        return
    if summary is not None:
        print("\n".join(format_summary(summary)))
    for line in slide_lines:
        print(line)
    for p in sorted(problems, key=lambda p: p.level != "error"):
        print(f"  {p}")
    n_err = sum(p.level == "error" for p in problems)
    n_warn = len(problems) - n_err
    print(f"{'OK' if ok else 'FAILED'}: {n_err} error(s), {n_warn} warning(s)")


def run(args: argparse.Namespace) -> int:
    from slidefm.cohort import Cohort, summarize, validate_cohort
    from slidefm.cohort.validate import format_slide_geometry

    cfg = dataclass_from_args(CheckConfig, args)
    try:
        cohort = Cohort.open(args.cohort, store=False)
    except CohortError as e:
        if not Path(args.cohort).is_dir():
            raise  # nothing to check: one line and exit 2, like every other command
        _emit(cfg, False, None, e.problems)
        return 1
    report = validate_cohort(cohort, scan_values=not cfg.quick, workers=cfg.workers)
    slide_lines = format_slide_geometry(report.slide_stats) if cfg.verbose else []
    _emit(cfg, report.ok, summarize(cohort, report), report.problems, slide_lines)
    return 0 if report.ok else 1
