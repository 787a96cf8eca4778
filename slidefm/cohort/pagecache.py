"""Page-cache hints: ask the kernel to fetch byte ranges of slide files before they are read.

``posix_fadvise(WILLNEED)`` starts reads without waiting for them, so a cold slide announced early is in
memory (or on its way) when it is read. Linux serves one call only up to the device's request limit,
``max(read_ahead_kb, max_sectors_kb)`` (128 KiB to a few MiB; 8 MiB on the machine where this was
measured), and silently drops the rest of the range: one call for a 20 MB TCGA-sized slide fetched its
first 8 MiB, and on a stock 128 KiB read-ahead far less. So a range is requested in pieces of that limit,
read from sysfs once per device (smaller pieces would split the disk's requests for no gain).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
from pathlib import Path
from typing import Iterable

import numpy as np

MIN_PIECE = 128 << 10  # the kernel's default read_ahead_kb: no device serves less unless an admin lowered it


@functools.lru_cache(maxsize=None)
def request_limit(dev: int) -> int:
    """Bytes one WILLNEED call fetches on the filesystem of device ``dev`` (a ``st_dev``): the larger of the
    disk's ``read_ahead_kb`` and ``max_sectors_kb``. Network and other filesystems without a block device
    give their read-ahead size where sysfs has it; at least :data:`MIN_PIECE`."""
    name = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        disk = Path("/sys/dev/block", name).resolve(strict=True)
        if (disk / "partition").exists():
            disk = disk.parent  # a partition's limits are its disk's
        kb = max(int((disk / "queue" / q).read_text()) for q in ("read_ahead_kb", "max_sectors_kb"))
    except (OSError, ValueError):
        try:
            kb = int(Path("/sys/class/bdi", name, "read_ahead_kb").read_text())  # NFS and the like
        except (OSError, ValueError):
            kb = 0
    return max(kb << 10, MIN_PIECE)


def will_need(fd: int, offset: int, length: int) -> None:
    """Request ``length`` bytes of ``fd`` from ``offset`` into the page cache without waiting for them.

    ``length`` 0 means to the end of the file. Raises ``OSError`` as ``posix_fadvise`` does; callers that only
    hint catch it."""
    st = os.fstat(fd)
    end = st.st_size if length == 0 else offset + length
    step = request_limit(st.st_dev)
    for pos in range(offset, end, step):
        os.posix_fadvise(fd, pos, min(step, end - pos), os.POSIX_FADV_WILLNEED)


def will_need_file(path: str | Path) -> None:
    """:func:`will_need` for a whole file (per-slide files: the file is the slide); errors ignored."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        will_need(fd, 0, 0)
    except OSError:
        pass
    finally:
        os.close(fd)


def evict(paths: Iterable[str | Path]) -> None:
    """Drop the files' pages from the page cache (``POSIX_FADV_DONTNEED``; no root needed, other files'
    pages stay): a cold read of them then comes from the disk. Dirty pages are written first, since
    DONTNEED skips them."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_share(paths: Iterable[str | Path]) -> float:
    """Share of the files' pages in the page cache (``mincore`` on a mapping that is never touched, so
    asking fetches nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = os.sysconf("SC_PAGE_SIZE")
    resident = total = 0
    for p in paths:
        size = os.stat(p).st_size
        if not size:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap of {p} failed")
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            try:
                if libc.mincore(addr, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore of {p} failed")
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
        resident += int(np.count_nonzero(np.frombuffer(vec, np.uint8) & 1))
        total += pages
    return resident / max(total, 1)
