"""Matplotlib figures (Agg backend): ROC, Kaplan-Meier, UMAP, RI curve, few-shot curve, training curves."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless; also what papermill kernels get

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .metrics import binary_auroc  # noqa: E402

_STYLES = ["-", "--", ":", "-."]


def _roc_points(pos: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(pos.astype(int), score)
    return fpr, tpr


def roc_figure(curves: dict, title: str):
    """``curves``: model -> (y, proba, class names). Binary: one curve per model; multiclass: one
    one-vs-rest curve per class (colour) and model (line style)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for m_i, (model, (y, proba, classes)) in enumerate(curves.items()):
        ls = _STYLES[m_i % len(_STYLES)]
        cols = [1] if proba.shape[1] == 2 else range(proba.shape[1])
        for c in cols:
            pos = y == c
            if pos.all() or not pos.any():
                continue
            fpr, tpr = _roc_points(pos, proba[:, c])
            name = model if proba.shape[1] == 2 else f"{model}: {classes[c]}"
            ax.plot(fpr, tpr, ls, color=f"C{c if proba.shape[1] > 2 else m_i}",
                    label=f"{name} (AUC {binary_auroc(pos, proba[:, c]):.2f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def km_figure(groups: dict, title: str):
    """``groups``: model -> (time, event, risk group 1/0, log-rank p); one panel per model."""
    from lifelines import KaplanMeierFitter

    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4), squeeze=False, sharey=True)
    for ax, (model, (t, e, g, p)) in zip(axes[0], groups.items()):
        for val, name, color in ((0, "low risk", "C0"), (1, "high risk", "C3")):
            m = g == val
            if m.any():
                KaplanMeierFitter().fit(t[m], e[m], label=f"{name} (n={int(m.sum())})").plot_survival_function(
                    ax=ax, color=color, ci_show=True)
        ax.set(title=f"{model}: log-rank p={p:.3g}", xlabel="time", ylabel="survival probability", ylim=(0, 1.02))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def umap_coords(X: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D UMAP of L2-normalised embeddings (cosine geometry, as the neighbour metrics use)."""
    import warnings

    import umap

    Z = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)  # seeded = single thread
        return umap.UMAP(n_neighbors=max(2, min(15, len(Z) - 1)), random_state=seed).fit_transform(Z)


def umap_figure(coords: np.ndarray, colours: dict[str, np.ndarray], title: str):
    """One scatter panel per colouring (label or site); categorical legend, missing values grey."""
    n = len(colours)
    ncol = min(n, 3)
    nrow = -(-n // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 4 * nrow), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, (name, vals) in zip(axes.flat, colours.items()):
        vals = pd.Series(vals, dtype=object)
        missing = vals.isna().to_numpy()
        ax.scatter(coords[missing, 0], coords[missing, 1], s=8, c="lightgrey", label="NA" if missing.any() else None)
        for i, v in enumerate(sorted(vals[~missing].astype(str).unique())):
            m = (vals.astype(str) == v).to_numpy() & ~missing
            ax.scatter(coords[m, 0], coords[m, 1], s=8, color=f"C{i % 10}", label=v)
        ax.set(title=name, xticks=[], yticks=[])
        ax.legend(fontsize=7, markerscale=1.5, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def ri_figure(curves: dict[str, dict[int, float]]):
    fig, ax = plt.subplots(figsize=(5, 4))
    for model, c in curves.items():
        ks = sorted(c)
        ax.plot(ks, [c[k] for k in ks], "o-", label=model)
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set(xlabel="k neighbours", ylabel="Robustness Index", ylim=(0, 1), title="Robustness Index vs k")
    ax.legend()
    fig.tight_layout()
    return fig


def fewshot_figure(curves: dict[str, dict[int, list[float]]], title: str):
    """``curves``: model -> {k: balanced accuracy per draw}; mean +- sd over draws."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for model, c in curves.items():
        ks = sorted(c)
        mean = np.array([np.nanmean(c[k]) for k in ks])
        sd = np.array([np.nanstd(c[k]) for k in ks])
        ax.errorbar(ks, mean, yerr=sd, marker="o", capsize=3, label=model)
    ax.set(xscale="log", xlabel="training rows per class", ylabel="balanced accuracy", title=title)
    ax.set_xticks(sorted({k for c in curves.values() for k in c}))
    ax.minorticks_off()
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.legend()
    fig.tight_layout()
    return fig


def save(fig, path) -> None:
    fig.savefig(path, dpi=110)
    plt.close(fig)
