"""TCGA-shaped CPU benchmark: real slide sizes through the house and TITAN-sized recipes.

    python benchmarks/tcga_shape.py --runs house:w0:30 house:w1:30 house:w2:30 titan:w0:6 titan:w1:6
    nohup python benchmarks/tcga_shape.py --runs house:w1:1000 --warmup 50 \
        --out benchmarks/results/tcga_shape_long.json > long.log 2>&1 &        # the 1,000-step curve
    SLIDEFM_ALLOCATOR=system python benchmarks/tcga_shape.py --runs house:w1:1000 --warmup 50 --tag glibc ...
    SLIDEFM_ALLOCATOR=glibc python benchmarks/tcga_shape.py --runs house:w1:1000 --warmup 50 --tag glibc_tuned ...
    SLIDEFM_ALLOCATOR=system SLIDEFM_MALLOC_TUNING=1 SLIDEFM_MALLOC_MMAP_THRESHOLD=0 SLIDEFM_MALLOC_TRIM_EVERY=50 \
        python benchmarks/tcga_shape.py --runs house:w1:1000 --warmup 50 --tag trim50 --out ...  # with malloc_trim

Training runs on the allocator `slidefm train` chooses (``slidefm.allocator``: jemalloc when it is installed,
else glibc with its tunables); ``SLIDEFM_ALLOCATOR=glibc`` measures the tuned glibc, ``SLIDEFM_ALLOCATOR=system``
glibc's malloc as it comes. The JSON records which one ran.

To compare code versions, run this script with ``PYTHONPATH`` at a worktree of the other commit (the JSON
records which ``slidefm`` ran); results/tcga_shape.json's ``*_before`` runs are the commit before b6226f6.

The cohort (``--workdir``, default /work/bench/tcga_shape, generated once and reused) is shaped like TCGA
diagnostic slides: patches per slide lognormal (median 10k, sigma 0.5, clipped to [1k, 27k]), D=1024
float16, TRIDENT-style HDF5 (``features`` + ``coords`` on a 256 px lattice at 20x or 512 px at 40x level
0, with the extractor's attributes), tissue laid out as 1-3 irregular blobs on a grid about three times the
tissue area (so crop windows hit edges and background as on real slides), patch features drawn around a few
per-slide tissue prototypes. To keep it modest on disk, ``--unique`` slide files (default 96, ~2 GB) are
written and ``slides.csv`` lists ``--patients`` patients (default 960, 1-2 slides each) whose slides point at
those files through the ``path`` column: epochs last as long as on a real cohort of that size while the disk
(and page cache) hold 96 slides. Reads are therefore warm-cache reads.

The cohort is features-only (no reports, no expression), as a TCGA feature dump is: the recipe fitter
drops the contrastive pairs, so both recipes train their masked self-distillation on grid crops.

Each RUN is RECIPE:wN:STEPS (N = data.num_workers) and runs in a fresh process with 1 torch thread (the
machine has 2 cores; the worker takes the other), validation and periodic checkpoints off. Per step it
records (Lightning callback): data wait (end of the previous step to the start of this one: the loader's
``next()`` plus Lightning's bookkeeping), compute (batch start to batch end), process CPU time, tokens (all
student view tokens: global + local crops), current and peak RSS. Reported: per-run medians and means over
the steps after warm-up, the data-wait share of the step, tokens/s, peak RSS, and per ``--window`` steps
the curve (wall and CPU s/step) with max/min-1 from the first full window on.

Prints one JSON document and writes it to benchmarks/results/tcga_shape.json (runs accumulate by name,
``--tag`` names variants).
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

from _common import flatness, rss_now_mb, run_child, window_stats, write_atomic

from slidefm.allocator import preload_env

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "tcga_shape.json"

MEDIAN, SIGMA, MIN_N, MAX_N, DIM = 10_000, 0.5, 1_000, 27_000, 1024

# Every run: no validation set (its loop would land in the next step's data wait), no periodic checkpoints.
COMMON = ["trainer.progress_bar=false", "trainer.log_every_n_steps=50", "trainer.val_every_n_steps=null",
          "data.val_fraction=0", "trainer.checkpoint_every_n_steps=1000000"]
# recipe name -> overrides. house: recipes/recipe/slidefm.yaml as it is (ViT 128 x 3, batch 16 patients,
# up to 2 slides each, crops 2 x 16^2 + 2 x 8^2). titan: recipes/recipe/titan.yaml as it is (ViT 768 x 6,
# 12 heads, ALiBi, batch 16, crops 2 x 14^2 + 4 x 6^2, distillation heads at the defaults: 8,192 prototypes).
RECIPES = {"house": ["recipe=slidefm"], "titan": ["recipe=titan"]}


# ---------------------------------------------------------------- cohort
def _layout(rng, n: int):
    """(cols, rows) of ``n`` tissue cells: 1-3 irregular blobs filling about a third of the grid."""
    import numpy as np
    from scipy import ndimage

    side = int(np.ceil(np.sqrt(3.0 * n)))
    h, w = side, int(np.ceil(3.0 * n / side))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    score = np.full((h, w), -np.inf, np.float32)
    k = int(rng.integers(1, 4))
    for _ in range(k):
        cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.2, 0.8) * w
        ry, rx = rng.uniform(0.2, 0.4) * h, rng.uniform(0.2, 0.4) * w
        theta = np.arctan2(yy - cy, xx - cx)
        wobble = 1 + sum(rng.uniform(0, 0.12) * np.cos(j * theta + rng.uniform(0, 6.3)) for j in range(2, 6))
        score = np.maximum(score, 1 - np.hypot((yy - cy) / ry, (xx - cx) / rx) / wobble)
    noise = ndimage.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), 2.0)
    score += 0.6 * noise / (noise.std() + 1e-6)  # ragged edges and holes
    keep = np.argsort(score.ravel(), kind="stable")[::-1][:n]
    rows, cols = np.unravel_index(np.sort(keep), (h, w))  # row-major scan order, like a tiler
    return cols.astype(np.int64), rows.astype(np.int64), (h, w)


def _features(rng, cols, rows, shape, dim: int):
    """Patch features around 6 per-slide prototypes assigned by smooth fields (regions), float16."""
    import numpy as np
    from scipy import ndimage

    fields = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 3.0) for _ in range(6)])
    region = fields[:, rows, cols].argmax(0)
    protos = rng.standard_normal((6, dim)).astype(np.float32)
    x = protos[region]
    x += 0.5 * rng.standard_normal(x.shape, dtype=np.float32)
    return x.astype(np.float16)


def make_cohort(root: Path, unique: int, patients: int, seed: int = 0) -> dict:
    """Write the cohort once (``.generated`` marks a finished one; a different spec is refused)."""
    import h5py
    import numpy as np
    import pandas as pd

    spec = {"unique_files": unique, "patients": patients, "seed": seed, "dim": DIM, "median": MEDIAN,
            "sigma": SIGMA, "clip": [MIN_N, MAX_N]}
    marker = root / ".generated"
    if marker.exists():
        info = json.loads(marker.read_text())
        if info["spec"] != spec:
            raise SystemExit(f"{root} holds a cohort of another spec {info['spec']}; use another --workdir")
        return info | {"reused": True}
    t0 = time.perf_counter()
    (root / "features").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = np.clip(np.round(MEDIAN * np.exp(SIGMA * rng.standard_normal(unique))), MIN_N, MAX_N).astype(int)
    counts[0] = MAX_N  # the largest TCGA-sized slide is always in the cohort
    for i, n in enumerate(counts):
        path = root / "features" / f"S{i:03d}.h5"
        if path.exists():
            continue
        r = np.random.default_rng([seed, i])
        cols, rows, shape = _layout(r, int(n))
        x = _features(r, cols, rows, shape, DIM)
        forty = i % 2 == 1  # half scanned at 40x: a 512 px level-0 stride for 256 px patches at 20x
        stride = 512 if forty else 256
        coords = np.stack([cols, rows], 1) * stride + r.integers(0, 20_000, 2)
        tmp = path.with_suffix(".tmp")
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=x)  # contiguous, uncompressed (TRIDENT's default)
            c = f.create_dataset("coords", data=coords.astype(np.int64))
            c.attrs.update({"patch_size_level0": stride, "patch_size": 256, "target_magnification": 20,
                            "level0_magnification": 40 if forty else 20, "overlap": 0})
        os.replace(tmp, path)
    # Patients: 1 slide (80%) or 2; slide entries cycle through the unique files.
    per = np.where(rng.random(patients) < 0.2, 2, 1)
    rows, k = [], 0
    for p, m in enumerate(per):
        for j in range(m):
            rows.append({"slide_id": f"P{p:04d}-{j + 1}", "patient_id": f"P{p:04d}",
                         "path": f"features/S{k % unique:03d}.h5"})
            k += 1
    pd.DataFrame(rows).to_csv(root / "slides.csv", index=False)
    entries = np.array([counts[i % unique] for i in range(k)])
    info = {"spec": spec, "slide_entries": k, "bytes_on_disk": int(sum(p.stat().st_size for p in (root / "features").iterdir())),
            "patches_per_file": {"median": float(np.median(counts)), "min": int(counts.min()), "max": int(counts.max()),
                                 "mean": float(counts.mean())},
            "patches_per_entry_median": float(np.median(entries)), "generate_s": time.perf_counter() - t0}
    marker.write_text(json.dumps(info, indent=2))
    return info


# ---------------------------------------------------------------- child: one training run
def _children_rss_mb() -> float | None:
    """RSS of the DataLoader workers (this process's children), MB; None without psutil."""
    try:
        import psutil
    except ImportError:
        return None
    total = 0
    for c in psutil.Process().children(recursive=True):
        try:
            total += c.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def batch_tokens(batch) -> int:
    """Tokens the step encodes: slide branch plus student views (counted here, not by slidefm, so the
    figure means the same for the code before and after a change)."""
    n = int(batch.slides.tokens.shape[0]) if _reads_slides else 0
    if batch.views is not None:
        n += int(batch.views.global_views.tokens.shape[0])
        if batch.views.local_views is not None:
            n += int(batch.views.local_views.tokens.shape[0])
    return n


_reads_slides = True  # set from the module once training starts


def child(args) -> dict:
    import pytorch_lightning as pl
    import torch
    from hydra import compose, initialize_config_module

    from slidefm.config import register_configs
    from slidefm.train import run as run_mod

    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    log_file = open(Path(args.run_dir) / "steps.jsonl", "a", buffering=1)  # partial curve if the run is cut short

    class StepTimer(pl.Callback):
        """Per step: data wait (previous step's end -> this batch's start: the loader's next() and
        Lightning's bookkeeping), compute (batch start -> end), process CPU time and RSS."""

        def on_train_start(self, trainer, pl_module):
            global _reads_slides
            # Slide-branch tokens count only where an objective encodes them (features-only: none does).
            _reads_slides = any(getattr(pl_module, k, None) is not None for k in ("contrastive", "supervised", "expert"))
            self.t_end, self.ru_end = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            self.children_peak = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t_start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now, ru = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            step = trainer.global_step
            row = {"step": step, "wall_s": now - self.t_end, "wait_s": self.t_start - self.t_end,
                   "compute_s": now - self.t_start, "user_s": ru.ru_utime - self.ru_end.ru_utime,
                   "sys_s": ru.ru_stime - self.ru_end.ru_stime, "minflt": ru.ru_minflt - self.ru_end.ru_minflt,
                   "tokens": batch_tokens(batch), "rss_mb": ru.ru_maxrss / 1024, "rss_now_mb": rss_now_mb()}
            if step % 10 == 0 or step <= 2:
                row["workers_rss_mb"] = _children_rss_mb()
                self.children_peak = max(self.children_peak, row["workers_rss_mb"] or 0.0)
            rows.append(row)
            log_file.write(json.dumps(row) + "\n")
            # Timing restarts here so the callback's own work (above) is not charged to the next wait.
            self.t_end, self.ru_end = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)

    make_trainer = run_mod.make_trainer
    timer = StepTimer()

    def with_timer(cfg, run_dir):
        trainer = make_trainer(cfg, run_dir)
        trainer.callbacks.append(timer)
        return trainer

    run_mod.make_trainer = with_timer  # benchmark-only instrumentation
    register_configs()
    over = [*RECIPES[args.recipe], f"data.cohort={args.cohort}", f"run_dir={args.run_dir}", *COMMON,
            f"data.num_workers={args.workers}", f"trainer.max_steps={args.steps}", f"optim.total_steps={args.steps}",
            *args.override]
    with initialize_config_module("slidefm.recipes", version_base="1.3"):
        cfg = compose("config", overrides=over)
    t0 = time.perf_counter()
    run_mod.train(cfg)
    import slidefm

    from slidefm.allocator import active

    return {"wall_s": time.perf_counter() - t0, "threads": torch.get_num_threads(), "overrides": over,
            "slidefm": str(Path(slidefm.__file__).parent), "allocator": active(),
            "workers_peak_rss_mb_sampled": timer.children_peak, "steps": rows}


def summarize(steps: list[dict], warmup: int, window: int) -> dict:
    """Figures over the steps after ``warmup`` and the per-window curve."""
    s = [r for r in steps if r["step"] > warmup] or steps
    wall = sum(r["wall_s"] for r in s)
    wait = sum(r["wait_s"] for r in s)
    cpu = sum(r["user_s"] + r["sys_s"] for r in s)
    med = lambda k: sorted(r[k] for r in s)[len(s) // 2]  # noqa: E731
    curve = window_stats(s, window) if len(s) >= window else []
    full = [w for w in curve if w["steps"][1] - w["steps"][0] + 1 == window]
    for w, start in zip(curve, range(0, len(s), window)):
        part = s[start:start + window]
        w["wait_share"] = sum(r["wait_s"] for r in part) / max(sum(r["wall_s"] for r in part), 1e-9)
    return {
        "steps_measured": len(s), "warmup_steps": warmup,
        "mean_step_s": wall / len(s), "median_step_s": med("wall_s"), "mean_cpu_s_per_step": cpu / len(s),
        "mean_wait_s": wait / len(s), "median_wait_s": med("wait_s"), "max_wait_s": max(r["wait_s"] for r in s),
        "wait_share": wait / wall, "tokens_per_step": sum(r["tokens"] for r in s) / len(s),
        "tokens_per_s": sum(r["tokens"] for r in s) / wall,
        "peak_rss_mb": max(r["rss_mb"] for r in steps),
        "rss_now_mb": {"first": s[0].get("rss_now_mb"), "last": s[-1].get("rss_now_mb")},
        "curve": curve,
        "flat_wall": flatness(full, "mean_step_s", skip=0), "flat_cpu": flatness(full, "mean_cpu_s", skip=0),
    }


# ---------------------------------------------------------------- parent
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["house:w0:30", "house:w1:30", "titan:w0:6", "titan:w1:6"],
                   help="RECIPE:wN:STEPS (recipes: " + ", ".join(RECIPES) + ")")
    p.add_argument("--workdir", default="/work/bench/tcga_shape", help="cohort directory (made once, reused)")
    p.add_argument("--unique", type=int, default=96, help="slide files written")
    p.add_argument("--patients", type=int, default=960, help="patients listed in slides.csv")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the figures (default 10%%, >= 2)")
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--tag", default="", help="suffix of the run names in the JSON (variants)")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per run")
    p.add_argument("--rescan", nargs=2, metavar=("NAME", "STEPS_JSONL"),
                   help="re-summarize a run's steps.jsonl (e.g. with another --warmup) into the entry NAME")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--recipe", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cohort", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        print(json.dumps(child(args)))
        return 0
    out = Path(args.out)
    doc: dict = json.loads(out.read_text()) if out.exists() else {}
    if args.rescan:
        name, path = args.rescan
        steps = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
        entry = doc.setdefault("runs", {}).setdefault(name, {})
        entry.update(summarize(steps, args.warmup if args.warmup is not None else max(2, len(steps) // 10), args.window))
        entry["rescanned_from"] = path
        write_atomic(out, doc)
        print(json.dumps({k: v for k, v in entry.items() if k not in ("per_step", "curve")}, indent=2))
        return 0
    cohort = Path(args.workdir)
    info = make_cohort(cohort, args.unique, args.patients)
    doc["cohort"] = {k: v for k, v in info.items() if k != "reused"} | {"path": str(cohort)}
    doc.setdefault("runs", {})
    for spec in args.runs:
        recipe, w, steps = spec.split(":")
        if recipe not in RECIPES or not w.startswith("w"):
            raise SystemExit(f"bad run {spec!r}: RECIPE:wN:STEPS with RECIPE in {', '.join(RECIPES)}")
        name = f"{recipe}_{w}_{steps}{'_' + args.tag if args.tag else ''}"
        run_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=cohort.parent))
        cmd = [sys.executable, __file__, "--_child", "--recipe", recipe, "--workers", w[1:], "--steps", steps,
               "--cohort", str(cohort), "--run-dir", str(run_dir), "--threads", str(args.threads)]
        for o in args.override:
            cmd += ["--override", o]
        print(f"[tcga_shape {time.strftime('%H:%M:%S')}] {name}: {run_dir}/steps.jsonl", file=sys.stderr, flush=True)
        t = time.perf_counter()
        # The child runs on the allocator `slidefm train` would choose (jemalloc when installed, else tuned glibc,
        # unless SLIDEFM_ALLOCATOR=system): the same environment the command re-executes itself with.
        env = preload_env(os.environ) or dict(os.environ)
        res = run_child(cmd, dict(env, PYTHONUNBUFFERED="1"), args.timeout)
        if "steps" not in res and (run_dir / "steps.jsonl").exists():  # cut short: keep the partial curve
            res["steps"] = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines() if line]
        entry = {"recipe": recipe, "num_workers": int(w[1:]), "steps": int(steps), "threads": args.threads,
                 "extra_overrides": args.override, "process_wall_s": time.perf_counter() - t,
                 # allocator settings act at start-up (slidefm.allocator, slidefm.train.memory)
                 "allocator_env": {k: v for k, v in env.items()
                                   if k.startswith(("SLIDEFM_MALLOC", "SLIDEFM_ALLOCATOR", "MALLOC_", "LD_PRELOAD", "GLIBC_TUNABLES"))},
                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "host": {"python": platform.python_version(), "cores": os.cpu_count(), "machine": platform.machine(),
                          "load_avg_at_end": os.getloadavg()}}
        if res.get("error"):
            entry["error"] = res["error"]
        if res.get("steps"):
            n = len(res["steps"])
            warm = args.warmup if args.warmup is not None else max(2, n // 10)
            entry.update(summarize(res["steps"], warm, args.window))
            entry["workers_peak_rss_mb_sampled"] = res.get("workers_peak_rss_mb_sampled")
            entry["slidefm"] = res.get("slidefm")
            entry["allocator"] = res.get("allocator")
            entry["per_step"] = [[r["step"], round(r["wall_s"], 4), round(r["wait_s"], 4),
                                  round(r["user_s"] + r["sys_s"], 4), round(r["rss_now_mb"] or 0, 1)]
                                 for r in res["steps"]]
            entry["per_step_columns"] = ["step", "wall_s", "wait_s", "cpu_s", "rss_now_mb"]
        doc["runs"][name] = entry
        write_atomic(out, doc)
        brief = {k: entry.get(k) for k in ("mean_step_s", "mean_cpu_s_per_step", "wait_share", "tokens_per_s",
                                           "peak_rss_mb", "flat_wall", "flat_cpu", "error")}
        print(f"[tcga_shape] {name}: {json.dumps(brief, default=str)[:600]}", file=sys.stderr, flush=True)
    print(json.dumps({**doc, "runs": {k: {kk: vv for kk, vv in v.items() if kk not in ("per_step", "curve")}
                                      for k, v in doc["runs"].items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
