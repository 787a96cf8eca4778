"""Packed store: identical reads, float16 kept, staleness, atomic writes, worker-safe reader."""

import json
import os
import pickle

import numpy as np
import pytest
import torch

from conftest import write_cohort, write_slide
from slidefm.cli import main
from slidefm.cohort import Cohort, PackedStore, pack_cohort
from slidefm.cohort import pack as pack_mod
from slidefm.errors import CohortError, SlidefmError


def assert_same(a, b, dtype=None):
    assert a.slide_id == b.slide_id
    assert torch.equal(a.features, b.features) and a.features.dtype == b.features.dtype
    assert a.features.dtype in (torch.float16, torch.float32) and dtype in (None, a.features.dtype)
    assert torch.equal(a.coords, b.coords) and torch.equal(a.positions, b.positions)
    assert (a.step, a.patch_size_level0) == (b.step, b.patch_size_level0)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_store_equals_hdf5(tmp_path, capsys, dtype):
    root = write_cohort(tmp_path, n_slides=7, dtype=dtype, batch_dim=dtype == "float32")
    assert main(["pack", str(root), "--shard-size-mb", "0"]) == 0  # 0 MiB: one slide per shard
    assert "packed 7 slides" in capsys.readouterr().out
    via_h5, via_store = Cohort.open(root, store=False), Cohort.open(root)
    assert via_store.store is not None and via_h5.store is None
    for sid in via_h5.slide_ids:
        assert_same(via_h5.read_slide(sid), via_store.read_slide(sid), getattr(torch, dtype))  # as stored
    store = via_store.store
    assert len(store.index["shards"]) == 7 and store.dim == via_h5.feature_dim == 16
    shard = np.load(store.path / "features-00000.npy", mmap_mode="r")
    assert shard.dtype == np.dtype(dtype)  # source dtype kept on disk
    assert via_store.feature_dtype == via_h5.feature_dtype == np.dtype(dtype)


def test_shards_split_by_size_and_dtype(tmp_path):
    root = write_cohort(tmp_path, n_slides=6, n_range=(30, 30), dim=16)  # 30 * 16 * 2 B = 960 B per slide
    rng = np.random.default_rng(0)
    write_slide(root / "features" / "S005.h5", rng.random((30, 16)).astype(np.float32),
                np.stack([np.arange(30), np.zeros(30, int)], 1) * 256, {"patch_size_level0": 256})
    out = pack_cohort(Cohort.open(root, store=False), tmp_path / "st", shard_bytes=2000)
    index = PackedStore(out).index
    assert [(s["dtype"], s["rows"]) for s in index["shards"]] == [("float16", 60), ("float16", 60),
                                                                 ("float16", 30), ("float32", 30)]
    c = Cohort.open(root, store=out)
    assert_same(c.read_slide("S005"), Cohort.open(root, store=False).read_slide("S005"))
    assert c.feature_dtype == np.float32  # the widest shard: what a buffer for any slide must hold


def test_stale_store_is_ignored_with_warning(cohort_dir):
    pack_cohort(Cohort.open(cohort_dir, store=False))
    assert Cohort.open(cohort_dir).store is not None
    path = cohort_dir / "features" / "S002.h5"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.warns(UserWarning, match=r"out of date \(features/S002.h5 changed after packing\)"):
        c = Cohort.open(cohort_dir)
    assert c.store is None
    with pytest.raises(SlidefmError, match="out of date"):
        Cohort.open(cohort_dir, store=cohort_dir / ".slidefm" / "store")


def test_store_missing_a_slide_is_stale(cohort_dir):
    pack_cohort(Cohort.open(cohort_dir, store=False))
    with open(cohort_dir / "slides.csv", "a") as f:
        f.write("S006,P003,A,0\n")
    with pytest.warns(UserWarning, match="slide S006 is not in it"):
        assert Cohort.open(cohort_dir).store is None


def test_failed_pack_leaves_nothing(cohort_dir, monkeypatch):
    store = cohort_dir / ".slidefm" / "store"
    calls = []
    real = pack_mod._copy_slide

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise OSError("disk full")
        return real(*args, **kw)

    monkeypatch.setattr(pack_mod, "_copy_slide", flaky)
    with pytest.raises(OSError, match="disk full"):
        pack_cohort(Cohort.open(cohort_dir, store=False))
    assert not store.exists()
    assert list(store.parent.iterdir()) == []  # no temp directory left behind either


def test_failed_repack_keeps_old_store(cohort_dir):
    store = pack_cohort(Cohort.open(cohort_dir, store=False))
    before = (store / "index.json").read_text()
    feats = np.random.default_rng(0).standard_normal((10, 16)).astype(np.float32)
    feats[4, 4] = np.nan
    write_slide(cohort_dir / "features" / "S003.h5", feats,
                np.stack([np.arange(10), np.zeros(10, int)], 1) * 256, {"patch_size_level0": 256})
    with pytest.raises(CohortError, match=r"features/S003.h5 \[slide S003\]: NaN/Inf features at patch row 4"):
        pack_cohort(Cohort.open(cohort_dir, store=False))
    assert (store / "index.json").read_text() == before
    assert sorted(p.name for p in store.parent.iterdir()) == ["store"]


def test_pack_validates_first(cohort_dir, capsys):
    (cohort_dir / "features" / "S001.h5").unlink()
    assert main(["pack", str(cohort_dir)]) == 2
    err = capsys.readouterr().err
    assert "features/S001.h5 [slide S001, slides.csv line 3]: file not found" in err
    assert not (cohort_dir / ".slidefm" / "store").exists()


def test_index_records_sources(cohort_dir):
    out = pack_cohort(Cohort.open(cohort_dir, store=False), cohort_dir / "elsewhere")
    t = json.loads((out / "index.json").read_text())["slides"]
    i = t["slide_id"].index("S004")
    st = (cohort_dir / "features" / "S004.h5").stat()
    assert t["source"][i] == "features/S004.h5"
    assert (t["source_size"][i], t["source_mtime_ns"][i]) == (st.st_size, st.st_mtime_ns)
    assert Cohort.open(cohort_dir).store is None  # not the default location: no auto-detection
    assert Cohort.open(cohort_dir, store=out).store is not None


def test_store_reader_in_dataloader_workers(cohort_dir):
    pack_cohort(Cohort.open(cohort_dir, store=False))
    c = Cohort.open(cohort_dir)
    reader = pickle.loads(pickle.dumps(c.reader))
    assert reader._files is None  # files are opened lazily, per process
    loader = torch.utils.data.DataLoader(c.slide_ids, batch_size=None, num_workers=2,
                                         collate_fn=lambda sid: (sid, reader(sid).features.sum().item()))
    got = dict(loader)
    ref = Cohort.open(cohort_dir, store=False)
    assert got == {sid: ref.read_slide(sid).features.sum().item() for sid in c.slide_ids}


def _bag_cohort(tmp_path):
    """Slides with coords plus one features-only .pt bag, packed."""
    root = write_cohort(tmp_path, n_slides=4, n_range=(60, 80))
    (root / "features" / "S003.h5").unlink()
    torch.save(torch.randn(50, 16).half(), root / "features" / "S003.pt")
    pack_cohort(Cohort.open(root, store=False))
    return Cohort.open(root, store=False), Cohort.open(root)


@pytest.mark.parametrize("advise", [None, 100])  # 100 B: every slide's range is requested before its read
def test_slide_is_one_storage_and_equal(tmp_path, monkeypatch, advise):
    # A DataLoader worker sends each storage through its own shared-memory segment: one per slide.
    from slidefm.cohort import store as store_mod

    if advise is not None:
        monkeypatch.setattr(store_mod, "ADVISE_BYTES", advise)
    via_h5, via_store = _bag_cohort(tmp_path)
    assert via_store.store is not None
    advised = []  # (fd, nbytes) of every WILLNEED the store's reads send
    real = store_mod.os.posix_fadvise
    monkeypatch.setattr(store_mod.os, "posix_fadvise", lambda fd, pos, n, how: (advised.append((fd, n)),
                                                                                real(fd, pos, n, how))[1])
    for sid in via_h5.slide_ids:
        advised.clear()
        a, b = via_h5.read_slide(sid), via_store.read_slide(sid)
        # the features' whole range is requested before a read of ADVISE_BYTES or more (these slides: < 3 KB)
        feature_advice = [n for fd, n in advised if fd != via_store.reader._open()[1][0]]
        assert feature_advice == ([b.features.nbytes] if advise is not None else [])
        assert_same(a, b)
        assert a.has_positions == b.has_positions == (sid != "S003")
        for s in (a, b):
            ptr = s.features.untyped_storage().data_ptr()
            assert s.coords.untyped_storage().data_ptr() == ptr == s.positions.untyped_storage().data_ptr()
            assert s.features.is_contiguous() and s.coords.is_contiguous() and s.positions.is_contiguous()
            assert (s.coords.dtype, s.positions.dtype, tuple(s.coords.shape)) == (torch.int64, torch.int64,
                                                                                 (s.num_patches, 2))
        if not b.has_positions:
            assert not b.coords.any() and not b.positions.any() and b.step == 0
        # the store's direct path equals the generic one built from its raw arrays
        from slidefm.cohort.slides import slide_data

        feats, g = via_store.reader.read_arrays(sid)
        c = slide_data(sid, feats, g[:, :2] if b.has_positions else None, g[:, 2:] if b.has_positions else None,
                       b.step, b.patch_size_level0)
        assert_same(b, c)


@pytest.mark.parametrize("gap", [None, 0])  # default: one merged run here; 0 B: runs split at gaps over 4 rows
def test_store_read_rows_equals_hdf5(tmp_path, monkeypatch, gap):
    from slidefm.cohort import store as store_mod

    if gap is not None:
        monkeypatch.setattr(store_mod, "RUN_GAP_BYTES", gap)
    via_h5, via_store = _bag_cohort(tmp_path)
    for sid in via_h5.slide_ids:
        n = via_h5.read_slide(sid).num_patches
        # None (whole slide); a run plus scattered rows with gaps, unsorted and repeated; one row
        for chosen in (None, np.r_[20:32, 3, 40, 3, 7, n - 1, 0], np.array([n // 2])):
            seen = []

            def select(pos, chosen=chosen, seen=seen):
                seen.append(pos.copy())
                return chosen

            ra, rb = via_h5.reader.read_rows(sid, select), via_store.reader.read_rows(sid, select)
            assert np.array_equal(seen[0], seen[1]) and np.array_equal(ra.positions, rb.positions)
            assert ra.has_positions == rb.has_positions
            assert (ra.rows is None) == (rb.rows is None) == (chosen is None)
            if chosen is not None:
                assert np.array_equal(ra.rows, rb.rows) and np.array_equal(rb.rows, np.unique(chosen))
            assert rb.features.dtype == ra.features.dtype == np.float16  # as stored
            assert np.array_equal(ra.features, rb.features)
            whole = via_h5.read_slide(sid).features.numpy()
            assert np.array_equal(rb.take(np.unique(chosen) if chosen is not None else np.arange(n)),
                                  whole if chosen is None else whole[np.unique(chosen)])


def test_truncated_shard_is_a_clear_error(tmp_path):
    """A shard cut short (disk full, interrupted copy) names the fix, whole-slide and row reads alike."""
    root = write_cohort(tmp_path, n_slides=2)
    assert main(["pack", str(root), "--shard-size-mb", "0"]) == 0  # one slide per shard
    c = Cohort.open(root)
    sid = c.slide_ids[0]
    shard = c.store.path / "features-00000.npy"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(SlidefmError, match=r"packed store file is truncated; run `slidefm pack` again"):
        c.read_slide(sid)
    with pytest.raises(SlidefmError, match=r"packed store file is truncated; run `slidefm pack` again"):
        c.reader.read_rows(sid, lambda pos: np.arange(len(pos) - 2, len(pos)))
