"""Omics transform (units, gene selection on train only, reindexing, state) and tabular encoders."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from slidefm.data.batch import Modality
from slidefm.errors import SlidefmError
from slidefm.modalities import MODALITY_ENCODERS, ExpressionTransform, GeneMismatchWarning

P, G, N_TRAIN = 30, 40, 20


def make_adata(X, genes=None, pids=None):
    a = ad.AnnData(X=X)
    a.obs_names = pids or [f"p{i}" for i in range(X.shape[0])]
    a.var_names = genes or [f"g{j}" for j in range(X.shape[1])]
    return a


@pytest.fixture
def counts():
    rng = np.random.default_rng(0)
    return rng.poisson(rng.gamma(2.0, 20.0, size=(1, G)), size=(P, G)).astype(np.float32)


PIDS = [f"p{i}" for i in range(P)]
TRAIN = PIDS[:N_TRAIN]


def _std(x, train_rows):
    m, s = x[train_rows].mean(0), x[train_rows].std(0)
    return (x - m) / np.where(s > 1e-8, s, 1.0)


@pytest.mark.parametrize("units", ["counts", "tpm", "log", "zscore", "binary"])
@pytest.mark.parametrize("standardize", [False, True])
def test_units_equal_manual_numpy(units, standardize, counts):
    raw = (counts > 40).astype(np.float32) if units == "binary" else counts
    if units in ("log", "zscore"):
        raw = np.log1p(counts) - (1.5 if units == "zscore" else 0.0)  # zscore data may be negative
    manual = {
        "counts": lambda x: np.log1p(x / x.sum(1, keepdims=True) * 1e4),
        "tpm": np.log1p,
    }.get(units, lambda x: x)(raw.astype(np.float64))
    if standardize:
        manual = _std(manual, slice(0, N_TRAIN))
    t = ExpressionTransform(units=units, n_top_genes=None, standardize=standardize)
    t.fit(make_adata(raw), TRAIN)
    X, present = t.transform(make_adata(raw), PIDS)
    assert X.dtype == torch.float32 and X.shape == (P, G) and present.all()
    np.testing.assert_allclose(X.numpy(), manual, rtol=1e-5, atol=1e-5)
    # Sparse input gives the same result.
    Xs, _ = ExpressionTransform(units=units, n_top_genes=None, standardize=standardize).fit(
        make_adata(sp.csr_matrix(raw)), TRAIN).transform(make_adata(sp.csr_matrix(raw)), PIDS)
    np.testing.assert_allclose(Xs.numpy(), X.numpy(), rtol=1e-6, atol=1e-6)


def test_standardize_defaults():
    assert ExpressionTransform("counts").standardize and ExpressionTransform("zscore").standardize
    assert not ExpressionTransform("binary").standardize


def test_hvg_on_training_patients_only():
    import scanpy as sc

    rng = np.random.default_rng(1)
    X = rng.poisson(50.0, size=(P, G)).astype(np.float64)
    # Genes 0-4 vary only in held-out patients, genes 5-9 only in training patients.
    X[N_TRAIN:, :5] *= np.exp(rng.normal(0, 1.5, size=(P - N_TRAIN, 5)))
    X[:N_TRAIN, 5:10] *= np.exp(rng.normal(0, 1.5, size=(N_TRAIN, 5)))
    X = np.round(X)
    t = ExpressionTransform(units="counts", n_top_genes=5).fit(make_adata(X), TRAIN)
    assert t.selection == "hvg" and len(t.genes) == 5

    ref = make_adata(X[:N_TRAIN].copy(), pids=TRAIN)
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    sc.pp.highly_variable_genes(ref, n_top_genes=5, flavor="seurat")
    disp = ref.var["dispersions_norm"].fillna(-np.inf)
    assert set(t.genes) == set(disp.sort_values(ascending=False, kind="stable").index[:5])
    assert set(t.genes) <= set(ref.var_names[ref.var["highly_variable"]])
    assert not {f"g{j}" for j in range(5)} & set(t.genes)
    # The same selection over all patients would have picked held-out-only genes (the test has power).
    leaky = ExpressionTransform(units="counts", n_top_genes=5).fit(make_adata(X), PIDS)
    assert {f"g{j}" for j in range(5)} & set(leaky.genes)
    # Statistics come from training patients only.
    Xt, _ = t.transform(make_adata(X), TRAIN)
    np.testing.assert_allclose(Xt.numpy().mean(0), 0, atol=1e-5)


def test_variance_selection_for_binary():
    rng = np.random.default_rng(2)
    freq = np.linspace(0.02, 0.5, G)
    X = (rng.random((P, G)) < freq).astype(np.float32)
    t = ExpressionTransform(units="binary", n_top_genes=6).fit(make_adata(X), TRAIN)
    var = X[:N_TRAIN].var(0)
    assert t.selection == "variance"
    assert sorted(t.genes, key=lambda g: int(g[1:])) == t.genes  # original order kept
    assert set(t.genes) == {f"g{j}" for j in np.argsort(-var, kind="stable")[:6]}


def test_gene_reindex_missing_and_unseen(counts):
    data = np.log1p(counts)
    t = ExpressionTransform(units="log", n_top_genes=None).fit(make_adata(data[:, :10]), TRAIN)
    ref, _ = t.transform(make_adata(data[:, :10]), PIDS)
    # New data: g0 and g1 missing, two unseen genes, columns shuffled.
    cols = [9, 3, 2, 7, 5, 4, 8, 6]
    new = np.concatenate([data[:, cols], np.ones((P, 2))], 1)
    genes = [f"g{c}" for c in cols] + ["new_a", "new_b"]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        X, present = t.transform(make_adata(new, genes=genes), PIDS)
    mism = [x for x in w if issubclass(x.category, GeneMismatchWarning)]
    assert len(mism) == 1
    assert "2 of 10 genes" in str(mism[0].message) and "2 genes not seen" in str(mism[0].message)
    assert present.all()
    assert torch.equal(X[:, :2], torch.zeros(P, 2))  # the training mean after standardisation
    assert torch.equal(X[:, 2:], ref[:, 2:])
    # Without standardisation a missing gene still carries the training mean.
    t2 = ExpressionTransform(units="log", n_top_genes=None, standardize=False).fit(make_adata(data[:, :10]), TRAIN)
    with pytest.warns(GeneMismatchWarning):
        X2, _ = t2.transform(make_adata(new, genes=genes), PIDS)
    np.testing.assert_allclose(X2[:, 0].numpy(), data[:N_TRAIN, 0].mean(), rtol=1e-6)


def test_given_gene_list(counts):
    with pytest.warns(GeneMismatchWarning, match="1 of 4 requested genes"):
        t = ExpressionTransform(units="tpm", genes=["g7", "g2", "nope", "g5"]).fit(make_adata(counts), TRAIN)
    assert t.genes == ["g7", "g2", "g5"] and t.selection == "given"
    X, _ = t.transform(make_adata(counts), PIDS)
    np.testing.assert_allclose(X[:, 0].numpy(), _std(np.log1p(counts.astype(np.float64)), slice(0, N_TRAIN))[:, 7],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(SlidefmError, match="none of the requested genes"):
        ExpressionTransform(units="tpm", genes=["x"]).fit(make_adata(counts), TRAIN)


def test_state_round_trip_weights_only(counts, tmp_path):
    t = ExpressionTransform(units="counts", n_top_genes=12).fit(make_adata(sp.csr_matrix(counts)), TRAIN)
    torch.save({"omics": {"expression": t.to_state()}}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["omics"]["expression"]
    u = ExpressionTransform.from_state(state)
    assert u.genes == t.genes and u.units == "counts" and u.target_sum == 1e4 and u.standardize
    a, pa = t.transform(make_adata(counts), PIDS + ["ghost"])
    b, pb = u.transform(make_adata(counts), PIDS + ["ghost"])
    assert torch.equal(a, b) and torch.equal(pa, pb)
    with pytest.raises(SlidefmError, match="version"):
        ExpressionTransform.from_state({**state, "version": 99})


def test_missing_patients_are_masked(counts):
    a = make_adata(counts[:N_TRAIN + 2])
    t = ExpressionTransform(units="counts", n_top_genes=None).fit(a, TRAIN)
    query = ["p3", "unknown", PIDS[N_TRAIN + 1], PIDS[N_TRAIN + 5]]
    X, present = t.transform(a, query)
    assert present.tolist() == [True, False, True, False]
    assert torch.equal(X[~present], torch.zeros(2, G))
    full, _ = t.transform(a, ["p3", PIDS[N_TRAIN + 1]])
    assert torch.equal(X[present], full)
    none, pn = t.transform(None, query)
    assert not pn.any() and torch.equal(none, torch.zeros(4, G))
    # Rows keyed by an obs column patient_id instead of obs_names.
    b = make_adata(counts[:N_TRAIN + 2], pids=[f"row{i}" for i in range(N_TRAIN + 2)])
    b.obs["patient_id"] = PIDS[:N_TRAIN + 2]
    Xb, pb = t.transform(b, query)
    assert torch.equal(Xb, X) and torch.equal(pb, present)
    # A missing row never reaches a loss: encoders see it but the Modality mask drops it.
    mod = Modality(X, present)
    enc = MODALITY_ENCODERS.build({"name": "mlp", "out_dim": 4}, in_dim=G)
    assert enc(mod.data)[mod.present].shape == (2, 4)


def test_bad_input_errors(counts):
    with pytest.raises(SlidefmError, match="units"):
        ExpressionTransform(units="fpkm")
    with pytest.raises(SlidefmError, match="negative"):
        ExpressionTransform("counts").fit(make_adata(counts - 100), TRAIN)
    bad = counts.copy()
    bad[0, 0] = np.nan
    with pytest.raises(SlidefmError, match="NaN"):
        ExpressionTransform("log").fit(make_adata(bad), TRAIN)
    with pytest.raises(SlidefmError, match="binary"):
        ExpressionTransform("binary").fit(make_adata(counts), TRAIN)
    with pytest.raises(SlidefmError, match="several rows for patient"):
        ExpressionTransform("log").fit(make_adata(counts, pids=["p0"] * P), TRAIN)
    with pytest.raises(SlidefmError, match="none of the training patients"):
        ExpressionTransform("log").fit(make_adata(counts), ["x", "y"])
    with pytest.raises(RuntimeError, match="not fitted"):
        ExpressionTransform("log").transform(make_adata(counts), PIDS)


@pytest.mark.parametrize("name", ["mlp", "snn", "geneset_transformer"])
def test_encoders_forward_backward(name):
    cfg = MODALITY_ENCODERS.config_class(name)(out_dim=16)
    enc = MODALITY_ENCODERS.build(cfg, in_dim=G)
    assert enc.out_dim == 16
    x = torch.randn(5, G)
    out = enc(x)
    assert out.shape == (5, 16)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters())


def test_geneset_tokens():
    genes = [f"g{j}" for j in range(10)]
    sets = {"A": ["g0", "g1", "g2"], "B": ["g2", "g5", "absent"], "C": ["zz"]}
    with pytest.warns(UserWarning, match="1 gene set"):
        enc = MODALITY_ENCODERS.build({"name": "geneset_transformer", "out_dim": 8, "dim": 16, "heads": 2,
                                       "gene_sets": sets}, in_dim=10, genes=genes)
    assert enc.set_names == ["A", "B", "other"] and enc.n_tokens == 3
    x = torch.randn(3, 10)
    t0 = enc.tokens(x)
    x2 = x.clone()
    x2[:, 5] += 1.0  # only in set B
    d = (enc.tokens(x2) - t0).abs().sum((0, 2))
    assert d[0] == 0 and d[1] > 0 and d[2] == 0
    x3 = x.clone()
    x3[:, 2] += 1.0  # in A and B
    d = (enc.tokens(x3) - t0).abs().sum((0, 2))
    assert d[0] > 0 and d[1] > 0 and d[2] == 0
    # gene -> set form gives the same grouping.
    enc2 = MODALITY_ENCODERS.build({"name": "geneset_transformer", "dim": 16, "heads": 2,
                                    "gene_sets": {"g0": "A", "g1": "A", "g2": "A"}}, in_dim=10, genes=genes)
    assert enc2.set_names == ["A", "other"]
    chunks = MODALITY_ENCODERS.build({"name": "geneset_transformer", "dim": 16, "heads": 2, "chunk_size": 4},
                                     in_dim=10)
    assert chunks.n_tokens == 3
    with pytest.raises(SlidefmError, match="genes="):
        MODALITY_ENCODERS.build({"name": "geneset_transformer", "gene_sets": sets}, in_dim=10)


def test_snn_is_self_normalising():
    torch.manual_seed(0)
    enc = MODALITY_ENCODERS.build({"name": "snn", "hidden_dims": [512] * 6, "out_dim": 8}, in_dim=256).eval()
    with torch.no_grad():
        h = enc.net[:-1](torch.randn(4096, 256))  # activations after the last SELU block
    assert abs(float(h.mean())) < 0.1 and abs(float(h.std()) - 1.0) < 0.1
    assert sum(isinstance(m, torch.nn.AlphaDropout) for m in enc.net) == 6
