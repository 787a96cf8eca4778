"""Inputs of an evaluation: tasks, embeddings (slide or patient rows) and per-task design matrices."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from slidefm.errors import SlidefmError


@dataclass
class EvalTask:
    """A downstream task; ``ordinal``, ``classes`` (label order) and ``prompts`` are optional tasks.yaml keys."""

    name: str
    kind: str  # classification | survival
    level: str = "patient"  # patient | slide
    label: str | None = None
    time: str | None = None
    event: str | None = None
    ordinal: bool = False
    classes: list | None = None
    prompts: dict | None = None


def _task_from_dict(d: dict, source: str) -> EvalTask:
    if not isinstance(d, dict) or "name" not in d:
        raise SlidefmError(f"{source}: every task needs a name")
    kind = str(d.get("kind", "classification"))
    level = str(d.get("level", "patient"))
    where = f"{source} [task {d['name']}]"
    if kind not in ("classification", "survival"):
        raise SlidefmError(f"{where}: kind must be classification or survival, got {kind!r}")
    if level not in ("patient", "slide"):
        raise SlidefmError(f"{where}: level must be patient or slide, got {level!r}")
    if kind == "classification" and not d.get("label"):
        raise SlidefmError(f"{where}: a classification task needs `label`")
    if kind == "survival" and not (d.get("time") and d.get("event")):
        raise SlidefmError(f"{where}: a survival task needs `time` and `event`")
    prompts = d.get("prompts")
    if prompts is not None and not isinstance(prompts, dict):
        raise SlidefmError(f"{where}: prompts must map each class to a list of texts")
    return EvalTask(
        name=str(d["name"]), kind=kind, level=level, label=d.get("label"), time=d.get("time"),
        event=d.get("event"), ordinal=bool(d.get("ordinal", False)), classes=d.get("classes"),
        prompts={str(k): [v] if isinstance(v, str) else list(v) for k, v in prompts.items()} if prompts else None,
    )


def read_tasks_yaml(path: str | Path) -> list[EvalTask]:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SlidefmError(f"{path}: cannot read tasks: {e}") from e
    entries = doc.get("tasks", []) if isinstance(doc, dict) else doc
    tasks = [_task_from_dict(d, str(path)) for d in entries or []]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise SlidefmError(f"{path}: task names must be unique")
    return tasks


def load_tasks(cohort, tasks: str | Path | list | None) -> list[EvalTask]:
    """Tasks from ``tasks`` (a tasks.yaml path or a list of EvalTask/dicts) or else ``cohort.tasks``.

    The cohort reader's TaskSpec has no ``ordinal``/``classes``/``prompts``; those are read from the
    cohort's own tasks.yaml when it has them.
    """
    if isinstance(tasks, (str, Path)):
        return read_tasks_yaml(tasks)
    if tasks is not None:
        return [t if isinstance(t, EvalTask) else _task_from_dict(t, "tasks") for t in tasks]
    extras: dict[str, EvalTask] = {}
    layout = getattr(cohort, "layout", None)
    raw = layout.optional("tasks") if layout is not None else Path(cohort.root) / "tasks.yaml"
    if raw is not None and raw.exists():
        extras = {t.name: t for t in read_tasks_yaml(raw)}
    out = []
    for spec in cohort.tasks or []:
        e = extras.get(spec.name)
        out.append(EvalTask(
            name=spec.name, kind=spec.kind, level=spec.level, label=spec.label, time=spec.time, event=spec.event,
            ordinal=bool(getattr(spec, "ordinal", e.ordinal if e else False)),
            classes=getattr(spec, "classes", e.classes if e else None),
            prompts=getattr(spec, "prompts", e.prompts if e else None),
        ))
    return out


@dataclass
class Embeddings:
    """Embedding rows and their metadata: ``units`` is indexed like ``X`` (slide_id or patient_id) and has
    columns patient_id and site (NaN where unknown)."""

    name: str
    X: np.ndarray
    units: pd.DataFrame
    level: str  # slide | patient


def unit_table(ids: list[str], level: str, cohort, site_column: str, obs: pd.DataFrame | None = None) -> pd.DataFrame:
    slides = cohort.slides
    site = slides[site_column] if site_column in slides.columns else pd.Series(np.nan, index=slides.index)
    if level == "slide":
        pid = obs["patient_id"].astype(str) if obs is not None and "patient_id" in obs else slides.loc[ids, "patient_id"]
        return pd.DataFrame({"patient_id": np.asarray(pid, str), "site": site.reindex(ids).to_numpy()}, index=pd.Index(ids, name="unit"))
    # A patient's site: the most frequent site among its slides (first in slides.csv order on ties).
    per_patient = site.groupby(slides["patient_id"].astype(str), sort=False).agg(
        lambda s: s.dropna().mode().iloc[0] if s.notna().any() else np.nan)
    return pd.DataFrame({"patient_id": ids, "site": per_patient.reindex(ids).to_numpy()}, index=pd.Index(ids, name="unit"))


def load_embeddings(adata, cohort, site_column: str = "center", name: str = "model") -> Embeddings:
    """AnnData (or .h5ad path) -> Embeddings. Level from ``uns['level']``, else by matching obs names to
    the cohort's slide ids (preferred when both match) or patient ids."""
    import anndata

    if isinstance(adata, (str, Path)):
        try:
            adata = anndata.read_h5ad(adata)
        except OSError as e:
            raise SlidefmError(f"{adata}: cannot read embeddings: {e}") from e
    ids = [str(i) for i in adata.obs_names]
    if len(set(ids)) != len(ids):
        raise SlidefmError("embeddings: obs names (slide or patient ids) must be unique")
    level = str(adata.uns.get("level", "")) if "level" in adata.uns else ""
    slide_ids, patient_ids = set(map(str, cohort.slide_ids)), set(map(str, cohort.patient_ids))
    if not level:
        if set(ids) <= slide_ids:
            level = "slide"
        elif set(ids) <= patient_ids:
            level = "patient"
        else:
            bad = sorted(set(ids) - slide_ids - patient_ids)[:5]
            raise SlidefmError(f"embeddings: obs names match neither the cohort's slide ids nor its patient ids (e.g. {bad})")
    if level not in ("slide", "patient"):
        raise SlidefmError(f"embeddings: uns['level'] must be slide or patient, got {level!r}")
    known = slide_ids if level == "slide" else patient_ids
    missing = sorted(set(ids) - known)
    if missing:
        raise SlidefmError(f"embeddings: {len(missing)} {level} id(s) not in the cohort, e.g. {missing[:5]}")
    X = adata.X
    X = np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=np.float64)
    if X.ndim != 2 or not np.all(np.isfinite(X)):
        raise SlidefmError("embeddings: X must be a finite 2-D matrix")
    units = unit_table(ids, level, cohort, site_column, adata.obs)
    return Embeddings(name, X, units, level)


@dataclass
class TaskData:
    """Rows of one task for one model: features, targets and grouping (all row-aligned)."""

    task: EvalTask
    ids: np.ndarray
    X: np.ndarray
    groups: np.ndarray  # patient_id
    sites: np.ndarray
    y: np.ndarray | None = None  # class index (classification)
    classes: list = field(default_factory=list)
    time: np.ndarray | None = None
    event: np.ndarray | None = None
    fixed: np.ndarray | None = None  # fold/split assignment from clinical.csv
    note: str = ""


def pool_to_patients(emb: Embeddings) -> Embeddings:
    """Mean of each patient's slide embeddings (patients in first-appearance order)."""
    if emb.level == "patient":
        return emb
    pids = emb.units["patient_id"].to_numpy()
    order = list(dict.fromkeys(pids))
    codes = pd.Index(order).get_indexer(pids)
    X = np.zeros((len(order), emb.X.shape[1]))
    np.add.at(X, codes, emb.X)
    X /= np.bincount(codes)[:, None]
    site = emb.units.groupby("patient_id", sort=False)["site"].agg(
        lambda s: s.dropna().mode().iloc[0] if s.notna().any() else np.nan).reindex(order)
    units = pd.DataFrame({"patient_id": order, "site": site.to_numpy()}, index=pd.Index(order, name="unit"))
    return Embeddings(emb.name, X, units, "patient")


def _class_order(values: pd.Series, task: EvalTask) -> list:
    if task.classes:
        declared = [str(c) for c in task.classes]
        unknown = sorted(set(values.astype(str)) - set(declared))
        if unknown:
            raise SlidefmError(f"task {task.name}: labels {unknown[:5]} are not in its declared classes")
        return declared
    uniq = values.unique()
    try:
        return [str(v) for v in sorted(uniq, key=float)]
    except (TypeError, ValueError):
        return sorted(str(v) for v in uniq)


def _fmt(v) -> str:
    # 1.0 and 1 name the same class whether pandas read the column as float or int.
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def task_data(task: EvalTask, emb: Embeddings, cohort, use_fixed: bool = True) -> TaskData | None:
    """Rows of ``emb`` with this task's targets (pooled to patients for patient tasks); None when the
    task is slide-level but only patient embeddings exist."""
    if task.level == "slide" and emb.level == "patient":
        return None
    if task.level == "patient":
        emb = pool_to_patients(emb)
        table = cohort.clinical
        if table is None:
            raise SlidefmError(f"task {task.name}: patient-level task but the cohort has no clinical.csv")
        table = table.copy()
        table.index = table.index.astype(str)
        key = emb.units.index
    else:
        table = cohort.slides.copy()
        table.index = table.index.astype(str)
        key = emb.units.index
    cols = [task.label] if task.kind == "classification" else [task.time, task.event]
    where = "clinical.csv" if task.level == "patient" else "slides.csv"
    for c in cols:
        if c not in table.columns:
            raise SlidefmError(f"task {task.name}: column {c!r} not in {where}")
    rows = table.reindex(key)[cols]
    keep = rows.notna().all(axis=1).to_numpy()
    ids = key.to_numpy()[keep]
    X = emb.X[keep]
    groups = emb.units["patient_id"].to_numpy()[keep].astype(str)
    sites = emb.units["site"].to_numpy()[keep]
    fixed = None
    clinical = cohort.clinical
    if use_fixed and clinical is not None:
        col = "fold" if "fold" in clinical.columns else ("split" if "split" in clinical.columns else None)
        if col:
            c = clinical[col].copy()
            c.index = c.index.astype(str)
            fixed = c.reindex(groups).to_numpy()
    td = TaskData(task, ids, X, groups, sites, fixed=fixed)
    if task.kind == "classification":
        vals = rows.loc[keep, task.label].map(_fmt)
        td.classes = _class_order(vals, task)
        td.y = pd.Index(td.classes).get_indexer(vals).astype(int)
    else:
        t = pd.to_numeric(rows.loc[keep, task.time], errors="coerce").to_numpy(float)
        e = pd.to_numeric(rows.loc[keep, task.event], errors="coerce").to_numpy(float)
        if np.isnan(t).any() or np.isnan(e).any() or not set(np.unique(e)) <= {0.0, 1.0} or (t < 0).any():
            raise SlidefmError(f"task {task.name}: survival time must be numeric >= 0 and event in {{0, 1}}")
        td.time, td.event = t, e.astype(int)
    return td


def ri_labels(emb: Embeddings, task: EvalTask, cohort) -> np.ndarray:
    """The task's label for every embedding row (patient labels broadcast to their slides)."""
    if task.level == "patient":
        clin = cohort.clinical
        if clin is None or task.label not in clin.columns:
            return np.full(len(emb.units), np.nan, dtype=object)
        col = clin[task.label].copy()
        col.index = col.index.astype(str)
        return col.reindex(emb.units["patient_id"].astype(str)).to_numpy(dtype=object)
    if emb.level != "slide":
        return np.full(len(emb.units), np.nan, dtype=object)
    col = cohort.slides[task.label].copy()
    col.index = col.index.astype(str)
    return col.reindex(emb.units.index).to_numpy(dtype=object)
