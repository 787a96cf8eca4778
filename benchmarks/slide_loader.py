"""Export's slide loader at TCGA sizes: whole slides through one worker, torch's transport vs the shm arena.

    python benchmarks/slide_loader.py                     # 16 slides x 10,000 patches x 1,536-D float16, 8 passes
    python benchmarks/slide_loader.py --patches 2000 --dim 384

The cohort (built once under --dir, packed into a store) is read in passes of every slide through
``slidefm.export.slide_loader`` (what ``slidefm export`` uses; read-ahead on, 1 worker) and, for comparison, through
torch's DataLoader with the same dataset and sampler (what export used before). The consumer gathers slides into
``--batch-tokens`` batches and packs each (``pack_slides``), as export does before its forward pass (no model
here: this is the pipeline's ceiling). Reported per transport: slides/s over all passes after the first slide (the worker's
start is not timed), CPU ms and minor page faults per slide in the main process and in the worker. The page cache
is warm (each transport runs a pass first). The script runs on the allocator ``slidefm export`` chooses (it
re-executes itself as the command does: ``slidefm.allocator``; ``SLIDEFM_ALLOCATOR=system`` for glibc as it comes).
Prints JSON and writes benchmarks/results/slide_loader.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from slidefm.allocator import active, reexec_with_allocator
from slidefm.cohort import Cohort, pack_cohort
from slidefm.data.batch import pack_slides
from slidefm.data.sampler import ReadAheadSampler
from slidefm.export import ExportConfig, _budget_batches_stream, _SlideReads, slide_loader


def build(root: Path, slides: int, patches: int, dim: int) -> None:
    rng = np.random.default_rng(0)
    (root / "features").mkdir(parents=True, exist_ok=True)
    side = int(np.ceil(np.sqrt(2 * patches)))
    for i in range(slides):
        cells = rng.choice(side * side, patches, replace=False)
        with h5py.File(root / "features" / f"S{i:03d}.h5", "w") as f:
            f["features"] = rng.standard_normal((patches, dim), dtype=np.float32).astype(np.float16)
            f["coords"] = np.stack([cells % side, cells // side], 1).astype(np.int64) * 512
            f["coords"].attrs["patch_size_level0"] = 512
    pd.DataFrame({"slide_id": [f"S{i:03d}" for i in range(slides)],
                  "patient_id": [f"P{i:03d}" for i in range(slides)]}).to_csv(root / "slides.csv", index=False)


def usage() -> tuple[resource.struct_rusage, resource.struct_rusage]:
    return resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)


def run(cohort: Cohort, ids: list[str], cfg: ExportConfig, transport: str) -> dict:
    if transport == "shm":
        loader = slide_loader(cohort, ids, cfg)
        arena_mb = loader._arena_bytes >> 20
    else:
        ds = _SlideReads(cohort, ids)
        loader = DataLoader(ds, batch_size=None, sampler=ReadAheadSampler(list(range(len(ds))), ds.will_need,
                                                                          cfg.read_ahead),
                            num_workers=cfg.num_workers, prefetch_factor=4)
        arena_mb = None
    (m0, w0) = usage()
    it = iter(loader)
    next(it)  # the worker is up (not kept: a held slide would pin the ring's space behind it)
    t0 = time.perf_counter()
    n = 0
    for batch in _budget_batches_stream(it, cfg.batch_tokens):
        packed = pack_slides([b[1] for b in batch], [b[2] for b in batch], [b[0] for b in batch])  # as export does
        n += len(batch)
        del batch, packed
    secs = time.perf_counter() - t0
    del it
    (m1, w1) = usage()

    def per(a, b, f):
        return round((f(b) - f(a)) / (n + 1), 3)

    cpu = lambda r: (r.ru_utime + r.ru_stime) * 1e3  # noqa: E731
    return {"slides_per_s": round(n / secs, 1), "slides": n, "arena_mb": arena_mb,
            "main_cpu_ms_per_slide": per(m0, m1, cpu), "main_faults_per_slide": per(m0, m1, lambda r: r.ru_minflt),
            "worker_cpu_ms_per_slide": per(w0, w1, cpu), "worker_faults_per_slide": per(w0, w1, lambda r: r.ru_minflt)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=16)
    ap.add_argument("--patches", type=int, default=10000, help="patches per slide (a median TCGA slide)")
    ap.add_argument("--dim", type=int, default=1536, help="feature width (UNI2 / Virchow2-sized)")
    ap.add_argument("--passes", type=int, default=8, help="passes over the slides per transport")
    ap.add_argument("--batch-tokens", type=int, default=ExportConfig.batch_tokens)
    ap.add_argument("--dir", default=None, help="cohort directory (default: a temp dir named by size; reused)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "slide_loader.json"))
    args = ap.parse_args(argv)
    if argv is None:
        reexec_with_allocator()  # as `slidefm export` does
    torch.set_num_threads(1)
    root = Path(args.dir or Path(tempfile.gettempdir()) / f"slidefm-slide-loader-{args.slides}x{args.patches}x{args.dim}")
    if not (root / "slides.csv").exists():
        build(root, args.slides, args.patches, args.dim)
    store = root / ".slidefm" / "store"
    if not store.exists():
        pack_cohort(Cohort.open(root, store=False), store)
    cohort = Cohort.open(root, store=store)
    cfg = ExportConfig(num_workers=1, batch_tokens=args.batch_tokens, progress=False)
    ids = cohort.slide_ids
    results = {}
    for transport in ("torch", "shm"):
        run(cohort, ids, cfg, transport)  # warm the page cache
        results[transport] = run(cohort, ids * args.passes, cfg, transport)
    out = {"benchmark": "export's slide loader: whole slides, 1 worker, read-ahead, consumer drops each batch",
           "cohort": {"slides": args.slides, "patches": args.patches, "dim": args.dim, "dtype": "float16",
                      "format": "packed store", "slide_MB_float32": round(args.patches * args.dim * 4 / 2**20, 1)},
           "passes": args.passes, "batch_tokens": args.batch_tokens, "results": results,
           "speedup": round(results["shm"]["slides_per_s"] / results["torch"]["slides_per_s"], 2),
           "allocator": active(),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                       "loadavg": [round(x, 2) for x in os.getloadavg()]}}
    text = json.dumps(out, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".json.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
