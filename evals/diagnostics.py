"""Pretraining diagnostics from a Lightning CSVLogger ``metrics.csv``: loss and RankMe curves, collapse flags."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from slidefm.errors import SlidefmError


def find_metrics_csv(run_dir: str | Path) -> Path:
    """The newest ``metrics.csv`` under ``run_dir`` (CSVLogger writes ``<name>/version_N/metrics.csv``)."""
    found = sorted(Path(run_dir).rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SlidefmError(f"{run_dir}: no metrics.csv below this directory")
    return found[-1]


def load_metrics(path: str | Path) -> pd.DataFrame:
    """One row per step: CSVLogger writes train and validation metrics on separate rows, merged here."""
    path = Path(path)
    if path.is_dir():
        path = find_metrics_csv(path)
    df = pd.read_csv(path)
    if "step" not in df.columns:
        raise SlidefmError(f"{path}: expected a 'step' column (Lightning CSVLogger format)")
    return df.groupby("step", sort=True).first().reset_index()


def loss_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if "loss" in c]


def rank_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if "rankme" in c.lower()]


def collapse_flags(df: pd.DataFrame, rank_drop: float = 0.5) -> list[str]:
    """Warnings: non-finite losses, and RankMe ending below ``rank_drop`` x its maximum (collapse)."""
    out = []
    for c in loss_columns(df):
        v = df[c].dropna().to_numpy(float)
        if len(v) and not np.all(np.isfinite(v)):
            out.append(f"{c}: non-finite values from step {int(df.loc[~np.isfinite(df[c].fillna(0)), 'step'].iloc[0])}")
    for c in rank_columns(df):
        v = df[c].dropna().to_numpy(float)
        if len(v) >= 2 and v[-1] < rank_drop * np.nanmax(v):
            out.append(f"{c}: fell from {np.nanmax(v):.1f} to {v[-1]:.1f} (possible representation collapse)")
    return out


def training_figure(df: pd.DataFrame):
    """Loss curves (left) and RankMe (right) against step."""
    from . import plots  # noqa: F401  (selects the Agg backend)
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for c in loss_columns(df):
        s = df[["step", c]].dropna()
        a.plot(s["step"], s[c], label=c)
    a.set(xlabel="step", ylabel="loss", title="losses")
    if loss_columns(df):
        a.legend(fontsize=7)
    for c in rank_columns(df):
        s = df[["step", c]].dropna()
        b.plot(s["step"], s[c], label=c)
    b.set(xlabel="step", ylabel="RankMe", title="RankMe (effective rank)")
    if rank_columns(df):
        b.legend(fontsize=7)
    fig.tight_layout()
    return fig
