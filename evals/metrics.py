"""Classification and survival metrics, and the patient-level cluster bootstrap.

Implemented here (not delegated) so that the bootstrap can call them thousands of times on
resampled rows without sklearn's input validation; tests cross-check each against sklearn,
lifelines and scikit-survival.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.stats import rankdata


def binary_auroc(y: np.ndarray, score: np.ndarray) -> float:
    """AUROC of ``score`` for the positives ``y`` (bool); ties count 1/2 (Mann-Whitney U). NaN if one class."""
    y = np.asarray(y, bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auroc(y: np.ndarray, proba: np.ndarray) -> float:
    """Binary: AUROC of column 1. Multiclass: mean one-vs-rest AUROC over the classes present in ``y``."""
    y = np.asarray(y)
    proba = np.asarray(proba, float)
    if proba.shape[1] == 2:
        return binary_auroc(y == 1, proba[:, 1])
    vals = [binary_auroc(y == c, proba[:, c]) for c in range(proba.shape[1]) if (y == c).any()]
    vals = [v for v in vals if not np.isnan(v)]
    return float(np.mean(vals)) if len(vals) >= 2 else float("nan")


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y``."""
    y, pred = np.asarray(y), np.asarray(pred)
    classes = np.unique(y)
    return float(np.mean([(pred[y == c] == c).mean() for c in classes])) if len(classes) else float("nan")


def weighted_f1(y: np.ndarray, pred: np.ndarray) -> float:
    """Per-class F1 averaged with weights = class support in ``y``."""
    y, pred = np.asarray(y), np.asarray(pred)
    classes, support = np.unique(y, return_counts=True)
    f1 = []
    for c in classes:
        tp = np.sum((pred == c) & (y == c))
        denom = np.sum(pred == c) + np.sum(y == c)
        f1.append(2 * tp / denom if denom else 0.0)
    return float(np.average(f1, weights=support)) if len(classes) else float("nan")


def quadratic_kappa(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Cohen's kappa with quadratic weights (w_ij = (i-j)^2) over class indices 0..n_classes-1."""
    y, pred = np.asarray(y, int), np.asarray(pred, int)
    obs = np.zeros((n_classes, n_classes))
    np.add.at(obs, (y, pred), 1)
    n = obs.sum()
    if n == 0:
        return float("nan")
    exp = np.outer(obs.sum(1), obs.sum(0)) / n
    i, j = np.indices((n_classes, n_classes))
    w = (i - j) ** 2
    denom = (w * exp).sum()
    return float(1 - (w * obs).sum() / denom) if denom > 0 else float("nan")


def classification_metrics(y: np.ndarray, proba: np.ndarray, ordinal: bool = False) -> dict[str, float]:
    """auroc (macro one-vs-rest), balanced_accuracy, weighted_f1 and, for ordinal labels, quadratic_kappa."""
    pred = np.argmax(proba, axis=1)
    out = {
        "auroc": macro_auroc(y, proba),
        "balanced_accuracy": balanced_accuracy(y, pred),
        "weighted_f1": weighted_f1(y, pred),
    }
    if ordinal:
        out["quadratic_kappa"] = quadratic_kappa(y, pred, proba.shape[1])
    return out


def harrell_c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's concordance index; higher ``risk`` = earlier event.

    A pair (i, j) is comparable when i has an event and either T_i < T_j, or T_i == T_j and j is
    censored; it is concordant when risk_i > risk_j and counts 1/2 when the risks tie.
    """
    t = np.asarray(time, float)
    e = np.asarray(event).astype(bool)
    r = np.asarray(risk, float)
    ti, tj = t[:, None], t[None, :]
    comparable = e[:, None] & ((ti < tj) | ((ti == tj) & ~e[None, :]))
    n = comparable.sum()
    if n == 0:
        return float("nan")
    ri, rj = r[:, None], r[None, :]
    conc = ((ri > rj) & comparable).sum() + 0.5 * ((ri == rj) & comparable).sum()
    return float(conc / n)


def cluster_bootstrap(
    stat: Callable[[np.ndarray], dict[str, float]],
    groups: np.ndarray,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile CIs of ``stat(row_indices)`` when whole groups (patients) are resampled with replacement.

    ``stat`` gets the row indices of a resample (a patient drawn twice contributes its rows twice) and
    returns named values; NaN draws (e.g. one class only) are dropped.
    """
    groups = np.asarray(groups)
    _, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(inverse.max() + 2))
    members = [order[bounds[g]:bounds[g + 1]] for g in range(len(bounds) - 1)]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        pick = rng.integers(0, len(members), len(members))
        idx = np.concatenate([members[g] for g in pick])
        for k, v in stat(idx).items():
            draws.setdefault(k, []).append(v)
    alpha = (1 - level) / 2
    out = {}
    for k, vals in draws.items():
        a = np.asarray(vals, float)
        a = a[~np.isnan(a)]
        out[k] = (float(np.quantile(a, alpha)), float(np.quantile(a, 1 - alpha))) if len(a) else (np.nan, np.nan)
    return out
