"""Read a cohort directory (shared/cohort-format.md): tables eagerly-cheap, slides lazily."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from slidefm.cohort import h5
from slidefm.cohort.layout import Layout, TableSpec, load_layout
from slidefm.cohort.slides import (H5SlideReader, SlideData, SlideReader,  # noqa: F401 - SlideData re-exported
                                   feature_dtype)
from slidefm.errors import CohortError, Problem, SlidefmError

# pandas' default NA tokens, applied to every column except identifiers ("NA" can be a patient id).
_NA = ["", "#N/A", "#NA", "-NaN", "-nan", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]
TASK_KINDS = ("classification", "survival")
TASK_LEVELS = ("patient", "slide")


@dataclass(frozen=True)
class TaskSpec:
    """A downstream evaluation task from tasks.yaml."""

    name: str
    kind: str  # classification | survival
    level: str = "patient"  # patient | slide
    label: str | None = None  # classification label column
    time: str | None = None  # survival time column
    event: str | None = None  # survival event column (1 = event, 0 = censored)

    @property
    def columns(self) -> list[str]:
        return [c for c in (self.label, self.time, self.event) if c]


def _torch_only_names(feat_dir: Path) -> dict[str, str]:
    """slide_id -> file name of the .pt/.pth files in the features directory without a matching .h5
    (CLAM's pt_files/); listed once, so opening a cohort costs one directory read, not a stat per slide."""
    try:
        names = [e.name for e in os.scandir(feat_dir) if e.is_file()]
    except OSError:
        return {}
    stems_h5 = {n[:-3] for n in names if n.endswith(".h5")}
    out = {}
    for n in sorted(names):
        stem, dot, ext = n.rpartition(".")
        if dot and "." + ext.lower() in h5.TORCH_SUFFIXES and stem not in stems_h5:
            out.setdefault(stem, n)
    return out


def _default_name(slide_id: str, torch_only: dict[str, str]) -> str:
    return torch_only.get(slide_id, f"{slide_id}.h5")


def _file_has_coords(path: Path) -> bool:
    """Whether a slide file carries coordinates (unreadable files count as having them: validation
    reports those, and a position check must not mask the real problem)."""
    if h5.is_torch_file(path):
        return False
    try:
        import h5py

        with h5py.File(path, "r") as f:
            return "coords" in f
    except OSError:
        return True


def read_csv(path: Path, id_cols: tuple[str, ...]) -> pd.DataFrame:
    """CSV with identifier columns kept as exact strings (only empty cells are missing)."""
    cols = pd.read_csv(path, nrows=0).columns
    na = {c: ([""] if c in id_cols else _NA) for c in cols}
    dtype = {c: str for c in id_cols if c in cols}
    return pd.read_csv(path, dtype=dtype, keep_default_na=False, na_values=na)


def lines_of(mask: np.ndarray | pd.Series, limit: int = 10) -> str:
    """'lines 3, 7 (+n more)' for the True rows of a table read from CSV (header is line 1)."""
    idx = np.flatnonzero(np.asarray(mask)) + 2
    s = ", ".join(str(i) for i in idx[:limit])
    more = f" (+{len(idx) - limit} more)" if len(idx) > limit else ""
    return ("line " if len(idx) == 1 else "lines ") + s + more


class Cohort:
    """A cohort directory: slides.csv plus optional tables, features read per slide on demand."""

    def __init__(self, layout: Layout, slides: pd.DataFrame, problems: list[Problem]):
        self.layout = layout
        self.root = layout.root
        self.slides = slides
        self._open_problems = problems
        self._cache: dict[str, tuple[Any, list[Problem]]] = {}
        self._store = None
        self._reader: SlideReader | None = None
        by_patient: dict[str, list[str]] = {}
        for sid, pid in zip(slides.index, slides["patient_id"]):
            by_patient.setdefault(pid, []).append(sid)
        self._by_patient = by_patient

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, store: str | Path | bool | None = None) -> "Cohort":
        """Open COHORT. ``store``: None = use the default packed store if present and up to date,
        a path = use that store (error if stale), False = always read HDF5. Checking the whole cohort is
        :func:`slidefm.cohort.validate.validate_cohort` (``Cohort.open`` reads only what it must)."""
        root = Path(path).resolve()
        if not root.is_dir():
            raise CohortError([Problem(str(path), "", "cohort directory not found")])
        layout, problems = load_layout(root)
        slides_path = layout.files["slides"]
        sname = layout.display(slides_path)
        fatal = [p for p in problems if p.level == "error"]
        if not slides_path.exists():
            fatal.append(Problem(sname, "", "required file not found"))
        if fatal:
            raise CohortError(fatal)
        try:
            df = read_csv(slides_path, ("slide_id", "patient_id", "path", "center"))
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise CohortError([Problem(sname, "", f"cannot parse CSV: {e}")]) from None
        missing = [c for c in ("slide_id", "patient_id") if c not in df.columns]
        if missing:
            raise CohortError([Problem(sname, "header", f"missing required column(s) {missing}")])
        if len(df) == 0:
            raise CohortError([Problem(sname, "", "no slides listed")])
        for col in ("slide_id", "patient_id"):
            empty = df[col].isna()
            if empty.any():
                problems.append(Problem(sname, lines_of(empty), f"empty {col}"))
                df[col] = df[col].fillna("")
        dup = df["slide_id"].duplicated(keep=False)
        if dup.any():
            for sid in pd.unique(df.loc[dup, "slide_id"]):
                problems.append(Problem(sname, f"{lines_of(df['slide_id'] == sid)}, slide {sid}",
                                        "duplicate slide_id"))
        feat_dir = layout.files["features"]
        given = df["path"] if "path" in df.columns else pd.Series([np.nan] * len(df), index=df.index)
        torch_only = _torch_only_names(feat_dir)
        df["path"] = [str(root / p) if isinstance(p, str) and p else str(feat_dir / _default_name(sid, torch_only))
                      for sid, p in zip(df["slide_id"], given)]
        rest = [c for c in df.columns if c not in ("slide_id", "patient_id", "path")]
        slides = df[["slide_id", "patient_id", "path"] + rest].set_index("slide_id")
        cohort = cls(layout, slides, problems)
        cohort._attach_store(store)
        return cohort

    def _attach_store(self, store: str | Path | bool | None) -> None:
        from slidefm.cohort.store import PackedStore

        if store is False:
            return
        explicit = store not in (None, True)
        path = Path(store) if explicit else self.layout.files["store"]
        if not (path / "index.json").exists():
            if explicit:
                raise SlidefmError(f"packed store {path} not found (run `slidefm pack {self.root}`)")
            return
        packed = PackedStore(path)
        reason = packed.stale_reason(self.slides["path"].to_dict(), self.display)
        if reason is not None:
            msg = f"packed store {path} is out of date ({reason}); run `slidefm pack {self.root}` again"
            if explicit:
                raise SlidefmError(msg)
            warnings.warn(msg + "; reading HDF5 files instead", stacklevel=3)
            return
        self._store = packed

    # ---- slides --------------------------------------------------------------------------------
    @property
    def slide_ids(self) -> list[str]:
        return list(self.slides.index)

    @property
    def patient_ids(self) -> list[str]:
        return list(self._by_patient)

    def slides_of(self, patient_id: str) -> list[str]:
        return list(self._by_patient.get(patient_id, []))

    def slide_path(self, slide_id: str) -> Path:
        return Path(self.slides.at[slide_id, "path"])

    def display(self, path: str | Path) -> str:
        return self.layout.display(Path(path))

    @property
    def store(self):
        """The PackedStore in use, or None when slides are read from HDF5."""
        return self._store

    @property
    def reader(self) -> SlideReader:
        """A picklable slide reader (packed store when attached, else HDF5) for DataLoader workers."""
        if self._reader is None:
            if self._store is not None:
                self._reader = self._store.reader()
            else:
                paths = {sid: p for sid, p in zip(self.slides.index, self.slides["path"])}
                self._reader = H5SlideReader(paths, self.root)
        return self._reader

    def read_slide(self, slide_id: str) -> SlideData:
        if slide_id not in self.slides.index:
            raise SlidefmError(f"slide {slide_id!r} is not in {self.display(self.layout.files['slides'])}")
        return self.reader.read(slide_id)

    def slides_without_positions(self, first_only: bool = False) -> list[str]:
        """Slides that are features-only bags (no coords), in slides.csv order.

        From the packed store's index or the last validation when available; else from the files
        (a .pt file never has positions; an HDF5 file is opened only to look for ``coords``).
        """
        if self._store is not None:
            flags = self._store.has_positions()
            known = {sid: flags[i] for i, sid in enumerate(self._store.slide_ids)}
        elif "slide_stats" in self._cache:
            st = self._cache["slide_stats"][0]
            known = dict(zip(st.index, st["has_coords"].astype(bool))) if "has_coords" in st else {}
        else:
            known = {}
        out = []
        for sid, path in zip(self.slides.index, self.slides["path"]):
            has = known.get(sid)
            if has is None:
                has = _file_has_coords(Path(path))
            if not has:
                out.append(sid)
                if first_only:
                    break
        return out

    @property
    def feature_dim(self) -> int:
        if self._store is not None:
            return self._store.dim
        if "feature_dim" not in self._cache:
            err = None
            for sid in self.slide_ids:
                try:
                    header = h5.read_header(self.slide_path(sid))
                    self._cache["feature_dim"] = (header.dim, [])
                    self._cache["feature_dtype"] = (feature_dtype(header.dtype), [])
                    break
                except h5.SlideFileError as e:
                    err = err or f"{self.display(self.slide_path(sid))} [slide {sid}]: {e}"
            else:
                raise SlidefmError(f"no readable slide file to take the feature width from; first failure: {err}")
        return self._cache["feature_dim"][0]

    @property
    def feature_dtype(self) -> np.dtype:
        """The dtype slides are handed out in (:func:`slidefm.cohort.slides.feature_dtype`: float16 kept, else
        float32): the widest of the packed store's shards, else that of the slide file ``feature_dim`` reads."""
        if self._store is not None:
            return max((feature_dtype(np.dtype(s["dtype"])) for s in self._store.index["shards"]),
                       key=lambda d: d.itemsize, default=np.dtype(np.float32))
        self.feature_dim  # noqa: B018 - reads the first readable header, caching its width and dtype
        return self._cache["feature_dtype"][0]

    # ---- tables --------------------------------------------------------------------------------
    def _get(self, key: str, loader) -> Any:
        if key not in self._cache:
            self._cache[key] = loader()
        value, problems = self._cache[key]
        errors = [p for p in problems if p.level == "error"]
        if errors:
            raise CohortError(errors)
        return value

    def table_problems(self) -> list[Problem]:
        """Problems found while parsing slides.csv, cohort.yaml and every optional table."""
        out = list(self._open_problems)
        for key, loader in (("clinical", self._load_clinical), ("reports", self._load_reports),
                            ("tasks", self._load_tasks), ("expression", self._load_expression),
                            ("omics", self._load_omics)):
            if key not in self._cache:
                self._cache[key] = loader()
            out.extend(self._cache[key][1])
        return out

    def clinical_lines(self) -> dict[str, int]:
        """CSV line of each patient's clinical row (for error messages)."""
        if "clinical" not in self._cache:
            self._cache["clinical"] = self._load_clinical()
        return self._cache["clinical_lines"][0]

    @property
    def clinical(self) -> pd.DataFrame | None:
        return self._get("clinical", self._load_clinical)

    def _load_clinical(self):
        path = self.layout.optional("clinical")
        if path is None:
            self._cache["clinical_lines"] = ({}, [])
            return None, []
        name = self.display(path)
        if not path.exists():
            return None, [Problem(name, "", "file named in cohort.yaml not found")]
        try:
            df = read_csv(path, ("patient_id",))
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            return None, [Problem(name, "", f"cannot parse CSV: {e}")]
        if "patient_id" not in df.columns:
            return None, [Problem(name, "header", "missing required column 'patient_id'")]
        problems = []
        empty = df["patient_id"].isna()
        if empty.any():
            problems.append(Problem(name, lines_of(empty), "empty patient_id"))
        dup = df["patient_id"].duplicated(keep=False) & ~empty
        for pid in pd.unique(df.loc[dup, "patient_id"]):
            problems.append(Problem(name, f"{lines_of(df['patient_id'] == pid)}, patient {pid}",
                                    "several rows for one patient"))
        unknown = ~df["patient_id"].isin(self._by_patient) & ~empty
        if unknown.any():
            problems.append(Problem(name, lines_of(unknown), f"{int(unknown.sum())} row(s) for patients not in "
                                    "slides.csv (ignored)", "warning"))
        keep = ~empty & ~df["patient_id"].duplicated(keep="first")
        self._cache["clinical_lines"] = ({pid: i + 2 for i, pid in zip(np.flatnonzero(keep), df.loc[keep, "patient_id"])}, [])
        return df[keep].set_index("patient_id"), problems

    @property
    def reports(self) -> pd.DataFrame | None:
        return self._get("reports", self._load_reports)

    def patient_report(self, patient_id: str) -> str | None:
        reports = self.reports
        if reports is None:
            return None
        if "report_by_patient" not in self._cache:
            joined = reports.dropna(subset=["patient_id"]).groupby("patient_id", sort=False)["text"]
            self._cache["report_by_patient"] = (joined.agg(lambda t: "\n\n".join(t)).to_dict(), [])
        return self._cache["report_by_patient"][0].get(patient_id)

    def _load_reports(self):
        path = self.layout.optional("reports")
        if path is None:
            return None, []
        name = self.display(path)
        if not path.exists():
            return None, [Problem(name, "", "file named in cohort.yaml not found")]
        try:
            df = read_csv(path, ("patient_id", "slide_id"))
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            return None, [Problem(name, "", f"cannot parse CSV: {e}")]
        problems = []
        if "text" not in df.columns:
            problems.append(Problem(name, "header", "missing required column 'text'"))
        if "patient_id" not in df.columns and "slide_id" not in df.columns:
            problems.append(Problem(name, "header", "needs a 'patient_id' or 'slide_id' column"))
        if problems:
            return None, problems
        pid = df["patient_id"] if "patient_id" in df.columns else pd.Series([None] * len(df), dtype=object)
        sid = df["slide_id"] if "slide_id" in df.columns else pd.Series([None] * len(df), dtype=object)
        owner = self.slides["patient_id"]
        known_slide = sid.isin(owner.index)
        from_slide = sid.map(lambda s: owner.get(s) if isinstance(s, str) and s in owner.index else None)
        clash = known_slide & pid.notna() & (pid != from_slide)
        if clash.any():
            problems.append(Problem(name, lines_of(clash), "patient_id differs from the slide's patient in slides.csv"))
        unknown_slide = sid.notna() & ~known_slide
        if unknown_slide.any():
            problems.append(Problem(name, lines_of(unknown_slide), f"{int(unknown_slide.sum())} report(s) for slides "
                                    "not in slides.csv (ignored)", "warning"))
        pid = pid.where(pid.notna(), from_slide)
        unknown = pid.notna() & ~pid.isin(self._by_patient) & ~unknown_slide
        if unknown.any():
            problems.append(Problem(name, lines_of(unknown), f"{int(unknown.sum())} report(s) for patients not in "
                                    "slides.csv (ignored)", "warning"))
        no_id = pid.isna() & sid.isna()
        if no_id.any():
            problems.append(Problem(name, lines_of(no_id), "report with neither patient_id nor slide_id"))
        empty = df["text"].isna() | (df["text"].astype(str).str.strip() == "")
        if empty.any():
            problems.append(Problem(name, lines_of(empty), "empty report text (ignored)", "warning"))
        keep = ~empty & pid.isin(self._by_patient) & ~clash
        out = pd.DataFrame({"patient_id": pid[keep].astype(str), "slide_id": sid[keep].where(sid[keep].notna(), None),
                            "text": df["text"][keep].astype(str)}).reset_index(drop=True)
        return out, problems

    @property
    def tasks(self) -> list[TaskSpec]:
        return self._get("tasks", self._load_tasks) or []

    def _load_tasks(self):
        path = self.layout.optional("tasks")
        if path is None:
            return [], []
        name = self.display(path)
        if not path.exists():
            return [], [Problem(name, "", "file named in cohort.yaml not found")]
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            return [], [Problem(name, "", f"not valid YAML: {e}")]
        raw = doc.get("tasks") if isinstance(doc, dict) else None
        if not isinstance(raw, list):
            return [], [Problem(name, "", "expected a top-level 'tasks:' list")]
        tasks, problems, seen = [], [], set()
        allowed = {"name", "kind", "level", "label", "time", "event"}
        for i, t in enumerate(raw):
            where = f"task {i + 1}"
            if not isinstance(t, dict) or not t.get("name"):
                problems.append(Problem(name, where, "each task needs a mapping with a 'name'"))
                continue
            where = f"task {t['name']}"
            bad = sorted(set(t) - allowed)
            if bad:
                problems.append(Problem(name, where, f"unknown key(s) {bad}; allowed: {', '.join(sorted(allowed))}"))
            if t["name"] in seen:
                problems.append(Problem(name, where, "duplicate task name"))
            seen.add(t["name"])
            kind, level = t.get("kind"), t.get("level", "patient")
            if kind not in TASK_KINDS:
                problems.append(Problem(name, where, f"kind {kind!r} not one of {', '.join(TASK_KINDS)}"))
                continue
            if level not in TASK_LEVELS:
                problems.append(Problem(name, where, f"level {level!r} not one of {', '.join(TASK_LEVELS)}"))
                continue
            need = ("label",) if kind == "classification" else ("time", "event")
            miss = [k for k in need if not t.get(k)]
            if miss:
                problems.append(Problem(name, where, f"{kind} task needs {', '.join(miss)}"))
                continue
            tasks.append(TaskSpec(str(t["name"]), kind, level, t.get("label"), t.get("time"), t.get("event")))
        return tasks, problems

    @property
    def expression(self):
        """Expression AnnData with obs_names = patient_id, or None."""
        return self._get("expression", self._load_expression)

    @property
    def expression_units(self) -> str | None:
        spec = self.layout.expression
        return None if spec is None else spec.units

    @property
    def omics(self) -> dict[str, tuple[Any, str]]:
        """Other omics tables from cohort.yaml: name -> (AnnData indexed by patient_id, units)."""
        return self._get("omics", self._load_omics) or {}

    def _load_expression(self):
        spec = self.layout.expression
        if spec is None:
            return None, []
        return self._load_anndata(spec)

    def _load_omics(self):
        out, problems = {}, []
        for name, spec in self.layout.omics.items():
            adata, p = self._load_anndata(spec)
            problems.extend(p)
            if adata is not None:
                out[name] = (adata, spec.units)
        return out, problems

    def _load_anndata(self, spec: TableSpec):
        import anndata

        name = self.display(spec.path)
        if not spec.path.exists():
            return None, [Problem(name, "", "file not found")]
        try:
            adata = anndata.read_h5ad(spec.path)
        except Exception as e:  # anndata raises many types for corrupt files
            return None, [Problem(name, "", f"cannot read as AnnData (.h5ad): {e}")]
        if "patient_id" in adata.obs.columns:
            ids = adata.obs["patient_id"].astype(str).to_numpy()
            source = "obs column patient_id"
        else:
            ids = np.asarray(adata.obs_names.astype(str))
            source = "obs_names"
        problems = []
        s = pd.Series(ids)
        dup = s.duplicated(keep=False)
        for pid in pd.unique(s[dup])[:20]:
            rows = ", ".join(str(i) for i in np.flatnonzero(s == pid)[:10])
            problems.append(Problem(name, f"obs rows {rows}, patient {pid}", f"several rows for one patient ({source})"))
        unknown = ~s.isin(self._by_patient)
        if unknown.any():
            ex = ", ".join(s[unknown].head(5))
            problems.append(Problem(name, f"obs rows {', '.join(str(i) for i in np.flatnonzero(unknown)[:10])}",
                                    f"{int(unknown.sum())} row(s) for patients not in slides.csv (e.g. {ex}; ignored)",
                                    "warning"))
        adata.obs_names = pd.Index(ids, name="patient_id")
        return adata, problems

    def __repr__(self) -> str:
        src = "packed store" if self._store is not None else "HDF5"
        return f"Cohort({self.root}, {len(self.slides)} slides, {len(self._by_patient)} patients, {src})"
