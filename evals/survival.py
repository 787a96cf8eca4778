"""Penalised Cox regression on PCA-reduced embeddings, tuned on inner folds; risk groups and log-rank test."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from .metrics import harrell_c_index
from .splits import Split, grouped_folds


@dataclass
class CoxModel:
    scaler: StandardScaler
    pca: PCA
    beta: np.ndarray

    def risk(self, X: np.ndarray) -> np.ndarray:
        """Log partial hazard (higher = earlier event)."""
        return self.pca.transform(self.scaler.transform(X)) @ self.beta


def fit_cox(X: np.ndarray, time: np.ndarray, event: np.ndarray, penalizer: float, l1_ratio: float,
            pca_dim: int, seed: int = 0) -> CoxModel | None:
    """Standardise + PCA (both fit on these rows only) + lifelines CoxPHFitter; None if the fit fails."""
    from lifelines import CoxPHFitter

    scaler = StandardScaler().fit(X)
    Z = scaler.transform(X)
    # PCA needs fewer components than rows; keep the Cox fit well-posed relative to the events too.
    dim = int(max(1, min(pca_dim, Z.shape[1], Z.shape[0] - 1, max(1, int(event.sum()) - 1))))
    pca = PCA(n_components=dim, random_state=seed).fit(Z)
    P = pca.transform(Z)
    df = pd.DataFrame(P, columns=[f"pc{i}" for i in range(dim)])
    df["time"] = time
    df["event"] = event.astype(int)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cph = CoxPHFitter(penalizer=penalizer, l1_ratio=l1_ratio).fit(df, "time", "event")
    except Exception:  # lifelines raises ConvergenceError and numpy LinAlgError on ill-posed fits
        return None
    beta = cph.params_.to_numpy()
    if not np.all(np.isfinite(beta)):
        return None
    return CoxModel(scaler, pca, beta)


def tune_cox(X, time, event, groups, penalizers, l1_ratios, pca_dim, n_inner, seed=0) -> tuple[float, float]:
    """(penalizer, l1_ratio) with the best mean inner-fold c-index; only the rows given are seen.

    Failed fits score NaN and are skipped; ties go to the stronger penalty.
    """
    grid = [(p, l) for p in sorted(penalizers, reverse=True) for l in l1_ratios]
    if len(grid) == 1:
        return grid[0]
    folds = grouped_folds(event.astype(int), groups, n_inner, seed)
    best, best_score = grid[0], -np.inf
    for p, l in grid:
        vals = []
        for tr, va in folds:
            m = fit_cox(X[tr], time[tr], event[tr], p, l, pca_dim, seed)
            if m is not None:
                vals.append(harrell_c_index(time[va], event[va], m.risk(X[va])))
        vals = [v for v in vals if not np.isnan(v)]
        if vals and np.mean(vals) > best_score:
            best, best_score = (p, l), float(np.mean(vals))
    return best


def cv_cox(X, time, event, groups, splits: list[Split], penalizers, l1_ratios, pca_dim, n_inner=3, seed=0):
    """Out-of-fold risks (NaN = never tested), fold id per row, and the chosen (penalizer, l1_ratio) per fold.

    If the tuned fit fails on the full training part, the strongest penalty in the grid is used
    (ridge, which converges); the choice is recorded rather than dropping the fold.
    """
    risk = np.full(len(time), np.nan)
    fold_of = np.full(len(time), -1)
    chosen = []
    for f, (tr, te) in enumerate(splits):
        p, l = tune_cox(X[tr], time[tr], event[tr], groups[tr], penalizers, l1_ratios, pca_dim, n_inner, seed)
        m = fit_cox(X[tr], time[tr], event[tr], p, l, pca_dim, seed)
        if m is None:
            p, l = max(penalizers), 0.0
            m = fit_cox(X[tr], time[tr], event[tr], p, l, pca_dim, seed)
        if m is None:
            raise RuntimeError(f"Cox fit failed in fold {f} even with penalizer={p}, l1_ratio=0")
        chosen.append((p, l))
        risk[te] = m.risk(X[te])
        fold_of[te] = f
    return risk, fold_of, chosen


def risk_groups(risk: np.ndarray, fold_of: np.ndarray) -> np.ndarray:
    """1 = high risk (above the median predicted risk of its own test fold), 0 = low, -1 = untested.

    Split within each fold because risk scales differ between the folds' models.
    """
    g = np.full(len(risk), -1)
    for f in np.unique(fold_of[fold_of >= 0]):
        m = fold_of == f
        g[m] = (risk[m] > np.median(risk[m])).astype(int)
    return g


def logrank_p(time, event, group) -> float:
    """p-value of the log-rank test between risk groups 1 and 0."""
    from lifelines.statistics import logrank_test

    a, b = group == 1, group == 0
    if not a.any() or not b.any():
        return float("nan")
    return float(logrank_test(time[a], time[b], event[a], event[b]).p_value)
