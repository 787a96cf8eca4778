"""`slidefm import-bags BAGS --out COHORT --table dataset.csv`: a cohort from CLAM pt_files / region bags."""

from __future__ import annotations

import argparse
import time


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "import-bags",
        help="build a cohort from per-slide feature bags (CLAM pt_files, HIPT region bags) and dataset CSVs",
        description="Write the cohort contract (slides.csv, clinical.csv, features/*.h5) from a folder of "
                    "per-slide bags ({slide}.pt tensors (N, D) or .h5 with 'features') and dataset CSVs with "
                    "one row per slide. Columns constant within a patient go to clinical.csv, the others "
                    "to slides.csv. Bags carry no positions: --layout raster lays each bag's rows on a "
                    "raster in file order (positions are synthetic; recorded in the files), --layout none "
                    "writes features-only files for position-free aggregators.",
    )
    p.add_argument("bags", help="folder of {slide_id}.pt / .h5 bags")
    p.add_argument("--out", required=True, help="cohort directory to write")
    p.add_argument("--table", action="append", default=[], metavar="CSV",
                   help="dataset CSV (may be zipped); repeat for several; the first with a value wins")
    p.add_argument("--slide-col", default="slide_id", help="table column with slide ids (extensions are ignored)")
    p.add_argument("--patient-col", default="case_id", help="table column with patient ids")
    p.add_argument("--center-col", default=None, help="table column with the site of origin")
    p.add_argument("--tcga", action="store_true",
                   help="derive missing patient ids and centres (tissue source site) from TCGA barcodes")
    p.add_argument("--layout", choices=["raster", "none"], default="raster", help="positions for bags without coordinates")
    p.add_argument("--patch-size", type=int, default=256, help="level-0 pixel size of one raster cell")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from slidefm.cohort.importer import import_bags

    t0 = time.perf_counter()
    s = import_bags(args.bags, args.out, args.table, slide_col=args.slide_col, patient_col=args.patient_col,
                    center_col=args.center_col, tcga=args.tcga, layout=args.layout, patch_size=args.patch_size,
                    overwrite=args.overwrite, progress=True)
    print(f"wrote {s.path}: {s.slides} slides, {s.patients} patients, {s.patches} feature rows (D={s.dim}) in "
          f"{time.perf_counter() - t0:.1f} s; {s.unmatched_table_rows} table rows had no bag; "
          f"clinical.csv columns: {len(s.clinical_columns)}, slides.csv extra columns: {s.slide_columns}")
    return 0
