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


def assert_same(a, b):
    assert a.slide_id == b.slide_id
    assert torch.equal(a.features, b.features) and a.features.dtype == b.features.dtype == torch.float32
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
        assert_same(via_h5.read_slide(sid), via_store.read_slide(sid))
    store = via_store.store
    assert len(store.index["shards"]) == 7 and store.dim == via_h5.feature_dim == 16
    shard = np.load(store.path / "features-00000.npy", mmap_mode="r")
    assert shard.dtype == np.dtype(dtype)  # source dtype kept on disk


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
