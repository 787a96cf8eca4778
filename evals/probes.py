"""Linear probe (inner-CV-tuned C), few-shot probe (fixed C), cosine k-NN and zero-shot classification."""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .metrics import macro_auroc
from .splits import Split, grouped_folds


def fit_logreg(X: np.ndarray, y: np.ndarray, C: float, seed: int = 0):
    """Standardise (fit on these rows only) + class-balanced logistic regression."""
    model = make_pipeline(
        StandardScaler(),
        LogisticRegression(C=C, class_weight="balanced", max_iter=2000, random_state=seed),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X, y)
    return model


def predict_proba(model, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities in columns 0..n_classes-1, zero for classes absent from the model's training rows."""
    out = np.zeros((len(X), n_classes))
    out[:, model.classes_.astype(int)] = model.predict_proba(X)
    return out


def tune_C(X: np.ndarray, y: np.ndarray, groups: np.ndarray, grid: list[float], n_inner: int, seed: int = 0) -> float:
    """The C of ``grid`` with the best mean inner-fold macro AUROC; only the rows given are ever seen.

    Ties go to the smaller C (stronger regularisation).
    """
    n_classes = int(y.max()) + 1
    if len(grid) == 1:
        return float(grid[0])
    folds = grouped_folds(y, groups, n_inner, seed)
    scores = []
    for C in sorted(grid):
        vals = []
        for tr, va in folds:
            if len(np.unique(y[tr])) < 2:
                continue
            m = fit_logreg(X[tr], y[tr], C, seed)
            vals.append(macro_auroc(y[va], predict_proba(m, X[va], n_classes)))
        vals = [v for v in vals if not np.isnan(v)]
        scores.append(np.mean(vals) if vals else -np.inf)
    return float(sorted(grid)[int(np.argmax(scores))])


def cv_linear_probe(
    X: np.ndarray, y: np.ndarray, groups: np.ndarray, splits: list[Split], grid: list[float],
    n_inner: int = 3, seed: int = 0,
) -> tuple[np.ndarray, list[float]]:
    """Out-of-fold class probabilities (NaN rows = never tested) and the C chosen in each outer fold."""
    n_classes = int(y.max()) + 1
    oof = np.full((len(y), n_classes), np.nan)
    chosen = []
    for tr, te in splits:
        C = tune_C(X[tr], y[tr], groups[tr], grid, n_inner, seed)
        chosen.append(C)
        oof[te] = predict_proba(fit_logreg(X[tr], y[tr], C, seed), X[te], n_classes)
    return oof, chosen


def feasible_shots(y: np.ndarray, splits: list[Split], shots: list[int]) -> list[int]:
    """The k for which every class has at least k training rows in every fold."""
    n_classes = int(y.max()) + 1
    least = min(np.bincount(y[tr], minlength=n_classes).min() for tr, _ in splits)
    return [k for k in sorted(shots) if k <= least]


def fewshot_probe(
    X: np.ndarray, y: np.ndarray, splits: list[Split], k: int, repeats: int, C: float, seed: int = 0,
) -> list[np.ndarray]:
    """For each repeat: out-of-fold probabilities from probes trained on k random training rows per class.

    No tuning is possible with k rows per class, so C is fixed.
    """
    n_classes = int(y.max()) + 1
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(repeats):
        oof = np.full((len(y), n_classes), np.nan)
        for tr, te in splits:
            pick = np.concatenate([rng.choice(tr[y[tr] == c], k, replace=False) for c in range(n_classes)])
            oof[te] = predict_proba(fit_logreg(X[pick], y[pick], C, seed), X[te], n_classes)
        out.append(oof)
    return out


def l2_normalise(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, float)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def knn_proba(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, k: int, n_classes: int) -> np.ndarray:
    """Share of each class among the k most cosine-similar training rows."""
    sim = l2_normalise(X_test) @ l2_normalise(X_train).T
    k = min(k, X_train.shape[0])
    nn = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    out = np.zeros((len(X_test), n_classes))
    for c in range(n_classes):
        out[:, c] = (y_train[nn] == c).mean(axis=1)
    return out


def cv_knn(X: np.ndarray, y: np.ndarray, splits: list[Split], k: int) -> np.ndarray:
    """Out-of-fold k-NN class shares (test patients never appear among the neighbours)."""
    n_classes = int(y.max()) + 1
    oof = np.full((len(y), n_classes), np.nan)
    for tr, te in splits:
        oof[te] = knn_proba(X[tr], y[tr], X[te], k, n_classes)
    return oof


def zeroshot_proba(
    X: np.ndarray, prompts: dict[int, list[str]], text_encoder: Callable[[list[str]], np.ndarray],
    temperature: float = 0.01,
) -> np.ndarray:
    """Softmax over cosine similarity to each class's mean (L2-normalised) prompt embedding."""
    n_classes = max(prompts) + 1
    centroids = []
    for c in range(n_classes):
        emb = l2_normalise(np.asarray(text_encoder(list(prompts[c])), float))
        centroids.append(emb.mean(axis=0))
    T = l2_normalise(np.stack(centroids))
    if T.shape[1] != X.shape[1]:
        raise ValueError(f"text embeddings have {T.shape[1]} dims, slide embeddings {X.shape[1]}")
    logits = l2_normalise(X) @ T.T / temperature
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)
