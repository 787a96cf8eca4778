"""Read-ahead: slides are announced to the reader before they are read (posix_fadvise WILLNEED), in the
loader's order, for exactly the slides an item reads; the data order and the items never change."""

import os

import numpy as np
import pytest

from conftest import write_cohort
from slidefm.cohort import Cohort, pack_cohort
from slidefm.data.config import DataConfig
from slidefm.data.dataset import PatientDataset
from slidefm.data.loader import KeyedSampler
from slidefm.data.sampler import ReadAheadSampler, read_ahead


def test_read_ahead_hints_depth_keys_early_and_keeps_order():
    events = []
    out = []
    for k in read_ahead(range(10), lambda k: events.append(("hint", k)), 3):
        events.append(("read", k))
        out.append(k)
    assert out == list(range(10))
    for k in range(10):
        before = events[: events.index(("read", k))]
        # Every key up to k + 3 was announced before k is read, and none further ahead.
        assert {h for kind, h in before if kind == "hint"} == set(range(min(10, k + 4)))
    assert [h for kind, h in events if kind == "hint"] == list(range(10))  # each key once, in order


@pytest.mark.parametrize("depth,hint", [(0, True), (5, False)])
def test_read_ahead_off(depth, hint):
    seen = []
    keys = list(read_ahead(iter(range(7)), seen.append if hint else None, depth))
    assert keys == list(range(7)) and seen == []
    assert list(ReadAheadSampler([3, 1, 2], seen.append, 0)) == [3, 1, 2] and seen == []


def test_keyed_sampler_order_unchanged_by_hints():
    data = list(range(23))
    plain = KeyedSampler(data, seed=4, shuffle=True)
    seen = []
    hinted = KeyedSampler(data, seed=4, shuffle=True, hint=seen.append, read_ahead=5)
    assert list(hinted) == list(plain) == seen


def _advice(monkeypatch):
    calls = []
    real = os.posix_fadvise

    def spy(fd, offset, length, advice):
        if advice == os.POSIX_FADV_WILLNEED:
            calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    return calls


def _ranges(calls):
    """The hinted calls as (file, offset, length) ranges, adjacent pieces of one file joined: a range goes out in
    pieces (slidefm.cohort.pagecache)."""
    out = []
    for f, a, n in calls:
        if out and out[-1][0] == f and out[-1][1] + out[-1][2] == a:
            out[-1] = (f, out[-1][1], out[-1][2] + n)
        else:
            out.append((f, a, n))
    return out


def test_store_hint_covers_the_slides_bytes(tmp_path, monkeypatch):
    root = write_cohort(tmp_path, n_slides=5, n_range=(20, 40), dim=16)
    store = pack_cohort(Cohort.open(root, store=False))
    reader = Cohort.open(root, store=store).reader
    calls = _advice(monkeypatch)
    sid = "S003"
    reader.will_need(sid)
    k, off, row, n, _ = reader.entries[reader.pos[sid]]
    fd, start = reader._open()[0][k]
    (gfd, gstart) = reader._open()[1]
    itemsize = reader.shards[k][1].itemsize
    shard = os.path.realpath(store / reader.shards[k][0])
    grid = os.path.realpath(store / "grid.npy")
    assert _ranges(calls) == [(shard, start + off * 16 * itemsize, n * 16 * itemsize),
                              (grid, gstart + row * 32, n * 32)]
    # The hinted features are exactly the bytes of the slide's features.
    raw = np.fromfile(shard, dtype=reader.shards[k][1], count=n * 16, offset=calls[0][1]).reshape(n, 16)
    assert np.array_equal(raw, reader.read_arrays(sid)[0])
    calls.clear()
    reader.will_need("no-such-slide")  # a hint never raises; the read reports a bad id
    assert calls == []


def test_hdf5_hint_covers_the_file(tmp_path, monkeypatch):
    root = write_cohort(tmp_path, n_slides=3)
    reader = Cohort.open(root, store=False).reader
    calls = _advice(monkeypatch)
    reader.will_need("S001")
    path = os.path.realpath(reader.paths["S001"])
    assert _ranges(calls) == [(path, 0, os.path.getsize(path))]


def _dataset(root, **cfg):
    cohort = Cohort.open(root, store=False)
    c = DataConfig(cohort=str(root), max_slides_per_patient=1, **cfg)
    return PatientDataset(cohort, cohort.patient_ids, {p: cohort.slides_of(p) for p in cohort.patient_ids}, c)


class _Spy:
    def __init__(self, reader):
        self.reader, self.hinted, self.read = reader, [], []

    def will_need(self, sid):
        self.hinted.append(sid)

    def read_rows(self, sid, select):
        self.read.append(sid)
        return self.reader.read_rows(sid, select)


def test_dataset_hints_exactly_the_slides_an_item_reads(tmp_path):
    root = write_cohort(tmp_path, n_slides=8, slides_per_patient=2)
    ds = _dataset(root)
    ds.reader = spy = _Spy(ds.reader)
    keys = list(KeyedSampler(ds, seed=1, shuffle=True))
    for key in keys:
        ds.will_need(key)
        ds[key]
    # One slide of two per patient, drawn per item: the hint names the one the item then reads.
    assert spy.hinted == spy.read and len(spy.read) == len(keys)
    assert len(set(spy.read)) > len(keys) // 2


def test_dataset_does_not_hint_partial_reads(tmp_path):
    root = write_cohort(tmp_path, n_slides=4)
    ds = _dataset(root, tokens="crop", crop_size=4)
    ds.reader = spy = _Spy(ds.reader)
    ds.will_need((0, 7))
    assert spy.hinted == []  # a crop reads a part of the slide: a whole-slide fetch would waste the disk


def test_training_loader_announces_every_slide_before_reading_it(tmp_path):
    from slidefm.data.loader import make_loader

    root = write_cohort(tmp_path, n_slides=12, slides_per_patient=2)
    ds = _dataset(root, batch_size=2, read_ahead=3)
    events = []

    class Log(_Spy):
        def will_need(self, sid):
            events.append(("hint", sid))

        def read_rows(self, sid, select):
            events.append(("read", sid))
            return self.reader.read_rows(sid, select)

    ds.reader = Log(ds.reader)
    batches = list(make_loader(ds, ds.cfg, lambda items: [it["patient_id"] for it in items], train=True))
    reads = [i for i, e in enumerate(events) if e[0] == "read"]
    assert len(reads) == 2 * len(batches) == 6  # 6 patients, one slide each, batches of 2
    for i in reads:
        sid = events[i][1]
        assert ("hint", sid) in events[:i]  # announced before it was read
    # The loader draws a batch's two keys before reading them, and each key drawn was announced with the
    # three after it (read_ahead=3): five announcements come before the first read.
    assert [e[0] for e in events[:6]] == ["hint"] * 5 + ["read"]


def test_negative_read_ahead_is_refused_before_any_work(tmp_path):
    from slidefm.errors import OptionError, SlidefmError
    from slidefm.export import ExportConfig, encode_slides_chunked

    root = write_cohort(tmp_path, n_slides=2)
    with pytest.raises(OptionError, match=r"data.read_ahead must be >= 0 \(0: off\), got -1"):
        _dataset(root, read_ahead=-1)
    partial = tmp_path / "out.partial"
    with pytest.raises(SlidefmError, match=r"--read-ahead must be >= 0 \(0: off\), got -2"):
        encode_slides_chunked(None, None, ["S000"], ExportConfig(read_ahead=-2), partial, "f")
    assert not partial.exists()


def test_export_announces_every_slide_before_reading_it(tmp_path):
    from slidefm.export import ExportConfig, encode_slides_chunked

    root = write_cohort(tmp_path, n_slides=7)
    cohort = Cohort.open(root, store=pack_cohort(Cohort.open(root, store=False)))
    events = []
    real_hint, real_read = cohort.reader.will_need, cohort.reader.read
    cohort.reader.will_need = lambda sid: (events.append(("hint", sid)), real_hint(sid))[1]
    cohort.reader.read = lambda sid: (events.append(("read", sid)), real_read(sid))[1]

    class Enc:  # mean of each slide's features: enough to run the export loop
        config, model, dim = {}, None, 16

        def encode_packed(self, packed, want_tokens):
            o = packed.offsets.tolist()
            return np.stack([packed.tokens[a:b].mean(0).numpy() for a, b in zip(o, o[1:])]), None

    emb, _ = encode_slides_chunked(Enc(), cohort, cohort.slide_ids, ExportConfig(progress=False, num_workers=0,
                                                                                  chunk_slides=4, read_ahead=2),
                                   None, "f")
    assert emb.shape == (7, 16)
    reads = [i for i, e in enumerate(events) if e[0] == "read"]
    assert [events[i][1] for i in reads] == cohort.slide_ids
    assert all(("hint", events[i][1]) in events[:i] for i in reads)
    assert [e[0] for e in events[:4]] == ["hint"] * 3 + ["read"]  # a chunk's first read waits for 2 more hints


def test_export_reads_every_chunk_through_one_loader(tmp_path, monkeypatch):
    """Chunks are for resuming, not for reading: one loader (its workers, arenas and read-ahead) serves every chunk
    left, and the embeddings are those of one big chunk."""
    import slidefm.export as export
    from slidefm.export import ExportConfig, encode_slides_chunked

    root = write_cohort(tmp_path, n_slides=7)
    cohort = Cohort.open(root, store=pack_cohort(Cohort.open(root, store=False)))

    class Enc:
        config, model, dim = {}, None, 16

        def encode_packed(self, packed, want_tokens):
            o = packed.offsets.tolist()
            return np.stack([packed.tokens[a:b].mean(0).numpy() for a, b in zip(o, o[1:])]), None

    loaders = []
    real = export.slide_loader
    monkeypatch.setattr(export, "slide_loader", lambda *a: loaders.append(a[1]) or real(*a))
    cfg = dict(progress=False, num_workers=1, batch_tokens=500)
    chunked, _ = encode_slides_chunked(Enc(), cohort, cohort.slide_ids, ExportConfig(chunk_slides=2, **cfg), None, "f")
    assert loaders == [cohort.slide_ids]
    whole, _ = encode_slides_chunked(Enc(), cohort, cohort.slide_ids, ExportConfig(chunk_slides=100, **cfg), None, "f")
    np.testing.assert_array_equal(chunked, whole)
    want = np.stack([cohort.read_slide(s).features.float().mean(0).numpy() for s in cohort.slide_ids])
    np.testing.assert_allclose(chunked, want, rtol=1e-6)
