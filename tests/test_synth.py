"""Synthetic cohort: determinism, contract conformance, and the planted biology.

Slides are read with h5py directly so these tests do not depend on the cohort reader.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from lifelines.utils import concordance_index
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from slidefm.cli import main
from slidefm.cohort.synth import (IMMUNE, RARE, STROMA, TUMOUR, SynthConfig, generate_cohort,
                                  make_world, planted_risk, read_regions)
from slidefm.errors import SlidefmError
from slidefm.grid import coords_to_grid

SMALL = dict(dim=16, min_side=12, max_side=18, genes=200)


def _small(tmp_path: Path, name: str, **kw) -> Path:
    cfg = SynthConfig(**{**SMALL, "patients": 12, **kw})
    generate_cohort(tmp_path / name, cfg)
    return tmp_path / name


def _read_slide(root: Path, slide_id: str) -> tuple[np.ndarray, np.ndarray, dict]:
    with h5py.File(root / "features" / f"{slide_id}.h5", "r") as f:
        return f["features"][()], f["coords"][()], dict(f["coords"].attrs)


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_cohort(tmp_path):
    a, b = _small(tmp_path, "a", seed=3), _small(tmp_path, "b", seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for name in files:
        if name.suffix != ".h5ad":  # anndata's HDF5 layout is not ours to pin; compared by value below
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for sid in pd.read_csv(a / "slides.csv").slide_id:
        fa, ca, aa = _read_slide(a, sid)
        fb, cb, ab = _read_slide(b, sid)
        assert fa.dtype == fb.dtype and np.array_equal(fa, fb) and np.array_equal(ca, cb) and aa == ab
        assert np.array_equal(read_regions(a, sid), read_regions(b, sid))
    ea, eb = ad.read_h5ad(a / "expression.h5ad"), ad.read_h5ad(b / "expression.h5ad")
    assert np.array_equal(ea.X, eb.X) and list(ea.obs_names) == list(eb.obs_names)


def test_different_seed_differs_but_shares_the_feature_space(tmp_path):
    a, b = _small(tmp_path, "a", seed=0, dim=32), _small(tmp_path, "b", seed=1, dim=32)
    assert (a / "clinical.csv").read_bytes() != (b / "clinical.csv").read_bytes()
    fa, _, _ = _read_slide(a, pd.read_csv(a / "slides.csv").slide_id[0])
    fb, _, _ = _read_slide(b, pd.read_csv(b / "slides.csv").slide_id[0])
    assert fa.shape != fb.shape or not np.array_equal(fa, fb)

    # Same world: a cohort's stroma centroid lies nearer the other cohort's stroma than its tumour.
    def centroids(root):
        out = {STROMA: [], TUMOUR: []}
        for sid in pd.read_csv(root / "slides.csv").slide_id:
            x = _read_slide(root, sid)[0].astype(np.float32)
            reg = read_regions(root, sid)
            for r in out:
                out[r].append(x[reg == r])
        return {r: np.concatenate(v).mean(0) for r, v in out.items()}

    ca, cb = centroids(a), centroids(b)
    assert np.linalg.norm(ca[STROMA] - cb[STROMA]) < 0.5 * np.linalg.norm(ca[STROMA] - cb[TUMOUR])


def test_smaller_cohort_is_a_prefix(tmp_path):
    a, b = _small(tmp_path, "a", patients=5), _small(tmp_path, "b", patients=12)
    sa, sb = pd.read_csv(a / "slides.csv"), pd.read_csv(b / "slides.csv")
    pd.testing.assert_frame_equal(sa, sb.iloc[: len(sa)])
    assert np.array_equal(_read_slide(a, sa.slide_id.iloc[-1])[0], _read_slide(b, sa.slide_id.iloc[-1])[0])


# ---------------------------------------------------------------------------------- contract


def test_contract_layout(tmp_path):
    root = _small(tmp_path, "c", patients=40, missing_report_fraction=0.3, missing_expression_fraction=0.3)
    slides = pd.read_csv(root / "slides.csv")
    assert list(slides.columns[:2]) == ["slide_id", "patient_id"] and "path" not in slides
    assert slides.slide_id.is_unique and {"center", "scanner"} <= set(slides.columns)
    assert slides.patient_id.value_counts().max() > 1  # some patients have several sections
    world = make_world(16, sites=4)
    geometry = set()
    for sid, center in zip(slides.slide_id, slides.center):
        feats, coords, attrs = _read_slide(root, sid)
        assert feats.dtype == np.float16 and feats.ndim == 2 and feats.shape[1] == 16
        assert coords.dtype == np.int64 and coords.shape == (len(feats), 2)
        assert np.isfinite(feats.astype(np.float32)).all()
        assert {"patch_size_level0", "patch_size", "target_magnification", "level0_magnification",
                "overlap"} <= set(attrs)
        site = next(s for s in world.sites if s.name == center)
        assert attrs["patch_size_level0"] == attrs["patch_size"] * attrs["level0_magnification"] // 20
        grid = coords_to_grid(coords, attrs["patch_size_level0"], attrs["overlap"], attrs["patch_size"])
        assert grid.step == site.stride_level0  # also checks no two patches share a cell
        assert max(grid.shape) <= SMALL["max_side"]
        assert len(read_regions(root, sid)) == len(feats)
        geometry.add((int(attrs["patch_size_level0"]), int(attrs["overlap"])))
    assert len({g[0] for g in geometry}) > 1 and any(g[1] > 0 for g in geometry)

    clinical = pd.read_csv(root / "clinical.csv")
    pids = set(slides.patient_id)
    assert set(clinical.patient_id) == pids and "split" not in clinical and "fold" not in clinical
    assert set(clinical.os_event) <= {0, 1} and (clinical.os_months > 0).all()
    tasks = yaml.safe_load((root / "tasks.yaml").read_text())["tasks"]
    assert [t["name"] for t in tasks] == ["subtype", "grade", "immune_pattern", "rare_focus", "overall_survival"]
    for t in tasks:
        assert t["level"] == "patient"
        cols = [t["label"]] if t["kind"] == "classification" else [t["time"], t["event"]]
        assert set(cols) <= set(clinical.columns)
        if t["kind"] == "classification":
            assert clinical[t["label"]].nunique() > 1
    assert yaml.safe_load((root / "cohort.yaml").read_text())["expression"] == {
        "path": "expression.h5ad", "units": "counts"}

    reports = pd.read_csv(root / "reports.csv")
    assert list(reports.columns) == ["patient_id", "text"]
    assert set(reports.patient_id) < pids and reports.text.str.len().min() > 0
    expr = ad.read_h5ad(root / "expression.h5ad")
    assert set(expr.obs_names) < pids and expr.n_vars == SMALL["genes"]
    X = np.asarray(expr.X)
    assert (X >= 0).all() and np.array_equal(X, np.round(X)) and X.sum(1).min() > 0


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["synth", str(out), "--patients", "3", "--dim", "8", "--min-side", "12", "--max-side", "14",
            "--genes", "50", "--seed", "5"]
    assert main(args) == 0
    assert (out / "slides.csv").exists() and "3 patients" in capsys.readouterr().out
    assert main(args) == 2  # refuses to overwrite
    assert main(args + ["--overwrite"]) == 0
    assert main(["synth", str(tmp_path / "bad"), "--patients", "0"]) == 2
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SlidefmError, match="min-side"):
        generate_cohort(tmp_path / "bad2", dataclasses.replace(SynthConfig(), min_side=50, max_side=40))


# ---------------------------------------------------------------------------- planted biology


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Per-patient summaries of a 160-patient cohort: mean pool, rare scores, spatial statistic."""
    root = tmp_path_factory.mktemp("synth") / "cohort"
    cfg = SynthConfig(patients=160, seed=11, dim=128, min_side=16, max_side=30, genes=100)
    generate_cohort(root, cfg)
    slides = pd.read_csv(root / "slides.csv")
    per = {}
    for sid, pid in zip(slides.slide_id, slides.patient_id):
        x, coords, attrs = _read_slide(root, sid)
        x = x.astype(np.float32)
        reg = read_regions(root, sid)
        pos = coords_to_grid(coords, attrs["patch_size_level0"], attrs["overlap"], attrs["patch_size"]).positions
        # Hand-crafted spatial statistic: fraction of an immune patch's 8 neighbours that are tumour.
        grid = np.full(tuple(pos.max(0) + 3), -1)
        grid[pos[:, 0] + 1, pos[:, 1] + 1] = reg
        imm = pos[reg == IMMUNE] + 1
        nb = np.stack([grid[imm[:, 0] + dx, imm[:, 1] + dy]
                       for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy], 1)
        spatial = ((nb == TUMOUR).sum(1) / np.maximum((nb >= 0).sum(1), 1)).mean()
        per.setdefault(pid, []).append(dict(x=x, reg=reg, spatial=spatial))
    pids = list(per)
    clinical = pd.read_csv(root / "clinical.csv").set_index("patient_id").loc[pids]
    return dict(
        per=per, pids=pids, clinical=clinical,
        mean=np.stack([np.mean([s["x"].mean(0) for s in per[p]], 0) for p in pids]),
        spatial=np.array([np.mean([s["spatial"] for s in per[p]]) for p in pids]),
        site=slides.groupby("patient_id").center.first().loc[pids].to_numpy(),
    )


def _cv_auroc(X, y) -> float:
    """Patient-level linear probe: macro AUROC averaged over stratified folds.

    Rows are patients, so the folds are patient-grouped. AUROC is computed within each fold:
    pooling predictions across folds biases a null label below 0.5 (fold intercepts differ).
    """
    aucs = []
    for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(X, y):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=1000)).fit(X[train], y[train])
        p = clf.predict_proba(X[test])
        aucs.append(roc_auc_score(y[test], p[:, 1] if p.shape[1] == 2 else p, multi_class="ovr"))
    return float(np.mean(aucs))


def _cv_predict(X, y) -> np.ndarray:
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=1000))
    return cross_val_predict(clf, X, y, cv=StratifiedKFold(5, shuffle=True, random_state=0))


def test_mean_pool_finds_subtype_and_site(planted):
    y = planted["clinical"].subtype.to_numpy()
    assert _cv_auroc(planted["mean"], y) > 0.85
    site = planted["site"]
    assert len(set(site)) == 4 and (_cv_predict(planted["mean"], site) == site).mean() > 0.9  # strong site confounding


def test_spatial_label_invisible_to_mean_pool_but_present(planted):
    y = (planted["clinical"].immune_pattern == "infiltrated").to_numpy().astype(int)
    assert 0.3 < y.mean() < 0.7
    # One-sided: a leak would push the probe above chance. Below 0.5 is the usual small-sample
    # anti-learning of cross-validated probes on a null label (shuffled labels span ~0.41-0.60 here).
    assert _cv_auroc(planted["mean"], y) < 0.62
    assert roc_auc_score(y, planted["spatial"]) > 0.95
    # Same composition in expectation: immune fraction does not differ between the patterns.
    frac = np.array([np.mean([(s["reg"] == IMMUNE).mean() for s in planted["per"][p]]) for p in planted["pids"]])
    assert abs(roc_auc_score(y, frac) - 0.5) < 0.15


def test_rare_focus_weak_for_mean_pool_strong_for_token_detector(planted):
    y = (planted["clinical"].rare_focus == "present").to_numpy().astype(int)
    assert 0.2 < y.mean() < 0.6
    assert _cv_auroc(planted["mean"], y) < 0.7
    # Token-level detector trained on half of the patients (true regions), max-pooled on the rest.
    pids, per = planted["pids"], planted["per"]
    half = np.arange(len(pids)) % 2 == 0
    rng = np.random.default_rng(0)
    xs, ts = [], []
    for p in np.array(pids)[half]:
        for s in per[p]:
            keep = (s["reg"] == RARE) | (rng.random(len(s["reg"])) < 0.05)
            xs.append(s["x"][keep])
            ts.append(s["reg"][keep] == RARE)
    det = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    det.fit(np.concatenate(xs), np.concatenate(ts))
    test = np.flatnonzero(~half)
    score = [max(det.decision_function(s["x"]).max() for s in per[pids[i]]) for i in test]
    assert roc_auc_score(y[test], score) > 0.95


def test_survival_follows_the_latent_biology(planted):
    c = planted["clinical"]
    assert 0.4 < c.os_event.mean() < 0.85  # right-censored, not all events
    assert concordance_index(c.os_months, -planted_risk(c), c.os_event) > 0.65
    infiltrated = c.immune_pattern == "infiltrated"
    rate = lambda m: c.os_event[m].sum() / c.os_months[m].sum()  # noqa: E731
    assert rate(infiltrated) < rate(~infiltrated)
