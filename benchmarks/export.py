"""Export throughput: slides/s, data-pipeline overhead, and peak memory as the cohort grows.

    python benchmarks/export.py                          # 2,000 slides x 2,000 patches x 384-D float16
    python benchmarks/export.py --slides 200 --sizes 50 200

A random-weight ViT checkpoint (RoPE, --model-dim x --depth) encodes every slide whole through
`Encoder.embed_slides` (packed batches, background reading). Each cohort size runs in a fresh
process: overhead = 1 - (time inside the model's forward / end-to-end time); peak RSS must stay
flat as the number of slides grows. Prints JSON and writes benchmarks/results/export.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def make_checkpoint(path: Path, in_dim: int, dim: int, depth: int, heads: int) -> None:
    import torch
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from slidefm.config import register_configs
    from slidefm.train.module import SlideFMModule

    register_configs()
    with initialize_config_module("slidefm.recipes", version_base="1.3"):
        cfg = compose("config", overrides=[
            "recipe=slidefm", "data.cohort=unused", "run_dir=unused", "model.report=null", "model.expression=null",
            "objectives.contrastive=null", f"model.aggregator.dim={dim}", f"model.aggregator.depth={depth}",
            f"model.aggregator.heads={heads}", f"model.embed_dim={dim}"])
    torch.manual_seed(0)
    module = SlideFMModule(OmegaConf.to_container(cfg, resolve=True), in_dim=in_dim)
    ck = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ck)
    torch.save(ck, path)


def run_one(cohort: str, ckpt: str, n: int, workers: int, batch_tokens: int) -> dict:
    """In a fresh process: export the first ``n`` slides, timing the model separately."""
    import torch

    import slidefm
    from slidefm.api import Encoder
    from slidefm.cohort import Cohort
    from slidefm.export import ExportConfig

    c = Cohort.open(cohort)
    c.slides = c.slides.iloc[:n]
    enc = slidefm.load(ckpt, device="cpu")
    model_s = {"t": 0.0, "tokens": 0}
    real = Encoder.encode_packed

    def timed(self, packed, want_tokens=False):
        t = time.perf_counter()
        out = real(self, packed, want_tokens)
        model_s["t"] += time.perf_counter() - t
        model_s["tokens"] += int(packed.tokens.shape[0])
        return out

    Encoder.encode_packed = timed
    t0 = time.perf_counter()
    a = enc.embed_slides(c, ExportConfig(num_workers=workers, batch_tokens=batch_tokens, progress=False,
                                         chunk_slides=256))
    wall = time.perf_counter() - t0
    assert a.n_obs == n
    return {
        "slides": n, "tokens": model_s["tokens"], "wall_s": round(wall, 2), "model_s": round(model_s["t"], 2),
        "slides_per_s": round(n / wall, 2), "tokens_per_s": round(model_s["tokens"] / wall),
        "overhead": round(1 - model_s["t"] / wall, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=2000)
    ap.add_argument("--patches", type=int, default=2000, help="mean patches per slide")
    ap.add_argument("--dim", type=int, default=384, help="patch feature width D")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="cohort sizes to export (default: N/8, N)")
    ap.add_argument("--model-dim", type=int, default=192)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--out", default=str(HERE / "results" / "export.json"))
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        cohort, ckpt, n, workers, bt = args.child
        print(json.dumps(run_one(cohort, ckpt, int(n), int(workers), int(bt))))
        return 0

    spec = importlib.util.spec_from_file_location("io_bench", HERE / "io.py")
    io_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(io_bench)  # type: ignore[union-attr]
    root = Path(args.dir or Path(tempfile.gettempdir()) / f"slidefm-export-bench-{args.slides}x{args.patches}x{args.dim}")
    t = time.perf_counter()
    if not (root / "slides.csv").exists():
        io_bench.build(root, args.slides, args.patches, args.dim, "float16", "contiguous", 0)
    build_s = time.perf_counter() - t
    ckpt = root / f"vit{args.model_dim}x{args.depth}.ckpt"
    make_checkpoint(ckpt, args.dim, args.model_dim, args.depth, args.heads)
    runs = []
    for n in args.sizes or [max(1, args.slides // 8), args.slides]:
        out = subprocess.run([sys.executable, __file__, "--child", str(root), str(ckpt), str(n), str(args.workers),
                              str(args.batch_tokens)], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), file=sys.stderr)
    big = runs[-1]
    result = {
        "benchmark": "export",
        "cohort": {"slides": args.slides, "mean_patches": args.patches, "dim": args.dim, "dtype": "float16",
                   "build_s": round(build_s, 1)},
        "model": {"aggregator": "vit", "pos": "rope", "dim": args.model_dim, "depth": args.depth, "heads": args.heads},
        "workers": args.workers, "batch_tokens": args.batch_tokens, "runs": runs,
        "slides_per_s": big["slides_per_s"], "overhead": big["overhead"], "overhead_target": 0.15,
        "peak_rss_growth_mb": round(big["peak_rss_mb"] - runs[0]["peak_rss_mb"], 1),
        "machine": {"cpu_count": __import__("os").cpu_count(), "python": platform.python_version()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
