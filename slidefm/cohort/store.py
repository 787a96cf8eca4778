"""Packed store: every slide's features in a few large memory-mappable shards plus one index.

Layout (docs/cohort.md)::

    STORE/index.json          format, D, shards, per-slide table (columnar), source sizes/mtimes
    STORE/features-00000.npy  (rows, D) in the slides' stored dtype (float16 stays float16)
    STORE/grid.npy            (T, 4) int64: level-0 x, y, grid col, grid row for every patch (zeros for
                              features-only bags, whose index entry has has_positions=false)

A slide is one contiguous row range of one shard and of ``grid.npy``. Rows are in the HDF5 order,
so reading from the store returns exactly what reading the HDF5 file returns. This module reads a store
(the Cohort reads through it); :mod:`slidefm.cohort.pack` writes one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from slidefm.cohort import h5, pagecache
from slidefm.cohort.slides import (RowSelector, SlideData, SlideReader, SlideRows, feature_dtype, finish_slide,
                                   selected_rows, slide_tensors)
from slidefm.errors import SlidefmError

FORMAT = "slidefm-store/1"
INDEX = "index.json"
GRID = "grid.npy"
DEFAULT_SHARD_BYTES = 1 << 30
ADVISE_BYTES = 256 << 10  # a whole-slide read at least this large first requests all its bytes at once
RUN_GAP_BYTES = 64 << 10  # read_rows reads through gaps up to this size between wanted rows
_COLUMNS = ("slide_id", "shard", "offset", "row", "n", "step", "patch_size_level0", "origin_x", "origin_y",
            "source", "source_size", "source_mtime_ns", "has_positions", "step_source", "snapped", "collided")


def _source_stat(path: str | Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _npy_data_offset(path: Path) -> int:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            np.lib.format.read_array_header_1_0(f)
        else:
            np.lib.format.read_array_header_2_0(f)
        return f.tell()


class StoreSlideReader(SlideReader):
    """Reads slides from a packed store; picklable, files opened lazily once in each process.

    A slide is read with ``pread`` rather than through a memory map: its whole byte range is requested
    at once (``POSIX_FADV_WILLNEED``) instead of being faulted in readahead-sized pieces (a map was
    about 1.7x slower on a cold cache and no faster warm; mapped pages also cannot be evicted). Output
    tensors are written directly, in one storage per slide (:func:`slidefm.cohort.slides.slide_tensors`).
    """

    def __init__(self, path: Path, index: dict):
        self.path = Path(path)
        self.shards = [(s["file"], np.dtype(s["dtype"])) for s in index["shards"]]
        self.dim = int(index["dim"])
        t = index["slides"]
        self.pos = {sid: i for i, sid in enumerate(t["slide_id"])}
        # One tuple of plain ints per slide: a read then costs one dict and one list lookup, not
        # several numpy scalar indexings (each slower than the tuple unpacking).
        self.entries = list(zip(*(map(int, t[k]) for k in ("shard", "offset", "row", "n", "step"))))
        self.psl0 = list(t["patch_size_level0"])
        # Stores packed before features-only bags existed have no such column: every slide had coords.
        self.has_positions = [bool(v) for v in t.get("has_positions", [True] * len(t["slide_id"]))]
        self._files: tuple[list[tuple[int, int]], tuple[int, int]] | None = None  # (fd, data offset)
        self._pid = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"] = None
        state["_pid"] = None
        return state

    def __del__(self):
        self._close()

    def _close(self) -> None:
        if self._files is not None and self._pid == os.getpid():
            for fd, _ in self._files[0] + [self._files[1]]:
                os.close(fd)
        self._files = None

    def _open(self):
        if self._files is None or self._pid != os.getpid():
            self._files = None  # descriptors inherited through fork belong to the parent
            opened = []
            for f in [name for name, _ in self.shards] + [GRID]:
                p = self.path / f
                opened.append((os.open(p, os.O_RDONLY), _npy_data_offset(p)))
            self._files = (opened[:-1], opened[-1])
            self._pid = os.getpid()
        return self._files

    @staticmethod
    def _pread(fd: int, out: np.ndarray, pos: int) -> np.ndarray:
        return h5.pread_into(fd, out, pos, SlidefmError("packed store file is truncated; run `slidefm pack` again"))

    def _locate(self, slide_id: str):
        try:
            i = self.pos[slide_id]
        except KeyError:
            raise SlidefmError(f"slide {slide_id!r} is not in the packed store {self.path}") from None
        return i, self.entries[i]

    def _grid(self, gfd: int, gstart: int, row: int, n: int) -> np.ndarray:
        return self._pread(gfd, np.empty((n, 4), np.int64), gstart + row * 32)  # grid rows: 4 x int64

    @staticmethod
    def _advise_grid(gfd: int, gstart: int, row: int, n: int) -> None:
        pagecache.will_need(gfd, gstart + row * 32, n * 32)

    def _features_at(self, k: int, off: int) -> tuple[int, np.dtype, int]:
        """(descriptor of shard ``k``, its stored dtype, byte position of its row ``off``)."""
        fd, start = self._open()[0][k]
        dtype = self.shards[k][1]
        return fd, dtype, start + off * self.dim * dtype.itemsize

    def will_need(self, slide_id: str) -> None:
        """Both byte ranges of the slide (features and grid rows) requested at once, without waiting."""
        i = self.pos.get(slide_id)
        if i is None:
            return
        k, off, row, n, _ = self.entries[i]
        try:
            fd, dtype, pos = self._features_at(k, off)
            pagecache.will_need(fd, pos, n * self.dim * dtype.itemsize)
            if self.has_positions[i]:
                self._advise_grid(*self._open()[1], row, n)
        except OSError:
            pass  # the read reports it

    def read_arrays(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(features in the stored dtype, (n, 4) grid rows: x, y, col, row)."""
        _, (k, off, row, n, _) = self._locate(slide_id)
        fd, dtype, pos = self._features_at(k, off)
        feats = self._pread(fd, np.empty((n, self.dim), dtype), pos)
        return feats, self._grid(*self._open()[1], row, n)

    def read(self, slide_id: str) -> SlideData:
        # Same result as slide_data(read_arrays(...)) (tested), written straight into the output tensors.
        i, (k, off, row, n, step) = self._locate(slide_id)
        gfd, gstart = self._open()[1]
        fd, dtype, pos = self._features_at(k, off)
        has = self.has_positions[i]
        if has:
            # Cold cache: the grid rows (another file) are fetched while the features are read, so the
            # slide costs about one request's latency instead of two. Warm: a page-cache lookup. (Also when
            # the loader announced the slide already: tracking which were announced would cost as much.)
            self._advise_grid(gfd, gstart, row, n)
        feats, grid = slide_tensors(n, self.dim, feature_dtype(dtype))
        nbytes = n * self.dim * dtype.itemsize
        if nbytes >= ADVISE_BYTES:
            # Cold cache: one request for the whole slide, not the kernel's readahead windows one after another
            pagecache.will_need(fd, pos, nbytes)
        self._pread(fd, feats.numpy(), pos)  # shards hold float16 or float32: read as stored, no conversion
        g = self._grid(gfd, gstart, row, n) if has else None
        return finish_slide(slide_id, feats, grid, None if g is None else g[:, :2], None if g is None else g[:, 2:],
                            step, self.psl0[i])

    def read_rows(self, slide_id: str, select: RowSelector) -> SlideRows:
        """Positions from the grid rows, then only the selected feature rows (one pread per run of rows)."""
        i, (k, off, row, n, _) = self._locate(slide_id)
        has = self.has_positions[i]
        pos = np.ascontiguousarray(self._grid(*self._open()[1], row, n)[:, 2:]) if has else np.zeros((n, 2), np.int64)
        rows = selected_rows(select(pos))
        fd, dtype, base = self._features_at(k, off)
        row_bytes = self.dim * dtype.itemsize
        if rows is None:
            raw = self._pread(fd, np.empty((n, self.dim), dtype), base)
        else:
            # Runs of wanted rows merged across gaps of up to RUN_GAP_BYTES: one more pread (a few us warm, a
            # disk round trip cold) costs more than reading that many unwanted bytes.
            raw = h5.gather_rows(rows, max(4, RUN_GAP_BYTES // row_bytes), self.dim, dtype, lambda a, b: self._pread(
                fd, np.empty((b - a, self.dim), dtype), base + a * row_bytes))
        return SlideRows(slide_id, pos, has, rows, raw)


class PackedStore:
    """An existing packed store directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.index = json.loads((self.path / INDEX).read_text())
        except (OSError, ValueError) as e:
            raise SlidefmError(f"cannot read packed store index {self.path / INDEX}: {e}") from None
        if self.index.get("format") != FORMAT:
            raise SlidefmError(f"{self.path / INDEX}: unsupported store format {self.index.get('format')!r}")
        self.dim = int(self.index["dim"])

    @property
    def slide_ids(self) -> list[str]:
        return list(self.index["slides"]["slide_id"])

    def has_positions(self) -> list[bool]:
        """Per slide (in ``slide_ids`` order): False for features-only bags."""
        t = self.index["slides"]
        return [bool(v) for v in t.get("has_positions", [True] * len(t["slide_id"]))]

    def reader(self) -> StoreSlideReader:
        return StoreSlideReader(self.path, self.index)

    def stale_reason(self, paths: Mapping[str, str | Path], display: Callable[[Path], str]) -> str | None:
        """Why the store does not match the cohort's current slide files (slide id -> path, shown as
        ``display(path)``, the form the index records), or None if it does."""
        t = self.index["slides"]
        packed = {sid: i for i, sid in enumerate(t["slide_id"])}
        for sid, path in paths.items():
            i = packed.get(sid)
            shown = display(Path(path))
            if i is None:
                return f"slide {sid} is not in it"
            if t["source"][i] != shown:
                return f"slide {sid} now points to {shown}"
            try:
                size, mtime = _source_stat(path)
            except OSError:
                return f"{shown} no longer exists"
            if size != t["source_size"][i] or mtime != t["source_mtime_ns"][i]:
                return f"{shown} changed after packing"
        return None
