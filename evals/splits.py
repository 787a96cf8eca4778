"""Patient-grouped evaluation splits: outer folds for testing, inner folds (training part only) for tuning."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from slidefm.errors import SlidefmError

Split = tuple[np.ndarray, np.ndarray]  # (train row indices, test row indices)


def grouped_folds(strata: np.ndarray, groups: np.ndarray, n_folds: int, seed: int = 0) -> list[Split]:
    """Stratified k-fold where all rows of one group (patient) fall in the same fold.

    ``n_folds`` is lowered to the number of groups when there are fewer; folds that come out
    empty are dropped.
    """
    strata = np.asarray(strata)
    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    k = min(int(n_folds), n_groups)
    if k < 2:
        raise SlidefmError(f"need at least 2 patients to split, got {n_groups}")
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # sklearn warns when a class has fewer groups than folds; the folds are still grouped.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return [(tr, te) for tr, te in cv.split(np.zeros(len(strata)), strata, groups) if len(te) and len(tr)]


def fixed_folds(assignment: pd.Series | np.ndarray) -> list[Split]:
    """Splits from a clinical.csv ``fold`` column (each value is one test fold) or ``split`` column
    (train/val/test: ``test`` rows are tested, ``train`` and ``val`` rows train; tuning uses inner folds
    of them, so ``val`` is not held out separately)."""
    a = pd.Series(np.asarray(assignment, dtype=object))
    if a.isna().any():
        raise SlidefmError(f"{int(a.isna().sum())} row(s) have no split/fold assignment")
    vals = a.astype(str).str.strip().str.lower()
    if set(vals) <= {"train", "val", "valid", "validation", "test"}:
        test = np.flatnonzero(vals == "test")
        train = np.flatnonzero(vals != "test")
        if not len(test) or not len(train):
            raise SlidefmError("the split column needs both train and test rows")
        return [(train, test)]
    out = []
    for f in sorted(vals.unique()):
        test = np.flatnonzero(vals == f)
        out.append((np.flatnonzero(vals != f), test))
    if len(out) < 2:
        raise SlidefmError("the fold column needs at least two distinct folds")
    return out


def check_grouped(splits: list[Split], groups: np.ndarray) -> None:
    """Raise if a group (patient) has rows on both sides of any split."""
    groups = np.asarray(groups)
    for i, (tr, te) in enumerate(splits):
        shared = set(groups[tr]) & set(groups[te])
        if shared:
            raise SlidefmError(f"fold {i}: patient(s) {sorted(shared)[:5]} are in both train and test")
