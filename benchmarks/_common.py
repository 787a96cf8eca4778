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
