"""The shared-memory worker transport: the same batches as torch's path, ring reuse, fallbacks, no deadlock."""

from __future__ import annotations

import collections
import dataclasses
import gc

import numpy as np
import pytest
import torch

from slidefm.data.transport import ArenaRef, ShmDataLoader, _Arena


@dataclasses.dataclass
class Item:
    sid: str
    features: torch.Tensor
    positions: np.ndarray
    small: torch.Tensor


class Slides(torch.utils.data.Dataset):
    """Items of varied size (some above, some below the arena threshold), keyed by index only."""

    def __init__(self, n=40, big=1000):
        self.n, self.big = n, big

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        rows = int(rng.integers(1, self.big))
        return Item(f"s{i}", torch.from_numpy(rng.standard_normal((rows, 64)).astype(np.float32)),
                    rng.integers(0, 50, (rows, 2)), torch.arange(3) + i)


Pair = collections.namedtuple("Pair", "values count")


def collate(items):
    extra = collections.defaultdict(list, lens=torch.tensor([len(it.features) for it in items]))
    return {"ids": [it.sid for it in items], "features": torch.cat([it.features for it in items]),
            "positions": np.concatenate([it.positions for it in items]), "small": [it.small for it in items],
            "pair": Pair(torch.ones(70_000, dtype=torch.float16) * len(items), 7), "extra": extra}


def batches(loader, epochs=2):
    out = []
    for _ in range(epochs):
        out.extend(list(loader))
    return out


def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return a == b


@pytest.mark.parametrize("persistent", [True, False])
def test_shm_batches_equal_torch_and_in_process(persistent):
    ds = Slides()
    ref = batches(ShmDataLoader(ds, batch_size=4, collate_fn=collate, num_workers=0))
    torch_path = ShmDataLoader(ds, batch_size=4, collate_fn=collate, num_workers=2, transport="torch",
                               persistent_workers=persistent)
    shm = ShmDataLoader(ds, batch_size=4, collate_fn=collate, num_workers=2, persistent_workers=persistent)
    assert torch_path.transport == "torch" and shm.transport == "shm"
    got_torch, got_shm = batches(torch_path), batches(shm)
    assert len(ref) == len(got_torch) == len(got_shm) == 20
    for a, b, c in zip(ref, got_torch, got_shm):
        assert same(a, b) and same(a, c)
        assert not any(isinstance(v, ArenaRef) for v in c.values())
    arenas = list(shm._arenas)

    def in_arena(t):
        return any(a.data.ctypes.data <= t.data_ptr() < a.data.ctypes.data + a.size for a in arenas)

    # the last epoch's batches are views of the current arenas (non-persistent workers got new ones per epoch)
    assert all(in_arena(c["features"]) and in_arena(c["pair"][0]) for c in got_shm[10:])  # views, not copies
    assert all(isinstance(c["positions"], np.ndarray) for c in got_shm)
    assert all(int(a.tail[0]) == 0 for a in arenas)  # every batch is still held: nothing released
    del got_shm, a, b, c
    gc.collect()
    assert all(int(a.tail[0]) > 0 for a in arenas)  # both workers' batches came through their arenas, now free


def test_held_batches_are_never_overwritten():
    """Tensors are views of the arena: while a consumer holds them, later batches must go elsewhere
    (the rest of the ring, or torch's path when it is full), and their values never change."""
    ds = Slides(n=48, big=3000)
    ref = batches(ShmDataLoader(ds, batch_size=2, collate_fn=collate, num_workers=0), epochs=3)
    loader = ShmDataLoader(ds, batch_size=2, collate_fn=collate, num_workers=2, arena_mb=1,
                           persistent_workers=True, prefetch_factor=2)
    held = list(loader)  # epoch 1, all held
    rest = []
    for b in loader:  # epoch 2, each dropped at once (ring reuse), and epoch 3 held again
        rest.append(same(b, ref[len(held) + len(rest)]))
    held3 = list(loader)
    assert all(rest) and len(rest) == 24
    assert all(same(a, b) for a, b in zip(ref[:24], held))  # epoch 1 unchanged after two more epochs
    assert all(same(a, b) for a, b in zip(ref[48:], held3))


def test_unbatched_items_and_dataclasses():
    ds = Slides(n=12)
    got = list(ShmDataLoader(ds, batch_size=None, num_workers=2))
    want = [ds[i] for i in range(12)]
    assert all(same(a, b) for a, b in zip(want, got))


@dataclasses.dataclass(frozen=True)
class Checked:
    """Frozen, validated in ``__post_init__``, with a tensor in a field ``__init__`` does not take."""

    sid: str
    features: torch.Tensor
    derived: torch.Tensor = dataclasses.field(init=False)
    later: torch.Tensor = dataclasses.field(init=False)  # never assigned: skipped, not an AttributeError

    def __post_init__(self):
        if not isinstance(self.features, torch.Tensor):
            raise TypeError("features must be a tensor")  # would fail on a record rebuilt through __init__
        object.__setattr__(self, "derived", self.features * 2)


class CheckedItems(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return Checked(f"s{i}", torch.full((500, 64), float(i)))


def test_dataclasses_cross_as_they_are():
    """A dataclass crosses as the same object with its arrays moved: ``__init__``/``__post_init__`` are not run
    again (a frozen, validating one works), and fields ``__init__`` does not take come through the arena too."""
    got = list(ShmDataLoader(CheckedItems(), batch_size=None, num_workers=2, arena_mb=4))
    assert len(got) == 6
    for i, c in enumerate(got):
        assert type(c) is Checked and c.sid == f"s{i}"
        assert torch.equal(c.features, torch.full((500, 64), float(i)))
        assert torch.equal(c.derived, torch.full((500, 64), 2.0 * i)) and not hasattr(c, "later")


def test_small_arena_falls_back_per_batch():
    """Batches larger than the arena, or arriving while it is full, go torch's way: same batches."""
    ds = Slides(n=24, big=6000)  # up to ~1.5 MB of features per item
    ref = batches(ShmDataLoader(ds, batch_size=2, collate_fn=collate, num_workers=0))
    got = batches(ShmDataLoader(ds, batch_size=2, collate_fn=collate, num_workers=2, arena_mb=1,
                                persistent_workers=True, prefetch_factor=4))
    assert all(same(a, b) for a, b in zip(ref, got)) and len(got) == len(ref)


def test_abandoned_epoch_does_not_block_the_next():
    """A persistent loader left mid-epoch (its prefetched batches never read) still delivers every
    later epoch in full: unread space is reclaimed by the next read, and a full arena never waits."""
    ds = Slides(n=60, big=3000)
    loader = ShmDataLoader(ds, batch_size=3, collate_fn=collate, num_workers=2, arena_mb=2,
                           persistent_workers=True, prefetch_factor=4)
    ref = list(ShmDataLoader(ds, batch_size=3, collate_fn=collate, num_workers=0))
    for stop in (2, 5, 1):
        for i, _ in enumerate(loader):
            if i == stop:
                break
        got = list(loader)
        assert len(got) == len(ref) and all(same(a, b) for a, b in zip(ref, got))


def test_arena_ring_allocation():
    a = _Arena(1024)
    assert a.alloc(100) == (0, 128)  # 64-byte aligned
    assert a.alloc(600) == (128, 768)
    assert a.alloc(300) is None  # would pass the unread tail (0): 768 + 256 (wrap skip) + 320 > 1024
    a.tail[0] = 128  # the first array was read
    assert a.alloc(100) == (768, 896)
    assert a.alloc(200) is None  # 128 left at the end, 128 free at the start: no split across the wrap
    a.tail[0] = 896
    assert a.alloc(200) == (0, 1024 + 256)  # skips the 128-byte end, starts over at 0
    assert a.alloc(2000) is None  # larger than the arena: never fits


def test_transport_option_is_checked():
    with pytest.raises(ValueError, match="transport must be"):
        ShmDataLoader(Slides(), transport="pipe")
    # no workers: nothing to transport
    assert ShmDataLoader(Slides(), num_workers=0).transport == "torch"


def test_dtypes_numpy_lacks_go_torchs_way():
    """bfloat16 (no numpy dtype) cannot be written into the arena: it travels as before, beside arena tensors."""
    class Mixed(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return {"bf16": torch.full((300, 64), float(i), dtype=torch.bfloat16), "f32": torch.full((300, 64), i)}

    got = list(ShmDataLoader(Mixed(), batch_size=2, num_workers=2))
    for j, b in enumerate(got):
        assert b["bf16"].dtype == torch.bfloat16 and b["bf16"][:, 0, 0].tolist() == [2 * j, 2 * j + 1]
        assert b["f32"][:, 0, 0].tolist() == [2 * j, 2 * j + 1]


# ----------------------------------------------------------------------------- buffers born in the arena


class BornSlides(torch.utils.data.Dataset):
    """Slides read as the readers read them (``slide_data``: one storage from ``slidefm.buffers.empty``); each
    item also says where its features lay in the worker, and can allocate a buffer it drops (``waste``)."""

    def __init__(self, n=30, rows=2000, waste=False):
        self.n, self.rows, self.waste = n, rows, waste

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        from slidefm.cohort.slides import slide_data

        if self.waste:
            from slidefm import buffers

            buffers.empty(300_000).fill_(7)  # a scratch buffer, never sent
        rng = np.random.default_rng(i)
        n = self.rows + i
        coords = np.stack([np.arange(n) % 50, np.arange(n) // 50], 1) * 256
        sd = slide_data(f"s{i}", rng.standard_normal((n, 32)).astype(np.float16), coords, coords // 256, 256, 256)
        return {"slide": sd, "ptr": sd.features.data_ptr()}


def test_slides_born_in_the_arena_cross_without_a_copy():
    ds = BornSlides()
    want = [ds[i]["slide"] for i in range(len(ds))]
    loader = ShmDataLoader(ds, batch_size=None, num_workers=2, arena_mb=4, prefetch_factor=2)
    n_direct = 0
    for i, got in enumerate(loader):
        s = got["slide"]
        assert same(s, want[i])
        n_direct += s.features.data_ptr() == got["ptr"]  # the very bytes the worker read into
    assert n_direct == len(ds)


def test_views_of_one_born_storage_keep_it_alive():
    """A slide's features and positions share one allocation: holding only the positions keeps all of it from
    being reused, while the ring cycles many times through the rest of the arena."""
    ds = BornSlides(n=60, rows=1000)
    want = [ds[i]["slide"] for i in range(len(ds))]
    loader = ShmDataLoader(ds, batch_size=None, num_workers=2, arena_mb=1, prefetch_factor=2)
    kept = {}
    for i, got in enumerate(loader):
        if i in (0, 1, 7):
            kept[i] = got["slide"].positions  # the features (most of the bytes) are dropped at once
        del got
    assert len(kept) == 3
    for i, pos in kept.items():
        assert torch.equal(pos, want[i].positions)


def test_unsent_buffers_do_not_block_the_ring():
    """Scratch buffers a worker drops are reclaimed with the next batch read: every slide still arrives
    zero-copy, through many times the arena's size."""
    ds = BornSlides(n=40, rows=1500, waste=True)
    want = [ds[i]["slide"] for i in range(len(ds))]
    loader = ShmDataLoader(ds, batch_size=None, num_workers=2, arena_mb=2, prefetch_factor=2)
    got = list((g["slide"], g["ptr"]) for g in loader)  # ~9 MB of slides and ~12 MB of scratch per worker, held
    assert all(same(s, w) for (s, _), w in zip(got, want))
    del got
    direct = [g["slide"].features.data_ptr() == g["ptr"] for g in loader]  # each dropped at once
    assert all(direct)


def test_collated_batches_are_packed_in_the_arena():
    from slidefm.data.batch import pack_slides

    def collate_packed(items):
        sl = [it["slide"] for it in items]
        packed = pack_slides([s.features for s in sl], [s.positions for s in sl], [s.slide_id for s in sl])
        return packed, packed.tokens.data_ptr()

    ds = BornSlides(n=12, rows=500)
    ref = list(ShmDataLoader(ds, batch_size=3, collate_fn=collate_packed, num_workers=0))
    got = list(ShmDataLoader(ds, batch_size=3, collate_fn=collate_packed, num_workers=2))
    assert len(got) == len(ref) == 4
    for k, ((a, _), (b, ptr)) in enumerate(zip(ref, got)):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.positions, b.positions) and a.slide_ids == b.slide_ids
        assert b.tokens.data_ptr() == ptr
        # the slides are float16 as read; the batch is float32, cast while packing
        slides = [ds[i]["slide"] for i in range(3 * k, 3 * k + 3)]
        assert slides[0].features.dtype == torch.float16 and b.tokens.dtype == torch.float32
        assert torch.equal(b.tokens, torch.cat([s.features.float() for s in slides]))


def test_pack_casts_any_feature_dtype_to_float32():
    from slidefm.data.batch import pack_slides

    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((5, 8)).astype(np.float16), torch.randn(3, 8), rng.standard_normal((4, 8)),
             torch.randn(2, 8).to(torch.bfloat16)]  # float16, float32, float64 (numpy), bfloat16
    pos = [np.zeros((len(f), 2), np.int64) for f in feats]
    want = torch.cat([torch.as_tensor(f).to(torch.float32) for f in feats])
    for fs in (feats, [torch.as_tensor(f).requires_grad_(f.dtype != np.float16) if isinstance(f, np.ndarray)
                       else f for f in feats]):  # the fast path, and torch's own (a tensor needing grad)
        packed = pack_slides(fs, pos)
        assert packed.tokens.dtype == torch.float32 and torch.equal(packed.tokens.detach(), want)
        assert packed.offsets.tolist() == [0, 5, 8, 12, 14]
        # dtype=None (export to an accelerator): float32 unless every slide is float16
        assert torch.equal(pack_slides(fs, pos, dtype=None).tokens.detach(), want)
    halves = [f for f in feats if f.dtype == np.float16] * 2
    kept = pack_slides(halves, [np.zeros((len(f), 2), np.int64) for f in halves], dtype=None).tokens
    assert kept.dtype == torch.float16 and torch.equal(kept, torch.cat([torch.from_numpy(f) for f in halves]))


def test_born_buffers_unit():
    a = _Arena(1024)
    t = a.empty(100)
    assert t.dtype == torch.uint8 and t.numel() == 100 and t.data_ptr() == a.data.ctypes.data
    assert a.born == [(0, 100, 128)]
    assert a.born_in(t.data_ptr() + 10, 90) == (0, 100, 128) and a.born_in(t.data_ptr() + 10, 91) is None
    a.empty(600)
    assert a.empty(500) is None  # no room: the caller falls back to torch.empty
    a.tail[0] = 768  # both read
    a.empty(100)  # the last 256 bytes: both earlier buffers are still known
    assert [b[0] for b in a.born] == [0, 128, 768]
    a.tail[0] = 896
    a.empty(200)  # wraps to 0: the first two buffers' space is reused, so they are forgotten
    assert a.born == [(768, 100, 896), (0, 200, 1280)]
    assert a.born_in(t.data_ptr() + 150, 10) == (0, 200, 1280) and a.born_in(t.data_ptr() + 300, 10) is None


def test_rebuilt_loader_does_not_wrap_twice():
    """Lightning re-creates loaders from their attributes: the worker init and collate are unwrapped first."""
    def init(_):
        pass

    first = ShmDataLoader(Slides(), num_workers=2, worker_init_fn=init, collate_fn=collate)
    again = ShmDataLoader(Slides(), num_workers=2, worker_init_fn=first.worker_init_fn, collate_fn=first.collate_fn)
    assert again.worker_init_fn.init is init and again.collate_fn.collate is collate


class OddShapes(torch.utils.data.Dataset):
    """Empty, 0-d, non-contiguous and bool arrays, torch and numpy, beside one large enough for the arena."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        big = torch.arange(200_000, dtype=torch.float32).view(400, 500) + i
        return {"empty": torch.empty(0, 64), "empty_np": np.zeros((0, 3), np.int64), "scalar": torch.tensor(float(i)),
                "strided": big.t()[::3], "mask": torch.arange(70_000) % 3 == i % 3, "big": big,
                "np_big": np.full((300, 300), i, np.float64)}


def test_odd_shapes_cross_unchanged():
    want = list(ShmDataLoader(OddShapes(), batch_size=None, num_workers=0))  # numpy arrays become tensors there too
    got = list(ShmDataLoader(OddShapes(), batch_size=None, num_workers=2, arena_mb=8))
    assert len(got) == 4 and all(same(a, b) for a, b in zip(want, got))


def test_training_batches_cross_workers_unchanged(tmp_path):
    """Training's own batches (a Batch of packed slides, views, modalities and labels: nested dataclasses, dicts and
    lists) come out of two workers exactly as they come out of the main process."""
    import dataclasses as dc

    from conftest import write_cohort
    from slidefm.cohort import Cohort
    from slidefm.data.config import DataConfig
    from slidefm.data.dataset import Collate, PatientDataset
    from slidefm.data.loader import make_loader
    from slidefm.data.tables import build_tables
    from slidefm.data.views import ViewConfig

    root = write_cohort(tmp_path, n_slides=8, n_range=(60, 90))
    cohort = Cohort.open(root)
    views = ViewConfig(n_global=2, global_size=5, n_local=2, local_size=3, noise_std=0.1)
    cfg = DataConfig(cohort=str(root), batch_size=2, max_slides_per_patient=2, views=views, seed=3)
    tables = build_tables(cohort, cfg, tasks=list(cohort.tasks), needs={"expression", "report"})
    ds = PatientDataset(cohort, tables.train_ids, {p: cohort.slides_of(p) for p in cohort.patient_ids}, cfg,
                        train=True)
    ref = list(make_loader(ds, cfg, Collate(tables), train=True))
    loader = make_loader(ds, dc.replace(cfg, num_workers=2), Collate(tables), train=True)
    assert loader.transport == "shm"
    got = list(loader)
    assert len(got) == len(ref) > 0
    for a, b in zip(ref, got):
        assert a.views is not None and "expression" in a.modalities and same(a, b)


class Fixed(torch.utils.data.Dataset):
    """``n`` items of ``rows`` x 64 float32 each (rows x 256 bytes)."""

    def __init__(self, n, rows):
        self.n, self.rows = n, rows

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((self.rows, 64), float(i))


def _arena_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "shared-memory arena" in r.getMessage()]


def test_batches_too_large_for_the_arena_are_named_once(caplog):
    """A 1 MiB arena cannot hold three 0.5 MB batches: they go torch's way, and the loader says once what to set."""
    caplog.set_level("WARNING", logger="slidefm.data.transport")
    ds = Fixed(12, 1024)  # batches of 2: 524,288 bytes
    loader = ShmDataLoader(ds, batch_size=2, num_workers=2, arena_mb=1, arena_setting="data.arena_mb",
                           persistent_workers=True)
    got = batches(loader)
    assert [int(b[0, 0, 0]) for b in got] == list(range(0, 12, 2)) * 2  # the same batches, in order
    msgs = _arena_warnings(caplog)
    assert len(msgs) == 1  # once per loader, over two epochs
    assert "a 1 MiB batch did not fit its worker's 1 MiB" in msgs[0] and "set data.arena_mb=64 (3 such batches)" in msgs[0]


def test_arena_that_holds_three_batches_says_nothing(caplog):
    """Batches of a size the arena holds three times over stay silent, even while a consumer that holds every
    batch fills the ring and later ones fall back (a full ring is not a small arena)."""
    caplog.set_level("WARNING", logger="slidefm.data.transport")
    ds = Fixed(40, 1024)  # 0.5 MB batches, 2 MiB arenas: four fit
    loader = ShmDataLoader(ds, batch_size=2, num_workers=2, arena_mb=2)
    held = list(loader)
    arenas = list(loader._arenas)

    def in_arena(t):
        return any(a.data.ctypes.data <= t.data_ptr() < a.data.ctypes.data + a.size for a in arenas)

    assert not all(in_arena(b) for b in held)  # some batches met a full ring and went torch's way
    assert _arena_warnings(caplog) == []
    # and a loader told not to name a setting never warns
    quiet = ShmDataLoader(Fixed(6, 4096), batch_size=2, num_workers=2, arena_mb=1, arena_setting=None)
    assert len(list(quiet)) == 3 and _arena_warnings(caplog) == []
