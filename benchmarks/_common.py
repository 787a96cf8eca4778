"""Helpers the benchmark scripts share (benchmarks/ is on sys.path when a script runs: ``from _common import ...``)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_atomic(path: Path, doc: dict, default=None) -> None:
    """``doc`` as indented JSON at ``path`` via a temp file + rename (a killed run never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2, default=default)
    os.replace(tmp, path)


def run_child(cmd: list[str], env: dict, timeout: float) -> dict:
    """A script's own ``--_child`` process, run from the repository root: the JSON on its last stdout line,
    or ``{"error": ...}`` (the output's tail when it exits non-zero, or the timeout)."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout)[-3000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def rss_now_mb() -> float | None:
    """Resident set size of this process now, MB (ru_maxrss is only the peak)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def window_stats(rows: list[dict], window: int) -> list[dict]:
    """Per ``window`` steps: mean step time, share of CPU time in the kernel, minor faults per step."""
    out = []
    for start in range(0, len(rows), window):
        w = rows[start:start + window]
        if not w:
            break
        wall = sum(r["wall_s"] for r in w)
        user = sum(r["user_s"] for r in w)
        sys_ = sum(r["sys_s"] for r in w)
        out.append({"steps": [w[0]["step"], w[-1]["step"]], "mean_step_s": wall / len(w),
                    "median_step_s": sorted(r["wall_s"] for r in w)[len(w) // 2],
                    "mean_cpu_s": (user + sys_) / len(w),  # robust to other processes sharing the cores
                    "sys_share": sys_ / (user + sys_) if user + sys_ > 0 else None,
                    "minflt_per_step": sum(r["minflt"] for r in w) / len(w),
                    "rss_mb_end": w[-1]["rss_mb"], "rss_now_mb_end": w[-1].get("rss_now_mb")})
    return out


def growth(curve: list[dict], skip_first: bool = True) -> float | None:
    """Last window's mean step time over the first steady window's (window 1 when there are >2: warm-up)."""
    if len(curve) < 2:
        return None
    first = curve[1] if skip_first and len(curve) > 2 else curve[0]
    return curve[-1]["mean_step_s"] / first["mean_step_s"]


def flatness(curve: list[dict], key: str, skip: int = 1) -> float | None:
    """max/min - 1 of ``key`` over the curve's windows from index ``skip`` on (window 0 holds warm-up)."""
    vals = [w[key] for w in curve[skip:] if w.get(key)]
    if len(vals) < 2:
        return None
    return max(vals) / min(vals) - 1
