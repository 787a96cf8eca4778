"""Build a cohort directory from per-slide feature bags and dataset tables (CLAM ``pt_files`` + CSV).

Many users hold CLAM-style ``pt_files/{slide}.pt`` (a tensor (N, D) per slide, no coordinates) or
region bags (HIPT) plus a dataset CSV with one row per slide (``case_id``, ``slide_id``, labels,
survival). ``import_bags`` writes the cohort contract from them:

* ``features/{slide_id}.h5`` with ``features`` (the bag, dtype kept) and, for ``layout="raster"``,
  ``coords`` that lay the bag's rows on a raster in file order (row-major, ``ceil(sqrt(N))`` cells
  wide, ``patch_size_level0`` = ``patch_size``); the root attribute ``slidefm_layout`` records that
  these positions are synthetic. ``layout="none"`` writes no coordinates (a features-only bag for
  position-free aggregators).
* ``slides.csv``: slide_id, patient_id, center and the table columns that differ between a
  patient's slides; ``clinical.csv``: patient_id and the columns constant within each patient.

Slide ids are matched between bags and tables after stripping file extensions (``.svs``, ``.pt``,
...). With ``tcga=True`` missing patient ids and centres come from the TCGA barcode
(``TCGA-TSS-PPPP-...``: patient = first 12 characters, centre = tissue source site).
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np
import pandas as pd

from slidefm.cohort import h5
from slidefm.errors import SlidefmError
from slidefm.io_utils import atomic_path

BAG_SUFFIXES = (".pt", ".h5")
_SLIDE_EXT = (".svs", ".ndpi", ".tif", ".tiff", ".mrxs", ".scn", ".czi", ".bif", ".pt", ".h5", ".pth")
LAYOUTS = ("raster", "none")


@dataclass
class ImportSummary:
    path: Path
    slides: int
    patients: int
    patches: int
    dim: int
    unmatched_table_rows: int  # table rows whose slide has no bag (skipped)
    slide_columns: list[str]
    clinical_columns: list[str]


def slide_key(s: str) -> str:
    """Slide id without a whole-slide-image or bag file extension."""
    s = str(s).strip()
    low = s.lower()
    for ext in _SLIDE_EXT:
        if low.endswith(ext):
            return s[: -len(ext)]
    return s


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """A CSV, also when zipped; a file named ``.zip`` that is really plain CSV is read as CSV."""
    path = Path(path)
    if path.suffix == ".zip" and not zipfile.is_zipfile(path):
        df = pd.read_csv(path, compression=None)
    else:
        df = pd.read_csv(path)
    return df.drop(columns=[c for c in df.columns if str(c).startswith("Unnamed: ")])


def load_bag(path: Path) -> np.ndarray:
    """(N, D) features of a bag in its stored dtype: a ``.pt`` tensor or an HDF5 ``features`` dataset, read
    through the cohort's own slide-file reader (``weights_only=True`` for torch files)."""
    try:
        with h5.SlideSource(path) as src:
            a = src.features()
    except h5.SlideFileError as e:
        raise SlidefmError(f"{path}: {e}") from None
    if len(h5.nonfinite_rows(a)):
        raise SlidefmError(f"{path}: features hold NaN/Inf")
    return a


def raster_coords(n: int, patch_size: int) -> np.ndarray:
    """Level-0 (x, y) of n cells laid row-major on a raster ceil(sqrt(n)) cells wide."""
    w = max(1, math.ceil(math.sqrt(n)))
    i = np.arange(n, dtype=np.int64)
    return np.stack([(i % w) * patch_size, (i // w) * patch_size], axis=1)


def find_bags(bags: str | os.PathLike) -> dict[str, Path]:
    root = Path(bags)
    if not root.is_dir():
        raise SlidefmError(f"{root}: bag directory not found")
    out: dict[str, Path] = {}
    for p in sorted(root.iterdir()):
        if p.suffix in BAG_SUFFIXES and p.is_file():
            key = slide_key(p.name)
            if key in out:
                raise SlidefmError(f"{root}: slide {key} has two bags ({out[key].name}, {p.name})")
            out[key] = p
    if not out:
        raise SlidefmError(f"{root}: no .pt or .h5 bags found")
    return out


def merge_tables(tables: Iterable[pd.DataFrame], slide_col: str) -> pd.DataFrame:
    """One row per slide key; where tables overlap, the first table with a value wins."""
    merged: pd.DataFrame | None = None
    for i, t in enumerate(tables):
        if slide_col not in t.columns:
            raise SlidefmError(f"table {i + 1} has no '{slide_col}' column (columns: {list(t.columns)[:12]})")
        t = t.copy()
        t.index = pd.Index([slide_key(s) for s in t[slide_col]], name="slide_id")
        t = t.drop(columns=[slide_col])
        t = t[~t.index.duplicated(keep="first")]
        merged = t if merged is None else merged.combine_first(t)
    return merged if merged is not None else pd.DataFrame(index=pd.Index([], name="slide_id"))


def import_bags(bags: str | os.PathLike, out: str | os.PathLike, tables: Sequence[str | os.PathLike | pd.DataFrame] = (),
                *, slide_col: str = "slide_id", patient_col: str | None = "case_id", center_col: str | None = None,
                tcga: bool = False, layout: str = "raster", patch_size: int = 256, overwrite: bool = False,
                progress: bool = False) -> ImportSummary:
    """Write the cohort contract at ``out`` from a folder of bags and dataset tables (see module doc).

    Everything is written under a temporary name and renamed into place, so ``out`` is whole or absent.
    """
    if layout not in LAYOUTS:
        raise SlidefmError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SlidefmError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
    bag_paths = find_bags(bags)
    frames = [t if isinstance(t, pd.DataFrame) else read_table(t) for t in tables]
    meta = merge_tables(frames, slide_col)
    unmatched = int((~meta.index.isin(list(bag_paths))).sum())
    meta = meta.reindex(list(bag_paths))

    def from_barcode(sid: str, part: str) -> str | None:
        if not tcga:
            return None
        bits = sid.split("-")
        if len(bits) < 3 or bits[0] != "TCGA":
            return None
        return "-".join(bits[:3]) if part == "patient" else bits[1]

    pcol = patient_col if patient_col and patient_col in meta.columns else None
    patients = []
    for sid in meta.index:
        v = meta.at[sid, pcol] if pcol else None
        if v is None or (isinstance(v, float) and np.isnan(v)):
            v = from_barcode(sid, "patient") or sid
        patients.append(str(v))
    ccol = center_col if center_col and center_col in meta.columns else None
    centers = []
    for sid in meta.index:
        v = meta.at[sid, ccol] if ccol else None
        if v is None or (isinstance(v, float) and np.isnan(v)):
            v = from_barcode(sid, "center")
        centers.append(None if v is None else str(v))
    rest = meta.drop(columns=[c for c in (pcol, ccol) if c])
    rest = rest.dropna(axis=1, how="all")
    pid = pd.Series(patients, index=meta.index)
    # A column is patient-level when no patient has two different non-missing values in it.
    per_patient = rest.groupby(pid.values).nunique(dropna=True) if len(rest.columns) else pd.DataFrame()
    clin_cols = [c for c in rest.columns if (per_patient[c] <= 1).all()]
    slide_cols = [c for c in rest.columns if c not in clin_cols]

    with atomic_path(out, is_dir=True) as tmp:
        (tmp / "features").mkdir()
        dim = None
        patches = 0
        ids = list(meta.index)
        for k, sid in enumerate(ids):
            a = load_bag(bag_paths[sid])
            if dim is None:
                dim = a.shape[1]
            elif a.shape[1] != dim:
                raise SlidefmError(f"{bag_paths[sid]}: D={a.shape[1]} differs from the first bag's D={dim}")
            patches += a.shape[0]
            with h5py.File(tmp / "features" / f"{sid}.h5", "w") as f:
                f.create_dataset("features", data=a)
                f.attrs["slidefm_layout"] = layout
                f.attrs["source"] = bag_paths[sid].name
                if layout == "raster":
                    c = f.create_dataset("coords", data=raster_coords(a.shape[0], patch_size))
                    c.attrs["patch_size_level0"] = int(patch_size)
            if progress and (k + 1) % 1000 == 0:
                print(f"  {k + 1}/{len(ids)} slides", flush=True)
        slides = pd.DataFrame({"slide_id": ids, "patient_id": patients})
        if any(c is not None for c in centers):
            slides["center"] = centers
        for c in slide_cols:
            slides[c] = rest[c].to_numpy()
        slides.to_csv(tmp / "slides.csv", index=False)
        if clin_cols:
            clin = rest[clin_cols].copy()
            clin.insert(0, "patient_id", patients)
            clin = clin.groupby("patient_id", sort=False).first().reset_index()
            clin.to_csv(tmp / "clinical.csv", index=False)
    return ImportSummary(out, len(ids), len(set(patients)), patches, int(dim or 0), unmatched, slide_cols, clin_cols)
