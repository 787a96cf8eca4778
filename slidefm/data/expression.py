"""Gene-expression and other-omics preprocessing, fitted on training patients only.

``ExpressionTransform`` turns an AnnData (one row per patient) into a fixed-width float32 matrix
over the genes chosen on the training patients, plus a ``present`` mask for patients without a
measurement. Its fitted state is a plain dict of tensors/lists/str/numbers that goes into a
checkpoint and reloads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from slidefm.errors import SlidefmError

#: units -> (preprocessing, standardise by default)
UNITS: dict[str, tuple[str, bool]] = {
    "counts": ("normalize_total + log1p", True),
    "tpm": ("log1p", True),
    "log": ("none", True),
    "zscore": ("none", True),
    "binary": ("none", False),
}
_HVG_UNITS = ("counts", "tpm", "log")  # scanpy's dispersion-based HVG assumes log-expression
STATE_VERSION = 1


class GeneMismatchWarning(UserWarning):
    """Genes of the fitted transform are absent from the data being transformed."""


def _patient_index(adata) -> list[str]:
    """Patient ids of an AnnData's rows: the ``patient_id`` obs column if present, else obs_names."""
    if "patient_id" in adata.obs.columns:
        ids = [str(x) for x in adata.obs["patient_id"]]
    else:
        ids = [str(x) for x in adata.obs_names]
    seen: set[str] = set()
    dup = sorted({i for i in ids if i in seen or seen.add(i)})  # type: ignore[func-returns-value]
    if dup:
        raise SlidefmError(f"omics table has several rows for patient(s) {', '.join(dup[:5])}"
                           + (f" and {len(dup) - 5} more" if len(dup) > 5 else ""))
    return ids


def _gene_names(adata) -> list[str]:
    genes = [str(g) for g in adata.var_names]
    if len(set(genes)) != len(genes):
        seen: set[str] = set()
        dup = sorted({g for g in genes if g in seen or seen.add(g)})  # type: ignore[func-returns-value]
        raise SlidefmError(f"omics table has duplicate gene names: {', '.join(dup[:5])}"
                           + (f" and {len(dup) - 5} more" if len(dup) > 5 else ""))
    return genes


def _check_values(X, units: str) -> None:
    data = X.data if sp.issparse(X) else np.asarray(X)
    if data.size == 0:
        return
    if not np.isfinite(data).all():
        raise SlidefmError(f"omics table ({units}) contains {int((~np.isfinite(data)).sum())} NaN/Inf values; "
                           "impute or drop them before training")
    if units in ("counts", "tpm") and (data < 0).any():
        raise SlidefmError(f"omics table declared as '{units}' has negative values; declare units 'log' or 'zscore'")
    if units == "binary" and not np.isin(data, (0, 1)).all():
        raise SlidefmError("omics table declared as 'binary' has values other than 0 and 1")


def preprocess(adata, units: str, target_sum: float = 1e4):
    """Per-patient preprocessing by units (no fitted state): returns a new float64 AnnData."""
    import anndata as ad
    import scanpy as sc

    if units not in UNITS:
        raise SlidefmError(f"omics units must be one of {', '.join(UNITS)}, got '{units}'")
    X = adata.X
    X = X.astype(np.float64) if sp.issparse(X) else np.asarray(X, dtype=np.float64)
    _check_values(X, units)
    out = ad.AnnData(X=X.copy())
    out.obs_names = [str(i) for i in range(adata.n_obs)]
    out.var_names = _gene_names(adata)
    if units == "counts":
        sc.pp.normalize_total(out, target_sum=target_sum)
        sc.pp.log1p(out)
    elif units == "tpm":
        sc.pp.log1p(out)
    return out


def _dense(X) -> np.ndarray:
    return X.toarray() if sp.issparse(X) else np.asarray(X)


class ExpressionTransform:
    """Units-aware preprocessing, gene selection and standardisation fitted on training patients.

    Gene selection: ``genes`` (a given list) wins; else ``n_top_genes`` highly variable genes of the
    training patients (scanpy's dispersion-based HVG for counts/tpm/log, highest variance for
    zscore/binary); else every gene. ``standardize`` defaults to True except for binary units.
    """

    def __init__(self, units: str = "counts", n_top_genes: int | None = 2000, genes: Sequence[str] | None = None,
                 target_sum: float = 1e4, standardize: bool | None = None):
        if units not in UNITS:
            raise SlidefmError(f"omics units must be one of {', '.join(UNITS)}, got '{units}'")
        if n_top_genes is not None and int(n_top_genes) < 1:
            raise SlidefmError(f"n_top_genes must be >= 1 or None, got {n_top_genes}")
        self.units = units
        self.n_top_genes = None if n_top_genes is None else int(n_top_genes)
        self.requested_genes = None if genes is None else [str(g) for g in genes]
        self.target_sum = float(target_sum)
        self.standardize = UNITS[units][1] if standardize is None else bool(standardize)
        self.genes: list[str] | None = None
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        self.selection: str | None = None
        self.n_train: int = 0

    # -- fit -------------------------------------------------------------------------------------
    def fit(self, adata, train_patient_ids: Sequence[str]) -> "ExpressionTransform":
        """Fit gene list and per-gene mean/std on the rows of ``train_patient_ids`` only."""
        pids = _patient_index(adata)
        pos = {p: i for i, p in enumerate(pids)}
        rows = [pos[p] for p in dict.fromkeys(str(x) for x in train_patient_ids) if p in pos]
        if not rows:
            raise SlidefmError("none of the training patients has a row in the omics table; cannot fit")
        train = preprocess(adata[rows], self.units, self.target_sum)
        all_genes = list(train.var_names)

        if self.requested_genes is not None:
            have = set(all_genes)
            missing = [g for g in self.requested_genes if g not in have]
            genes = [g for g in dict.fromkeys(self.requested_genes) if g in have]
            if not genes:
                raise SlidefmError("none of the requested genes is in the omics table")
            if missing:
                warnings.warn(f"{len(missing)} of {len(self.requested_genes)} requested genes are not in the "
                              f"training omics table and are dropped (e.g. {', '.join(missing[:5])})",
                              GeneMismatchWarning, stacklevel=2)
            self.selection = "given"
        elif self.n_top_genes is not None and self.n_top_genes < len(all_genes):
            genes = self._select_top(train)
        else:
            genes = all_genes
            self.selection = "all"

        col = {g: j for j, g in enumerate(all_genes)}
        X = _dense(train.X[:, [col[g] for g in genes]])
        mean = X.mean(0)
        std = X.std(0)
        # Genes constant on the training patients keep unit scale: x - mean, never a division by ~0.
        std = np.where(std > 1e-8, std, 1.0)
        self.genes = genes
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.std = torch.as_tensor(std, dtype=torch.float64)
        self.n_train = len(rows)
        return self

    def _select_top(self, train) -> list[str]:
        import scanpy as sc

        n = self.n_top_genes
        assert n is not None
        if self.units in _HVG_UNITS and train.n_obs >= 2:
            hv = train.copy()
            sc.pp.highly_variable_genes(hv, n_top_genes=n, flavor="seurat")
            # scanpy keeps every gene tied at the cut-off (e.g. single-gene bins all score 1), so
            # take exactly n by its normalised dispersion; NaN (constant genes) rank last.
            disp = np.nan_to_num(hv.var["dispersions_norm"].to_numpy(np.float64), nan=-np.inf)
            top = np.argsort(-disp, kind="stable")[:n]
            self.selection = "hvg"
        else:
            var = _dense(train.X).var(0)
            # Stable sort keeps the original gene order among ties.
            top = np.argsort(-var, kind="stable")[:n]
            self.selection = "variance"
        mask = np.zeros(train.n_vars, dtype=bool)
        mask[top] = True
        return [g for g, m in zip(train.var_names, mask) if m]

    # -- transform -------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if self.genes is None:
            raise RuntimeError("ExpressionTransform is not fitted; call fit() or from_state()")

    def transform(self, adata, patient_ids: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(X float32 (P, G), present bool (P,)) for ``patient_ids`` in order.

        Patients without a row get zeros and present=False. Fitted genes absent from ``adata`` are
        set to 0 after standardisation (the training mean) with one GeneMismatchWarning; genes the
        transform was not fitted on are ignored.
        """
        self._check_fitted()
        assert self.genes is not None and self.mean is not None and self.std is not None
        P, G = len(patient_ids), len(self.genes)
        out = torch.zeros(P, G, dtype=torch.float32)
        present = torch.zeros(P, dtype=torch.bool)
        if adata is None or adata.n_obs == 0:
            return out, present
        pos = {p: i for i, p in enumerate(_patient_index(adata))}
        want = [(k, pos[str(p)]) for k, p in enumerate(patient_ids) if str(p) in pos]
        if not want:
            return out, present
        data = preprocess(adata[[r for _, r in want]], self.units, self.target_sum)
        col = {g: j for j, g in enumerate(data.var_names)}
        have = [j for j, g in enumerate(self.genes) if g in col]
        n_missing = G - len(have)
        if n_missing:
            n_unseen = len(set(col) - set(self.genes))
            warnings.warn(f"{n_missing} of {G} genes of the fitted omics transform are missing from the data and "
                          f"are set to the training mean ({n_unseen} genes not seen in training are ignored)",
                          GeneMismatchWarning, stacklevel=2)
        X = np.zeros((len(want), G), dtype=np.float64)
        X[:, have] = _dense(data.X[:, [col[self.genes[j]] for j in have]])
        have_set = set(have)
        miss = [j for j in range(G) if j not in have_set]
        if self.standardize:
            X = (X - self.mean.numpy()) / self.std.numpy()
            X[:, miss] = 0.0
        else:
            # Without standardisation a missing gene still takes the training mean.
            X[:, miss] = self.mean.numpy()[miss]
        rows = torch.as_tensor([k for k, _ in want], dtype=torch.long)
        out[rows] = torch.as_tensor(X, dtype=torch.float32)
        present[rows] = True
        return out, present

    def fit_transform(self, adata, train_patient_ids: Sequence[str], patient_ids: Sequence[str] | None = None):
        self.fit(adata, train_patient_ids)
        return self.transform(adata, list(train_patient_ids) if patient_ids is None else patient_ids)

    @property
    def n_genes(self) -> int:
        self._check_fitted()
        return len(self.genes or [])

    # -- state -----------------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """Plain dict (tensors, lists, str, numbers) for checkpoints; ``torch.load(weights_only=True)`` safe."""
        self._check_fitted()
        return {
            "version": STATE_VERSION,
            "units": self.units,
            "genes": list(self.genes or []),
            "mean": self.mean.clone(),  # type: ignore[union-attr]
            "std": self.std.clone(),  # type: ignore[union-attr]
            "target_sum": self.target_sum,
            "standardize": self.standardize,
            "n_top_genes": self.n_top_genes,
            "selection": self.selection,
            "n_train": self.n_train,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "ExpressionTransform":
        if int(state.get("version", -1)) != STATE_VERSION:
            raise SlidefmError(f"unsupported omics transform state version {state.get('version')}")
        t = cls(units=state["units"], n_top_genes=state["n_top_genes"], target_sum=state["target_sum"],
                standardize=state["standardize"])
        t.genes = [str(g) for g in state["genes"]]
        t.mean = torch.as_tensor(state["mean"], dtype=torch.float64)
        t.std = torch.as_tensor(state["std"], dtype=torch.float64)
        t.selection = state["selection"]
        t.n_train = int(state["n_train"])
        return t


__all__ = ["ExpressionTransform", "GeneMismatchWarning", "UNITS", "preprocess"]
