"""``slidefm pack``: validate a cohort, then write its packed store (format in :mod:`slidefm.cohort.store`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from slidefm.cohort import h5
from slidefm.cohort.reader import Cohort
from slidefm.cohort.slides import slide_grid
from slidefm.cohort.store import _COLUMNS, DEFAULT_SHARD_BYTES, FORMAT, GRID, INDEX, _source_stat
from slidefm.cohort.validate import validate_cohort
from slidefm.errors import CohortError, Problem
from slidefm.grid import GridError
from slidefm.io_utils import atomic_path


def _plan(stats, order: list[str], shard_bytes: int) -> tuple[list[tuple[int, int]], list[list]]:
    """(shard, offset) per slide; a shard holds one dtype and at most ``shard_bytes`` (or one slide)."""
    plan: list[tuple[int, int]] = []
    shards: list[list] = []  # [dtype, rows]
    for sid in order:
        n, dim, dtype = int(stats.at[sid, "n"]), int(stats.at[sid, "dim"]), stats.at[sid, "dtype"]
        row_bytes = dim * np.dtype(dtype).itemsize
        if not shards or shards[-1][0] != dtype or (shards[-1][1] and (shards[-1][1] + n) * row_bytes > shard_bytes):
            shards.append([dtype, 0])
        plan.append((len(shards) - 1, shards[-1][1]))
        shards[-1][1] += n
    return plan, shards


def pack_cohort(cohort: Cohort, out: str | Path | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                workers: int | None = None, progress: Callable[[int, int], None] | None = None) -> Path:
    """Validate the cohort, then write its packed store atomically; returns the store path.

    Feature values are checked for NaN/Inf while they are copied (one read of the data); a bad
    slide aborts the pack and the temporary directory is removed, so no partial store appears.
    """
    out = Path(out) if out is not None else cohort.layout.files["store"]
    report = validate_cohort(cohort, scan_values=False, workers=workers)
    if report.errors:
        raise CohortError(report.errors)
    order = list(cohort.slides.index)
    stats = report.slide_stats
    dim = int(stats["dim"].iloc[0])
    plan, shard_meta = _plan(stats, order, shard_bytes)
    total = int(stats["n"].sum())
    cols: dict[str, list] = {k: [] for k in _COLUMNS}
    with atomic_path(out, is_dir=True) as tmp:
        grid = np.lib.format.open_memmap(tmp / GRID, mode="w+", dtype=np.int64, shape=(total, 4))
        files = [f"features-{k:05d}.npy" for k in range(len(shard_meta))]
        current, mm = -1, None
        row = 0
        for k, (sid, (shard, offset)) in enumerate(zip(order, plan)):
            if shard != current:
                if mm is not None:
                    mm.flush()
                    del mm
                dtype, rows = shard_meta[shard]
                mm = np.lib.format.open_memmap(tmp / files[shard], mode="w+", dtype=np.dtype(dtype), shape=(rows, dim))
                current = shard
            path = cohort.slide_path(sid)
            size, mtime = _source_stat(path)  # taken before reading: a file changed mid-pack reads as stale
            n, g, psl0 = _copy_slide(sid, path, cohort, mm, offset, grid, row)
            geo = (g.step, g.origin[0], g.origin[1]) if g is not None else (0, 0, 0)
            for key, v in zip(_COLUMNS, (sid, shard, offset, row, n, geo[0], psl0, geo[1], geo[2],
                                         cohort.display(path), size, mtime, g is not None,
                                         g.source if g is not None else None, g.snapped if g is not None else 0,
                                         g.collided if g is not None else 0)):
                cols[key].append(v)
            row += n
            if progress is not None:
                progress(k + 1, len(order))
        if mm is not None:
            mm.flush()
            del mm
        grid.flush()
        del grid
        index = {
            "format": FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "cohort": str(cohort.root),
            "dim": dim,
            "total_patches": total,
            "shards": [{"file": f, "dtype": d, "rows": r} for f, (d, r) in zip(files, shard_meta)],
            "grid": GRID,
            "slides": cols,
        }
        (tmp / INDEX).write_text(json.dumps(index))
    return out


def _copy_slide(sid: str, path: Path, cohort: Cohort, mm: np.ndarray, offset: int, grid: np.ndarray,
                row: int):
    """Copy one slide's features into the shard and its grid rows; returns (n, Grid or None, patch_size_level0)."""
    where = f"slide {sid}"

    def fail(msg: str) -> CohortError:
        return CohortError([Problem(cohort.display(path), where, msg)])

    try:
        with h5.SlideSource(path) as src:
            if src.header is None:
                raise fail("; ".join(src.problems))
            header = src.header
            coords = src.coords()
            g = None if coords is None else slide_grid(coords, header)
            for start, chunk in src.chunks(8192):
                bad = h5.nonfinite_rows(chunk)
                if len(bad):
                    raise fail(f"NaN/Inf features at patch row {start + int(bad[0])}")
                mm[offset + start:offset + start + len(chunk)] = chunk
    except (h5.SlideFileError, GridError, OSError) as e:
        raise fail(str(e)) from None
    n = header.n
    if g is None:
        grid[row:row + n] = 0  # features-only bag: no positions (has_positions=False in the index)
    else:
        grid[row:row + n, :2] = coords
        grid[row:row + n, 2:] = g.positions
    return n, g, header.patch_size_level0
