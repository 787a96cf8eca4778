"""Check a cohort against the contract and report every problem at once.

Slide files are checked from shapes and attributes, plus their coordinates (duplicates, lattice);
the feature values are scanned for NaN/Inf in row chunks unless ``scan_values=False``. Slides are
checked in worker processes when there are many, since opening 100k HDF5 files dominates.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from slidefm.cohort import h5
from slidefm.cohort.reader import Cohort
from slidefm.errors import CohortError, Problem
from slidefm.grid import GridError, coords_to_grid

CHUNK_ROWS = 8192
SPLITS = ("train", "val", "test")
# Per-slide table of a validation; the geometry columns are None for features-only bags.
STAT_COLUMNS = ["n", "dim", "dtype", "patch_size_level0", "target_magnification", "has_coords", "kind", "step",
                "step_source", "grid_w", "grid_h", "occupancy", "neighbour_share", "snapped", "collided"]


@dataclass
class ValidationReport:
    problems: list[Problem]
    slide_stats: pd.DataFrame  # index slide_id; STAT_COLUMNS; only slides whose file could be read

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.level != "error"]

    @property
    def ok(self) -> bool:
        return not self.errors


def _rows(idx: np.ndarray, limit: int = 5) -> str:
    s = ", ".join(str(int(i)) for i in idx[:limit])
    return s + (f" (+{len(idx) - limit} more)" if len(idx) > limit else "")


def check_slide(job: tuple[str, str, str, str, bool, int]) -> tuple[tuple | None, list[Problem]]:
    """Check one slide file (HDF5 or .pt); returns (stats row or None, problems). Top-level so it pickles."""
    sid, path, display, where, scan_values, chunk_rows = job
    try:
        src = h5.SlideSource(Path(path))
    except h5.SlideFileError as e:
        return None, [Problem(display, where, str(e))]
    problems: list[Problem] = []
    grid = None
    with src:
        header = src.header
        if header is None:
            return None, [Problem(display, where, m) for m in src.problems]
        a = header.attrs
        try:
            coords = src.coords()
            if coords is not None:
                grid = _check_coords(coords, a, display, where, problems)
            if scan_values:
                bad = [start + h5.nonfinite_rows(c) for start, c in src.chunks(chunk_rows)]
                bad_rows = np.concatenate(bad)
                if len(bad_rows):
                    problems.append(Problem(display, f"{where}, patch rows {_rows(bad_rows)}",
                                            f"{len(bad_rows)} patch(es) with NaN/Inf features"))
        except h5.SlideFileError as e:
            problems.append(Problem(display, where, str(e)))
        except OSError as e:  # corrupt chunk / truncated file only shows up when values are read
            problems.append(Problem(display, where, f"cannot read data ({e})"))
    geo = (None,) * 8
    if grid is not None:
        w, h = grid.shape
        geo = (grid.step, grid.source, w, h, round(grid.occupancy, 6), round(grid.neighbour_share, 4), grid.snapped,
               grid.collided)
    stats = (sid, header.n, header.dim, str(header.dtype), header.patch_size_level0, a.get("target_magnification"),
             header.has_coords, header.kind, *geo)
    return stats, problems


def _check_coords(coords: np.ndarray, attrs: dict[str, Any], display: str, where: str,
                  problems: list[Problem]):
    """Duplicates, then the grid and its plausibility; returns the Grid (None when it cannot be built)."""
    lo = coords.min(0)
    span = coords.max(0) - lo + 1
    key = (coords[:, 0] - lo[0]) * span[1] + (coords[:, 1] - lo[1])
    order = np.argsort(key, kind="stable")
    same = np.flatnonzero(key[order][1:] == key[order][:-1])
    if len(same):
        first = order[same[0]], order[same[0] + 1]
        x, y = coords[first[0]]
        problems.append(Problem(display, f"{where}, patch rows {first[0]} and {first[1]}",
                                f"{len(same)} duplicate coordinate(s), e.g. ({x}, {y})"))
        return None
    try:
        grid = coords_to_grid(coords, attrs=attrs, check_duplicates=False)
    except GridError as e:
        problems.append(Problem(display, where, str(e)))
        return None
    for msg in grid.problems():
        problems.append(Problem(display, where, msg))
    if grid.declared_step is not None:
        problems.append(Problem(display, where, f"declared geometry gives a {grid.declared_step} px stride, but "
                                f"neighbouring patches are {grid.step} px apart (overlap not recorded?); the grid "
                                "follows the coordinates", "warning"))
    if grid.source == "inferred" and grid.declared_step is None:
        problems.append(Problem(display, where, "no patch geometry attributes (patch_size_level0, CLAM's patch_size/"
                                f"downsample, TRIDENT's magnifications); stride {grid.step} px measured from the "
                                "coordinates", "warning"))
    if grid.collided > 0.01 * grid.num_patches and not grid.problems():
        problems.append(Problem(display, where, f"{grid.collided} of {grid.num_patches} patches collided on the "
                                f"stride-{grid.step} grid and were moved to the nearest free cell", "warning"))
    return grid


def _slide_jobs(cohort: Cohort, scan_values: bool, chunk_rows: int) -> list[tuple]:
    jobs = []
    for i, (sid, path) in enumerate(zip(cohort.slides.index, cohort.slides["path"])):
        jobs.append((sid, path, cohort.display(path), f"slide {sid}, slides.csv line {i + 2}", scan_values, chunk_rows))
    return jobs


def check_slides(cohort: Cohort, scan_values: bool = True, workers: int | None = None,
                 chunk_rows: int = CHUNK_ROWS) -> ValidationReport:
    """Check every slide file, then what only the whole cohort shows (D, magnification)."""
    from slidefm.cohort.validation_cache import SlideCheckCache

    jobs = _slide_jobs(cohort, scan_values, chunk_rows)
    cache = SlideCheckCache.load(cohort, jobs, scan_values)  # unchanged files keep their earlier result
    jobs = cache.to_check
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if len(jobs) >= 256 else 1
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            results = list(ex.map(check_slide, jobs, chunksize=max(1, len(jobs) // (workers * 16))))
    else:
        results = [check_slide(j) for j in jobs]
    jobs, results = cache.complete(results)  # every job again, cached + fresh results; saves the cache
    problems = [p for _, ps in results for p in ps]
    rows = [r for r, _ in results if r is not None]
    stats = pd.DataFrame(rows, columns=["slide_id"] + STAT_COLUMNS).set_index("slide_id")
    where = {j[0]: (j[2], j[3]) for j in jobs}
    if stats["dim"].nunique() > 1:
        dims = stats["dim"].value_counts()
        main = int(dims.index[0])
        for sid, d in stats["dim"][stats["dim"] != main].items():
            problems.append(Problem(*where[sid], f"feature width D={d}, but {dims.iloc[0]} other slide(s) have "
                                    f"D={main}; all slides of a cohort need the same patch encoder"))
    problems.extend(_check_positions_mixed(stats, where))
    mags = stats["target_magnification"].dropna()
    if mags.nunique() > 1:
        counts = mags.value_counts()
        for mag in counts.index[1:]:
            sids = list(mags.index[mags == mag])
            problems.append(Problem("features", "slides " + ", ".join(sids[:5]) + (" ..." if len(sids) > 5 else ""),
                                    f"{len(sids)} slide(s) extracted at {mag}x while {counts.iloc[0]} are at "
                                    f"{counts.index[0]}x", "warning"))
    cohort._cache["slide_stats"] = (stats, [])  # Cohort.slides_without_positions reads it
    return ValidationReport(problems, stats)


def _check_positions_mixed(stats: pd.DataFrame, where: dict[str, tuple[str, str]]) -> list[Problem]:
    """A cohort is all features-only bags or all with coords. An HDF5 file that lacks ``coords`` among
    files that have them is broken (an error, as the contract says); a .pt bag among them is a warning."""
    has = stats["has_coords"].astype(bool)
    if has.all() or not has.any():
        return []
    out = []
    n_with = int(has.sum())
    pt = []
    for sid in stats.index[~has]:
        if stats.at[sid, "kind"] == "pt":
            pt.append(sid)
        else:
            out.append(Problem(*where[sid], f"no 'coords' dataset, while {n_with} other slide(s) have coordinates"))
    if pt:
        out.append(Problem("features", "slides " + ", ".join(pt[:5]) + (" ..." if len(pt) > 5 else ""),
                           f"{len(pt)} features-only .pt bag(s) among {n_with} slide(s) with coordinates: models "
                           "that need positions will refuse this cohort", "warning"))
    return out


def _numeric(col: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Numeric values and the mask of cells that are present but not numbers."""
    num = pd.to_numeric(col, errors="coerce")
    return num, col.notna() & num.isna()


def check_tasks(cohort: Cohort) -> list[Problem]:
    problems: list[Problem] = []
    try:
        tasks = cohort.tasks
    except CohortError:
        return problems  # parse problems are already in table_problems()
    tasks_name = cohort.display(cohort.layout.files["tasks"])
    try:
        clinical = cohort.clinical
    except CohortError:
        clinical = None
        clinical_broken = True
    else:
        clinical_broken = False
    clin_name = cohort.display(cohort.layout.files["clinical"])
    slides_name = cohort.display(cohort.layout.files["slides"])
    clin_lines = cohort.clinical_lines() if clinical is not None else {}
    patient_tasks = []
    for t in tasks:
        where = f"task {t.name}"
        if t.level == "patient":
            if clinical is None:
                if not clinical_broken:
                    problems.append(Problem(tasks_name, where, f"patient-level task needs {clin_name}, which is missing"))
                continue
            table, name = clinical, clin_name
            lines = np.array([clin_lines[p] for p in clinical.index]) if len(clinical) else np.zeros(0, int)
        else:
            table, name = cohort.slides, slides_name
            lines = np.arange(len(table)) + 2
        missing = [c for c in t.columns if c not in table.columns]
        if missing:
            problems.append(Problem(tasks_name, where, f"column(s) {missing} not in {name}"))
            continue
        if t.level == "patient":
            patient_tasks.append(t.name)

        def bad(mask: pd.Series, msg: str) -> None:
            m = np.asarray(mask, bool)
            if m.any():
                idx = lines[m]
                s = ", ".join(str(i) for i in idx[:10]) + (f" (+{len(idx) - 10} more)" if len(idx) > 10 else "")
                problems.append(Problem(name, ("line " if len(idx) == 1 else "lines ") + s, msg))

        if t.kind == "survival":
            time, non_num = _numeric(table[t.time])
            bad(non_num, f"survival time {t.time!r} is not a number (task {t.name})")
            bad(time < 0, f"negative survival time in {t.time!r} (task {t.name})")
            bad(~np.isfinite(time) & time.notna(), f"infinite survival time in {t.time!r} (task {t.name})")
            event, non_num = _numeric(table[t.event])
            bad(non_num, f"event {t.event!r} is not a number (task {t.name})")
            bad(event.notna() & ~event.isin([0, 1]), f"event {t.event!r} must be 0 (censored) or 1 (event) "
                f"(task {t.name})")
            bad(time.isna() != event.isna(), f"only one of {t.time!r}/{t.event!r} given; the row counts as "
                f"unlabelled for task {t.name}")
        elif table[t.label].notna().sum() == 0:
            problems.append(Problem(name, f"column {t.label}", f"task {t.name} has no labelled rows", "warning"))
        elif table[t.label].nunique() < 2:
            problems.append(Problem(name, f"column {t.label}", f"task {t.name} has a single class", "warning"))
    if patient_tasks and clinical is not None:
        have = set(clinical.index)
        for pid in cohort.patient_ids:
            if pid not in have:
                sids = cohort.slides_of(pid)
                problems.append(Problem(clin_name, f"patient {pid} (slide {', '.join(sids[:5])})",
                                        f"no row for this patient; needed by task(s) {', '.join(patient_tasks)}"))
    return problems


def check_splits(cohort: Cohort) -> list[Problem]:
    try:
        clinical = cohort.clinical
    except CohortError:
        return []
    if clinical is None:
        return []
    name = cohort.display(cohort.layout.files["clinical"])
    lines = np.array([cohort.clinical_lines()[p] for p in clinical.index]) if len(clinical) else np.zeros(0, int)
    out = []
    if "split" in clinical.columns:
        m = np.asarray(clinical["split"].notna() & ~clinical["split"].isin(SPLITS))
        if m.any():
            out.append(Problem(name, lines_of_lines(lines[m]), f"split must be one of {', '.join(SPLITS)}"))
    if "fold" in clinical.columns:
        num, non_num = _numeric(clinical["fold"])
        m = np.asarray(non_num | (num.notna() & (num != num.round())))
        if m.any():
            out.append(Problem(name, lines_of_lines(lines[m]), "fold must be an integer"))
    return out


def lines_of_lines(idx: np.ndarray, limit: int = 10) -> str:
    s = ", ".join(str(int(i)) for i in idx[:limit]) + (f" (+{len(idx) - limit} more)" if len(idx) > limit else "")
    return ("line " if len(idx) == 1 else "lines ") + s


def check_omics_values(cohort: Cohort) -> list[Problem]:
    """Finite values everywhere; counts/tpm non-negative; binary tables hold only 0/1."""
    import scipy.sparse as sp

    tables = []
    try:
        if cohort.expression is not None:
            tables.append((cohort.layout.expression.path, cohort.expression, cohort.expression_units))
    except CohortError:
        pass  # load problems are already in table_problems()
    try:
        for name, (adata, units) in cohort.omics.items():
            tables.append((cohort.layout.omics[name].path, adata, units))
    except CohortError:
        pass
    out = []
    for path, adata, units in tables:
        x = adata.X
        if x is None:
            continue
        vals = x.data if sp.issparse(x) else np.asarray(x)

        def rows_of(m: np.ndarray, x=x) -> np.ndarray:
            return np.unique(x.tocoo().row[m]) if sp.issparse(x) else np.flatnonzero(m.reshape(len(m), -1).any(1))

        name = cohort.display(path)
        if vals.dtype.kind not in "biuf":
            out.append(Problem(name, "X", f"values have dtype {vals.dtype}; expected numbers"))
            continue
        checks = [(~np.isfinite(vals), "NaN/Inf values")]
        if units in ("counts", "tpm"):
            checks.append((vals < 0, f"negative values in a table declared as {units}"))
        if units == "binary":
            checks.append(((vals != 0) & (vals != 1) & np.isfinite(vals), "values other than 0/1 in a binary table"))
        for mask, msg in checks:
            if mask.any():
                rows = rows_of(mask)
                out.append(Problem(name, f"obs rows {_rows(rows)} (patient {adata.obs_names[rows[0]]})", msg))
    return out


def validate_cohort(cohort: Cohort, scan_values: bool = True, workers: int | None = None,
                    chunk_rows: int = CHUNK_ROWS) -> ValidationReport:
    """Every problem of the cohort: tables, tasks, omics and each slide file."""
    report = check_slides(cohort, scan_values=scan_values, workers=workers, chunk_rows=chunk_rows)
    problems = cohort.table_problems() + check_tasks(cohort) + check_splits(cohort) + check_omics_values(cohort)
    report.problems = problems + report.problems
    return report


def summarize_geometry(stats: pd.DataFrame) -> dict[str, Any]:
    """Grid figures over the slides with coordinates: strides and their sources, grid sizes,
    occupancy, share of patches with a neighbour, snapped and collided patches."""
    has = stats["has_coords"].astype(bool)
    g = stats[has & stats["step"].notna()]
    out: dict[str, Any] = {"slides_with_coords": int(has.sum()), "slides_without_coords": int((~has).sum())}
    if len(g):
        out["stride_px"] = {str(int(k)): int(v) for k, v in g["step"].value_counts().sort_index().items()}
        out["stride_source"] = {str(k): int(v) for k, v in g["step_source"].value_counts().items()}
        cells = g["grid_w"].astype(np.int64) * g["grid_h"].astype(np.int64)
        big = cells.idxmax()
        out["grid"] = {"median_w": float(g["grid_w"].median()), "median_h": float(g["grid_h"].median()),
                       "largest": f"{int(g.at[big, 'grid_w'])} x {int(g.at[big, 'grid_h'])}"}
        occ, nb = g["occupancy"].astype(float), g["neighbour_share"].astype(float)
        out["occupancy"] = {"min": round(float(occ.min()), 4), "median": round(float(occ.median()), 4),
                            "max": round(float(occ.max()), 4)}
        out["neighbour_share"] = {"min": round(float(nb.min()), 4), "median": round(float(nb.median()), 4)}
        out["snapped"] = {"patches": int(g["snapped"].sum()), "slides": int((g["snapped"] > 0).sum())}
        out["collided"] = {"patches": int(g["collided"].sum()), "slides": int((g["collided"] > 0).sum())}
    return out


def format_slide_geometry(stats: pd.DataFrame) -> list[str]:
    """One line per slide (`slidefm check --verbose`)."""
    lines = []
    for sid, r in stats.iterrows():
        if not r["has_coords"]:
            lines.append(f"  slide {sid}: {r['n']} patches, no coords (features-only {r['kind']} bag)")
        elif r["step"] is None or pd.isna(r["step"]):
            lines.append(f"  slide {sid}: {r['n']} patches, no grid (see the problems below)")
        else:
            lines.append(f"  slide {sid}: {r['n']} patches, stride {int(r['step'])} px ({r['step_source']}), grid "
                         f"{int(r['grid_w'])} x {int(r['grid_h'])}, occupancy {100 * r['occupancy']:.1f}%, "
                         f"{100 * r['neighbour_share']:.0f}% with a neighbour, snapped {int(r['snapped'])}, "
                         f"collided {int(r['collided'])}")
    return lines


def summarize(cohort: Cohort, report: ValidationReport) -> dict[str, Any]:
    """Figures for `slidefm check`: sizes, feature width and modality/label coverage."""
    stats = report.slide_stats
    pids = cohort.patient_ids
    n_pat = max(1, len(pids))

    def safe(fn):
        try:
            return fn()
        except CohortError:
            return None

    out: dict[str, Any] = {"root": str(cohort.root), "slides": len(cohort.slides), "patients": len(pids),
                           "slides_readable": len(stats)}
    if len(stats):
        n = stats["n"]
        out["patches_per_slide"] = {"min": int(n.min()), "median": float(n.median()), "max": int(n.max()),
                                    "total": int(n.sum())}
        out["feature_dim"] = int(stats["dim"].mode().iloc[0])
        out["dtypes"] = {k: int(v) for k, v in stats["dtype"].value_counts().items()}
        out["geometry"] = summarize_geometry(stats)
    reports = safe(lambda: cohort.reports)
    if reports is not None:
        out["share_with_report"] = round(reports["patient_id"].isin(pids).groupby(reports["patient_id"]).any()
                                         .sum() / n_pat, 4)
    expr = safe(lambda: cohort.expression)
    if expr is not None:
        out["share_with_expression"] = round(len(set(expr.obs_names) & set(pids)) / n_pat, 4)
        out["expression_units"] = cohort.expression_units
    omics = safe(lambda: cohort.omics) or {}
    for name, (adata, units) in omics.items():
        out[f"share_with_{name}"] = round(len(set(adata.obs_names) & set(pids)) / n_pat, 4)
    tasks = safe(lambda: cohort.tasks) or []
    clinical = safe(lambda: cohort.clinical)
    labels = {}
    for t in tasks:
        table = clinical if t.level == "patient" else cohort.slides
        if table is None or any(c not in table.columns for c in t.columns):
            continue
        have = table[t.columns].notna().all(axis=1)
        if t.level == "patient":
            labels[t.name] = round(float(have.reindex(pids, fill_value=False).mean()), 4)
        else:
            labels[t.name] = round(float(have.mean()), 4)
    if labels:
        out["share_with_label"] = labels
    if "center" in cohort.slides.columns:
        out["slides_per_site"] = {str(k): int(v) for k, v in cohort.slides["center"].fillna("(none)").value_counts().items()}
    out["errors"] = len(report.errors)
    out["warnings"] = len(report.warnings)
    return out
