"""glibc heap settings for long CPU training runs (opt-in: ``SLIDEFM_MALLOC_TUNING=1``).

Suspected cause of CPU step time growing over long runs: tensors of a different size every step, blocks
above glibc's mmap threshold mmap'ed and unmapped every step (page faults, kernel zero-fill: system time),
and the heap top trimmed back whenever 128 KiB are free. ``configure_allocator`` can fix the mmap
threshold (``mallopt(M_MMAP_THRESHOLD)``, at most 32 MiB on 64-bit), the trim threshold, and
``MallocTrim`` can hand free memory back every N steps.

Measured (benchmarks/longrun.py, house recipe at small sizes, 1 thread, shared 2-core machine): with
glibc's defaults the CPU time per step stays flat over 300 steps (0.46-0.49 s, ~1k minor faults and
<1% system time per step), so there is nothing for these settings to fix at that size, and two of
them make it worse:

- ``M_TRIM_THRESHOLD`` set alone also switches off glibc's *dynamic* mmap threshold, leaving it at
  128 KiB: every larger block is mmap'ed again, 10-20k minor faults and 3-6% system time per step;
- ``malloc_trim(0)`` every 50 steps (with both thresholds fixed): 15-22k faults per step, +15-20% CPU.

At the house recipe's real size on TCGA-shaped slides (benchmarks/tcga_shape.py, 1,000 steps, 1 worker) RSS
grows 2.0 -> 3.6 GB with glibc's defaults; it is freed memory glibc keeps (``malloc_trim(0)`` brings it back
to ~1.0 GB), and trimming every 50 steps ends the run at 1.1 GB but still peaks at 3.5 GB between trims and
costs ~5% CPU per step, so it is not switched on there either.

What does fix the growth is another allocator: `slidefm train` runs on jemalloc when it is installed
(``slidefm.allocator``, measured there). These glibc settings stay for machines without it.

Hence: off by default. ``SLIDEFM_MALLOC_TUNING=1`` applies only a fixed 32 MiB mmap threshold (no trim
threshold, no periodic trim), which measured like the default; ``SLIDEFM_MALLOC_TRIM_THRESHOLD`` and
``SLIDEFM_MALLOC_TRIM_EVERY`` (steps) add the others for experiments on other machines and sizes (see
``benchmarks/longrun.py --modes``). Non-glibc platforms (macOS, musl) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

import pytorch_lightning as pl

log = logging.getLogger("slidefm.train")

# mallopt parameter numbers (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts (HEAP_MAX_SIZE/2 on 64-bit)
TRIM_THRESHOLD = 0  # 0: leave glibc's (dynamic) trim threshold alone, see the module docstring
TRIM_EVERY_N_STEPS = 0  # 0: no periodic malloc_trim

_state: dict = {"configured": False, "settings": {}}


def _libc():
    if not hasattr(_libc, "lib"):
        lib = None
        try:
            name = ctypes.util.find_library("c")
            cand = ctypes.CDLL(name) if name else None
            if cand is not None and hasattr(cand, "mallopt") and hasattr(cand, "malloc_trim"):
                lib = cand
        except OSError:
            lib = None
        _libc.lib = lib
    return _libc.lib


def enabled() -> bool:
    return os.environ.get("SLIDEFM_MALLOC_TUNING", "0").strip().lower() not in ("0", "false", "off", "no", "")


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    try:
        return int(v) if v not in (None, "") else default
    except ValueError:
        return default


def configure_allocator() -> dict:
    """Fix glibc's mmap and trim thresholds (once per process); returns what was set."""
    if _state["configured"]:
        return _state["settings"]
    _state["configured"] = True
    lib = _libc()
    if not enabled() or lib is None:
        _state["settings"] = {"enabled": False, "reason": "SLIDEFM_MALLOC_TUNING is not 1" if lib is not None
                              else "not glibc"}
        return _state["settings"]
    # glibc rejects an mmap threshold above HEAP_MAX_SIZE/2 (32 MiB on 64-bit) and returns 0.
    mmap = min(_env_int("SLIDEFM_MALLOC_MMAP_THRESHOLD", MMAP_THRESHOLD), 32 * 2**20)
    trim = _env_int("SLIDEFM_MALLOC_TRIM_THRESHOLD", TRIM_THRESHOLD)
    settings = {"enabled": True}
    if mmap > 0:
        settings["mmap_threshold"] = mmap if lib.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(mmap)) == 1 else None
    if trim > 0:
        settings["trim_threshold"] = trim if lib.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(trim)) == 1 else None
    settings["trim_every_n_steps"] = _env_int("SLIDEFM_MALLOC_TRIM_EVERY", TRIM_EVERY_N_STEPS)
    _state["settings"] = settings
    log.debug("allocator settings: %s", settings)
    return settings


def malloc_trim() -> bool:
    """Return free heap memory to the kernel now; True if any was released."""
    lib = _libc()
    return bool(lib.malloc_trim(ctypes.c_size_t(0))) if lib is not None else False


def describe() -> dict:
    return dict(_state["settings"]) if _state["configured"] else {"configured": False}


class MallocTrim(pl.Callback):
    """``malloc_trim(0)`` every ``every_n_steps`` training steps (and after validation)."""

    def __init__(self, every_n_steps: int = 50):
        self.every_n_steps = every_n_steps
        self.trims = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            malloc_trim()
            self.trims += 1

    def on_validation_end(self, trainer, pl_module):
        malloc_trim()


def memory_callbacks() -> list[pl.Callback]:
    """Configure the allocator for this process and return the callbacks that keep it steady."""
    s = configure_allocator()
    if not s.get("enabled"):
        return []
    every = s.get("trim_every_n_steps", TRIM_EVERY_N_STEPS)
    return [MallocTrim(every)] if every > 0 else []
