"""Every test under tests/gpu/ carries the ``gpu`` marker and is skipped, with the reason, without CUDA.

CPU CI collects these files (so import errors still show) and reports them as skipped; nothing here
imports a CUDA-only package at module level. ``SLIDEFM_GPU_TESTS=require`` turns the skip into a
failure (benchmarks/gpu_check.sh on a GPU machine sets it, so a broken CUDA setup cannot pass as skips).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def cuda_unavailable_reason() -> str | None:
    """None when a CUDA device can be used, else why not."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a hard dependency
        return f"torch not importable ({e})"
    if not torch.backends.cuda.is_built():
        return f"torch {torch.__version__} was built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (tests/gpu; skipped without one)")


def pytest_collection_modifyitems(config, items):
    reason = cuda_unavailable_reason()
    require = os.environ.get("SLIDEFM_GPU_TESTS", "").lower() == "require"
    for item in items:
        if HERE not in Path(str(item.fspath)).resolve().parents:
            continue
        item.add_marker(pytest.mark.gpu)
        if reason is not None and not require:
            item.add_marker(pytest.mark.skip(reason=f"GPU test: {reason}"))


@pytest.fixture
def no_tf32():
    """TF32 off for matmuls and cuDNN during the test (plain fp32 to compare against), restored afterwards."""
    import torch

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(autouse=True)
def _cuda_or_fail():
    """With SLIDEFM_GPU_TESTS=require, a missing CUDA device fails every test instead of skipping it."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        pytest.fail(f"SLIDEFM_GPU_TESTS=require but {reason}")
    yield
