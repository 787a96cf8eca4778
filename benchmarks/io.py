"""Random-access slide reads: packed store vs per-slide HDF5, cold and warm page cache.

    python benchmarks/io.py                      # 2,000 slides x 1,000 patches x 384-D float16 (~1.5 GB)
    python benchmarks/io.py --slides 200 --reads 100 --h5-layout rowchunk

The cohort is written once with h5py (reused from --dir on later runs) and packed with
`slidefm.cohort.pack_cohort`. "Cold" evicts every file from the page cache first (drop_caches
when permitted, else posix_fadvise(DONTNEED) per file, which needs no privileges). Each mode reads
the same random sample of slides through `Cohort.read_slide`, i.e. float32 tensors plus grid
positions, which is what training consumes, with one torch thread as in a DataLoader worker. Prints JSON and writes benchmarks/results/io.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from slidefm.cohort import Cohort, pack_cohort


def build(root: Path, slides: int, patches: int, dim: int, dtype: str, layout: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (root / "features").mkdir(parents=True, exist_ok=True)
    for i in range(slides):
        n = int(rng.integers(patches // 2, patches * 3 // 2 + 1))  # mean = patches
        width = int(np.ceil(np.sqrt(2 * n)))
        cells = rng.choice(width * width, n, replace=False)
        coords = np.stack([cells % width, cells // width], 1).astype(np.int64) * 512 + 1000
        feats = rng.standard_normal((n, dim), dtype=np.float32).astype(dtype)
        with h5py.File(root / "features" / f"S{i:05d}.h5", "w") as f:
            # rowchunk: one chunk per patch, the layout of writers that append patch batches
            chunks = (1, dim) if layout == "rowchunk" else None
            f.create_dataset("features", data=feats, chunks=chunks, maxshape=(None, dim) if chunks else None)
            c = f.create_dataset("coords", data=coords)
            c.attrs["patch_size_level0"] = 512
            c.attrs["patch_size"] = 256
    pd.DataFrame({"slide_id": [f"S{i:05d}" for i in range(slides)],
                  "patient_id": [f"P{i // 2:05d}" for i in range(slides)]}).to_csv(root / "slides.csv", index=False)


def evict(paths: list[Path]) -> str:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        pass
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "posix_fadvise(DONTNEED)"


def timed_reads(cohort: Cohort, ids: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    nbytes = 0
    for sid in ids:
        s = cohort.read_slide(sid)
        nbytes += s.features.numel()
    return time.perf_counter() - t0, nbytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=2000)
    ap.add_argument("--patches", type=int, default=1000, help="mean patches per slide (uniform in [p/2, 3p/2])")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--reads", type=int, default=500, help="random slides read per measurement")
    ap.add_argument("--h5-layout", default="contiguous", choices=["contiguous", "rowchunk"])
    ap.add_argument("--dir", default=None, help="where to build/reuse the cohort (default: a temp dir named by size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "io.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # as in DataLoader workers; also keeps timings stable on a shared machine

    tag = f"{args.slides}x{args.patches}x{args.dim}-{args.dtype}-{args.h5_layout}"
    root = Path(args.dir) if args.dir else Path(tempfile.gettempdir()) / f"slidefm-io-bench-{tag}"
    t0 = time.perf_counter()
    if not (root / "slides.csv").exists():
        build(root, args.slides, args.patches, args.dim, args.dtype, args.h5_layout, args.seed)
    build_s = time.perf_counter() - t0
    store = root / ".slidefm" / "store"
    t0 = time.perf_counter()
    if not (store / "index.json").exists():
        pack_cohort(Cohort.open(root, store=False), store)
    pack_s = time.perf_counter() - t0

    via_h5 = Cohort.open(root, store=False)
    via_store = Cohort.open(root, store=store)
    rng = np.random.default_rng(args.seed + 1)
    ids = list(rng.choice(via_h5.slide_ids, size=min(args.reads, len(via_h5.slide_ids)), replace=False))
    files = [Path(p) for p in via_h5.slides["path"]] + sorted(store.glob("*.npy"))
    results: dict[str, dict] = {}
    method = None
    for name, cohort in (("hdf5", via_h5), ("store", via_store)):
        for cache in ("cold", "warm"):
            if cache == "cold":
                method = evict(files)
            secs, elems = timed_reads(cohort, ids)
            item = np.dtype(args.dtype).itemsize
            results[f"{name}_{cache}"] = {"seconds": round(secs, 3), "slides_per_s": round(len(ids) / secs, 1),
                                          "MB_per_s": round(elems * item / secs / 1e6, 1)}
    out = {
        "benchmark": "random-access read_slide, packed store vs per-slide HDF5",
        "cohort": {"slides": args.slides, "mean_patches": args.patches, "dim": args.dim, "dtype": args.dtype,
                   "h5_layout": args.h5_layout,
                   "feature_bytes": int(sum(p.stat().st_size for p in store.glob("features-*.npy")))},
        "reads": len(ids),
        "eviction": method,
        "build_s": round(build_s, 1),
        "pack_s": round(pack_s, 1),
        "results": results,
        "speedup_cold": round(results["hdf5_cold"]["seconds"] / results["store_cold"]["seconds"], 2),
        "speedup_warm": round(results["hdf5_warm"]["seconds"] / results["store_warm"]["seconds"], 2),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "h5py": h5py.__version__},
    }
    text = json.dumps(out, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
