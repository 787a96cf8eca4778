"""Long-run CPU step time: does the per-step time grow over a few hundred steps, and does the fix hold it flat?

    nice -n 10 python benchmarks/longrun.py                      # before (tuning off) and after (on)
    nice -n 10 python benchmarks/longrun.py --modes after --steps 200

Trains the house recipe (``recipe=slidefm``, report tower off so no text model is needed) at reduced
sizes on a ``slidefm synth`` cohort, each mode in a fresh process (allocator settings act at start-up):

- ``before``: ``SLIDEFM_MALLOC_TUNING=0``, glibc's default allocator behaviour;
- ``after``: ``SLIDEFM_MALLOC_TUNING=1`` (``slidefm.train.memory``'s opt-in settings), and
  ``after_full`` (fixed mmap + 512 MiB trim threshold + ``malloc_trim`` every 50 steps) and one-setting
  modes (``--modes mmap_only,trim_threshold_only,trim_callback_only,arena_max_2``) to see which matters.

Per step it records wall time, process user/system CPU time and minor page faults (getrusage), and
reports them per 50-step window. Prints one JSON document and writes it atomically to
benchmarks/results/longrun.json (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import growth, rss_now_mb, run_child, window_stats, write_atomic

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# The house recipe at a size where a few hundred steps fit in minutes on a shared 2-core machine.
RUN = ["~model/report", "objectives.contrastive.pairs=[[slide,expression]]", "data.num_workers=0",
       "trainer.progress_bar=false", "trainer.log_every_n_steps=10", "trainer.val_every_n_steps=null",
       "trainer.checkpoint_every_n_steps=100000"]
SMALL = [
    "model.embed_dim=64", "model.aggregator.dim=64", "model.aggregator.depth=2", "model.aggregator.heads=2",
    "model.case.heads=2", "model.expression.hidden_dims=[64]",
    "objectives.distillation.out_dim=256", "objectives.distillation.hidden_dim=128",
    "objectives.distillation.bottleneck_dim=64", "objectives.distillation.feature_hidden_dim=128",
    "data.batch_size=8",
]
SIZES = {"small": SMALL, "house": []}  # house: the recipe's own model and batch sizes


# mode -> environment of the training process (slidefm.train.memory reads these at start-up)
MODES = {
    "before": {"SLIDEFM_MALLOC_TUNING": "0"},
    "after": {"SLIDEFM_MALLOC_TUNING": "1"},
    "after_full": {"SLIDEFM_MALLOC_TUNING": "1", "SLIDEFM_MALLOC_TRIM_THRESHOLD": str(512 * 2**20),
                   "SLIDEFM_MALLOC_TRIM_EVERY": "50"},
    # one setting at a time, to see which one matters
    "mmap_only": {"SLIDEFM_MALLOC_TUNING": "1", "SLIDEFM_MALLOC_TRIM_THRESHOLD": "0", "SLIDEFM_MALLOC_TRIM_EVERY": "0"},
    "trim_threshold_only": {"SLIDEFM_MALLOC_TUNING": "1", "SLIDEFM_MALLOC_MMAP_THRESHOLD": "0",
                            "SLIDEFM_MALLOC_TRIM_THRESHOLD": str(512 * 2**20), "SLIDEFM_MALLOC_TRIM_EVERY": "0"},
    "trim_callback_only": {"SLIDEFM_MALLOC_TUNING": "1", "SLIDEFM_MALLOC_MMAP_THRESHOLD": "0",
                           "SLIDEFM_MALLOC_TRIM_THRESHOLD": "0", "SLIDEFM_MALLOC_TRIM_EVERY": "50"},
    "arena_max_2": {"SLIDEFM_MALLOC_TUNING": "0", "MALLOC_ARENA_MAX": "2"},
}


# ---------------------------------------------------------------- child: one training run
def child(args) -> dict:
    import pytorch_lightning as pl
    from hydra import compose, initialize_config_module

    from slidefm.config import register_configs
    from slidefm.train import run as run_mod

    rows: list[dict] = []
    log_file = open(Path(args.run_dir) / "steps.jsonl", "a", buffering=1)  # partial curve if the run is cut short

    class StepTimer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t, self.ru = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ru = resource.getrusage(resource.RUSAGE_SELF)
            rows.append({"step": trainer.global_step, "wall_s": time.perf_counter() - self.t,
                         "user_s": ru.ru_utime - self.ru.ru_utime, "sys_s": ru.ru_stime - self.ru.ru_stime,
                         "minflt": ru.ru_minflt - self.ru.ru_minflt, "rss_mb": ru.ru_maxrss / 1024,
                         "rss_now_mb": rss_now_mb()})
            log_file.write(json.dumps(rows[-1]) + "\n")

    make_trainer = run_mod.make_trainer

    def with_timer(cfg, run_dir):
        trainer = make_trainer(cfg, run_dir)
        trainer.callbacks.append(StepTimer())
        return trainer

    run_mod.make_trainer = with_timer  # benchmark-only instrumentation
    register_configs()
    over = ["recipe=slidefm", f"data.cohort={args.cohort}", f"run_dir={args.run_dir}", *RUN, *SIZES[args.size],
            f"trainer.max_steps={args.steps}", f"optim.total_steps={args.steps}", *args.override]
    with initialize_config_module("slidefm.recipes", version_base="1.3"):
        cfg = compose("config", overrides=over)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    run_mod.train(cfg)
    from slidefm.train import memory

    return {"mode": os.environ.get("SLIDEFM_MALLOC_TUNING", "default"), "wall_s": time.perf_counter() - t0,
            "threads": torch.get_num_threads(), "memory_settings": memory.describe(), "steps": rows}


# ---------------------------------------------------------------- parent
def make_cohort(path: Path, patients: int, dim: int, min_side: int, max_side: int) -> None:
    if (path / "slides.csv").exists():
        return
    cmd = [sys.executable, "-m", "slidefm", "synth", str(path), "--patients", str(patients), "--dim", str(dim),
           "--min-side", str(min_side), "--max-side", str(max_side), "--seed", "0"]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="before,after", help="comma list of " + ", ".join(MODES))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--patients", type=int, default=120)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--min-side", type=int, default=22)
    p.add_argument("--max-side", type=int, default=46)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="model/batch sizes (house: the recipe's)")
    p.add_argument("--cohort", default=None, help="existing cohort (default: a synth cohort in the temp dir)")
    p.add_argument("--out", default=str(HERE / "results" / "longrun.json"))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per mode")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        print(json.dumps(child(args)))
        return 0
    tmp = Path(tempfile.gettempdir()) / "slidefm-longrun"
    cohort = Path(args.cohort) if args.cohort else tmp / f"cohort-p{args.patients}-d{args.dim}-s{args.min_side}-{args.max_side}"
    make_cohort(cohort, args.patients, args.dim, args.min_side, args.max_side)
    out = Path(args.out)
    doc: dict = {}
    if out.exists():  # modes run separately accumulate in one file
        try:
            doc = json.loads(out.read_text())
        except json.JSONDecodeError:
            doc = {}
    doc.update({"host": {"python": platform.python_version(), "cores": os.cpu_count(), "machine": platform.machine()},
                "config": {"recipe": "slidefm", "size": args.size, "overrides": RUN + SIZES[args.size] + args.override, "steps": args.steps,
                           "window": args.window, "cohort": {"patients": args.patients, "dim": args.dim,
                                                             "side": [args.min_side, args.max_side]}}})
    doc.setdefault("modes", {})
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
        env = dict(os.environ, **MODES[mode])
        run_dir = Path(tempfile.mkdtemp(prefix=f"run-{mode}-", dir=tmp))
        cmd = [sys.executable, __file__, "--_child", "--cohort", str(cohort), "--run-dir", str(run_dir),
               "--steps", str(args.steps), "--size", args.size] + (["--threads", str(args.threads)] if args.threads else [])
        for o in args.override:
            cmd += ["--override", o]
        t = time.perf_counter()
        res = run_child(cmd, env, args.timeout)
        if "steps" not in res and (run_dir / "steps.jsonl").exists():  # cut short: keep the partial curve
            res["steps"] = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines() if line]
        if "steps" in res:
            res["curve"] = window_stats(res["steps"], args.window)
            res["growth_last_over_second_window"] = growth(res["curve"])
            res["per_step"] = [[r["step"], round(r["wall_s"], 4)] for r in res.pop("steps")]
        res["process_wall_s"] = time.perf_counter() - t
        res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        doc["modes"][mode] = res
        write_atomic(out, doc)
        print(f"[{mode}] {res.get('growth_last_over_second_window')} in {res['process_wall_s']:.0f} s", file=sys.stderr)
    summary = {m: {"curve_mean_step_s": [round(w["mean_step_s"], 4) for w in r.get("curve", [])],
                   "curve_mean_cpu_s": [round(w["mean_cpu_s"], 4) for w in r.get("curve", [])],
                   "sys_share": [round(w["sys_share"] or 0, 3) for w in r.get("curve", [])],
                   "growth": r.get("growth_last_over_second_window"), "error": r.get("error")}
               for m, r in doc["modes"].items()}
    doc["summary"] = summary
    write_atomic(out, doc)
    print(json.dumps(doc | {"modes": {m: {k: v for k, v in r.items() if k != "per_step"}
                                      for m, r in doc["modes"].items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
