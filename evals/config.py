"""`EvalConfig`: every evaluation setting; the `slidefm eval` options are generated from it."""

from __future__ import annotations

from dataclasses import dataclass, field

from slidefm.errors import SlidefmError

PROTOCOLS = ("linear_probe", "fewshot", "knn", "retrieval", "zeroshot", "cox", "robustness")


def _h(text: str) -> dict:
    return {"help": text}


@dataclass
class EvalConfig:
    folds: int = field(default=5, metadata=_h("outer patient-grouped stratified folds (ignored when clinical.csv has a fold/split column)"))
    split_by: str = field(default="patient", metadata=_h("what outer and inner folds keep together: patient | site (centre-held-out: every site's patients are tested by a probe trained on other sites)"))
    inner_folds: int = field(default=3, metadata=_h("inner folds of the training part used to tune hyperparameters"))
    use_fixed_splits: bool = field(default=True, metadata=_h("use clinical.csv's fold or split column when present"))
    c_grid: list = field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0], metadata=_h("logistic-regression C values tuned by inner CV"))
    fewshot_k: list = field(default_factory=lambda: [1, 2, 4, 8, 16], metadata=_h("few-shot rows per class (those feasible in every fold run)"))
    fewshot_repeats: int = field(default=20, metadata=_h("random draws per few-shot k"))
    fewshot_c: float = field(default=0.5, metadata=_h("fixed C of the few-shot probe (no tuning possible)"))
    knn_k: int = field(default=20, metadata=_h("neighbours of the cosine k-NN classifier"))
    retrieval_k: list = field(default_factory=lambda: [1, 5, 10], metadata=_h("k of top-k accuracy and mAP@k"))
    cox_penalizers: list = field(default_factory=lambda: [0.01, 0.1, 1.0], metadata=_h("Cox penalizer grid"))
    cox_l1_ratios: list = field(default_factory=lambda: [0.0, 0.5], metadata=_h("Cox elastic-net l1_ratio grid"))
    pca_dim: int = field(default=16, metadata=_h("PCA components fed to the Cox model (fit on training rows)"))
    ri_k: list = field(default_factory=lambda: [5, 10, 20], metadata=_h("neighbour counts of the Robustness Index; also reported averaged"))
    ri_label: str = field(default="", metadata=_h("biological label (a classification task name) for the Robustness Index; default: the first"))
    site_column: str = field(default="center", metadata=_h("slides.csv column naming the site of origin"))
    bootstrap: int = field(default=1000, metadata=_h("patient-level cluster bootstrap draws for CIs (0 = none)"))
    ci_level: float = field(default=0.95, metadata=_h("confidence level of the percentile bootstrap CIs"))
    protocols: list = field(default_factory=lambda: list(PROTOCOLS), metadata=_h("protocols to run"))
    baseline: bool = field(default=True, metadata=_h("also evaluate mean-pooled patch features as model 'mean_pool'"))
    plots: bool = field(default=True, metadata=_h("write ROC, Kaplan-Meier and UMAP plots"))
    umap: bool = field(default=True, metadata=_h("include UMAP plots (slowest plot)"))
    model_name: str = field(default="model", metadata=_h("name of the evaluated embeddings in results"))
    seed: int = field(default=0, metadata=_h("random seed for folds, few-shot draws, bootstrap and UMAP"))

    def __post_init__(self) -> None:
        # The CLI hands lists over as strings.
        self.c_grid = [float(v) for v in self.c_grid]
        self.fewshot_k = [int(v) for v in self.fewshot_k]
        self.retrieval_k = [int(v) for v in self.retrieval_k]
        self.cox_penalizers = [float(v) for v in self.cox_penalizers]
        self.cox_l1_ratios = [float(v) for v in self.cox_l1_ratios]
        self.ri_k = [int(v) for v in self.ri_k]
        self.protocols = [str(p) for p in self.protocols]
        unknown = set(self.protocols) - set(PROTOCOLS)
        if unknown:
            raise SlidefmError(f"unknown protocol(s) {sorted(unknown)}; choose from {list(PROTOCOLS)}")
        if self.split_by not in ("patient", "site"):
            raise SlidefmError(f"split_by must be 'patient' or 'site', got {self.split_by!r}")
        if self.folds < 2 or self.inner_folds < 2:
            raise SlidefmError("folds and inner_folds must be at least 2")
        if not self.c_grid or not self.cox_penalizers or not self.cox_l1_ratios:
            raise SlidefmError("hyperparameter grids must not be empty")
        if not 0 < self.ci_level < 1:
            raise SlidefmError("ci_level must lie in (0, 1)")
