"""Cohort-scale start-up costs: `check` (cold / warm validation cache), `pack`, train and export start-up.

    nice -n 10 python benchmarks/scale.py                         # 10k and 100k slides
    nice -n 10 python benchmarks/scale.py --sizes 10000 --parts generate,check,train

Simulates cohorts of N slides (small HDF5 feature files: 16-64 patches x 32-D float16 on a 256 px
lattice, two slides per patient) and times, each in a fresh process:

- ``check_cold``: `slidefm check --json` with an empty validation cache (every file opened and scanned);
- ``check_warm``: the same again: only fingerprints are compared (os.stat per file);
- ``pack``: `slidefm pack` (its quick validation is served by the cache the checks left);
- ``train``: `slidefm train` with a tiny ViT (moozy_stage1 recipe, trainer.max_steps=1) on the packed
  store, warm cache: time to the first optimizer step and its phases (open + validate, tables + model,
  first batch), and with ``--train-cold`` once more with the cache off;
- ``export``: export start-up, from process start to the first encoded batch (the export is stopped there).

Then per part the growth factor from the smallest to the largest N (1.0 x N-ratio = linear). Prints
one JSON document and writes it atomically to benchmarks/results/scale.json (after every part, so an
interrupted run keeps what it measured). Generated cohorts are kept under --workdir for reruns.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import run_child, write_atomic

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PARTS = ("generate", "check_cold", "check_warm", "pack", "train", "export")
TINY = ["recipe=moozy_stage1", "model.aggregator.dim=32", "model.aggregator.depth=1", "model.aggregator.heads=2",
        "model.embed_dim=32", "objectives.distillation.out_dim=64", "objectives.distillation.hidden_dim=64",
        "objectives.distillation.bottleneck_dim=32", "data.views.global_size=6", "data.views.local_size=4",
        "data.batch_size=8", "data.num_workers=0", "trainer.progress_bar=false", "trainer.max_steps=1",
        "trainer.checkpoint_every_n_steps=100000", "trainer.log_every_n_steps=1"]


# ---------------------------------------------------------------- generation
def generate(root: Path, n_slides: int, dim: int = 32, seed: int = 0) -> dict:
    """N slide files + slides.csv; resumes an interrupted generation (files already there are kept)."""
    import h5py
    import numpy as np

    done_marker = root / ".generated"
    if done_marker.exists():
        return json.loads(done_marker.read_text()) | {"reused": True}
    t = time.perf_counter()
    feats_dir = root / "features"
    feats_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ns = rng.integers(16, 65, n_slides)
    side = 12
    cells = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).reshape(-1, 2)
    rows = []
    total = 0
    for i, n in enumerate(ns.tolist()):
        sid = f"S{i:06d}"
        rows.append(f"{sid},P{i // 2:06d}\n")
        path = feats_dir / f"{sid}.h5"
        total += n
        if path.exists():
            continue
        pick = rng.permutation(len(cells))[:n]
        coords = (cells[pick] * 256 + np.array([1000, 2000])).astype(np.int64)
        tmp = path.with_suffix(".h5.tmp")
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=rng.standard_normal((n, dim), dtype=np.float32).astype(np.float16))
            c = f.create_dataset("coords", data=coords)
            c.attrs["patch_size_level0"] = 256
            c.attrs["patch_size"] = 256
        os.replace(tmp, path)
    with open(root / "slides.csv", "w") as f:
        f.write("slide_id,patient_id\n")
        f.writelines(rows)
    info = {"slides": n_slides, "patients": (n_slides + 1) // 2, "patches": int(total), "dim": dim,
            "patches_per_slide": [16, 64], "generate_s": time.perf_counter() - t,
            "bytes": sum(p.stat().st_size for p in feats_dir.iterdir())}
    done_marker.write_text(json.dumps(info))
    return info


# ---------------------------------------------------------------- children (fresh processes)
def child_train(args) -> dict:
    """Time to first step of `slidefm train` and its phases (in-process marks)."""
    t0 = time.perf_counter()
    import pytorch_lightning as pl
    from hydra import compose, initialize_config_module

    from slidefm.config import register_configs
    from slidefm.train import run as run_mod

    marks: dict[str, float] = {"imports_s": time.perf_counter() - t0}
    build = run_mod.build_everything

    def timed_build(cfg):
        t = time.perf_counter()
        from slidefm.cohort import Cohort

        open_ = Cohort.open

        def timed_open(*a, **k):
            s = time.perf_counter()
            c = open_(*a, **k)
            marks["cohort_open_s"] = time.perf_counter() - s
            validate = c.validate

            def timed_validate(*va, **vk):
                s2 = time.perf_counter()
                out = validate(*va, **vk)
                marks["validate_s"] = time.perf_counter() - s2
                return out

            c.validate = timed_validate
            return c

        Cohort.open = timed_open
        try:
            out = build(cfg)
        finally:
            Cohort.open = open_
        marks["build_everything_s"] = time.perf_counter() - t
        return out

    class FirstStep(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            marks.setdefault("to_train_start_s", time.perf_counter() - t0)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            marks.setdefault("to_first_batch_s", time.perf_counter() - t0)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            marks.setdefault("to_first_step_done_s", time.perf_counter() - t0)

    make_trainer = run_mod.make_trainer

    def with_marks(cfg, run_dir):
        marks["make_trainer_at_s"] = time.perf_counter() - t0
        tr = make_trainer(cfg, run_dir)
        tr.callbacks.append(FirstStep())
        return tr

    run_mod.build_everything, run_mod.make_trainer = timed_build, with_marks
    register_configs()
    with initialize_config_module("slidefm.recipes", version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, f"data.cohort={args.cohort}", f"run_dir={args.run_dir}"])
    out = run_mod.train(cfg)
    marks["total_s"] = time.perf_counter() - t0
    return {"global_step": out["global_step"], **marks}


class _Stop(Exception):
    pass


def child_export(args) -> dict:
    """Export start-up: process start -> first encoded batch (then stop)."""
    t0 = time.perf_counter()
    import slidefm
    import slidefm.export as ex
    from slidefm.cohort import Cohort

    marks: dict[str, float] = {"imports_s": time.perf_counter() - t0}
    s = time.perf_counter()
    cohort = Cohort.open(args.cohort)
    marks["cohort_open_s"] = time.perf_counter() - s
    s = time.perf_counter()
    enc = slidefm.load(args.checkpoint, device="cpu")
    marks["load_checkpoint_s"] = time.perf_counter() - s
    real = enc.encode_packed

    def first(*a, **k):
        out = real(*a, **k)
        marks["to_first_batch_s"] = time.perf_counter() - t0
        raise _Stop

    enc.encode_packed = first
    cfg = ex.ExportConfig(progress=False, num_workers=0)
    try:
        ex.export_embeddings(enc, cohort, args.out, cfg)
    except _Stop:
        pass
    shutil.rmtree(ex.partial_dir_for(args.out), ignore_errors=True)
    marks["store"] = cohort.store is not None
    return marks


# ---------------------------------------------------------------- parent
def run(cmd: list[str], env: dict, timeout: float) -> tuple[dict, float]:
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}, time.perf_counter() - t
    wall = time.perf_counter() - t
    if p.returncode not in (0, 1):  # check exits 1 on cohort errors, which we also want to see
        return {"error": (p.stderr or p.stdout)[-3000:], "returncode": p.returncode}, wall
    return {"returncode": p.returncode, "stdout_tail": p.stdout[-300:]}, wall


def run_child_timed(cmd: list[str], env: dict, timeout: float) -> dict:
    """This script's ``--_child`` (its JSON, or the error) plus ``process_wall_s``, process start to exit."""
    t = time.perf_counter()
    r = run_child(cmd, env, timeout)
    r["process_wall_s"] = time.perf_counter() - t
    return r


def measure(n: int, args, doc: dict, out: Path) -> None:
    work = Path(args.workdir)
    cohort = work / f"c{n}"
    vcache = work / f"vcache{n}"
    res = doc["sizes"].setdefault(str(n), {})
    py = [sys.executable, "-m", "slidefm"]
    env = dict(os.environ, SLIDEFM_VALIDATION_CACHE=str(vcache), PYTHONWARNINGS="ignore")
    parts = args.parts.split(",")

    def save():
        write_atomic(out, doc)

    if "generate" in parts or not (cohort / ".generated").exists():
        res["generate"] = generate(cohort, n)
        save()
    if "check_cold" in parts:
        shutil.rmtree(vcache, ignore_errors=True)
        r, wall = run(py + ["check", str(cohort), "--json"], env, args.timeout)
        res["check_cold"] = {"wall_s": wall, **r}
        save()
    if "check_warm" in parts:
        r, wall = run(py + ["check", str(cohort), "--json"], env, args.timeout)
        res["check_warm"] = {"wall_s": wall, **r}
        if vcache.exists():
            files = list(vcache.glob("*.json"))
            res["validation_cache_bytes"] = sum(p.stat().st_size for p in files)
            from slidefm.cohort import validation_cache as vc

            if files:
                version = vc.validator_version()  # imports the validator modules: not part of the load
                t = time.perf_counter()
                entries = vc.read_entries(files[0], version)
                res["validation_cache_load_s"] = time.perf_counter() - t
                res["validation_cache_entries"] = len(entries)
        save()
    if "pack" in parts:
        r, wall = run(py + ["pack", str(cohort)], env, args.timeout)
        res["pack"] = {"wall_s": wall, **r}
        save()
    ckpt = None
    if "train" in parts or "export" in parts:
        run_dir = work / f"run{n}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [sys.executable, __file__, "--_child", "train", "--cohort", str(cohort), "--run-dir", str(run_dir)]
        res["train"] = run_child_timed(cmd, env, args.timeout)
        save()
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        if args.train_cold:
            shutil.rmtree(run_dir, ignore_errors=True)
            res["train_cold_cache"] = run_child_timed(cmd, dict(env, SLIDEFM_VALIDATION_CACHE="0"), args.timeout)
            save()
    if "export" in parts and ckpt is not None and ckpt.exists():
        cmd = [sys.executable, __file__, "--_child", "export", "--cohort", str(cohort), "--checkpoint", str(ckpt),
               "--out", str(work / f"export{n}.h5ad")]
        res["export"] = run_child_timed(cmd, env, args.timeout)
        save()


def growth(doc: dict) -> dict:
    """Ratio largest-N / smallest-N of each timing (N ratio = linear growth)."""
    sizes = sorted(int(k) for k in doc["sizes"])
    if len(sizes) < 2:
        return {}
    lo, hi = doc["sizes"][str(sizes[0])], doc["sizes"][str(sizes[-1])]
    keys = {"check_cold": "wall_s", "check_warm": "wall_s", "pack": "wall_s", "train": "to_first_step_done_s",
            "train_cold_cache": "to_first_step_done_s", "export": "to_first_batch_s"}
    out = {"n_ratio": sizes[-1] / sizes[0]}
    for part, key in keys.items():
        a, b = lo.get(part, {}).get(key), hi.get(part, {}).get(key)
        if a and b:
            out[part] = round(b / a, 2)
    for part in ("train", "export"):
        for key in ("validate_s", "cohort_open_s", "build_everything_s"):
            a, b = lo.get(part, {}).get(key), hi.get(part, {}).get(key)
            if a and b:
                out[f"{part}.{key}"] = round(b / a, 2)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--parts", default=",".join(PARTS[1:]), help="comma list of " + ",".join(PARTS))
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "slidefm-scale"))
    p.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    p.add_argument("--timeout", type=float, default=3600, help="seconds per step")
    p.add_argument("--train-cold", action="store_true", help="also time train start-up with the cache off")
    p.add_argument("--_child", choices=("train", "export"), help=argparse.SUPPRESS)
    p.add_argument("--cohort", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child == "train":
        print(json.dumps(child_train(args)))
        return 0
    if args._child == "export":
        print(json.dumps(child_export(args)))
        return 0
    out = Path(args.out)
    doc: dict = {}
    if out.exists():
        try:
            doc = json.loads(out.read_text())
        except json.JSONDecodeError:
            doc = {}
    doc["host"] = {"python": platform.python_version(), "cores": os.cpu_count(), "machine": platform.machine(),
                   "note": "shared 2-core machine, run under nice -n 10 while other work was running"}
    doc["config"] = {"slide": "16-64 patches x 32-D float16, 256 px lattice, 2 slides per patient",
                     "train": TINY, "check": "slidefm check --json (full NaN/Inf scan)", "parts": args.parts}
    doc.setdefault("sizes", {})
    for n in [int(s) for s in args.sizes.split(",")]:
        t = time.perf_counter()
        measure(n, args, doc, out)
        print(f"[{n}] done in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    doc["growth"] = growth(doc)
    write_atomic(out, doc)
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
