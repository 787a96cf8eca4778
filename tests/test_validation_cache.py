"""Validation cache: unchanged slide files are not read again, changed ones are; a bad cache is ignored."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pandas as pd
import pytest

from conftest import lattice_coords, write_cohort, write_slide
from slidefm.cohort import Cohort, validate_cohort
from slidefm.cohort import validate as validate_mod
from slidefm.cohort import validation_cache as vc


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "vcache"
    monkeypatch.setenv("SLIDEFM_VALIDATION_CACHE", str(d))
    return d


@pytest.fixture
def checked(monkeypatch):
    """Slide ids whose file was actually checked (read), in order."""
    seen: list[str] = []
    real = validate_mod.check_slide

    def counting(job):
        seen.append(job[0])
        return real(job)

    monkeypatch.setattr(validate_mod, "check_slide", counting)
    return seen


def backdate(path, seconds=100.0, bump_ns=0):
    """Move a file's mtime into the past (out of the racy window), optionally by a distinct amount."""
    t = time.time_ns() - int(seconds * 1e9) + bump_ns
    os.utime(path, ns=(t, t))


def make(tmp_path, **kw):
    root = write_cohort(tmp_path, **kw)
    for p in (root / "features").glob("*.h5"):
        backdate(p)
    return root


def run(root, scan_values=True):
    return validate_cohort(Cohort.open(root, store=False), scan_values=scan_values, workers=1)


def assert_same_report(a, b):
    assert [str(p) for p in a.problems] == [str(p) for p in b.problems]
    pd.testing.assert_frame_equal(a.slide_stats, b.slide_stats)


def test_unchanged_files_are_not_read_again(tmp_path, cache_dir, checked):
    root = make(tmp_path)
    first = run(root)
    assert sorted(checked) == [f"S{i:03d}" for i in range(6)]
    assert len(list(cache_dir.glob("*.json"))) == 1
    checked.clear()
    second = run(root)
    assert checked == []  # every result came from the cache
    assert_same_report(first, second)


def test_changed_file_is_rechecked_and_its_new_problem_reported(tmp_path, cache_dir, checked):
    root = make(tmp_path)
    assert run(root).ok
    checked.clear()
    # Same patch count, dim and dtype: the file keeps its size; only the mtime (and the values) change.
    victim = root / "features" / "S002.h5"
    size = victim.stat().st_size
    rng = np.random.default_rng(5)
    with __import__("h5py").File(victim, "r+") as f:
        feats = f["features"][()]
        feats[3, 0] = np.nan
        f["features"][...] = feats
    backdate(victim, seconds=50)
    assert victim.stat().st_size == size
    report = run(root)
    assert checked == ["S002"]
    assert not report.ok and any("S002" in p.where and "NaN/Inf" in p.message for p in report.errors)
    # The broken file is not cached: checked again next time; the others still come from the cache.
    checked.clear()
    run(root)
    assert checked == ["S002"]
    # Rewritten with a different patch count: size changes too.
    n = 17
    write_slide(victim, rng.standard_normal((n, 16)).astype("float16"), lattice_coords(rng, n, 256),
                attrs={"patch_size_level0": 256, "patch_size": 256})
    backdate(victim, seconds=40)
    checked.clear()
    report = run(root)
    assert checked == ["S002"] and report.ok
    assert report.slide_stats.at["S002", "n"] == n
    checked.clear()
    run(root)
    assert checked == []


@pytest.mark.parametrize("garbage", [b"", b"\x00\xff not json", b'{"format": "slidefm-validation-cache/2"',
                                     b"[1, 2, 3]", "bad-columns"])
def test_corrupt_cache_is_ignored_and_rewritten(tmp_path, cache_dir, checked, garbage):
    root = make(tmp_path)
    first = run(root)
    path = vc.cache_path(root)
    if garbage == "bad-columns":  # well-formed JSON, right format and version, ragged columns
        doc = json.loads(path.read_text())
        doc["size"] = doc["size"][:-1]
        path.write_text(json.dumps(doc))
    else:
        path.write_bytes(garbage)
    checked.clear()
    second = run(root)
    assert sorted(checked) == [f"S{i:03d}" for i in range(6)]  # nothing trusted
    assert_same_report(first, second)
    checked.clear()
    run(root)
    assert checked == []  # and the rewritten cache works


def test_cache_of_another_version_or_cohort_is_not_used(tmp_path, cache_dir, checked, monkeypatch):
    root = make(tmp_path)
    run(root)
    monkeypatch.setattr(vc, "_version", "some-older-validator")
    checked.clear()
    run(root)
    assert len(checked) == 6
    # A cache file copied from another cohort path (same relative file names) is refused.
    other = make(tmp_path, name="other")
    vc.cache_path(other).write_bytes(vc.cache_path(root).read_bytes())
    checked.clear()
    run(other)
    assert len(checked) == 6


def test_quick_result_does_not_serve_a_full_check(tmp_path, cache_dir, checked):
    root = make(tmp_path)
    run(root, scan_values=False)
    checked.clear()
    run(root, scan_values=True)  # the NaN scan never ran: everything is read again
    assert len(checked) == 6
    checked.clear()
    run(root, scan_values=False)  # a full result serves a quick check
    assert checked == []


def test_fresh_files_and_warnings(tmp_path, cache_dir, checked):
    root = write_cohort(tmp_path)  # files written just now: inside the racy window
    run(root)
    checked.clear()
    run(root)
    assert len(checked) == 6  # a same-size rewrite within the timestamp tick would be invisible: not cached
    # A slide with a warning (no geometry attributes) is cached together with its warning.
    for p in (root / "features").glob("*.h5"):
        backdate(p)
    rng = np.random.default_rng(1)
    victim = root / "features" / "S001.h5"
    write_slide(victim, rng.standard_normal((20, 16)).astype("float16"), lattice_coords(rng, 20, 256))
    backdate(victim, seconds=30)
    first = run(root)
    warned = [str(p) for p in first.warnings if "S001" in p.where]
    assert warned
    checked.clear()
    second = run(root)
    assert checked == []
    assert [str(p) for p in second.warnings if "S001" in p.where] == warned
    assert_same_report(first, second)


def test_removed_slide_file_is_reported_and_listing_changes_prune(tmp_path, cache_dir, checked):
    root = make(tmp_path)
    run(root)
    (root / "features" / "S004.h5").unlink()
    checked.clear()
    report = run(root)
    assert checked == ["S004"]
    assert any("S004" in p.where for p in report.errors)
    entries = vc.read_entries(vc.cache_path(root), vc.validator_version(), str(root.resolve()))
    assert sorted(entries) == sorted(f"features/S{i:03d}.h5" for i in range(6) if i != 4)


def test_disabled_by_environment(tmp_path, monkeypatch, checked):
    monkeypatch.setenv("SLIDEFM_VALIDATION_CACHE", "0")
    monkeypatch.setenv("SLIDEFM_CACHE", str(tmp_path / "home-cache"))
    root = make(tmp_path)
    run(root)
    checked.clear()
    run(root)
    assert len(checked) == 6
    assert not (tmp_path / "home-cache").exists()
    assert not (root / ".slidefm").exists()  # nothing is ever written into the cohort


def test_unwritable_cache_does_not_fail_validation(tmp_path, monkeypatch, checked):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    monkeypatch.setenv("SLIDEFM_VALIDATION_CACHE", str(blocker / "sub"))
    root = make(tmp_path)
    assert run(root).ok
    assert len(checked) == 6


def test_hundred_thousand_entries_load_fast(tmp_path):
    n = 100_000
    entries = {f"features/slide-{i:06d}.h5": (40_000 + i, 1_700_000_000_000_000_000 + i, True,
                                             [32 + i % 32, 32, "float16", 256, 20.0, True, "h5", 256, "attrs",
                                              8, 8, 0.5, 0.9, 0, 0], [["rel", ", x", None, "m", "warning"]] if i % 1000 == 0 else [])
               for i in range(n)}
    path = tmp_path / "big.json"
    vc.write_entries(path, "v", entries, "/cohort")
    t = time.perf_counter()
    back = vc.read_entries(path, "v", "/cohort")
    elapsed = time.perf_counter() - t
    assert len(back) == n
    for k in ("features/slide-000007.h5", "features/slide-002000.h5"):
        a, b = back[k], entries[k]
        assert a[:3] == b[:3] and list(a[3]) == b[3] and a[4] == b[4]
    assert elapsed < 1.0, f"loading {n} entries took {elapsed:.2f} s"


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.json"
    vc.write_entries(path, "v", {"a": (1, 2, True, (1,), [])})
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(vc.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        vc.write_entries(path, "v", {"b": (3, 4, True, (1,), [])})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]  # no temp file left behind
