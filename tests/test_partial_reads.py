"""Crop-only reads: training on views alone reads the views' rows of a slide, not the whole file, and
gets exactly the features a whole-slide read would have given."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from slidefm.cohort import Cohort, h5
from slidefm.cohort.slides import H5SlideReader, SlideReader, SlideRows
from slidefm.data.config import DataConfig
from slidefm.data.dataset import PatientDataset
from slidefm.data.views import ViewConfig, finish_views, make_views, plan_rows, plan_views
from conftest import lattice_coords, write_cohort, write_slide


def _slide(tmp_path, n=300, dim=8, **create):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((n, dim)).astype(np.float16)
    coords = lattice_coords(rng, n, 256)
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats, **create)
        f.create_dataset("coords", data=coords).attrs["patch_size_level0"] = 256
    return path, feats


def test_row_runs_merge_small_gaps():
    assert h5.row_runs(np.array([0, 1, 2, 5, 6, 20]), max_gap=2) == [(0, 7), (20, 21)]
    assert h5.row_runs(np.array([0, 1, 2, 5, 6, 20]), max_gap=1) == [(0, 3), (5, 7), (20, 21)]
    assert h5.row_runs(np.array([], np.int64), max_gap=4) == []


@pytest.mark.parametrize("create", [{}, {"chunks": (16, 8)}, {"chunks": (32, 8), "compression": "gzip"}],
                         ids=["contiguous", "chunked", "compressed"])
def test_feature_rows_equal_whole_read(tmp_path, create):
    path, feats = _slide(tmp_path, **create)
    rows = np.unique(np.random.default_rng(1).choice(len(feats), 120, replace=False))
    rows = np.concatenate([[0], rows, [len(feats) - 1]])  # both ends of the array
    rows = np.unique(rows)
    with h5.SlideSource(path) as src:
        got = src.feature_rows(rows)
    assert got.dtype == feats.dtype and np.array_equal(got, feats[rows])


def test_feature_rows_of_batch_dim_and_torch_files(tmp_path):
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((50, 4)).astype(np.float32)
    write_slide(tmp_path / "b.h5", feats, lattice_coords(rng, 50, 256), batch_dim=True)  # (1, N, D)
    torch.save(torch.from_numpy(feats).to(torch.bfloat16), tmp_path / "b.pt")
    rows = np.array([0, 3, 4, 5, 40, 49])
    with h5.SlideSource(tmp_path / "b.h5") as src:
        assert np.array_equal(src.feature_rows(rows), feats[rows])
    with h5.SlideSource(tmp_path / "b.pt") as src:
        expect = torch.from_numpy(feats).to(torch.bfloat16).float().numpy()[rows]
        assert np.array_equal(src.feature_rows(rows), expect)


def test_h5_reader_read_rows_matches_read(tmp_path):
    root = write_cohort(tmp_path, n_slides=2, n_range=(60, 80))
    reader = Cohort.open(root, store=False).reader
    assert isinstance(reader, H5SlideReader)
    whole = reader.read("S000")
    seen = {}

    def select(pos):
        seen["pos"] = pos
        return np.array([7, 3, 3, 11])  # unsorted, repeated: the reader reads each row once

    part = reader.read_rows("S000", select)
    assert np.array_equal(seen["pos"], whole.positions.numpy())
    assert part.rows.tolist() == [3, 7, 11] and part.has_positions
    assert np.array_equal(part.take(np.array([11, 3])), whole.features.numpy()[[11, 3]])
    everything = reader.read_rows("S000", lambda pos: None)
    assert everything.rows is None and np.array_equal(everything.features, whole.features.numpy())
    # The fallback of readers without partial reads (the packed store's) gives the same rows.
    fallback = SlideReader.read_rows(reader, "S000", select)
    assert np.array_equal(fallback.features, part.features)


def test_slide_rows_take_maps_slide_rows():
    part = SlideRows("s", np.zeros((10, 2), np.int64), True, np.array([2, 5, 9]),
                     np.arange(6, dtype=np.float32).reshape(3, 2))
    assert part.take(np.array([9, 2])).tolist() == [[4, 5], [0, 1]]


VIEWS = ViewConfig(n_global=2, global_size=5, n_local=2, local_size=3, noise_std=0.1, stain_jitter=0.1,
                   token_dropout=0.1, dihedral=True)


def test_make_views_is_plan_then_finish():
    rng = np.random.default_rng(0)
    pos = lattice_coords(rng, 150, 1)
    feats = rng.standard_normal((150, 6)).astype(np.float32)
    a = make_views(feats, pos, VIEWS, np.random.default_rng(5))
    r = np.random.default_rng(5)
    plans = plan_views(pos, VIEWS, r)
    rows = plan_rows(plans)
    assert np.array_equal(rows, np.unique(np.concatenate([v.indices for v in a])))
    b = finish_views(lambda idx: feats[idx], plans, VIEWS, r)
    for va, vb in zip(a, b):
        assert np.array_equal(va.indices, vb.indices) and np.array_equal(va.features, vb.features)


def _dataset(root, slide_tokens):
    cohort = Cohort.open(root, store=False)
    cfg = DataConfig(cohort=str(root), max_slides_per_patient=2, views=VIEWS)
    return PatientDataset(cohort, cohort.patient_ids, {p: cohort.slides_of(p) for p in cohort.patient_ids}, cfg,
                          slide_tokens=slide_tokens)


def test_views_only_items_read_only_the_views_rows(tmp_path, monkeypatch):
    root = write_cohort(tmp_path, n_slides=4, n_range=(80, 120))
    full, crops = _dataset(root, True), _dataset(root, False)
    read = []
    real = h5.SlideSource.feature_rows

    def spy(self, rows):
        read.append(len(rows))
        return real(self, rows)

    monkeypatch.setattr(h5.SlideSource, "feature_rows", spy)
    a, b = full[(1, 123)], crops[(1, 123)]
    # The whole-slide item read its slides whole (no partial read); the views-only one read partially.
    assert len(read) == len(b["slides"]) and all(n < 80 for n in read)
    for (sid_a, fa, _), (sid_b, fb, pb) in zip(a["slides"], b["slides"]):
        assert sid_a == sid_b and len(fa) >= 80 and fb.shape == (0, fa.shape[1]) and pb.shape == (0, 2)
    # Same seed, same views: the crop-only read changes what is read, not what the model sees.
    for va, vb in zip(a["views"], b["views"]):
        for x, y in zip(va, vb):
            assert np.array_equal(x.indices, y.indices) and np.array_equal(x.features, y.features)
            assert np.array_equal(x.token_mask, y.token_mask) and np.array_equal(x.positions, y.positions)


def test_views_only_needs_views(tmp_path):
    root = write_cohort(tmp_path, n_slides=2)
    cohort = Cohort.open(root, store=False)
    with pytest.raises(ValueError, match="needs data.views"):
        PatientDataset(cohort, cohort.patient_ids, {}, DataConfig(cohort=str(root)), slide_tokens=False)


def test_features_only_training_leaves_slide_tokens_out(tmp_path):
    """The house recipe on a features-only cohort: no objective reads whole slides, so the datasets
    skip them; with expression the contrast reads them and the datasets keep them."""
    from slidefm.train.run import build_everything
    from test_train import compose_cfg

    for expression in (False, True):
        root = write_cohort(tmp_path, n_slides=6, reports=False, expression=expression, name=f"c{expression}")
        cfg = compose_cfg("slidefm", root, tmp_path / "run", "data.batch_size=2", "data.views.global_size=4",
                          "data.views.local_size=2")
        module, dm, _ = build_everything(cfg)
        assert module.reads_slides is expression
        assert dm.train_set.slide_tokens is expression
        batch = dm.collate([dm.train_set[i] for i in range(2)])
        assert (batch.slides.tokens.shape[0] > 0) is expression and batch.slides.num_slides >= 2
