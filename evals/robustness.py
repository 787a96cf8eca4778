"""Robustness to the site of origin: Robustness Index (PathoROB), site predictability, leave-one-site-out."""

from __future__ import annotations

import numpy as np

from .probes import cv_linear_probe
from .retrieval import neighbours


def ri_counts(X: np.ndarray, labels: np.ndarray, sites: np.ndarray, groups: np.ndarray, k: int):
    """Per query: SO = #neighbours with the same label from another site, OS = #other label, same site,
    among the k cosine-nearest rows of other patients (so the query's own slide is excluded too)."""
    labels, sites = np.asarray(labels), np.asarray(sites)
    nn = neighbours(X, groups, k)
    valid = nn >= 0
    j = np.where(valid, nn, 0)
    same_label = labels[j] == labels[:, None]
    same_site = sites[j] == sites[:, None]
    so = (valid & same_label & ~same_site).sum(axis=1)
    os_ = (valid & ~same_label & same_site).sum(axis=1)
    return so, os_


def robustness_index(so: np.ndarray, os_: np.ndarray) -> tuple[float, int]:
    """RI = sum SO / (sum SO + sum OS) pooled over queries, and its support (that denominator)."""
    denom = int(so.sum() + os_.sum())
    return (float(so.sum() / denom) if denom else float("nan")), denom


def site_holdout(
    X: np.ndarray, y: np.ndarray, groups: np.ndarray, sites: np.ndarray, grid: list[float],
    n_inner: int = 3, seed: int = 0,
) -> dict[str, np.ndarray]:
    """Leave-one-site-out probe: for each site, train (C tuned on inner folds of the other sites) and
    predict that site's rows. Returns site -> probabilities for that site's rows (sites whose training
    part lacks a class are skipped)."""
    out = {}
    n_classes = int(y.max()) + 1
    for s in np.unique(sites):
        te = np.flatnonzero(sites == s)
        tr = np.flatnonzero(sites != s)
        if len(np.unique(y[tr])) < n_classes or len(np.unique(groups[tr])) < 2:
            continue
        oof, _ = cv_linear_probe(X, y, groups, [(tr, te)], grid, n_inner, seed)
        out[str(s)] = oof[te]
    return out

