"""Per-slide validation results cached by file fingerprint, so a restart re-checks only what changed.

``check_slides`` checks every slide file (open, header, coordinates, optionally a NaN/Inf scan). On a
100k-slide cohort that is minutes on every `train` restart and every `check`. This cache keeps each
slide's result under its fingerprint (path relative to the cohort, size, mtime_ns) and the validator
version (a hash of the checking code), and hands back the stored result while the fingerprint is
unchanged:

    cache = SlideCheckCache.load(cohort, jobs, scan_values)   # stats every file, splits the jobs
    jobs = cache.to_check                                      # new / changed / never cached
    results = [check_slide(j) for j in jobs]                   # as before
    jobs, results = cache.complete(results)                    # all jobs in order; saves the cache

Where: ``$SLIDEFM_CACHE/validation/<hash of the cohort path>.json`` (default ``~/.cache/slidefm``, the
cache the frozen report embeddings use), never inside the cohort: cohorts are often shared read-only
data, a re-`pack` replaces the default store directory whole (a cache inside it would be dropped on
every pack), and the cohort directory keeps only what the user put there plus the store.
``SLIDEFM_VALIDATION_CACHE=DIR`` puts the files in DIR instead. The file is columnar JSON (100k entries
load in a fraction of a second), written atomically (temp file + rename). A missing, corrupt, foreign
or outdated cache is ignored (everything is checked) and rewritten. Files unused for 60 days are
removed when another cache is written.

What is cached: results without errors (clean slides and slides with warnings only). Files with errors
are checked again every time (there are few, the user is fixing them, and a read error may be transient).
A result from a full check (``scan_values=True``) also serves a quick one; a quick result does not
serve a full check. ``SLIDEFM_VALIDATION_CACHE=0`` turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from slidefm.errors import Problem

log = logging.getLogger("slidefm.cohort")

FORMAT = "slidefm-validation-cache/2"
FILENAME = "validation.json"
_FIELDS = ("size", "mtime_ns", "scanned", "stats", "problems")
RACY_NS = 2_000_000_000  # FAT/SMB timestamps are 2 s coarse; ext4/xfs a clock tick
PRUNE_AFTER_S = 60 * 86400
_version: str | None = None


def enabled() -> bool:
    return os.environ.get("SLIDEFM_VALIDATION_CACHE", "1").strip().lower() not in ("0", "false", "off", "no", "")


def validator_version() -> str:
    """Hash of the code that produces a slide's result: any change to it invalidates every entry."""
    global _version
    if _version is None:
        import slidefm
        from slidefm import grid
        from slidefm.cohort import h5

        h = hashlib.sha256(f"{FORMAT}\0{getattr(slidefm, '__version__', '')}".encode())
        # validate.py is hashed as a file, not imported: it imports this module (no loop).
        for path in (Path(__file__).with_name("validate.py"), Path(h5.__file__), Path(grid.__file__)):
            try:
                h.update(path.read_bytes())
            except OSError:
                h.update(path.stem.encode())
        _version = h.hexdigest()[:20]
    return _version


def cache_dir() -> Path:
    """$SLIDEFM_VALIDATION_CACHE when it names a directory, else $SLIDEFM_CACHE/validation (~/.cache/slidefm)."""
    env = os.environ.get("SLIDEFM_VALIDATION_CACHE", "").strip()
    if env and env.lower() not in ("1", "true", "on", "yes"):
        return Path(env).expanduser()
    base = os.environ.get("SLIDEFM_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "slidefm")
    return Path(base).expanduser() / "validation"


def cache_path(root: str | Path) -> Path:
    """The cache file of the cohort at ``root`` (one per resolved cohort path)."""
    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:20]
    return cache_dir() / f"{key}.json"


def _plain(v: Any) -> Any:
    """JSON-safe scalar (numpy scalars -> Python); raises TypeError for anything else."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    item = getattr(v, "item", None)
    if callable(item):
        v = item()
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    raise TypeError(f"cannot cache a {type(v).__name__}")


def _fingerprint(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _key(root: Path, path: str) -> str:
    """Path relative to the cohort root when inside it (the cache survives moving the cohort)."""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def read_entries(path: Path, version: str, root: str | None = None) -> dict[str, tuple]:
    """{key: (size, mtime_ns, scanned, stats tuple, problems)} or {} when the file is absent, corrupt or stale."""
    try:
        doc = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable validation cache %s (%s); checking every slide", path, e)
        return {}
    try:
        if doc.get("format") != FORMAT or doc.get("version") != version or (root is not None and doc.get("root") != root):
            return {}
        keys, size, mtime, scanned = doc["key"], doc["size"], doc["mtime_ns"], doc["scanned"]
        stats, problems = doc["stats"], doc["problems"]
        n = len(keys)
        if any(not isinstance(c, list) or len(c) != n for c in (keys, size, mtime, scanned, *stats)):
            raise ValueError("columns of different lengths")
        rows = list(zip(*stats)) if stats else [()] * n
        none: list = []
        out = {k: (a, b, c, r, none) for k, a, b, c, r in zip(keys, size, mtime, scanned, rows)}
        for i, ps in problems.items():  # sparse: most slides have no problem at all
            k = keys[int(i)]
            out[k] = out[k][:4] + (ps,)
        return out
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as e:
        log.warning("ignoring malformed validation cache %s (%s); checking every slide", path, e)
        return {}


def write_entries(path: Path, version: str, entries: dict[str, tuple], root: str | None = None) -> None:
    """Columnar JSON (flat lists parse ~5x faster than one small list per slide), written atomically:
    a temp file in the same directory renamed over the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(entries)
    vals = [entries[k] for k in keys]
    width = {len(v[3]) for v in vals}
    if len(width) > 1:
        raise ValueError(f"stats rows of different lengths {sorted(width)}")
    doc = {"format": FORMAT, "version": version, "root": root, "key": keys,
           "size": [v[0] for v in vals], "mtime_ns": [v[1] for v in vals], "scanned": [bool(v[2]) for v in vals],
           "stats": [list(c) for c in zip(*(v[3] for v in vals))] if vals and width != {0} else [],
           "problems": {str(i): v[4] for i, v in enumerate(vals) if v[4]}}
    data = json.dumps(doc, separators=(",", ":"))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def prune(directory: Path, keep: Path, older_than_s: float = PRUNE_AFTER_S) -> None:
    """Remove cache files not used (loaded or written) for ``older_than_s`` seconds: cohorts that are gone."""
    limit = time.time() - older_than_s
    try:
        for p in directory.glob("*.json"):
            try:
                if p != keep and p.stat().st_mtime < limit:
                    p.unlink()
            except OSError:
                pass
    except OSError:
        pass


class SlideCheckCache:
    """Splits ``check_slides`` jobs into cached results and files to check; merges and saves afterwards.

    A job is ``(slide_id, path, display, where, scan_values, chunk_rows)`` as built by
    ``slidefm.cohort.validate._slide_jobs``; a result is ``(stats row or None, problems)``.
    """

    def __init__(self, root: Path, jobs: list[tuple], scan_values: bool, path: Path | None,
                 entries: dict[str, tuple]):
        self.root, self.path, self.scan_values = root, path, scan_values
        self.started_ns = time.time_ns()
        self.jobs = jobs
        self.entries = entries
        self.hits: dict[int, tuple] = {}
        self.to_check: list[tuple] = []
        self._fresh: list[tuple[int, tuple[int, int] | None]] = []  # (job index, fingerprint before checking)
        loaded = len(entries)
        wanted: set[str] = set()
        for i, job in enumerate(jobs):
            key = _key(root, job[1])
            wanted.add(key)
            fp = _fingerprint(job[1])  # taken before the check: a file changed mid-check reads as changed next time
            e = entries.get(key) if fp is not None else None
            if e is not None and (e[0], e[1]) == fp and (e[2] or not scan_values):
                hit = self._result(job, e)
                if hit is not None:
                    self.hits[i] = hit
                    continue
            self.to_check.append(job)
            self._fresh.append((i, fp))
        stale = [k for k in entries if k not in wanted]
        for k in stale:  # slides no longer listed
            del entries[k]
        self._dirty = bool(stale) or len(entries) != loaded

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def load(cls, cohort, jobs: list[tuple], scan_values: bool) -> "SlideCheckCache":
        root = Path(cohort.root).resolve()
        if not enabled():
            return cls(root, jobs, scan_values, None, {})
        path = cache_path(root)
        entries = read_entries(path, validator_version(), str(root))
        if entries:
            try:
                os.utime(path)  # "used": pruning goes by mtime
            except OSError:
                pass
        return cls(root, jobs, scan_values, path, entries)

    # ---- one entry <-> one result --------------------------------------------------------------
    @staticmethod
    def _result(job: tuple, e: tuple) -> tuple | None:
        sid, _, display, where = job[:4]
        try:
            stats = None if e[3] is None else (sid, *e[3])
            problems = [Problem(display if f is None else f, where + w if rel else w, msg, level)
                        for rel, w, f, msg, level in e[4]]
        except (TypeError, ValueError):
            return None
        return stats, problems

    @staticmethod
    def _entry(job: tuple, fp: tuple[int, int], result: tuple) -> tuple | None:
        stats, problems = result
        if stats is None or any(p.level == "error" for p in problems):
            return None
        display, where = job[2], job[3]
        try:
            row = [_plain(v) for v in stats[1:]]
            probs = []
            for p in problems:
                rel = p.where.startswith(where)
                probs.append([rel, p.where[len(where):] if rel else p.where, None if p.file == display else p.file,
                              p.message, p.level])
        except TypeError:
            return None
        return (fp[0], fp[1], bool(job[4]), tuple(row), probs)

    # ---- after checking ------------------------------------------------------------------------
    def complete(self, results: list[tuple]) -> tuple[list[tuple], list[tuple]]:
        """(all jobs, all results in job order) from the fresh ``results`` of ``to_check``; saves the cache."""
        if len(results) != len(self._fresh):
            raise ValueError(f"expected {len(self._fresh)} results, got {len(results)}")
        merged: list[tuple | None] = [None] * len(self.jobs)
        for i, r in self.hits.items():
            merged[i] = r
        for (i, fp), r in zip(self._fresh, results):
            merged[i] = r
            key = _key(self.root, self.jobs[i][1])
            racy = fp is None or fp[1] > self.started_ns - RACY_NS
            e = None if racy else self._entry(self.jobs[i], fp, r)
            old = self.entries.get(key)
            if e is not None:
                if old is not None and old[:2] == e[:2] and old[2] and not e[2]:
                    continue  # keep the full-scan result of the same file over a quick one
                self.entries[key] = e
                self._dirty = True
            elif old is not None:
                del self.entries[key]
                self._dirty = True
        self.save()
        return self.jobs, merged  # type: ignore[return-value]

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        try:
            write_entries(self.path, validator_version(), self.entries, str(self.root))
            self._dirty = False
            prune(self.path.parent, self.path)
        except (OSError, ValueError) as e:  # a read-only or full disk must not fail validation
            log.warning("could not write the validation cache %s (%s)", self.path, e)

    @property
    def stats(self) -> dict[str, int]:
        return {"cached": len(self.hits), "checked": len(self.to_check)}
