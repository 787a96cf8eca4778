"""Write an evaluation's results.csv, summary.md and plots; every file appears whole or not at all."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from .config import EvalConfig


def safe_name(s: str) -> str:
    """A task or model name as a file-name fragment."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(s))


MAIN_METRIC = {"classification": ("linear_probe", "auroc"), "survival": ("cox", "c_index")}


def _fmt(r) -> str:
    if r is None or np.isnan(r["mean"]):
        return "n/a"
    ci = "" if np.isnan(r["ci_low"]) else f" [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
    return f"{r['mean']:.3f}{ci}"


def _lookup(df: pd.DataFrame, task, kind, metric, model):
    m = df[(df.task == task) & (df.kind == kind) & (df.metric == metric) & (df.model == model)]
    return None if m.empty else m.iloc[0]


def _protocols_with_rows(df: pd.DataFrame) -> set[str]:
    """Protocols that produced results (row kinds: fewshot_k5 -> fewshot, site_probe -> robustness, ...)."""
    out = set()
    for kind in set(df.kind):
        kind = str(kind)
        out.add("fewshot" if kind.startswith("fewshot") else
                "robustness" if kind in ("robustness", "site_probe", "site_holdout") else kind)
    return out


def summary_markdown(result, cfg: EvalConfig) -> str:
    """Main metric per task for the model and mean_pool, with the gain; robustness; notes."""
    df = result.results
    models = list(dict.fromkeys(df.model)) or [cfg.model_name]
    model = cfg.model_name
    base = "mean_pool" if "mean_pool" in models else None
    ran = [p for p in cfg.protocols if p in _protocols_with_rows(df)]
    not_ran = [p for p in cfg.protocols if p not in ran]
    skipped = f" Requested without results: {', '.join(not_ran)} (reasons under Notes)." if not_ran else ""
    lines = ["# Evaluation summary", "",
             f"Protocols: {', '.join(ran) or 'none'}.{skipped} Outer folds: {cfg.folds} (patient-grouped), tuning on "
             f"{cfg.inner_folds} inner folds of each training part. CIs: {cfg.ci_level:.0%} patient-level cluster "
             f"bootstrap ({cfg.bootstrap} draws).", ""]
    head = f"| task | protocol | metric | {model} |" + (f" {base} | gain |" if base else "")
    lines += ["## Main metrics", "", head, "|" + "---|" * (head.count("|") - 1)]
    for t in result.tasks:
        kind, metric = MAIN_METRIC[t.kind]
        metrics = [metric] + (["balanced_accuracy"] if t.kind == "classification" else [])
        if t.kind == "classification" and t.ordinal:
            metrics.append("quadratic_kappa")
        for met in metrics:
            r = _lookup(df, t.name, kind, met, model)
            line = f"| {t.name} | {kind} | {met} | {_fmt(r)} |"
            if base:
                b = _lookup(df, t.name, kind, met, base)
                gain = (r["mean"] - b["mean"]) if r is not None and b is not None else np.nan
                line += f" {_fmt(b)} | {'n/a' if np.isnan(gain) else f'{gain:+.3f}'} |"
            lines.append(line)
    rob = df[df.kind.isin(["robustness", "site_probe"]) & df.metric.isin(["ri_mean", "balanced_accuracy",
                                                                        "chance_balanced_accuracy"])]
    if not rob.empty:
        lines += ["", "## Robustness to site", "",
                  "Robustness Index (higher = neighbours share biology rather than site; > 0.5 biology dominates) "
                  "and site-prediction balanced accuracy (lower = less site signal).", "",
                  "| model | label | metric | value |", "|---|---|---|---|"]
        for _, r in rob.iterrows():
            lines.append(f"| {r.model} | {r.task} | {r.kind}/{r.metric} | {_fmt(r)} |")
    drops = df[(df.kind == "site_holdout") & df.metric.str.endswith("_mean_drop")]
    if not drops.empty:
        lines += ["", "Leave-one-site-out: mean drop of the metric from cross-validation to an unseen site.", "",
                  "| model | task | metric | drop |", "|---|---|---|---|"]
        for _, r in drops.iterrows():
            lines.append(f"| {r.model} | {r.task} | {r.metric} | {r['mean']:+.3f} |")
    if result.artifacts.hyperparameters:
        lines += ["", "## Tuned hyperparameters (per outer fold, chosen on inner folds)", ""]
        for (task, m, what), vals in result.artifacts.hyperparameters.items():
            lines.append(f"- {task} / {m} / {what}: {vals}")
    if result.artifacts.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result.artifacts.notes]
    lines += ["", "All rows: `results.csv`. Definitions: docs/evaluation.md.", ""]
    return "\n".join(lines)


def _plots(result, cohort, cfg: EvalConfig, d: Path) -> None:
    from . import plots
    from .data import ri_labels

    art = result.artifacts
    for t in result.tasks:
        roc = {m: v for (task, m), v in art.roc.items() if task == t.name}
        if roc:
            plots.save(plots.roc_figure(roc, f"{t.name}: linear probe, out-of-fold"), d / f"roc_{safe_name(t.name)}.png")
        km = {m: v for (task, m), v in art.km.items() if task == t.name}
        if km:
            plots.save(plots.km_figure(km, f"{t.name}: risk groups (median split per test fold)"),
                       d / f"km_{safe_name(t.name)}.png")
        fs = {m: v for (task, m), v in art.fewshot.items() if task == t.name}
        if fs:
            plots.save(plots.fewshot_figure(fs, f"{t.name}: few-shot"), d / f"fewshot_{safe_name(t.name)}.png")
    if art.ri_curve:
        plots.save(plots.ri_figure(art.ri_curve), d / "robustness_index.png")
    if cfg.umap:
        for name, emb in art.embeddings.items():
            if len(emb.X) < 5:
                continue
            colours = {t.label: ri_labels(emb, t, cohort) for t in result.tasks if t.kind == "classification"}
            colours["site"] = emb.units["site"].to_numpy(dtype=object)
            coords = plots.umap_coords(emb.X, cfg.seed)
            plots.save(plots.umap_figure(coords, colours, f"{name} ({emb.level} embeddings)"),
                       d / f"umap_{safe_name(name)}.png")


def write_outputs(result, cohort, cfg: EvalConfig, out: Path) -> None:
    """Stage everything in a temporary sibling directory, then move each file into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        result.results.to_csv(stage / "results.csv", index=False)
        (stage / "summary.md").write_text(summary_markdown(result, cfg))
        if cfg.plots:
            (stage / "plots").mkdir()
            _plots(result, cohort, cfg, stage / "plots")
        if cfg.plots:
            (out / "plots").mkdir(exist_ok=True)
        for f in sorted(stage.rglob("*")):
            if f.is_file():
                os.replace(f, out / f.relative_to(stage))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
