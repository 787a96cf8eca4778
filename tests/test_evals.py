"""Evaluation protocols: grouped splits, no tuning on test rows, learning sanity, inputs, `slidefm eval` end to end."""

import shutil

import numpy as np
import pandas as pd
import pytest

from slidefm.errors import SlidefmError
from slidefm.evals import COLUMNS, EvalConfig, evaluate, probes, survival
from slidefm.evals.metrics import harrell_c_index, macro_auroc
from slidefm.evals.splits import check_grouped, fixed_folds, grouped_folds

QUICK = dict(folds=3, inner_folds=2, c_grid=[0.1, 1.0], bootstrap=30, fewshot_k=[1, 2], fewshot_repeats=2,
             cox_penalizers=[0.1], cox_l1_ratios=[0.0], ri_k=[5], retrieval_k=[1, 5])


def _grouped_data(seed=0, n_pat=60, d=8, signal=2.0):
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 4, n_pat)
    groups = np.repeat([f"p{i}" for i in range(n_pat)], per)
    y = np.repeat(rng.integers(0, 3, n_pat), per)
    X = rng.normal(size=(len(y), d)) + signal * np.eye(d)[y]
    return X, y, groups


def test_grouped_folds_keep_patients_together():
    X, y, groups = _grouped_data()
    splits = grouped_folds(y, groups, 5, seed=1)
    assert len(splits) == 5
    tested = np.concatenate([te for _, te in splits])
    assert sorted(tested) == list(range(len(y)))  # every row tested exactly once
    for tr, te in splits:
        assert not set(groups[tr]) & set(groups[te])
        assert len(np.unique(y[te])) == 3  # stratified
    check_grouped(splits, groups)
    with pytest.raises(SlidefmError, match="both train and test"):
        check_grouped([(np.array([0, 1]), np.array([2, 3]))], np.array(["a", "a", "a", "b"]))


def test_fixed_folds():
    splits = fixed_folds(pd.Series([0, 1, 2, 0, 1, 2]))
    assert [te.tolist() for _, te in splits] == [[0, 3], [1, 4], [2, 5]]
    [(tr, te)] = fixed_folds(["train", "val", "test", "train", "test"])
    assert tr.tolist() == [0, 1, 3] and te.tolist() == [2, 4]
    with pytest.raises(SlidefmError, match=r"1 row\(s\) have no split/fold assignment"):
        fixed_folds(["train", None, "test"])


def test_linear_probe_learns_and_tuning_never_sees_test_rows(monkeypatch):
    X, y, groups = _grouped_data()
    ids = np.arange(len(y), dtype=float)
    Xid = np.column_stack([ids, X])  # column 0 identifies the row (a nuisance feature for the probe)
    splits = grouped_folds(y, groups, 4, seed=0)
    tune_rows, fit_rows = [], []
    real_tune, real_fit = probes.tune_C, probes.fit_logreg

    def spy_tune(Xs, *a, **k):
        tune_rows.append(set(Xs[:, 0]))
        fit_rows.append([])
        return real_tune(Xs, *a, **k)

    def spy_fit(Xs, *a, **k):
        fit_rows[-1].append(set(Xs[:, 0]))
        return real_fit(Xs, *a, **k)

    monkeypatch.setattr(probes, "tune_C", spy_tune)
    monkeypatch.setattr(probes, "fit_logreg", spy_fit)
    oof, Cs = probes.cv_linear_probe(Xid, y, groups, splits, [0.01, 1.0], n_inner=3)
    assert len(tune_rows) == len(splits) == len(Cs)
    for (tr, te), seen, fits in zip(splits, tune_rows, fit_rows):
        assert seen == set(ids[tr])
        assert len(fits) == 2 * 3 + 1  # grid x inner folds, then the refit
        for rows in fits:
            assert not rows & set(ids[te])
    assert macro_auroc(y, oof) > 0.9
    # Labels unrelated to X: no better than chance.
    rng = np.random.default_rng(5)
    y_rand = rng.permutation(y)
    oof_rand, _ = probes.cv_linear_probe(X, y_rand, groups, grouped_folds(y_rand, groups, 4), [0.1])
    assert macro_auroc(y_rand, oof_rand) < 0.7


def test_fewshot_and_knn():
    X, y, groups = _grouped_data(signal=3.0)
    splits = grouped_folds(y, groups, 3)
    assert probes.feasible_shots(y, splits, [1, 2, 4, 1000]) == [1, 2, 4]
    draws = probes.fewshot_probe(X, y, splits, 4, repeats=3, C=0.5)
    assert len(draws) == 3 and not np.isnan(draws[0]).any()
    assert not np.allclose(draws[0], draws[1])  # different random draws
    assert np.mean([macro_auroc(y, p) for p in draws]) > 0.8
    knn = probes.cv_knn(X, y, splits, 10)
    assert np.allclose(knn.sum(1), 1) and macro_auroc(y, knn) > 0.9


def test_zeroshot_uses_prompt_embeddings():
    X, y, groups = _grouped_data(signal=4.0, d=3)
    vocab = {"alpha": 0, "beta": 1, "gamma": 2}

    def encoder(texts):
        return np.stack([np.eye(3)[vocab[t.split()[-1]]] + 0.01 for t in texts])

    prompts = {c: [f"an image of {w}", f"tissue with {w}"] for w, c in vocab.items()}
    proba = probes.zeroshot_proba(X, prompts, encoder)
    assert np.allclose(proba.sum(1), 1) and macro_auroc(y, proba) > 0.9
    with pytest.raises(ValueError, match="dims"):
        probes.zeroshot_proba(np.zeros((4, 5)), prompts, encoder)


def test_cox_learns_and_tuning_never_sees_test_rows(monkeypatch):
    rng = np.random.default_rng(2)
    n = 90
    X = rng.normal(size=(n, 6))
    risk = X[:, 0] - 0.5 * X[:, 1]
    time = rng.exponential(np.exp(-risk)) * 20
    event = (rng.random(n) < 0.75).astype(int)
    groups = np.array([f"p{i // 2}" for i in range(n)])  # two rows per patient
    ids = np.arange(n, dtype=float)
    Xid = np.column_stack([ids, X])
    splits = grouped_folds(event, groups, 3)
    seen = []
    real = survival.fit_cox

    def spy(Xs, *a, **k):
        seen.append(set(Xs[:, 0]))
        return real(Xs, *a, **k)

    monkeypatch.setattr(survival, "fit_cox", spy)
    out, fold_of, chosen = survival.cv_cox(Xid, time, event, groups, splits, [0.05, 1.0], [0.0], pca_dim=4, n_inner=2)
    per_fold = len(seen) // len(splits)
    assert per_fold == 2 * 2 + 1
    for f, (tr, te) in enumerate(splits):
        for rows in seen[f * per_fold:(f + 1) * per_fold]:
            assert not rows & set(ids[te])
    assert (fold_of >= 0).all() and len(chosen) == 3
    assert harrell_c_index(time, event, out) > 0.65
    g = survival.risk_groups(out, fold_of)
    assert set(g) == {0, 1} and survival.logrank_p(time, event, g) < 0.05


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    import anndata

    from slidefm.cli import main
    from slidefm.cohort import Cohort
    from slidefm.evals.baseline import mean_pool_adata

    d = tmp_path_factory.mktemp("ev")
    assert main(["synth", str(d / "cohort"), "--patients", "40", "--dim", "16", "--sites", "3", "--seed", "1",
                 "--min-side", "12", "--max-side", "20"]) == 0
    c = Cohort.open(d / "cohort")
    ad = mean_pool_adata(c)
    rng = np.random.default_rng(0)
    emb = anndata.AnnData(ad.X + rng.normal(0, 0.05, ad.X.shape).astype(np.float32), obs=ad.obs[[]])
    emb.write_h5ad(d / "slide_emb.h5ad")
    return d, c, emb


def test_embedding_level_detection_and_pooling(small_cohort):
    import anndata

    from slidefm.evals.data import load_embeddings, pool_to_patients

    d, c, emb = small_cohort
    e = load_embeddings(emb, c)
    assert e.level == "slide" and (e.units["patient_id"] == c.slides.loc[e.units.index, "patient_id"]).all()
    assert e.units["site"].notna().all()
    p = pool_to_patients(e)
    pid = c.patient_ids[0]
    assert np.allclose(p.X[list(p.units.index).index(pid)], e.X[(e.units["patient_id"] == pid).to_numpy()].mean(0))
    pat = anndata.AnnData(p.X, obs=pd.DataFrame(index=p.units.index))
    assert load_embeddings(pat, c).level == "patient"
    pat.uns["level"] = "slide"
    with pytest.raises(SlidefmError, match="not in the cohort"):
        load_embeddings(pat, c)
    bad = anndata.AnnData(np.zeros((2, 3)), obs=pd.DataFrame(index=["x", "y"]))
    with pytest.raises(SlidefmError, match="match neither"):
        load_embeddings(bad, c)


def test_fixed_fold_column_is_used(small_cohort, tmp_path):
    d, c, emb = small_cohort
    root = tmp_path / "cohort"
    shutil.copytree(d / "cohort", root)
    clin = pd.read_csv(root / "clinical.csv")
    clin["fold"] = np.arange(len(clin)) % 4
    clin.to_csv(root / "clinical.csv", index=False)
    cfg = EvalConfig(**{**QUICK, "protocols": ["linear_probe"], "baseline": False})
    res = evaluate(emb, root, tasks=[{"name": "subtype", "kind": "classification", "label": "subtype"}], config=cfg)
    assert len(res.artifacts.hyperparameters[("subtype", "model", "linear_probe C")]) == 4
    assert set(res.results.metric) == {"auroc", "balanced_accuracy", "weighted_f1"}


def test_cli_end_to_end(small_cohort, tmp_path):
    from slidefm.cli import main

    d, c, emb = small_cohort
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(
        "tasks:\n"
        "  - {name: subtype, kind: classification, level: patient, label: subtype}\n"
        "  - {name: grade, kind: classification, level: patient, label: grade, ordinal: true}\n"
        "  - {name: os, kind: survival, level: patient, time: os_months, event: os_event}\n")
    out = tmp_path / "out"
    args = ["eval", "--embeddings", str(d / "slide_emb.h5ad"), "--cohort", str(d / "cohort"), "--tasks", str(tasks),
            "--out", str(out), "--folds", "3", "--inner-folds", "2", "--c-grid", "0.1", "1", "--bootstrap", "30",
            "--fewshot-k", "1", "2", "--fewshot-repeats", "2", "--cox-penalizers", "0.1", "--cox-l1-ratios", "0",
            "--ri-k", "5", "--retrieval-k", "1", "5", "--no-umap"]
    assert main(args) == 0
    res = pd.read_csv(out / "results.csv")
    assert list(res.columns) == COLUMNS
    assert set(res.model) == {"model", "mean_pool"}
    kinds = set(res.kind)
    assert {"linear_probe", "knn", "fewshot_k1", "fewshot_k2", "retrieval", "cox", "robustness", "site_probe",
            "site_holdout"} <= kinds
    assert "quadratic_kappa" in set(res[res.task == "grade"].metric)
    lp = res[(res.kind == "linear_probe") & (res.metric == "auroc")]
    assert (lp.ci_low <= lp["mean"]).all() and (lp["mean"] <= lp.ci_high).all()
    assert (res[res.kind == "robustness"].n > 0).all()
    summary = (out / "summary.md").read_text()
    assert "mean_pool" in summary and "gain" in summary and "| subtype | linear_probe | auroc |" in summary
    pngs = {p.name for p in (out / "plots").glob("*.png")}
    # UMAP (tens of seconds of numba compilation) is exercised by tests/test_notebooks.py instead.
    assert {"roc_subtype.png", "roc_grade.png", "km_os.png", "robustness_index.png", "fewshot_subtype.png"} <= pngs
    assert (out / "mean_pool.h5ad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    # --no-baseline: only the model; bad input: exit code 2 with a message, nothing written.
    out2 = tmp_path / "out2"
    assert main(args[:7] + ["--out", str(out2), "--no-baseline", "--protocols", "linear_probe", "--no-plots",
                               "--bootstrap", "0", "--folds", "3", "--inner-folds", "2", "--c-grid", "1"]) == 0
    assert set(pd.read_csv(out2 / "results.csv").model) == {"model"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks:\n  - {name: x, kind: classification, label: no_such_column}\n")
    out3 = tmp_path / "out3"
    assert main(args[:5] + ["--tasks", str(bad), "--out", str(out3), "--no-baseline"]) == 2
    assert not (out3 / "results.csv").exists()


def test_zeroshot_runs_only_with_encoder_and_prompts(small_cohort):
    d, c, emb = small_cohort
    rng = np.random.default_rng(0)
    words = {}

    def encoder(texts):  # a fixed random vector per text, width of the embeddings
        return np.stack([words.setdefault(t, rng.normal(size=emb.n_vars)) for t in texts])

    task = {"name": "subtype", "kind": "classification", "label": "subtype",
            "prompts": {"acinar": ["acinar"], "solid": ["solid", "solid sheets"], "papillary": "papillary"}}
    cfg = EvalConfig(**{**QUICK, "protocols": ["zeroshot"], "baseline": False})
    res = evaluate(emb, c, tasks=[task], config=cfg, text_encoder=encoder)
    z = res.results[res.results.kind == "zeroshot"]
    assert set(z.metric) == {"auroc", "balanced_accuracy", "weighted_f1"} and (z.n == len(c.patient_ids)).all()
    assert set(evaluate(emb, c, tasks=[task], config=cfg).results.kind) == set()  # no encoder: nothing


def test_summary_says_why_a_requested_protocol_has_no_rows(small_cohort, tmp_path):
    from slidefm.evals.report import summary_markdown

    d, c, emb = small_cohort
    task = {"name": "subtype", "kind": "classification", "label": "subtype"}
    cfg = EvalConfig(**{**QUICK, "protocols": ["linear_probe", "zeroshot"], "baseline": False})
    res = evaluate(emb, c, tasks=[task], config=cfg)
    md = summary_markdown(res, cfg)
    assert "Protocols: linear_probe. Requested without results: zeroshot (reasons under Notes)." in md
    assert "- zero-shot: not run, no text encoder" in md
    res = evaluate(emb, c, tasks=[task], config=cfg, text_encoder=lambda texts: np.zeros((len(texts), emb.n_vars)))
    assert "- zero-shot: not run, no classification task in tasks.yaml has prompts" in summary_markdown(res, cfg)


def test_grid_edge_note_flags_a_best_value_at_the_grid_edge():
    from slidefm.evals.evaluate import grid_edge_note

    grid = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    note = grid_edge_note([1e-3, 1e-3, 1e-2, 1e-3, 1e-3], grid, "C", "--c-grid")
    assert note == "C chose the grid's lowest value (0.001) in 4 of 5 folds: the best C may lie beyond the grid (--c-grid)"
    assert "highest value (10)" in grid_edge_note([10.0, 10.0, 1.0], grid, "C", "--c-grid")
    assert grid_edge_note([1e-3, 1e-3, 1.0, 10.0], grid, "C", "--c-grid") is None  # half is not most
    assert grid_edge_note([0.1] * 5, grid, "C", "--c-grid") is None
    assert grid_edge_note([1.0, 1.0], [1.0], "C", "--c-grid") is None  # a one-value grid tunes nothing
