"""Training's data loader on whole TCGA-sized slides: epoch time by worker arena size and read-ahead.

    python benchmarks/train_loader.py       # 200 slides x 10,000 patches x 1,024-D fp16 (20 MB each, ~4 GB)
    python benchmarks/train_loader.py --slides 40 --patches 2000 --repeats 1   # a quick look

Items are what `slidefm train` reads for the slide branch with `data.tokens=whole`: `PatientDataset` over a packed
store (one slide per patient, 100 patients of 2 slides each), batched by training's `Collate` (the cohort has
features only, so a batch is its slides packed by `slidefm.data.batch.pack_slides`: float32 tokens, ~40 MB per slide here, ~330 MB per batch of 8), delivered by
`slidefm.data.loader.make_loader` (training's loader: read-ahead, persistent workers, the shared-memory arenas). The
main process reads one value per 4 KiB page of each batch's tokens, as any consumer would. No model runs: this is the
loader alone, the part a GPU run waits on.

Cells, each `--repeats` times in turn (so a change in the machine's load hits all alike):
- ``arena{MB}_nw{W}`` (``warm_nw0`` without workers): warm page cache, persistent workers, epochs 2 and 3 of one
  loader timed (its arenas have gone round). A batch that does not fit a worker's arena goes torch's way (a new shared-memory segment per tensor);
  `data.arena_mb` below three batches is what the loader warns about.
- ``readahead{R}_nw{W}``: the cohort evicted from the page cache (posix_fadvise DONTNEED), then epoch 1 (cold) and
  epochs 2 and 3 (warm) with `data.read_ahead` R, the arena at its largest `--arena-mb` value. Read-ahead hints
  fetch whole slides on a cold cache, and fill the page cache with 4 KiB pages where the kernel's own read-ahead
  makes larger ones (docs/benchmarks.md, session 16).
Prints JSON and writes benchmarks/results/train_loader.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import write_atomic
from slidefm.allocator import active, reexec_with_allocator
from slidefm.cohort import Cohort, pack_cohort
from slidefm.cohort.pagecache import evict
from slidefm.data.config import DataConfig
from slidefm.data.dataset import Collate, PatientDataset
from slidefm.data.loader import make_loader
from slidefm.data.tables import build_tables

HERE = Path(__file__).resolve().parent


def epochs(ds: PatientDataset, cfg: DataConfig, collate: Collate, n: int) -> list[float]:
    """Wall seconds of ``n`` epochs of one training loader (its workers persist across them)."""
    loader = make_loader(ds, cfg, collate, train=True)
    out = []
    for ep in range(n):
        loader.sampler.set_epoch(ep)
        t0 = time.perf_counter()
        for b in loader:
            float(b.slides.tokens.reshape(-1)[::1024].sum())  # one value per 4 KiB page
        out.append(time.perf_counter() - t0)
    del loader
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=200)
    ap.add_argument("--patches", type=int, default=10000, help="mean patches per slide (uniform in [p/2, 3p/2])")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8, help="patients per batch (data.batch_size)")
    ap.add_argument("--workers", default="0,2", help="num_workers values, comma-separated")
    ap.add_argument("--arena-mb", default="256,1024", help="data.arena_mb values, comma-separated")
    ap.add_argument("--read-ahead", default="16,0", help="data.read_ahead values of the cold cells, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="runs per cell; medians are reported")
    ap.add_argument("--dir", default=None, help="where to build/reuse the cohort (default: io.py's, by size)")
    ap.add_argument("--out", default=str(HERE / "results" / "train_loader.json"))
    args = ap.parse_args(argv)
    if argv is None:
        reexec_with_allocator()  # the malloc `slidefm train` runs on
    torch.set_num_threads(1)
    workers = [int(w) for w in args.workers.split(",")]
    arenas = [int(a) for a in args.arena_mb.split(",")]
    aheads = [int(r) for r in args.read_ahead.split(",")]

    spec = importlib.util.spec_from_file_location("io_bench", HERE / "io.py")
    io_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(io_bench)  # type: ignore[union-attr]
    tag = f"{args.slides}x{args.patches}x{args.dim}-float16-chunk32"
    root = Path(args.dir) if args.dir else Path(tempfile.gettempdir()) / f"slidefm-io-bench-{tag}"
    if not (root / "slides.csv").exists():
        io_bench.build(root, args.slides, args.patches, args.dim, "float16", "chunk32", 0)
    store = root / ".slidefm" / "store"
    try:
        cohort = Cohort.open(root, store=store)
    except Exception:  # noqa: BLE001 - missing or stale: (re)pack
        pack_cohort(Cohort.open(root, store=False), store)
        cohort = Cohort.open(root, store=store)
    files = sorted(p for p in store.iterdir() if p.suffix == ".npy")
    slides_of = {p: list(cohort.slides_of(p)) for p in cohort.patient_ids}
    n_slides = dict(zip(cohort.store.slide_ids, cohort.store.index["slides"]["n"]))
    batch_mb = args.batch_size * statistics.mean(n_slides.values()) * (args.dim * 4 + 16) / 2**20

    def dataset(**kw) -> tuple[PatientDataset, DataConfig]:
        cfg = DataConfig(cohort=str(root), batch_size=args.batch_size, max_slides_per_patient=1, tokens="whole",
                         **kw)
        return PatientDataset(cohort, cohort.patient_ids, slides_of, cfg, train=True), cfg

    # training's collate; the cohort has features only, so its batches carry the slide branch alone
    collate = Collate(build_tables(cohort, dataset(num_workers=0)[1]))

    runs: dict[str, list[list[float]]] = {}
    for rep in range(args.repeats):
        for nw in workers:
            for mb in arenas if nw else arenas[:1]:  # no workers: no arena
                ds, cfg = dataset(num_workers=nw, arena_mb=mb, read_ahead=16, seed=rep)
                epochs(ds, cfg, collate, 1)  # page cache warm
                runs.setdefault(f"arena{mb}_nw{nw}" if nw else "warm_nw0", []).append(epochs(ds, cfg, collate, 3)[1:])
            for ra in aheads:
                ds, cfg = dataset(num_workers=nw, arena_mb=max(arenas), read_ahead=ra, seed=rep)
                evict(files)
                runs.setdefault(f"readahead{ra}_nw{nw}", []).append(epochs(ds, cfg, collate, 3))

    slides_per_epoch = len(cohort.patient_ids) // args.batch_size * args.batch_size
    results = {}
    for key, rs in runs.items():
        cols = list(zip(*rs))  # per epoch, over repeats
        med = [round(statistics.median(c), 3) for c in cols]
        if not key.startswith("readahead"):
            results[key] = {"warm_epoch_s": round(statistics.median(x for r in rs for x in r), 3),
                            "slides_per_s": round(slides_per_epoch / statistics.median(x for r in rs for x in r), 1),
                            "runs_s": [[round(x, 3) for x in r] for r in rs]}
        else:
            results[key] = {"cold_epoch_s": med[0], "warm_epoch_s": med[1:],
                            "runs_s": [[round(x, 3) for x in r] for r in rs]}
    out = {
        "benchmark": "training's data loader on whole TCGA-sized slides (no model)",
        "cohort": {"slides": args.slides, "mean_patches": args.patches, "dim": args.dim, "dtype": "float16",
                   "patients": len(cohort.patient_ids), "slides_per_epoch": slides_per_epoch},
        "batch_size": args.batch_size,
        "mean_batch_MiB_float32": round(batch_mb, 1),
        "repeats": args.repeats,
        "results": results,
        "machine": {"cpus": os.cpu_count(), "allocator": active(), "python": platform.python_version(),
                    "torch": torch.__version__},
    }
    print(json.dumps(out, indent=2))
    write_atomic(Path(args.out), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
