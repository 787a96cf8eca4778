"""Aggregator benchmarks: CPU MFU, packed vs padded, whole-slide memory, MOOZY anchor, GPU.

GPU sections (CUDA only; skipped with a reason otherwise): gpu_mfu (bf16 MFU vs the datasheet peak),
gpu_packed (packed vs padded bf16 training), gpu_slide (one 100k-patch slide, RoPE and ALiBi); "gpu" runs
all three in one process. benchmarks/gpu_check.sh runs them as separate, time-limited parts.

    python benchmarks/aggregators.py                       # all CPU sections, spec sizes
    python benchmarks/aggregators.py --sections mfu,packed --mfu-tokens 2048
    python benchmarks/aggregators.py --sections moozy --moozy-python /tmp/moozy-venv/bin/python

Prints one JSON document and writes it to benchmarks/results/aggregators.json (--out).
Whole-slide and MOOZY cases each run in a fresh subprocess so ru_maxrss is that case's peak.
MOOZY is never a dependency: it is driven in a subprocess with the interpreter of a separate venv.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------- helpers
def maxrss_gb() -> float:
    """Peak resident memory of this process in GB.

    VmHWM first: ru_maxrss survives fork+exec, so a child would report its parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux/BSD report KiB


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2]


def gemm_flops(n: int = 4096, repeats: int = 3, device="cpu", dtype=torch.float32) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)

    def mm():
        torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()

    return 2 * n**3 / timed(mm, repeats)


def vit_flops(lens, in_dim, dim, depth, mlp_ratio=4.0, prefix=1, train=True) -> float:
    """Matmul FLOPs of the ViT on slides of ``lens`` patches (fwd; x3 for fwd+bwd)."""
    seq = [n + prefix for n in lens]
    T, sq = sum(seq), sum(n * n for n in seq)
    linear = 2 * T * dim * (3 * dim + dim + 2 * mlp_ratio * dim) * depth
    attn = 4 * sq * dim * depth  # QK^T and AV
    proj = 2 * sum(lens) * in_dim * dim
    return (linear + attn + proj) * (3 if train else 1)


def grid_positions(n: int, seed: int = 0) -> torch.Tensor:
    """n distinct cells of a roughly square grid (tissue-like blob: the first n in a random order)."""
    side = math.ceil(math.sqrt(n))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(side * side, generator=g)[:n]
    return torch.stack([idx % side, idx // side], 1)


def make_batch(lens, in_dim, seed=0):
    from slidefm.data.batch import pack_slides

    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(n, in_dim, generator=g) for n in lens]
    return pack_slides(feats, [grid_positions(n, seed + i) for i, n in enumerate(lens)])


def build_vit(in_dim, dim, depth, heads, pos="rope", **kw):
    from slidefm.models.aggregators.vit import ViTAggregator, ViTConfig

    torch.manual_seed(0)
    return ViTAggregator(ViTConfig(dim=dim, depth=depth, heads=heads, pos=pos, **kw), in_dim=in_dim)


# ---------------------------------------------------------------- (a) CPU MFU
def section_mfu(args) -> dict:
    in_dim, dim, depth, heads = 1024, 384, 6, 6
    model = build_vit(in_dim, dim, depth, heads, "rope").train()
    x = make_batch([args.mfu_tokens], in_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(x)
        (out.slide.square().mean() + out.tokens.square().mean()).backward()

    peak = gemm_flops(4096)
    t = timed(step, args.mfu_steps)
    peak_after = gemm_flops(4096)  # other processes share the cores: bracket the run
    flops = vit_flops([args.mfu_tokens], in_dim, dim, depth)
    gemm = max(peak, peak_after)
    return {
        "config": {"tokens": args.mfu_tokens, "dim": dim, "depth": depth, "heads": heads, "pos": "rope",
                   "dtype": "float32", "threads": torch.get_num_threads()},
        "step_s": t, "model_flops_per_step": flops, "model_flop_s": flops / t,
        "gemm_flop_s": gemm, "gemm_flop_s_before_after": [peak, peak_after],
        "mfu_vs_gemm": flops / t / gemm, "target": 0.5,
    }


# ---------------------------------------------------------------- (b) packed vs padded
def padded_forward(model, x):
    """The naive way: pad every slide to the longest in the batch, mask padded keys, run everything."""
    import torch.nn.functional as F

    from slidefm.models.attention import apply_rope, rope_angles

    lens = x.lengths.tolist()
    dev = x.tokens.device
    B, L, P, D = len(lens), max(lens), model.num_prefix, model.dim
    h = model.proj(x.tokens)
    seq = h.new_zeros(B, P + L, D)
    pos = torch.full((B, P + L, 2), float("nan"), device=dev)
    valid = torch.zeros(B, P + L, dtype=torch.bool, device=dev)
    prefix = torch.cat([model.cls_token, model.registers]).to(h.dtype)
    for b, (a, e) in enumerate(zip(x.offsets[:-1].tolist(), x.offsets[1:].tolist())):
        row = torch.tensor([b], device=dev)
        seq = seq.index_put((row, torch.arange(P, device=dev)), prefix)
        seq = seq.index_put((row, torch.arange(P, P + e - a, device=dev)), h[a:e])
        p = x.positions[a:e].float()
        pos[b, P : P + e - a] = p - p.mean(0)  # the model centres each slide's grid (CLS has no rotation)
        valid[b, : P + e - a] = True
    key_mask = valid[:, None, None, :]
    for blk in model.blocks:
        att = blk.attn
        y = blk.norm1(seq)
        q, k, v = att.qkv(y).view(B, P + L, 3, att.heads, att.head_dim).unbind(2)
        cos, sin = rope_angles(pos.reshape(-1, 2), att.head_dim, att.rope_base)
        q = apply_rope(q.reshape(B * (P + L), att.heads, -1), cos, sin).view(B, P + L, att.heads, -1)
        k = apply_rope(k.reshape(B * (P + L), att.heads, -1), cos, sin).view(B, P + L, att.heads, -1)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask)
        seq = seq + blk.ls1(att.proj(o.transpose(1, 2).reshape(B, P + L, D)))
        seq = seq + blk.ls2(blk.mlp(blk.norm2(seq)))
    seq = model.norm(seq)
    return seq[:, 0], seq[:, P:][valid[:, P:]]


def lognormal_batches(args) -> list[list[int]]:
    """--packed-batches batches of --packed-batch-size slide lengths: lognormal (median 2000), clipped to 64..20000."""
    import numpy as np

    rng = np.random.default_rng(0)
    return [np.clip(rng.lognormal(math.log(2000), args.packed_sigma, args.packed_batch_size), 64, 20000).astype(int).tolist()
            for _ in range(args.packed_batches)]


def packed_vs_padded(batches, in_dim, step_times, device=None) -> tuple[list[dict], float, float]:
    """Per batch ``step_times(b, x) -> (packed_s, padded_s)`` on ``make_batch(lens, seed=b)``: rows and both totals."""
    rows, t_packed, t_padded = [], 0.0, 0.0
    for b, lens in enumerate(batches):
        x = make_batch(lens, in_dim, seed=b)
        tp, tq = step_times(b, x if device is None else x.to(device))
        t_packed += tp
        t_padded += tq
        rows.append({"lengths": lens, "tokens": sum(lens), "padded_tokens": len(lens) * max(lens),
                     "packed_s": tp, "padded_s": tq, "speedup": tq / tp})
    return rows, t_packed, t_padded


def slide_diff_packed_vs_padded(model, in_dim, device=None) -> float:
    """Max |packed - padded| slide embedding in eval mode, fp32: the speedup compares the same computation."""
    model.eval()
    with torch.no_grad():
        x = make_batch([300, 70, 150], in_dim, seed=7)
        x = x if device is None else x.to(device)
        ref, s = model(x).slide, padded_forward(model, x)[0]
    return float((ref - s).abs().max())


def section_packed(args) -> dict:
    in_dim, dim, depth, heads = 256, args.packed_dim, args.packed_depth, args.packed_heads
    model = build_vit(in_dim, dim, depth, heads, "rope").train()
    batches = lognormal_batches(args)
    warm = make_batch([256, 128], in_dim)

    def step_times(b, x):
        def packed():
            model.zero_grad(set_to_none=True)
            out = model(x)
            (out.slide.square().mean() + out.tokens.square().mean()).backward()

        def padded():
            model.zero_grad(set_to_none=True)
            slide, tokens = padded_forward(model, x)
            (slide.square().mean() + tokens.square().mean()).backward()

        if b == 0:  # warm both paths on a tiny batch
            model(warm).slide.sum().backward()
            padded_forward(model, warm)[0].sum().backward()
        return timed(packed, args.packed_steps, warmup=0), timed(padded, args.packed_steps, warmup=0)

    rows, t_packed, t_padded = packed_vs_padded(batches, in_dim, step_times)
    diff = slide_diff_packed_vs_padded(model, in_dim)
    return {
        "config": {"in_dim": in_dim, "dim": dim, "depth": depth, "heads": heads, "lognormal_median": 2000,
                   "sigma": args.packed_sigma, "clip": [64, 20000], "batch_size": args.packed_batch_size,
                   "steps": args.packed_steps, "threads": torch.get_num_threads()},
        "batches": rows, "tokens_per_s_packed": sum(r["tokens"] for r in rows) * args.packed_steps / t_packed,
        "tokens_per_s_padded": sum(r["tokens"] for r in rows) * args.packed_steps / t_padded,
        "speedup": t_padded / t_packed, "target": 1.8,
        "max_abs_diff_slide_packed_vs_padded": diff,
    }


# ---------------------------------------------------------------- (c) whole slide, fresh process per case
def child_slide(args) -> dict:
    base = maxrss_gb()
    model = build_vit(1024, 768, args.slide_depth, 12, args.pos).eval()
    x = make_batch([args.slide_tokens], 1024)
    ready = maxrss_gb()
    t = time.perf_counter()
    with torch.inference_mode():
        out = model(x)
    wall = time.perf_counter() - t
    assert out.tokens.shape == (args.slide_tokens, 768) and bool(torch.isfinite(out.slide).all())
    return {"pos": args.pos, "tokens": args.slide_tokens, "depth": args.slide_depth, "threads": torch.get_num_threads(),
            "wall_s": wall,
            "peak_rss_gb": maxrss_gb(), "rss_before_model_gb": base, "rss_with_model_and_input_gb": ready,
            "flop_s": vit_flops([args.slide_tokens], 1024, 768, args.slide_depth, train=False) / wall}


def run_child(cmd: list[str], timeout: float) -> dict:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout)[-2000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def section_slide(args) -> dict:
    # tokens and depth are per entry: the two position schemes may be run separately (see main)
    res = {"config": {"in_dim": 1024, "dim": 768, "heads": 12, "spec_tokens": 100_000, "spec_depth": 6,
                      "subsampling": "none", "target_peak_rss_gb": 4.0}}
    for pos in args.slide_pos.split(","):
        cmd = [sys.executable, __file__, "--_child", "slide", "--pos", pos, "--slide-tokens", str(args.slide_tokens),
               "--slide-depth", str(args.slide_depth), "--threads", str(torch.get_num_threads())]
        r = run_child(cmd, args.child_timeout)
        if "wall_s" in r and args.slide_depth != 6:
            # inference memory does not grow with depth (blocks run one after another); time is linear in depth
            r["wall_s_extrapolated_depth6"] = r["wall_s"] * 6 / args.slide_depth
        res[pos] = r
    return res


# ---------------------------------------------------------------- (d) MOOZY anchor
def child_moozy(args) -> dict:
    """Runs in the MOOZY venv: only torch + moozy are imported."""
    from moozy.models.moozy_slide_encoder import MOOZYSlideEncoder

    side = int(round(math.sqrt(args.moozy_tokens)))
    base = maxrss_gb()
    torch.manual_seed(0)
    enc = MOOZYSlideEncoder(feat_dim=384, d_model=768, n_heads=12, n_layers=6, dim_feedforward=3072,
                            num_registers=4, dropout=0.0).eval()
    x = torch.randn(1, side, side, 384)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    patch = 224.0
    coords = torch.stack([xx, yy], -1).reshape(1, side * side, 2).float() * patch
    t = time.perf_counter()
    with torch.inference_mode():
        cls, patches, _ = enc(x, coords_xy=coords, patch_sizes=torch.tensor([patch]))
    wall = time.perf_counter() - t
    return {"system": "moozy", "tokens": side * side, "wall_s": wall, "peak_rss_gb": maxrss_gb(),
            "rss_before_model_gb": base, "out": list(cls.shape)}


def child_ours_grid(args) -> dict:
    from slidefm.data.batch import pack_slides

    side = int(round(math.sqrt(args.moozy_tokens)))
    base = maxrss_gb()
    model = build_vit(384, 768, 6, 12, args.pos, num_registers=4).eval()
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    x = pack_slides([torch.randn(side * side, 384)], [torch.stack([xx, yy], -1).reshape(-1, 2)])
    t = time.perf_counter()
    with torch.inference_mode():
        out = model(x)
    wall = time.perf_counter() - t
    return {"system": f"slidefm-vit-{args.pos}", "tokens": side * side, "wall_s": wall, "peak_rss_gb": maxrss_gb(),
            "rss_before_model_gb": base, "out": list(out.slide.shape)}


def section_moozy(args) -> dict:
    res = {"config": {"tokens": args.moozy_tokens, "grid": "square", "in_dim": 384, "dim": 768, "depth": 6,
                      "heads": 12, "registers": 4, "weights": "random", "mode": "inference",
                      "targets": {"speedup": 2.0, "memory_ratio": 4.0}}}
    common = ["--moozy-tokens", str(args.moozy_tokens), "--threads", str(torch.get_num_threads())]
    py = args.moozy_python
    cmds = {f"slidefm_{pos}": [sys.executable, __file__, "--_child", "ours_grid", "--pos", pos, *common]
            for pos in ("alibi", "rope")}
    if py and Path(py).exists():
        res["moozy_python"] = py
        cmds["moozy"] = [py, __file__, "--_child", "moozy", *common]
    else:
        res["moozy"] = {"error": f"no MOOZY interpreter at {py!r}; create one with: python -m venv /tmp/moozy-venv && "
                                 "/tmp/moozy-venv/bin/pip install torch moozy"}
    # Interleaved repeats, fastest kept: a shared machine's slow spells then hit every system alike.
    runs: dict[str, list[dict]] = {k: [] for k in cmds}
    for _ in range(args.moozy_repeats):
        for key, cmd in cmds.items():
            runs[key].append(run_child(cmd, args.child_timeout))
    for key, rs in runs.items():
        ok = [r for r in rs if "wall_s" in r]
        res[key] = min(ok, key=lambda r: r["wall_s"]) | {"wall_s_all": [r["wall_s"] for r in ok]} if ok else rs[-1]
    m = res["moozy"]
    for pos in ("alibi", "rope"):
        o = res[f"slidefm_{pos}"]
        if "wall_s" in m and "wall_s" in o:
            res[f"speedup_{pos}"] = m["wall_s"] / o["wall_s"]
            res[f"memory_ratio_{pos}"] = m["peak_rss_gb"] / o["peak_rss_gb"]
            # without the ~constant interpreter + torch baseline, the ratio of what the models need
            ours_net = o["peak_rss_gb"] - o["rss_before_model_gb"]
            if ours_net > 0:
                res[f"memory_ratio_above_baseline_{pos}"] = (m["peak_rss_gb"] - m["rss_before_model_gb"]) / ours_net
    return res


# ---------------------------------------------------------------- (e) GPU
# Datasheet dense (no sparsity) bf16 tensor-core peaks, FLOP/s; first matching name pattern wins, so the
# specific variants come before the family (device names: "NVIDIA H100 80GB HBM3" is the SXM part,
# "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe").
BF16_PEAK = (
    ("GH200", 989.4e12), ("H200 NVL", 835e12), ("H200", 989.4e12),
    ("H100 NVL", 835e12), ("H100 PCIE", 756e12), ("H100", 989.4e12),
    ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12), ("A10", 125e12), ("L4", 121e12),
)
GPU_GOALS = {"mfu_vs_datasheet": 0.40, "packed_speedup": 2.0, "slide_wall_s": 1.0, "slide_peak_gb": 8.0}


def bf16_peak_flops(device_name: str) -> tuple[float | None, str | None]:
    """(datasheet dense bf16 FLOP/s, matched pattern) for a CUDA device name, (None, None) if unknown."""
    import re

    up = device_name.upper()
    for pattern, peak in BF16_PEAK:
        # whole-word match: "A10" must not match "A100", "L4" not "L40S"
        if re.search(r"(?<![A-Z0-9])" + re.escape(pattern) + r"(?![A-Z0-9])", up):
            return peak, pattern
    return None, None


def _cuda_sync():
    torch.cuda.synchronize()


def section_gpu_mfu(args) -> dict:
    """bf16 MFU of ViT-RoPE 384 x 6 on slides of --gpu-tokens tokens (training step: fwd + bwd + AdamW)."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    from slidefm.models.attention import resolve_backend

    dev, name = torch.device("cuda"), torch.cuda.get_device_name()
    peak, matched = bf16_peak_flops(name)
    measured = gemm_flops(8192, 10, device="cuda", dtype=torch.bfloat16)
    lens = [args.gpu_tokens] * args.gpu_batch
    model = build_vit(1024, 384, 6, 6, "rope").to(dev).train()
    x = make_batch(lens, 1024).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
            loss = out.slide.float().square().mean() + out.tokens.float().square().mean()
        loss.backward()
        opt.step()
        _cuda_sync()

    t = timed(step, args.gpu_steps, warmup=2)
    flops = vit_flops(lens, 1024, 384, 6)
    mfu = flops / t / peak if peak else None
    return {"device": name, "config": {"tokens_per_slide": args.gpu_tokens, "slides": args.gpu_batch, "in_dim": 1024,
                                       "dim": 384, "depth": 6, "heads": 6, "pos": "rope", "dtype": "bf16-autocast",
                                       "steps": args.gpu_steps},
            "backend": resolve_backend("auto", dev, torch.bfloat16), "step_s": t, "model_flops_per_step": flops,
            "model_flop_s": flops / t, "datasheet_bf16_flop_s": peak, "datasheet_match": matched,
            "bf16_gemm_flop_s": measured, "mfu_vs_datasheet": mfu, "mfu_vs_gemm": flops / t / measured,
            "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 1e9,
            "goal": GPU_GOALS["mfu_vs_datasheet"], "meets_goal": None if mfu is None else mfu >= GPU_GOALS["mfu_vs_datasheet"]}


def section_gpu_packed(args) -> dict:
    """Packed (varlen kernel) vs padded (dense SDPA + key mask) bf16 training, ViT 384 x 6, lognormal lengths."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    from slidefm.models.attention import resolve_backend

    dev = torch.device("cuda")
    in_dim, dim, depth, heads = 256, 384, 6, 6
    model = build_vit(in_dim, dim, depth, heads, "rope").to(dev).train()
    batches = lognormal_batches(args)

    def run(fn, x):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            slide, tokens = fn(x)
            loss = slide.float().square().mean() + tokens.float().square().mean()
        loss.backward()
        _cuda_sync()

    def packed_fn(x):
        out = model(x)
        return out.slide, out.tokens

    def step_times(b, x):
        return (timed(lambda: run(packed_fn, x), args.gpu_steps, warmup=1),
                timed(lambda: run(lambda y: padded_forward(model, y), x), args.gpu_steps, warmup=1))

    rows, t_packed, t_padded = packed_vs_padded(batches, in_dim, step_times, device=dev)
    diff = slide_diff_packed_vs_padded(model, in_dim, device=dev)
    speedup = t_padded / t_packed
    return {"config": {"in_dim": in_dim, "dim": dim, "depth": depth, "heads": heads, "lognormal_median": 2000,
                       "sigma": args.packed_sigma, "clip": [64, 20000], "batch_size": args.packed_batch_size,
                       "batches": args.packed_batches, "steps": args.gpu_steps, "dtype": "bf16-autocast"},
            "backend_packed": resolve_backend("auto", dev, torch.bfloat16), "batches": rows,
            "tokens_per_s_packed": sum(r["tokens"] for r in rows) / t_packed,
            "tokens_per_s_padded": sum(r["tokens"] for r in rows) / t_padded,
            "speedup": speedup, "goal": GPU_GOALS["packed_speedup"], "meets_goal": speedup >= GPU_GOALS["packed_speedup"],
            "max_abs_diff_slide_packed_vs_padded_fp32": diff}


def section_gpu_slide(args) -> dict:
    """One --slide-tokens slide (default 100k, no subsampling) through ViT 768 x 6, RoPE and ALiBi, bf16 inference."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    from slidefm.models.attention import resolve_backend

    dev = torch.device("cuda")
    res = {"config": {"tokens": args.slide_tokens, "in_dim": 1024, "dim": 768, "depth": 6, "heads": 12,
                      "subsampling": "none", "dtype": "bf16-autocast", "mode": "inference"},
           "goal": {"wall_s": GPU_GOALS["slide_wall_s"], "peak_gpu_mem_gb": GPU_GOALS["slide_peak_gb"]}}
    for pos in args.slide_pos.split(","):
        try:
            model = build_vit(1024, 768, 6, 12, pos).to(dev).eval()
            x = make_batch([args.slide_tokens], 1024).to(dev)
            torch.cuda.empty_cache()
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                t0 = time.perf_counter()
                model(x)  # first call: kernel selection / FlexAttention compile
                _cuda_sync()
                first = time.perf_counter() - t0
                torch.cuda.reset_peak_memory_stats()
                walls = []
                for _ in range(args.gpu_steps):
                    t0 = time.perf_counter()
                    out = model(x)
                    _cuda_sync()
                    walls.append(time.perf_counter() - t0)
            wall = sorted(walls)[len(walls) // 2]
            peak = torch.cuda.max_memory_allocated() / 1e9
            assert out.tokens.shape == (args.slide_tokens, 768) and bool(torch.isfinite(out.slide).all())
            res[pos] = {"wall_s": wall, "wall_s_all": walls, "first_call_s": first, "peak_gpu_mem_gb": peak,
                        "backend": resolve_backend("auto", dev, torch.bfloat16, alibi=pos == "alibi"),
                        "flop_s": vit_flops([args.slide_tokens], 1024, 768, 6, train=False) / wall,
                        "meets_goal": wall < GPU_GOALS["slide_wall_s"] and peak < GPU_GOALS["slide_peak_gb"]}
            del model, x, out
        except Exception as e:  # one position scheme failing must not lose the other's figures
            res[pos] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        torch.cuda.empty_cache()
    return res


def section_gpu(args) -> dict:
    """All GPU parts in one process (benchmarks/gpu_check.sh runs them as separate parts instead)."""
    return {"mfu": section_gpu_mfu(args), "packed": section_gpu_packed(args), "slide": section_gpu_slide(args)}


SECTIONS = {"mfu": section_mfu, "packed": section_packed, "slide": section_slide, "moozy": section_moozy,
            "gpu": section_gpu, "gpu_mfu": section_gpu_mfu, "gpu_packed": section_gpu_packed,
            "gpu_slide": section_gpu_slide}
CHILDREN = {"slide": child_slide, "moozy": child_moozy, "ours_grid": child_ours_grid}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="mfu,packed,slide,moozy,gpu", help="comma list of " + ",".join(SECTIONS))
    p.add_argument("--out", default=str(HERE / "results" / "aggregators.json"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--mfu-tokens", type=int, default=4096)
    p.add_argument("--mfu-steps", type=int, default=3)
    p.add_argument("--packed-dim", type=int, default=128)
    p.add_argument("--packed-depth", type=int, default=2)
    p.add_argument("--packed-heads", type=int, default=2)
    p.add_argument("--packed-batch-size", type=int, default=8)
    p.add_argument("--packed-batches", type=int, default=4)
    p.add_argument("--packed-steps", type=int, default=1)
    p.add_argument("--packed-sigma", type=float, default=1.0, help="lognormal sigma of slide lengths")
    p.add_argument("--slide-tokens", type=int, default=100_000)
    p.add_argument("--slide-depth", type=int, default=6)
    p.add_argument("--slide-pos", default="rope,alibi")
    p.add_argument("--moozy-tokens", type=int, default=10_000)
    p.add_argument("--moozy-python", default="/tmp/moozy-venv/bin/python")
    p.add_argument("--moozy-repeats", type=int, default=2)
    p.add_argument("--gpu-batch", type=int, default=8, help="slides per GPU MFU step")
    p.add_argument("--gpu-tokens", type=int, default=8192, help="tokens per slide of the GPU MFU step")
    p.add_argument("--gpu-steps", type=int, default=5, help="timed repeats per GPU measurement")
    p.add_argument("--child-timeout", type=float, default=7200)
    p.add_argument("--_child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--pos", default="rope", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._child:
        print(json.dumps(CHILDREN[args._child](args)))
        return 0
    result = {"host": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor(),
                       "cores": os.cpu_count(), "threads": torch.get_num_threads()},
              "argv": sys.argv[1:]}
    out = Path(args.out)
    if out.exists():  # sections run separately accumulate in one file
        try:
            result = json.loads(out.read_text()) | {"host": result["host"]}
        except json.JSONDecodeError:
            pass
    for name in args.sections.split(","):
        t = time.perf_counter()
        prev, res = result.get(name), SECTIONS[name](args)
        if name == "slide" and isinstance(prev, dict):  # one position scheme rerun keeps the other's entry
            res |= {k: prev[k] for k in ("rope", "alibi") if k in prev and k not in res}
        res["section_wall_s"] = time.perf_counter() - t
        res["run"] = {"threads": torch.get_num_threads(), "argv": sys.argv[1:],
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        result[name] = res
        print(f"[{name}] done in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")  # after every section, atomically: long runs keep partial results
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
