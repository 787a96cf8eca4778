"""Cosine nearest neighbours that exclude the query's own patient, and retrieval metrics over them."""

from __future__ import annotations

import numpy as np

from .probes import l2_normalise


def neighbours(X: np.ndarray, groups: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Indices (n, k) of each row's k most cosine-similar rows of *other* groups, most similar first;
    -1 pads rows with fewer than k candidates. Ties go to the lower row index."""
    Z = l2_normalise(X).astype(np.float32)
    groups = np.asarray(groups)
    n = len(Z)
    out = np.full((n, k), -1, dtype=np.int64)
    for s in range(0, n, chunk):
        sim = Z[s:s + chunk] @ Z.T
        sim[groups[s:s + chunk, None] == groups[None, :]] = -np.inf
        order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        valid = np.take_along_axis(sim, order, axis=1) > -np.inf
        out[s:s + chunk, :order.shape[1]] = np.where(valid, order, -1)
    return out


def retrieval_scores(X: np.ndarray, y: np.ndarray, groups: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-query top-k hit (0/1) and AP@k; NaN for queries with no same-label row outside their patient.

    With rel_i = 1 when the i-th retrieved row has the query's label and R = number of such rows
    among the other patients: hit@k = max_{i<=k} rel_i and
    AP@k = (1 / min(k, R)) * sum_{i<=k} rel_i * precision@i.
    """
    y = np.asarray(y)
    groups = np.asarray(groups)
    nn = neighbours(X, groups, k)
    valid = nn >= 0
    rel = valid & (y[np.where(valid, nn, 0)] == y[:, None])
    R = np.array([np.sum((y == y[i]) & (groups != groups[i])) for i in range(len(y))])
    prec = np.cumsum(rel, axis=1) / np.arange(1, k + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (rel * prec).sum(axis=1) / np.minimum(k, R)
    hit = rel.any(axis=1).astype(float)
    none = R == 0
    ap[none] = np.nan
    hit[none] = np.nan
    return hit, ap
