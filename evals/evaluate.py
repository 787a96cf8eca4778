"""`evaluate`: every protocol on every task for the given embeddings and the mean-pool baseline."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from slidefm.errors import SlidefmError

from . import probes, robustness, survival
from .baseline import mean_pool_adata
from .config import EvalConfig
from .data import (EvalTask, Embeddings, TaskData, load_embeddings, load_tasks, pool_to_patients, ri_labels,  # noqa: F401
                   task_data)
from .metrics import classification_metrics, cluster_bootstrap, harrell_c_index
from .retrieval import retrieval_scores
from .splits import Split, check_grouped, fixed_folds, grouped_folds

COLUMNS = ["task", "kind", "metric", "mean", "ci_low", "ci_high", "n", "model"]
BASELINE = "mean_pool"


@dataclass
class Artifacts:
    """What the plots and notebooks need beyond results.csv, keyed by (task, model)."""

    roc: dict = field(default_factory=dict)  # -> (y, out-of-fold probabilities, class names)
    km: dict = field(default_factory=dict)  # -> (time, event, risk group, log-rank p)
    fewshot: dict = field(default_factory=dict)  # -> {k: [balanced accuracy per draw]}
    ri_curve: dict = field(default_factory=dict)  # model -> {k: RI}
    hyperparameters: dict = field(default_factory=dict)  # -> chosen value per outer fold
    embeddings: dict = field(default_factory=dict)  # model -> Embeddings
    notes: list = field(default_factory=list)


@dataclass
class EvalResult:
    results: pd.DataFrame
    artifacts: Artifacts
    tasks: list
    out: Path | None = None


def _row(task, kind, metric, mean, ci=(np.nan, np.nan), n=0, model="model") -> dict:
    return dict(task=task, kind=kind, metric=metric, mean=float(mean), ci_low=float(ci[0]), ci_high=float(ci[1]),
                n=int(n), model=model)


def _with_ci(stat: Callable[[np.ndarray], dict], rows: np.ndarray, groups: np.ndarray, cfg: EvalConfig,
             task: str, kind: str, model: str, n: int | None = None) -> list[dict]:
    """Point estimates of ``stat`` on ``rows`` plus patient cluster-bootstrap CIs."""
    point = stat(rows)
    cis = cluster_bootstrap(lambda i: stat(rows[i]), groups[rows], cfg.bootstrap, cfg.ci_level, cfg.seed) \
        if cfg.bootstrap > 0 else {}
    return [_row(task, kind, m, v, cis.get(m, (np.nan, np.nan)), len(rows) if n is None else n, model)
            for m, v in point.items()]


def split_groups(td: TaskData, cfg: EvalConfig) -> np.ndarray:
    """What folds keep together: patients, or sites (``split_by=site``; a row without a site is its own
    group). Inner tuning folds use the same grouping, so a tuned C cannot exploit site either."""
    if cfg.split_by != "site":
        return td.groups
    sites = np.asarray(td.sites, dtype=object)
    missing = pd.isna(sites)
    return np.where(missing, "patient:" + td.groups.astype(str), "site:" + sites.astype(str))


def make_splits(td: TaskData, cfg: EvalConfig) -> list[Split]:
    if td.fixed is not None and cfg.split_by != "site":
        splits = fixed_folds(td.fixed)
    else:
        strata = td.y if td.y is not None else td.event
        groups = split_groups(td, cfg)
        if cfg.split_by == "site" and len(np.unique(groups)) < 2:
            raise SlidefmError(f"{td.task.name}: split_by=site needs at least 2 sites")
        splits = grouped_folds(strata, groups, cfg.folds, cfg.seed)
    check_grouped(splits, td.groups)
    return splits


def grid_edge_note(chosen: list, grid: list, name: str, option: str) -> str | None:
    """A note when inner-fold tuning picked the grid's lowest or highest value in most outer folds: the best
    value may lie beyond the grid, so the probe is not tuned there (None otherwise, or for a one-value grid)."""
    if len(set(grid)) < 2 or not chosen:
        return None
    for value, side in ((min(grid), "lowest"), (max(grid), "highest")):
        n = sum(float(c) == value for c in chosen)
        if 2 * n > len(chosen):
            return (f"{name} chose the grid's {side} value ({value:g}) in {n} of {len(chosen)} folds: the best "
                    f"{name} may lie beyond the grid ({option})")
    return None


def _classification(td: TaskData, splits: list[Split], cfg: EvalConfig, model: str, art: Artifacts,
                    text_encoder) -> list[dict]:
    t = td.task
    y = td.y
    out: list[dict] = []

    def cls_stat(proba):
        return lambda i: classification_metrics(y[i], proba[i], t.ordinal)

    if "linear_probe" in cfg.protocols:
        oof, Cs = probes.cv_linear_probe(td.X, y, split_groups(td, cfg), splits, cfg.c_grid, cfg.inner_folds,
                                            cfg.seed)
        tested = np.flatnonzero(~np.isnan(oof[:, 0]))
        out += _with_ci(cls_stat(oof), tested, td.groups, cfg, t.name, "linear_probe", model)
        art.roc[(t.name, model)] = (y[tested], oof[tested], td.classes)
        art.hyperparameters[(t.name, model, "linear_probe C")] = Cs
        edge = grid_edge_note(Cs, cfg.c_grid, "C", "--c-grid")
        if edge:
            art.notes.append(f"{t.name} / {model}: linear probe {edge}")
    if "knn" in cfg.protocols:
        oof = probes.cv_knn(td.X, y, splits, cfg.knn_k)
        tested = np.flatnonzero(~np.isnan(oof[:, 0]))
        out += _with_ci(cls_stat(oof), tested, td.groups, cfg, t.name, "knn", model)
    if "fewshot" in cfg.protocols:
        shots = probes.feasible_shots(y, splits, cfg.fewshot_k)
        if len(shots) < len(cfg.fewshot_k):
            art.notes.append(f"{t.name}: few-shot k={sorted(set(cfg.fewshot_k) - set(shots))} skipped "
                             "(a class has fewer training rows in some fold)")
        alpha = (1 - cfg.ci_level) / 2
        for k in shots:
            draws = probes.fewshot_probe(td.X, y, splits, k, cfg.fewshot_repeats, cfg.fewshot_c, cfg.seed + k)
            per = [classification_metrics(y[~np.isnan(p[:, 0])], p[~np.isnan(p[:, 0])], t.ordinal) for p in draws]
            n = int((~np.isnan(draws[0][:, 0])).sum())
            for m in per[0]:
                v = np.array([d[m] for d in per], float)
                v = v[~np.isnan(v)]
                if not len(v):
                    continue
                # Spread over draws (not a bootstrap): percentile interval of the draws, and their sd.
                out.append(_row(t.name, f"fewshot_k{k}", m, v.mean(), np.quantile(v, [alpha, 1 - alpha]), n, model))
                out.append(_row(t.name, f"fewshot_k{k}", f"{m}_sd", v.std(ddof=1) if len(v) > 1 else 0.0,
                                n=n, model=model))
            art.fewshot.setdefault((t.name, model), {})[k] = [d["balanced_accuracy"] for d in per]
    if "retrieval" in cfg.protocols:
        for k in cfg.retrieval_k:
            hit, ap = retrieval_scores(td.X, y, td.groups, k)
            q = np.flatnonzero(~np.isnan(hit))
            if len(q):
                out += _with_ci(lambda i, hit=hit, ap=ap, k=k: {f"top{k}_accuracy": float(np.mean(hit[i])),
                                                             f"map@{k}": float(np.mean(ap[i]))},
                                q, td.groups, cfg, t.name, "retrieval", model)
    if "zeroshot" in cfg.protocols and text_encoder is not None and t.prompts:
        missing = [c for c in td.classes if c not in t.prompts]
        if missing:
            art.notes.append(f"{t.name}: zero-shot skipped, no prompts for classes {missing}")
        else:
            try:
                proba = probes.zeroshot_proba(td.X, {i: t.prompts[c] for i, c in enumerate(td.classes)}, text_encoder)
            except ValueError as e:
                art.notes.append(f"{t.name} / {model}: zero-shot skipped: {e}")
            else:
                out += _with_ci(cls_stat(proba), np.arange(len(y)), td.groups, cfg, t.name, "zeroshot", model)
    if "robustness" in cfg.protocols:
        out += _site_holdout(td, cfg, model, out)
    return out


def _site_holdout(td: TaskData, cfg: EvalConfig, model: str, done: list[dict]) -> list[dict]:
    """Leave-one-site-out metrics per site and their drop from the cross-validated metric."""
    has = np.array([isinstance(s, str) or not pd.isna(s) for s in td.sites])
    if len(set(td.sites[has])) < 2:
        return []
    idx = np.flatnonzero(has)
    sites = np.asarray(td.sites[idx]).astype(str)
    per_site = robustness.site_holdout(td.X[idx], td.y[idx], td.groups[idx], sites, cfg.c_grid,
                                       cfg.inner_folds, cfg.seed)
    overall = {r["metric"]: r["mean"] for r in done if r["kind"] == "linear_probe"}
    out, drops = [], {}
    for s, proba in per_site.items():
        rows = np.flatnonzero(sites == s)
        y_s = td.y[idx][rows]
        stat = lambda i, y_s=y_s, proba=proba: {
            k: v for k, v in classification_metrics(y_s[i], proba[i]).items() if k in ("auroc", "balanced_accuracy")}
        for r in _with_ci(stat, np.arange(len(rows)), td.groups[idx][rows], cfg, td.task.name, "site_holdout", model):
            m = r["metric"]
            r["metric"] = f"{m}@{s}"
            out.append(r)
            if m in overall and not np.isnan(r["mean"]):
                drops.setdefault(m, []).append(overall[m] - r["mean"])
                out.append(_row(td.task.name, "site_holdout", f"{m}_drop@{s}", overall[m] - r["mean"], n=r["n"],
                                model=model))
    for m, d in drops.items():
        out.append(_row(td.task.name, "site_holdout", f"{m}_mean_drop", np.mean(d), n=len(d), model=model))
    return out


def _survival(td: TaskData, splits: list[Split], cfg: EvalConfig, model: str, art: Artifacts) -> list[dict]:
    if "cox" not in cfg.protocols:
        return []
    t = td.task
    if td.event.sum() < 2:
        art.notes.append(f"{t.name}: fewer than 2 events, survival skipped")
        return []
    risk, fold_of, chosen = survival.cv_cox(td.X, td.time, td.event, split_groups(td, cfg), splits, cfg.cox_penalizers,
                                            cfg.cox_l1_ratios, cfg.pca_dim, cfg.inner_folds, cfg.seed)
    art.hyperparameters[(t.name, model, "cox (penalizer, l1_ratio)")] = chosen
    edge = grid_edge_note([p for p, _ in chosen], cfg.cox_penalizers, "penalizer", "--cox-penalizers")
    if edge:
        art.notes.append(f"{t.name} / {model}: Cox {edge}")
    tested = np.flatnonzero(fold_of >= 0)
    out = _with_ci(lambda i: {"c_index": harrell_c_index(td.time[i], td.event[i], risk[i])},
                   tested, td.groups, cfg, t.name, "cox", model)
    group = survival.risk_groups(risk, fold_of)
    p = survival.logrank_p(td.time[tested], td.event[tested], group[tested])
    out.append(_row(t.name, "cox", "logrank_p", p, n=len(tested), model=model))
    art.km[(t.name, model)] = (td.time[tested], td.event[tested], group[tested], p)
    return out


def _robustness(emb: Embeddings, tasks: list[EvalTask], cohort, cfg: EvalConfig, art: Artifacts) -> list[dict]:
    out: list[dict] = []
    sites = emb.units["site"].to_numpy(dtype=object)
    groups = emb.units["patient_id"].to_numpy().astype(str)
    has_site = ~pd.isna(sites)
    if len(set(sites[has_site])) < 2:
        art.notes.append(f"{emb.name}: fewer than 2 sites in `{cfg.site_column}`, robustness skipped")
        return out
    # Robustness Index on the chosen biological label.
    cls_tasks = [t for t in tasks if t.kind == "classification"]
    task = next((t for t in cls_tasks if t.name == cfg.ri_label), None) if cfg.ri_label else \
        (cls_tasks[0] if cls_tasks else None)
    if cfg.ri_label and task is None:
        raise SlidefmError(f"ri_label {cfg.ri_label!r} is not a classification task")
    if task is not None:
        labels = ri_labels(emb, task, cohort)
        keep = np.flatnonzero(has_site & ~pd.isna(labels))
        lab = labels[keep].astype(str)
        st = sites[keep].astype(str)
        curve = {}
        for k in cfg.ri_k:
            so, os_ = robustness.ri_counts(emb.X[keep], lab, st, groups[keep], k)
            ri, support = robustness.robustness_index(so, os_)
            stat = lambda i, so=so, os_=os_: {f"ri@{k}": robustness.robustness_index(so[i], os_[i])[0]}
            out += _with_ci(stat, np.arange(len(keep)), groups[keep], cfg, task.name, "robustness", emb.name,
                            n=support)
            curve[k] = ri
        art.ri_curve[emb.name] = curve
        vals = [v for v in curve.values() if not np.isnan(v)]
        if vals:
            out.append(_row(task.name, "robustness", "ri_mean", np.mean(vals), n=len(keep), model=emb.name))
    # How well the site itself can be read off the embeddings.
    idx = np.flatnonzero(has_site)
    names = sorted(set(sites[idx].astype(str)))
    y = pd.Index(names).get_indexer(sites[idx].astype(str))
    splits = grouped_folds(y, groups[idx], cfg.folds, cfg.seed)
    oof, _ = probes.cv_linear_probe(emb.X[idx], y, groups[idx], splits, cfg.c_grid, cfg.inner_folds, cfg.seed)
    tested = np.flatnonzero(~np.isnan(oof[:, 0]))
    out += _with_ci(lambda i: {"balanced_accuracy": classification_metrics(y[i], oof[i])["balanced_accuracy"]},
                    tested, groups[idx], cfg, "site", "site_probe", emb.name)
    out.append(_row("site", "site_probe", "chance_balanced_accuracy", 1 / len(names), n=len(tested), model=emb.name))
    return out


def _open_cohort(cohort):
    if isinstance(cohort, (str, os.PathLike)):
        from slidefm.cohort import Cohort

        return Cohort.open(cohort)
    return cohort


def evaluate(embeddings, cohort, tasks=None, out: str | os.PathLike | None = None,
             config: EvalConfig | None = None, text_encoder: Callable[[list[str]], np.ndarray] | None = None
             ) -> EvalResult:
    """Evaluate ``embeddings`` (AnnData or .h5ad; rows = slides or patients) on the cohort's tasks.

    ``tasks``: a tasks.yaml path or list of task dicts (default: the cohort's). ``text_encoder`` maps
    prompts to embeddings for zero-shot. With ``out`` set, results.csv, summary.md and plots are written
    there (each file atomically) and the mean-pool baseline is cached as ``out/mean_pool.h5ad``.
    """
    from threadpoolctl import threadpool_limits

    # The fits are many and tiny: multi-threaded BLAS only adds overhead (5-10x slower on a busy machine).
    with threadpool_limits(limits=1):
        return _evaluate(embeddings, cohort, tasks, out, config or EvalConfig(), text_encoder)


def _evaluate(embeddings, cohort, tasks, out, cfg: EvalConfig, text_encoder) -> EvalResult:
    cohort = _open_cohort(cohort)
    task_list = load_tasks(cohort, tasks)
    if not task_list and not {"robustness"} & set(cfg.protocols):
        raise SlidefmError("no tasks: give --tasks or add tasks.yaml to the cohort")
    model = load_embeddings(embeddings, cohort, cfg.site_column, cfg.model_name)
    if model.name == BASELINE and cfg.baseline:
        raise SlidefmError(f"model name {BASELINE!r} is reserved for the baseline")
    models = [model]
    if cfg.baseline:
        cache = Path(out) / "mean_pool.h5ad" if out is not None else None
        base = load_embeddings(mean_pool_adata(cohort, cache), cohort, cfg.site_column, BASELINE)
        models.append(pool_to_patients(base) if model.level == "patient" else base)
    art = Artifacts()
    rows: list[dict] = []
    for emb in models:
        art.embeddings[emb.name] = emb
        for task in task_list:
            td = task_data(task, emb, cohort, cfg.use_fixed_splits)
            if td is None:
                art.notes.append(f"{task.name}: slide-level task skipped for patient-level embeddings ({emb.name})")
                continue
            if task.kind == "classification":
                if len(td.classes) < 2:
                    art.notes.append(f"{task.name}: fewer than 2 classes, skipped")
                    continue
                rows += _classification(td, make_splits(td, cfg), cfg, emb.name, art, text_encoder)
            else:
                rows += _survival(td, make_splits(td, cfg), cfg, emb.name, art)
        if "robustness" in cfg.protocols:
            rows += _robustness(emb, task_list, cohort, cfg, art)
    if "zeroshot" in cfg.protocols:
        if text_encoder is None:
            art.notes.append("zero-shot: not run, no text encoder (`slidefm eval` has none; in Python pass "
                             "text_encoder=slidefm.load(CKPT).embed_text for a checkpoint trained with reports)")
        elif not any(t.prompts for t in task_list if t.kind == "classification"):
            art.notes.append("zero-shot: not run, no classification task in tasks.yaml has prompts")
    results = pd.DataFrame(rows, columns=COLUMNS)
    art.notes = list(dict.fromkeys(art.notes))
    result = EvalResult(results, art, task_list, Path(out) if out is not None else None)
    if out is not None:
        from .report import write_outputs

        write_outputs(result, cohort, cfg, Path(out))
    return result
