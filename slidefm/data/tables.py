"""Per-patient tables prepared once before training: split, modality matrices, labels.

Everything that must be fitted (expression preprocessing, label bins, class weights) is fitted on
training patients only, and its state goes into the checkpoint so export applies the same transform.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from slidefm.data.config import DataConfig


def split_patients(patient_ids: list[str], val_fraction: float, seed: int, clinical=None) -> tuple[list[str], list[str]]:
    """Train/validation split of patients; a ``split`` column in clinical.csv wins when present.

    Without one the split is a seeded hash order, so adding patients to a cohort does not move
    existing ones between train and validation.
    """
    if clinical is not None and "split" in clinical.columns:
        split = clinical["split"].reindex(patient_ids).fillna("train").astype(str).str.lower()
        train = [p for p in patient_ids if split[p] == "train"]
        val = [p for p in patient_ids if split[p] in ("val", "valid", "validation")]
        return train, val
    if val_fraction <= 0 or len(patient_ids) < 2:
        return list(patient_ids), []
    key = lambda p: hashlib.sha1(f"{seed}:{p}".encode()).hexdigest()  # noqa: E731
    order = sorted(patient_ids, key=key)
    n_val = max(1, int(round(val_fraction * len(patient_ids))))
    val = set(order[:n_val])
    return [p for p in patient_ids if p not in val], [p for p in patient_ids if p in val]


@dataclass
class PatientTables:
    """Row-aligned per-patient data: ``index[pid]`` is the row of every matrix here."""

    patient_ids: list[str]
    train_ids: list[str]
    val_ids: list[str]
    tabular: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (X, present)
    report_texts: list[str | None] | None = None
    report_embeddings: torch.Tensor | None = None  # frozen text tower: (P, width)
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    experts: dict[str, tuple[torch.Tensor, torch.Tensor, dict[str, int]]] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)  # checkpointed transform states

    def __post_init__(self):
        self.index = {p: i for i, p in enumerate(self.patient_ids)}

    def rows(self, pids: list[str]) -> torch.Tensor:
        return torch.tensor([self.index[p] for p in pids], dtype=torch.long)

    @property
    def report_present(self) -> torch.Tensor:
        texts = self.report_texts or [None] * len(self.patient_ids)
        return torch.tensor([bool(t) for t in texts], dtype=torch.bool)


def build_tables(cohort, cfg: DataConfig, tasks=None, needs: set[str] | None = None, preprocessing=None) -> PatientTables:
    """Split patients and prepare what the model's modalities need (``needs``: report, expression, omics names).

    ``preprocessing`` (from a checkpoint) re-applies fitted transforms instead of fitting new ones.
    """
    from slidefm.data.expression import ExpressionTransform

    needs = set(needs or ())
    pids = list(cohort.patient_ids)
    train, val = split_patients(pids, cfg.val_fraction, cfg.seed, cohort.clinical)
    tables = PatientTables(pids, train, val)
    prep = dict(preprocessing or {})

    if "report" in needs:
        tables.report_texts = [cohort.patient_report(p) for p in pids]

    tab_sources: dict[str, tuple[Any, str, Any]] = {}
    if "expression" in needs:
        if cohort.expression is None:
            warnings.warn("model has an expression encoder but the cohort has no expression table")
        else:
            tab_sources["expression"] = (cohort.expression, cohort.expression_units, cfg.expression)
    for name, (adata, units) in (cohort.omics or {}).items():
        if name in needs:
            tab_sources[name] = (adata, units, cfg.omics.get(name))
    for name, (adata, units, dcfg) in tab_sources.items():
        if name in prep:
            tf = ExpressionTransform.from_state(prep[name])
        else:
            kw = {}
            if dcfg is not None:
                kw = {"n_top_genes": dcfg.n_top_genes, "genes": list(dcfg.genes) if dcfg.genes else None}
            tf = ExpressionTransform(units=units, **kw).fit(adata, train)
        x, present = tf.transform(adata, pids)
        tables.tabular[name] = (x, present)
        tables.preprocessing[name] = tf.to_state()

    if tasks:
        tables.labels, label_state = encode_labels(cohort, tasks, pids, prep.get("labels"))
        tables.preprocessing["labels"] = label_state

    for name, path in (cfg.experts or {}).items():
        tables.experts[name] = load_expert(path, list(cohort.slide_ids))
    return tables


def encode_labels(cohort, tasks, pids, state=None):
    """Patient-level labels: classification -> class index (-1 missing); survival -> time/event (NaN missing)."""
    clinical = cohort.clinical
    labels: dict[str, torch.Tensor] = {}
    state = dict(state or {})
    for t in tasks:
        if t.level != "patient":
            continue
        if clinical is None:
            continue
        col = clinical.reindex(pids)
        if t.kind == "classification":
            raw = col[t.label]
            classes = state.get(t.name) or sorted({str(v) for v in raw.dropna()})
            lookup = {c: i for i, c in enumerate(classes)}
            y = [lookup.get(str(v), -1) if v == v and v is not None else -1 for v in raw]
            labels[t.name] = torch.tensor(y, dtype=torch.long)
            state[t.name] = list(classes)
        elif t.kind == "survival":
            labels[f"{t.name}/time"] = torch.tensor(col[t.time].astype(float).to_numpy(), dtype=torch.float32)
            labels[f"{t.name}/event"] = torch.tensor(col[t.event].astype(float).to_numpy(), dtype=torch.float32)
    return labels, state


def load_expert(path: str, slide_ids: list[str]):
    """Expert slide embeddings from an .h5ad with obs_names = slide_id; absent slides are masked."""
    import anndata as ad

    a = ad.read_h5ad(path)
    x = np.asarray(a.X.toarray() if hasattr(a.X, "toarray") else a.X, dtype=np.float32)
    pos = {s: i for i, s in enumerate(a.obs_names)}
    out = np.zeros((len(slide_ids), x.shape[1]), np.float32)
    present = np.zeros(len(slide_ids), bool)
    for i, s in enumerate(slide_ids):
        j = pos.get(s)
        if j is not None:
            out[i] = x[j]
            present[i] = True
    return torch.from_numpy(out), torch.from_numpy(present), {s: i for i, s in enumerate(slide_ids)}
