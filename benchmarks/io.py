"""Random-access slide reads: packed store vs per-slide HDF5, cold and warm page cache, DataLoader workers.

    python benchmarks/io.py                      # 2,000 slides x 1,000 patches x 384-D float16 (~1.5 GB)
    python benchmarks/io.py --h5-layout rowchunk # HDF5 as TRIDENT's save_h5 writes it: (1, D) chunks, maxshape (None, D)
    python benchmarks/io.py --h5-layout chunk32  # as CLAM's extract_features_fp writes it: (32, D) chunks
    python benchmarks/io.py --slides 200 --reads 100 --workers 0
    python benchmarks/io.py --h5-layout chunk32 --slides 200 --patches 10000 --dim 1024 --reads 100 --arena-mb 256 \
        --out benchmarks/results/io-tcga-chunk32.json   # TCGA-sized slides (20 MB each), training's arena size

The cohort is written once with h5py (reused from --dir on later runs; contiguous `features` and
`coords` datasets by default; row-chunked as TRIDENT's save_h5 writes them; or in 32-row chunks as CLAM's
feature extraction (utils/file_utils.save_hdf5, chunk_size=32) writes them) and
packed with `slidefm.cohort.pack_cohort`. Each cell reads the same random sample of slides through a
DataLoader (`slidefm.data.transport.ShmDataLoader`) whose items are `Cohort.read_slide(sid)` (features as stored,
float16 here, coords and grid positions; HDF5: `H5SlideReader`, which opens the file and computes the grid, as `train` does
without a store), in the sample's order, with `num_workers` 0 or 2 (forked workers, one torch thread
each, prefetch_factor 4 as in `slidefm.data.loader`). Every item is sent to the main process; with
workers, through `--transport` (training's `data.transport`): `shm`, the default, copies large arrays
through a reused shared-memory arena per worker (`slidefm.data.transport`); `torch` is torch's own path, a
new shared-memory segment per tensor. The main process reads one value per 4 KiB page of every slide's
features, as any consumer would (torch's path maps the pages lazily, so an untouched slide would cost it
nothing there). Worker start-up is not timed: the workers first answer one no-op
item each, and the reads wait on an event set when the clock starts. With --crop, `_crop` cells read
what a training view needs (every position, then one 16 x 16-cell window's features through
`SlideReader.read_rows`; the benchmark's rows are in random spatial order, so a window is ~100 runs of
rows, the worst case for both formats). With workers, two more cells split the cost: `_count` reads
each slide in the worker but returns only its patch count (the read without the transfer), and
`none_warm_nw2_transfer` reads nothing and returns tensors of each slide's shapes (the transfer alone:
the floor for any format; ``slide_tensors`` allocates them as a reader does, in the worker's arena with shm).
Before the clock starts, each worker writes blank slides into its arena until the ring has gone round once, and
the main process reads them: every page of the ring is then mapped on both sides, as after a training run's first
pass (its workers persist). A fresh arena's first pass costs about ten times a later one (page faults that zero
the memory: 15 ms against 1.4 ms to read a 20 MB slide into it); `--fresh-arena` times it too.
With --batch B > 1, each loader message carries B slides packed as training packs them
(`slidefm.data.batch.pack_slides`: float32 tokens cast from the stored dtype, in the worker's arena): the cells
named `_b{B}` are what a training batch of B slides costs to read and deliver; the main process touches the
packed tokens.

Slides are announced to the reader `--read-ahead` items before they are read (training's `data.read_ahead`:
`SlideReader.will_need`, posix_fadvise(WILLNEED) of the slide's bytes, so a cold read overlaps the reads
before it), in whole-slide cells only, as in training; hints sent before the clock starts are dropped. 0 reads
as before read-ahead existed.

"Cold" evicts every file of both formats from the page cache with posix_fadvise(DONTNEED) (no root
needed and, unlike drop_caches, it leaves other processes' caches alone); `eviction_check` records the
share of their pages still resident afterwards (mincore) and times a sequential read of the largest
shard right after eviction and again when cached. "Warm" repeats the cell right after its cold pass,
so every byte it needs is cached. That is every page's second read, on which Linux promotes it to the active
LRU list (`pages_activated_per_page_read` in the warm cells, from /proc/vmstat): a per-page kernel cost both
formats pay on a run's second epoch and not after, which weighs most on the faster reader. Each cell runs --repeats times, the formats alternating (cold ones
re-evicted each time); the median and the best run are reported, with the CPU time per slide
(main process plus workers, less the workers' start-up), which other jobs on a shared machine disturb
less than wall time. `device` records the sequential read bandwidth of the largest shard with O_DIRECT
and buffered from a cold cache (4 MiB requests), and of mean-slide-sized reads at random offsets with O_DIRECT
from 1, 2 and 4 threads, for judging whether cold reads are bound by the disk. Each cold cell also records what
the device holding the files did while its clock ran (`device_during_cell`, from /proc/diskstats: MB/s and the share
of the time a request was in flight, `busy_share`; near 1, the reads wait on the disk), and `cold_vs_disk` sets the
device bytes per second the store would need for 5x HDF5 in each cold cell beside the most any cold run got.
Prints JSON and writes benchmarks/results/io.json (io-rowchunk.json, io-chunk32.json for those layouts).
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from slidefm.allocator import active, reexec_with_allocator
from slidefm.cohort import Cohort, pack_cohort
from slidefm.cohort.pagecache import evict, resident_share
from slidefm.cohort.slides import SlideData, feature_dtype, slide_tensors
from slidefm.data.batch import pack_slides
from slidefm.data.config import DataConfig
from slidefm.data.sampler import ReadAheadSampler
from slidefm.data.transport import ShmDataLoader


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
            for name, data in (("features", feats), ("coords", coords)):
                if layout in ("rowchunk", "chunk32"):
                    # TRIDENT's save_h5: one chunk per row; CLAM's feature files: 32 rows; both resizable
                    rows = 1 if layout == "rowchunk" else 32
                    d = f.create_dataset(name, data=data, chunks=(min(rows, len(data)),) + data.shape[1:],
                                         maxshape=(None,) + data.shape[1:])
                else:
                    d = f.create_dataset(name, data=data)
            d.attrs["patch_size_level0"] = 512  # on coords, as TRIDENT writes it
            d.attrs["patch_size"] = 256
    pd.DataFrame({"slide_id": [f"S{i:05d}" for i in range(slides)],
                  "patient_id": [f"P{i // 2:05d}" for i in range(slides)]}).to_csv(root / "slides.csv", index=False)


def _diskstats() -> list[list[str]]:
    """The rows of /proc/diskstats (fields split), [] where there is none."""
    try:
        return [f for f in (line.split() for line in Path("/proc/diskstats").read_text().splitlines()) if len(f) >= 14]
    except OSError:
        return []


def block_device(path: Path) -> str | None:
    """The /proc/diskstats name of the block device holding ``path`` (the partition, if on one), or None (not
    Linux, or a file system without one, such as tmpfs or overlay on some hosts)."""
    dev = os.stat(path).st_dev
    return next((f[2] for f in _diskstats() if os.makedev(int(f[0]), int(f[1])) == dev), None)


def disk_counters(name: str | None) -> tuple[int, int, int] | None:
    """(sectors read, ms the device was busy, reads completed) of one /proc/diskstats device, or None."""
    if name is None:
        return None
    return next(((int(f[5]), int(f[12]), int(f[3])) for f in _diskstats() if f[2] == name), None)


def disk_use(before: tuple[int, int, int] | None, after: tuple[int, int, int] | None, secs: float) -> dict | None:
    """What the device did between two ``disk_counters``: MB read, MB/s and the share of the time it was busy
    (1.0: a request was in flight all along, i.e. the reads waited on the disk)."""
    if before is None or after is None or secs <= 0:
        return None
    sectors, busy_ms, reads = (b - a for a, b in zip(before, after))
    return {"MB": round(sectors * 512 / 1e6, 1), "MB_per_s": round(sectors * 512 / 1e6 / secs, 1),
            "busy_share": round(min(busy_ms / 1e3 / secs, 1.0), 3), "reads": reads}


def pages_activated() -> int | None:
    """Linux's count of pages promoted to the active LRU list (/proc/vmstat ``pgactivate``), None elsewhere.
    A cached page read a second time is promoted then, at a cost in the reading process; later reads are not."""
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == "pgactivate":
                return int(v)
    except OSError:
        pass
    return None


def random_direct_mb_s(path: Path, nbytes: int, block: int, streams: int) -> float:
    """Reads of ``block`` bytes at shuffled aligned offsets in the first ``nbytes`` of ``path`` with O_DIRECT
    (no page cache), from ``streams`` threads at once; MB/s. What the disk gives slide-sized random reads."""
    import threading

    offsets = np.random.default_rng(0).permutation(max(1, nbytes // block)) * block
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    got = [0] * streams

    def work(k: int) -> None:
        buf = mmap.mmap(-1, block)  # page-aligned
        for off in offsets[k::streams]:
            got[k] += os.preadv(fd, [buf], int(off))

    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(streams)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(got) / (time.perf_counter() - t0) / 1e6
    finally:
        os.close(fd)


def seq_read_mb_s(path: Path, nbytes: int, direct: bool) -> float:
    """Sequential read of the first ``nbytes`` of ``path`` in 4 MiB requests; MB/s."""
    block = 4 << 20
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT requires
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        t0, done = time.perf_counter(), 0
        while done < nbytes:
            got = os.preadv(fd, [buf], done)
            if got <= 0:
                break
            done += got
        return done / (time.perf_counter() - t0) / 1e6
    finally:
        os.close(fd)
        buf.close()


class Reads(torch.utils.data.Dataset):
    """One item per slide read; ``workers`` leading no-op items tell that every worker is up.

    ``deliver``: "slide" returns the SlideData (sent to the main process, as a loader does);
    "count" returns only its patch count (the read's cost without the transfer); "transfer" reads
    nothing and returns tensors of the slide's shapes (the transfer's cost alone); "crop" reads, as
    training's views do (``SlideReader.read_rows``), every position and the features of one random
    CROP x CROP window of grid cells, the same window for both formats.
    """

    def __init__(self, cohort: Cohort, ids: list[str], workers: int, go, deliver: str, sizes: dict[str, int],
                 dtype: np.dtype | str = "float32", batch: int = 1, warm: int = 0, warm_rows: int = 0):
        self.cohort, self.go, self.deliver, self.sizes, self.dtype = cohort, go, deliver, sizes, dtype
        self.warm_rows = warm_rows
        # each worker's first message is all no-ops, then ``warm`` messages of blank slides (see timed_loader)
        self.items = [None] * (workers * batch) + [WARM] * (warm * batch) + list(ids)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        sid = self.items[i]
        if sid is None:
            return 0
        if sid is WARM:  # every page written, as a read writes it
            feats, grid = slide_tensors(self.warm_rows, self.cohort.feature_dim, self.dtype)
            feats.zero_()
            grid.zero_()
            return SlideData(WARM, feats, grid[0], grid[1], 0, None)
        self.go.wait()
        if self.deliver == "transfer":
            feats, grid = slide_tensors(self.sizes[sid], self.cohort.feature_dim, self.dtype)
            return SlideData(sid, feats, grid[0], grid[1], 0, None)
        if self.deliver == "crop":
            rng = np.random.default_rng(i)

            def window(pos: np.ndarray) -> np.ndarray:
                lo, hi = pos.min(0), pos.max(0)
                corner = lo + rng.integers(0, np.maximum(hi - lo - CROP + 2, 1))
                return np.flatnonzero(np.all((pos >= corner) & (pos < corner + CROP), axis=1))

            return self.cohort.reader.read_rows(sid, window)
        s = self.cohort.read_slide(sid)
        return s.num_patches if self.deliver == "count" else s

    def will_need(self, i: int) -> None:
        """The loader's read-ahead hint (whole-slide cells only, as training hints only whole-slide reads).
        Hints sent before the clock starts are dropped, so no cell reads ahead on untimed time."""
        sid = self.items[i]
        if sid not in (None, WARM) and self.deliver in ("slide", "count") and self.go.is_set():
            self.cohort.reader.will_need(sid)


WARM = "<warm-up>"  # an item that writes a blank slide into the worker's arena before the clock starts
CROP = 16  # grid cells a side of the "crop" cells' window (~128 of a benchmark slide's ~1,000 patches)


def pack_batch(items: list):
    """--batch: the slides of one message packed as a training batch's are (no-op items dropped)."""
    slides = [s for s in items if not isinstance(s, int)]
    if not slides:
        return 0
    return pack_slides([s.features for s in slides], [s.positions for s in slides], [s.slide_id for s in slides])


def _worker_init(_):
    torch.set_num_threads(1)  # as slidefm.data.loader's workers


def touch(t: torch.Tensor) -> float:
    """Read one value per 4 KiB page: what any consumer (a model, a copy to the GPU) does at least."""
    flat = t.reshape(-1)
    step = max(1, 4096 // flat.element_size())
    return float(flat[::step].sum()) if flat.numel() else 0.0


def _cpu_s() -> float:
    """CPU seconds of this process and of its reaped children (the loader's workers, once joined)."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def timed_loader(cohort: Cohort, ids: list[str], workers: int, deliver: str, sizes: dict[str, int],
                 transport: str = "shm", arena_mb: int = 32, read_ahead: int = 0,
                 dtype: np.dtype | str = "float32", batch: int = 1, warm_rows: int = 0,
                 disk: str | None = None, stats: dict | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the main process and its workers, worker start-up included).

    ``disk`` (a /proc/diskstats device name) and ``stats``: what that device did while the clock ran
    (:func:`disk_use`) goes to ``stats["disk"]``, and the pages Linux promoted meanwhile (:func:`pages_activated`)
    to ``stats["activated"]``.

    ``warm_rows`` > 0 (with shm workers): before the clock starts, each worker writes blank slides of that many
    rows into its arena until the ring has gone round once, and the main process reads them, so every page of
    the ring is mapped on both sides: the state after a training run's first pass through it (its workers
    persist). A fresh arena's first pass costs about 10x a later one (page faults that zero the memory)."""
    cpu0 = _cpu_s()
    ctx = mp.get_context("fork")  # the platform default on Linux, stated so the gating event is shared
    go = ctx.Event()
    warm = 0
    if warm_rows and workers and transport == "shm":
        per_slide = warm_rows * (cohort.feature_dim * np.dtype(dtype).itemsize + 32)
        per_message = batch * per_slide + (batch * warm_rows * (cohort.feature_dim * 4 + 16) if batch > 1 else 0)
        warm = -(-(arena_mb << 20) // per_message) + 1  # messages per worker: round the ring once
    ds = Reads(cohort, ids, workers, go, deliver, sizes, dtype, batch, warm * workers, warm_rows)
    sampler = ReadAheadSampler(list(range(len(ds))), ds.will_need, read_ahead)
    loader = ShmDataLoader(ds, batch_size=None if batch == 1 else batch, sampler=sampler, num_workers=workers,
                           collate_fn=None if batch == 1 else pack_batch,
                           prefetch_factor=4 if workers else None,
                           multiprocessing_context=ctx if workers else None,
                           worker_init_fn=_worker_init if workers else None, transport=transport,
                           arena_mb=arena_mb)
    it = iter(loader)
    for _ in range(workers):
        next(it)
    for _ in range(warm * workers):
        s = next(it)
        touch(s.tokens if batch > 1 else s.features)
        del s
    d0, a0 = disk_counters(disk), pages_activated()
    t0 = time.perf_counter()
    go.set()
    rows = 0
    for s in it:
        if not isinstance(s, int):
            touch(s.tokens if batch > 1 else s.features)  # the consumer reads what it gets (torch's path maps pages lazily)
        rows += s if isinstance(s, int) else len(s.positions)
    secs = time.perf_counter() - t0
    if stats is not None:
        stats["disk"] = disk_use(d0, disk_counters(disk), secs)
        a1 = pages_activated()
        stats["activated"] = None if a0 is None or a1 is None else a1 - a0
    assert rows == sum(sizes[s] for s in ids)  # every slide arrived, whole
    del it  # exhausted: its workers are joined, so their CPU time is in RUSAGE_CHILDREN
    return secs, _cpu_s() - cpu0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=2000)
    ap.add_argument("--patches", type=int, default=1000, help="mean patches per slide (uniform in [p/2, 3p/2])")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--reads", type=int, default=1000, help="random slides read per measurement")
    ap.add_argument("--workers", default="0,2", help="DataLoader num_workers values, comma-separated")
    ap.add_argument("--batch", type=int, default=1,
                    help="also time whole-slide reads B slides per message, packed as training packs a batch "
                         "(cells named _bB; 16 is the house recipe's batch); 1: none")
    ap.add_argument("--transport", default="shm", choices=["shm", "torch"],
                    help="how workers send slides (data.transport): training's default shm arenas, or torch's path")
    ap.add_argument("--arena-mb", type=int, default=32,
                    help="MiB per worker arena (data.arena_mb) of the per-slide cells: enough for the prefetched "
                         "slides (batch cells get room for their batches)")
    ap.add_argument("--fresh-arena", action="store_true",
                    help="time the workers' first pass through their fresh arenas too (default: the ring's pages are "
                         "touched before the clock starts, as they are after a run's first pass)")
    ap.add_argument("--read-ahead", type=int, default=DataConfig.read_ahead,
                    help="slides announced to the reader before they are read (training's data.read_ahead); 0: off")
    ap.add_argument("--repeats", type=int, default=5, help="runs per cell; the median and the best are reported")
    ap.add_argument("--crop", action="store_true", help="add cells that read one view window per slide "
                    "(SlideReader.read_rows), as training's views do")
    ap.add_argument("--h5-layout", default="contiguous", choices=["contiguous", "rowchunk", "chunk32"])
    ap.add_argument("--dir", default=None, help="where to build/reuse the cohort (default: a temp dir named by size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="default: benchmarks/results/io.json (io-LAYOUT.json for "
                    "the other --h5-layout values)")
    args = ap.parse_args(argv)
    if args.batch < 1:
        ap.error(f"--batch must be >= 1, got {args.batch}")
    if argv is None:
        reexec_with_allocator()  # the malloc `slidefm train` runs on (the workers fork from this process)
    if args.out is None:
        args.out = str(Path(__file__).parent / "results" / ("io.json" if args.h5_layout == "contiguous"
                                                             else f"io-{args.h5_layout}.json"))
    torch.set_num_threads(1)  # as in DataLoader workers; also keeps timings stable on a shared machine

    tag = f"{args.slides}x{args.patches}x{args.dim}-{args.dtype}-{args.h5_layout}"
    root = Path(args.dir) if args.dir else Path(tempfile.gettempdir()) / f"slidefm-io-bench-{tag}"
    t0 = time.perf_counter()
    if not (root / "slides.csv").exists():
        build(root, args.slides, args.patches, args.dim, args.dtype, args.h5_layout, args.seed)
    build_s = time.perf_counter() - t0
    store = root / ".slidefm" / "store"
    t0 = time.perf_counter()
    fresh = True
    try:
        Cohort.open(root, store=store)
    except Exception:  # noqa: BLE001 - missing, stale or of an older format: (re)pack
        fresh = False
    if not fresh:
        import shutil

        shutil.rmtree(store, ignore_errors=True)
        pack_cohort(Cohort.open(root, store=False), store)
    pack_s = time.perf_counter() - t0

    via_h5 = Cohort.open(root, store=False)
    via_store = Cohort.open(root, store=store)
    rng = np.random.default_rng(args.seed + 1)
    ids = [str(s) for s in rng.choice(via_h5.slide_ids, size=min(args.reads, len(via_h5.slide_ids)), replace=False)]
    h5_files = [Path(p) for p in via_h5.slides["path"]]
    store_files = sorted(p for p in store.iterdir() if p.suffix in (".npy", ".bin"))
    files = h5_files + store_files
    read_bytes = {"hdf5": sum(Path(via_h5.slides.at[s, "path"]).stat().st_size for s in ids)}  # whole files

    evict(files)
    resident_after = resident_share(files)
    shard = max(store_files, key=lambda p: p.stat().st_size)
    probe = min(shard.stat().st_size, 512 << 20)
    evict([shard])
    cold_mb_s = seq_read_mb_s(shard, probe, direct=False)
    warm_mb_s = seq_read_mb_s(shard, probe, direct=False)
    direct_mb_s = seq_read_mb_s(shard, probe, direct=True)
    slide_bytes = (args.patches * args.dim * np.dtype(args.dtype).itemsize + 4095) // 4096 * 4096
    random_mb_s = {f"{k}_streams": round(random_direct_mb_s(shard, probe, slide_bytes, k)) for k in (1, 2, 4)}

    load_start = os.getloadavg()
    workers = [int(w) for w in args.workers.split(",")]
    sizes = dict(zip(via_store.store.slide_ids, via_store.store.index["slides"]["n"]))
    rows_read = sum(sizes[s] for s in ids)
    # the store's bytes (features, grid) in proportion to the rows read
    read_bytes["store"] = int(sum(p.stat().st_size for p in store_files) * rows_read / sum(sizes.values()))
    cells = [("hdf5", via_h5, "slide", 1), ("store", via_store, "slide", 1)]
    if args.batch > 1:
        cells += [("hdf5", via_h5, "slide", args.batch), ("store", via_store, "slide", args.batch)]
    if args.crop:
        cells += [("hdf5", via_h5, "crop", 1), ("store", via_store, "crop", 1)]
    if any(workers):
        cells += [("hdf5", via_h5, "count", 1), ("store", via_store, "count", 1), ("none", via_store, "transfer", 1)]
    dtype = feature_dtype(np.dtype(args.dtype))
    # a batch cell's arena holds what the loader keeps in flight (prefetch_factor 4, one being packed), as
    # training's data.arena_mb does
    batch_arena_mb = max(args.arena_mb, -(-6 * args.batch * int(args.patches * 1.5) * (args.dim * 4 + 32) // 2**20))

    def arena_mb(batch: int) -> int:
        return args.arena_mb if batch == 1 else batch_arena_mb

    runs: dict[str, list[tuple[float, float]]] = {}
    disk_runs: dict[str, list[dict]] = {}  # cold cells: what the device did while each ran
    activated: dict[str, list[int]] = {}  # warm cells: pages promoted to the active LRU list while each ran
    disk = block_device(store)
    # CPU of starting and joining the workers with nothing to read, subtracted from each cell's CPU time
    warm_rows = 0 if args.fresh_arena else int(args.patches * 1.5)  # the largest slide

    def fixed(nw: int, batch: int) -> float:
        return statistics.median(timed_loader(via_store, [], nw, "slide", sizes, args.transport, arena_mb(batch), 0,
                                              dtype, batch, warm_rows)[1] for _ in range(3))

    fixed_cpu = {(nw, b): fixed(nw, b) for nw in workers for b in sorted({c[3] for c in cells})}
    for nw in workers:
        for _ in range(args.repeats):
            # formats alternate within each repeat, so a change in the machine's load hits both alike
            for name, cohort, deliver, batch in cells:
                if deliver not in ("slide", "crop") and nw == 0:
                    continue
                for cache in ("cold", "warm") if name != "none" else ("warm",):
                    if cache == "cold":
                        evict(files)
                    key = (f"{name}_{cache}_nw{nw}" + ("" if deliver == "slide" else f"_{deliver}")
                           + ("" if batch == 1 else f"_b{batch}"))
                    stats: dict = {}
                    wall, cpu = timed_loader(cohort, ids, nw, deliver, sizes, args.transport, arena_mb(batch),
                                             args.read_ahead, dtype, batch, warm_rows, disk, stats)
                    runs.setdefault(key, []).append((wall, cpu - fixed_cpu[nw, batch]))
                    if cache == "cold" and stats.get("disk"):
                        disk_runs.setdefault(key, []).append(stats["disk"])
                    if cache == "warm" and stats.get("activated") is not None:
                        activated.setdefault(key, []).append(stats["activated"])
    results: dict[str, dict] = {}
    for key, pairs in runs.items():
        times = [w for w, _ in pairs]
        secs = statistics.median(times)
        name = key.split("_")[0]
        results[key] = {"seconds": round(secs, 3), "slides_per_s": round(len(ids) / secs, 1),
                        # the least disturbed run: other jobs on a shared machine only ever add time
                        "best_slides_per_s": round(len(ids) / min(times), 1),
                        "disk_MB_per_s": round(read_bytes[name] / secs / 1e6, 1) if name in read_bytes else None,
                        # less sensitive than wall time to other jobs on the machine; excludes waiting on disk;
                        # main process and workers, less the workers' start-up (fixed_cpu_s)
                        "cpu_ms_per_slide": round(statistics.median(c for _, c in pairs) / len(ids) * 1e3, 3),
                        "runs_s": [round(t, 3) for t in times]}
        if key in activated and name in read_bytes:
            # ~1: every page read was promoted (a warm cell is the second read since the cold one); a cost the kernel
            # charges per page, alike for both formats, so it weighs most on the faster reader
            results[key]["pages_activated_per_page_read"] = round(
                statistics.median(activated[key]) / (read_bytes[name] / 4096), 2)
        if key in disk_runs:  # the device while the cold cell ran (medians): busy_share near 1 = waiting on the disk
            results[key]["device_during_cell"] = {
                k: round(statistics.median(d[k] for d in disk_runs[key]), 3) for k in ("MB_per_s", "busy_share")}
    cell = [key[len("hdf5_"):] for key in results if key.startswith("hdf5_")]
    speedup = {c: round(results["store_" + c]["slides_per_s"] / results["hdf5_" + c]["slides_per_s"], 2) for c in cell}
    speedup_best = {c: round(results["store_" + c]["best_slides_per_s"] / results["hdf5_" + c]["best_slides_per_s"], 2)
                    for c in cell}
    # Whether 5x HDF5 is within the disk's reach in each cold cell: the device bytes per second the store would
    # need, beside what it got and the most the device gave any cold run of this benchmark (either format).
    store_bytes_per_slide = read_bytes["store"] / max(len(ids), 1)
    seen = [d["MB_per_s"] for ds in disk_runs.values() for d in ds]
    cold_reach = {}
    for c in (c for c in cell if c.startswith("cold")):
        got = results["store_" + c].get("device_during_cell", {})
        cold_reach[c] = {"store_MB_per_s": got.get("MB_per_s"), "store_busy_share": got.get("busy_share"),
                         "five_x_hdf5_needs_MB_per_s": round(5 * results["hdf5_" + c]["slides_per_s"]
                                                             * store_bytes_per_slide / 1e6, 1)}
    out = {
        "benchmark": "random-access slide reads through a DataLoader, packed store vs per-slide HDF5",
        "cohort": {"slides": args.slides, "mean_patches": args.patches, "dim": args.dim, "dtype": args.dtype,
                   "h5_layout": args.h5_layout,
                   "hdf5_bytes": int(sum(p.stat().st_size for p in h5_files)),
                   "store_bytes": int(sum(p.stat().st_size for p in store_files))},
        "reads": len(ids),
        "transport": args.transport,
        "arena_mb": args.arena_mb,
        "batch": args.batch,
        "batch_arena_mb": batch_arena_mb,
        "read_ahead": args.read_ahead,
        "crop_cells": {"window_cells": CROP} if args.crop else None,
        "bytes_per_pass": read_bytes,
        "repeats": args.repeats,
        "eviction": "posix_fadvise(DONTNEED) per file",
        "eviction_check": {"file": shard.name, "MB": round(probe / 1e6), "cold_MB_per_s": round(cold_mb_s),
                           "warm_MB_per_s": round(warm_mb_s),
                           "resident_share_after_eviction": round(resident_after, 4)},
        "device": {"sequential_O_DIRECT_MB_per_s": round(direct_mb_s), "sequential_buffered_cold_MB_per_s":
                   round(cold_mb_s),
                   # a mean slide's bytes per read, at random offsets: the ceiling for cold random slide reads
                   "random_slide_O_DIRECT_MB_per_s": random_mb_s},
        "build_s": round(build_s, 1),
        "pack_s": round(pack_s, 1),
        "fixed_cpu_s": {f"nw{nw}" + ("" if b == 1 else f"_b{b}"): round(c, 3) for (nw, b), c in fixed_cpu.items()},
        "arena": "fresh in each cell" if args.fresh_arena else "pages touched before the clock starts",
        "results": results,
        "speedup": speedup,  # medians
        "speedup_best": speedup_best,  # best runs
        "cold_vs_disk": {"device": disk, "most_MB_per_s_in_a_cold_run": max(seen) if seen else None,
                         "cells": cold_reach} if disk else None,
        "machine": {"cpus": os.cpu_count(), "allocator": active(), "python": platform.python_version(), "h5py": h5py.__version__,
                    "torch": torch.__version__, "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
    }
    text = json.dumps(out, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
