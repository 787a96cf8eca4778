"""The malloc ``slidefm train`` runs on, on Linux: jemalloc when it is installed, else glibc's with two settings.

With glibc's malloc a long CPU run slows down step by step: tensors of a different size every step fragment
the heap and freed pages go back to the kernel and are faulted in again. Measured with
``benchmarks/tcga_shape.py`` (house recipe, TCGA-shaped cohort, 1 worker, 1 torch thread, 1,000 steps, on a
quiet 2-core machine), 50-step windows from step 101:

- glibc: 0.73 -> 0.88 s/step (+20%), minor faults 6k -> 22k per step, RSS 2.4 -> 3.5 GB;
- jemalloc, default decay: flat at ~1.0 s/step, but 157k faults and 25% system time per step (it hands
  freed pages back at once);
- jemalloc, no decay (``MALLOC_CONF`` below): 0.72-0.76 s/step, ~600 faults per step, RSS 1.5-1.9 GB;
- glibc with ``GLIBC_TUNABLES`` below (no mmap'd chunks, no trimming: every freed byte stays in the heap for
  reuse): 0.70-0.77 s/step (max/min-1 0.099), 26-2,000 faults per step, RSS 2.6 -> 3.9 GB; the same session's
  untuned glibc: 0.71 -> 0.79 s/step by step 351 (0.116), 300-42k faults per step, peak RSS 4.4 GB.

An allocator, and glibc's tunables, must be in place before the interpreter allocates, so the command
re-executes itself (same PID, same arguments) with ``LD_PRELOAD`` or ``GLIBC_TUNABLES`` set.
``SLIDEFM_ALLOCATOR`` chooses: ``auto`` (default: jemalloc when installed, else tuned glibc), ``jemalloc`` (an
error when it is missing), ``glibc`` (tuned glibc) or ``system`` (as the process started). A ``MALLOC_CONF`` or
``GLIBC_TUNABLES`` the user set is kept.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Callable, Mapping

from slidefm.errors import SlidefmError

ENV = "SLIDEFM_ALLOCATOR"
CHOICES = ("auto", "jemalloc", "glibc", "system")
# Keep freed pages for reuse (no time-based purging): the steady state of a training step reuses them.
MALLOC_CONF = "background_thread:true,dirty_decay_ms:-1,muzzy_decay_ms:-1"
# glibc: large tensors from the heap instead of fresh mmaps (unmapped on free, faulted in again next step), and
# the heap's free top kept instead of trimmed (16 GiB: never, in practice).
GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"
_GUARD = "SLIDEFM_ALLOCATOR_EXECED"  # set in the re-executed process: never loop


def find_jemalloc() -> str | None:
    """The jemalloc shared library the dynamic linker would load (``ldconfig``'s name), or None."""
    return ctypes.util.find_library("jemalloc")


def preload_env(environ: Mapping[str, str], platform: str = sys.platform,
                find: Callable[[], str | None] = find_jemalloc) -> dict[str, str] | None:
    """The environment to re-execute ``slidefm train`` with, or None to run as is."""
    mode = environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in CHOICES:
        raise SlidefmError(f"{ENV}={environ[ENV]!r}: must be one of {', '.join(CHOICES)}")
    if mode == "system" or environ.get(_GUARD) or "jemalloc" in environ.get("LD_PRELOAD", ""):
        return None
    if not platform.startswith("linux"):
        return None
    lib = find() if mode != "glibc" else None
    if lib is None:
        if mode == "jemalloc":
            raise SlidefmError(f"{ENV}=jemalloc, but no jemalloc library is installed "
                               "(Debian/Ubuntu: apt install libjemalloc2; conda: conda install jemalloc)")
        if environ.get("GLIBC_TUNABLES"):
            return None  # the user's own glibc settings
        env = dict(environ)
        env["GLIBC_TUNABLES"] = GLIBC_TUNABLES
    else:
        env = dict(environ)
        env["LD_PRELOAD"] = ":".join(p for p in (lib, environ.get("LD_PRELOAD", "")) if p)
        env.setdefault("MALLOC_CONF", MALLOC_CONF)
    env[_GUARD] = "1"
    return env


def reexec_with_allocator() -> None:
    """Replace this process by the same command under jemalloc or tuned glibc when :func:`preload_env` says so."""
    env = preload_env(os.environ)
    if env is None:
        return
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


def active() -> str:
    """The allocator this process runs on: ``jemalloc`` when it is mapped in, ``glibc`` when glibc's malloc
    started with this module's tunables, else ``system``."""
    try:
        with open("/proc/self/maps") as f:
            if "jemalloc" in f.read():
                return "jemalloc"
    except OSError:
        pass
    return "glibc" if os.environ.get("GLIBC_TUNABLES") == GLIBC_TUNABLES else "system"
