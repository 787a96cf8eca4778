"""Metrics cross-checked against sklearn, lifelines, scikit-survival, croma and worked examples."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

from slidefm.evals.metrics import (
    balanced_accuracy, binary_auroc, classification_metrics, cluster_bootstrap, harrell_c_index, macro_auroc,
    quadratic_kappa, weighted_f1,
)
from slidefm.evals.retrieval import neighbours, retrieval_scores
from slidefm.evals.robustness import ri_counts, robustness_index


@pytest.mark.parametrize("seed", [0, 1])
def test_auroc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    s = rng.normal(size=200) + y
    s[:40] = np.round(s[:40])  # ties
    assert binary_auroc(y == 1, s) == pytest.approx(roc_auc_score(y, s))
    y3 = rng.integers(0, 3, 300)
    p = rng.dirichlet(np.ones(3), 300)
    p[np.arange(300), y3] += 0.3
    p /= p.sum(1, keepdims=True)
    assert macro_auroc(y3, p) == pytest.approx(roc_auc_score(y3, p, multi_class="ovr", average="macro"))
    p2 = np.stack([1 - s / 10, s / 10], 1)
    assert macro_auroc(y, p2) == pytest.approx(roc_auc_score(y, s))


def test_label_metrics_match_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 150)
    pred = np.where(rng.random(150) < 0.6, y, rng.integers(0, 4, 150))
    assert balanced_accuracy(y, pred) == pytest.approx(balanced_accuracy_score(y, pred))
    assert weighted_f1(y, pred) == pytest.approx(f1_score(y, pred, average="weighted"))
    assert quadratic_kappa(y, pred, 4) == pytest.approx(cohen_kappa_score(y, pred, labels=range(4), weights="quadratic"))
    # A class never predicted and one never true: still agrees once sklearn is told all labels.
    pred2 = np.where(pred == 3, 2, pred)
    assert quadratic_kappa(y, pred2, 5) == pytest.approx(
        cohen_kappa_score(y, pred2, labels=range(5), weights="quadratic"))
    m = classification_metrics(y, np.eye(4)[pred], ordinal=True)
    assert set(m) == {"auroc", "balanced_accuracy", "weighted_f1", "quadratic_kappa"}


@pytest.mark.parametrize("ties", [False, True])
def test_c_index_matches_lifelines_and_sksurv(ties):
    from lifelines.utils import concordance_index
    from sksurv.metrics import concordance_index_censored

    rng = np.random.default_rng(7)
    n = 120
    risk = rng.normal(size=n)
    time = rng.exponential(np.exp(-risk)) * 10
    event = rng.random(n) < 0.7
    if ties:  # tied times (event and censored at the same time) and tied risks
        time = np.round(time)
        risk = np.round(risk, 1)
    ours = harrell_c_index(time, event, risk)
    # lifelines scores are "higher = longer survival": pass the negated risk.
    assert ours == pytest.approx(concordance_index(time, -risk, event))
    assert ours == pytest.approx(concordance_index_censored(event, time, risk)[0])
    assert ours > 0.6
    # By hand: 3 patients, events at t=1 and t=2, censored at t=3.
    assert harrell_c_index([1, 2, 3], [1, 1, 0], [3, 2, 1]) == 1.0
    assert harrell_c_index([1, 2, 3], [1, 1, 0], [1, 2, 3]) == 0.0
    assert harrell_c_index([1, 2, 3], [1, 1, 0], [1, 1, 1]) == 0.5


def test_cluster_bootstrap_resamples_whole_patients():
    groups = np.array(["a", "a", "b", "c", "c", "c"])
    seen = []

    def stat(idx):
        seen.append(idx)
        return {"n": float(len(idx))}

    ci = cluster_bootstrap(stat, groups, n_boot=200, seed=0)
    for idx in seen:
        g = groups[idx]
        # every drawn patient contributes all of its rows, as many times as it was drawn
        for p, size in (("a", 2), ("b", 1), ("c", 3)):
            assert (g == p).sum() % size == 0
    lo, hi = ci["n"]
    assert 3 <= lo <= hi <= 9


def _by_hand_example():
    # Five rows on a circle; row i at angle theta_i, patients p0 (rows 0, 1), p1, p2, p3.
    theta = np.array([0.0, 0.1, 0.3, 1.2, 2.5])
    X = np.stack([np.cos(theta), np.sin(theta)], 1) * np.array([[1], [2], [3], [1], [5]])  # norms irrelevant
    y = np.array(["A", "A", "B", "A", "B"])
    groups = np.array(["p0", "p0", "p1", "p2", "p3"])
    sites = np.array(["s1", "s2", "s1", "s2", "s1"])
    return X, y, groups, sites


def test_neighbours_exclude_same_patient():
    X, y, groups, sites = _by_hand_example()
    nn = neighbours(X, groups, 3)
    # row 0 (angle 0): row 1 is its own patient; then angles 0.3, 1.2, 2.5
    assert nn[0].tolist() == [2, 3, 4]
    assert nn[2].tolist() == [1, 0, 3]
    assert neighbours(X, groups, 4)[0].tolist() == [2, 3, 4, -1]


def test_retrieval_by_hand():
    X, y, groups, sites = _by_hand_example()
    hit1, ap1 = retrieval_scores(X, y, groups, 1)
    hit2, ap2 = retrieval_scores(X, y, groups, 2)
    # Row 0 (A): ranking 2(B), 3(A), 4(B); relevant among other patients R = 1 (row 3).
    assert hit1[0] == 0 and ap1[0] == 0
    assert hit2[0] == 1 and ap2[0] == pytest.approx(0.5)  # (1/min(2,1)) * precision@2 = 1/2
    # Row 3 (A, angle 1.2): ranking 2 (0.9 away), 1 (1.1), 0 (1.2), 4 (1.3); R = 2 (rows 0, 1).
    assert hit1[3] == 0 and hit2[3] == 1
    assert ap2[3] == pytest.approx(0.5 * (1 / 2))  # rel = [0, 1]: (1/2) * (1/2)
    # Row 4 (B): ranking 3(A), 2(B), ...; R = 1.
    assert ap2[4] == pytest.approx(0.5) and hit1[4] == 0
    # Row 2 (B): ranking 1(A), 0(A), 3(A), 4(B): nothing relevant in the top 2.
    assert hit2[2] == 0 and ap2[2] == 0
    assert np.nanmean(hit2) == pytest.approx((1 + 1 + 0 + 1 + 1) / 5)


def test_robustness_index_by_hand():
    X, y, groups, sites = _by_hand_example()
    so, os_ = ri_counts(X, y, sites, groups, 2)
    # row 0 (A,s1): nn 2 (B,s1) -> OS, 3 (A,s2) -> SO
    # row 1 (A,s2): nn 2 (B,s1) -> OO, 3 (A,s2) -> SS
    # row 2 (B,s1): nn 1 (A,s2) -> OO, 0 (A,s1) -> OS
    # row 3 (A,s2): nn 2 (B,s1) -> OO, 1 (A,s2) -> SS
    # row 4 (B,s1): nn 3 (A,s2) -> OO, 2 (B,s1) -> SS
    assert so.tolist() == [1, 0, 0, 0, 0]
    assert os_.tolist() == [1, 0, 1, 0, 0]
    ri, support = robustness_index(so, os_)
    assert ri == pytest.approx(1 / 3) and support == 3


def test_robustness_index_matches_croma():
    croma = pytest.importorskip("croma")
    rng = np.random.default_rng(11)
    n_pat = 80
    slides_per = rng.integers(1, 4, n_pat)
    groups = np.repeat([f"p{i}" for i in range(n_pat)], slides_per)
    label = np.repeat(rng.integers(0, 3, n_pat), slides_per)
    site = np.repeat(rng.integers(0, 4, n_pat), slides_per)
    X = rng.normal(size=(len(groups), 16)) + 1.5 * np.eye(16)[label] + 1.0 * np.eye(16)[8 + site]
    manifest = pd.DataFrame({
        "sample_id": [f"s{i}" for i in range(len(groups))], "image_path": "-", "label": label.astype(str),
        "group_id": groups, "center": site.astype(str),
    })
    ks = [1, 5, 10, 20]
    curve = croma.RI.compute_curve(X, manifest, confounder_column="center", k_values=ks)
    for k in ks:
        ri, support = robustness_index(*ri_counts(X, label, site, groups, k))
        assert support > 0
        assert ri == pytest.approx(curve[k], abs=1e-12)
