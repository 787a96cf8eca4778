"""Patient-stage losses: Cox, discrete-time survival, multi-task classification."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from slidefm.objectives import (
    OBJECTIVES,
    DiscreteTimeSurvival,
    MultiTaskLoss,
    SupervisedConfig,
    balanced_class_weights,
    cox_ph_loss,
    quantile_cuts,
)


def test_cox_matches_lifelines_partial_likelihood():
    from lifelines import CoxPHFitter

    rng = np.random.default_rng(0)
    n = 30
    x = rng.normal(size=(n, 2))
    time = rng.permutation(np.arange(1, n + 1)).astype(float) + rng.random(n) * 0.1  # no ties
    event = (rng.random(n) < 0.7).astype(float)
    df = pd.DataFrame({"x0": x[:, 0], "x1": x[:, 1], "T": time, "E": event})
    cph = CoxPHFitter().fit(df, duration_col="T", event_col="E")
    beta = cph.params_[["x0", "x1"]].to_numpy()
    risk = torch.tensor(x @ beta, dtype=torch.float32)
    loss = cox_ph_loss(risk, torch.tensor(time), torch.tensor(event))
    assert float(loss) * event.sum() == pytest.approx(-cph.log_likelihood_, rel=1e-5)


def test_cox_breslow_ties_and_masking_by_hand():
    risk = torch.tensor([0.5, -0.2, 1.0, 0.3, 7.0, 0.0], requires_grad=True)
    time = torch.tensor([2.0, 2.0, 2.0, 3.0, float("nan"), 2.0])
    event = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    valid = torch.tensor([True, True, True, True, True, False])  # row 4: NaN time; row 5: masked
    r = [0.5, -0.2, 1.0, 0.3]
    # events at t=2 (rows 0, 1; tied; risk set rows 0-3, row 2 censored at t=2 included) and t=3 (row 3)
    rs2 = math.log(sum(math.exp(r[j]) for j in (0, 1, 2, 3)))
    want = -((r[0] - rs2) + (r[1] - rs2) + (r[3] - r[3])) / 3
    loss = cox_ph_loss(risk, time, event, valid)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-6)
    loss.backward()
    assert risk.grad[4] == 0 and risk.grad[5] == 0 and risk.grad[2] != 0  # censored row 2 is in the risk set
    none = cox_ph_loss(risk, time, torch.zeros(6))
    assert float(none.detach()) == 0.0 and none.requires_grad


def test_discrete_time_nll_by_hand():
    surv = DiscreteTimeSurvival.fit_bins([1.0, 2.0, 3.0, 4.0, 5.0, 9.0], [1, 1, 1, 1, 1, 0], n_bins=3)
    cuts = np.quantile([1.0, 2.0, 3.0, 4.0, 5.0], [1 / 3, 2 / 3])
    torch.testing.assert_close(surv.cuts, torch.tensor(cuts, dtype=torch.float32))
    logits = torch.tensor([[0.2, -1.0, 0.5], [1.0, 0.3, -0.4], [-0.5, 0.1, 2.0], [0.0, 0.0, 0.0]])
    time = torch.tensor([2.0, 4.5, 0.5, float("nan")])
    event = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert surv.bin_index(time[:3]).tolist() == [0, 2, 0]  # cuts ~2.33, 3.67
    h = torch.sigmoid(logits)
    want = [
        -math.log(h[0, 0]),  # event in bin 0
        -math.log((1 - h[1, 0]) * (1 - h[1, 1]) * (1 - h[1, 2])),  # censored in bin 2: survived it
        -math.log(1 - h[2, 0]),  # censored in bin 0
    ]
    loss = surv(logits, time, event)
    assert float(loss) == pytest.approx(sum(want) / 3, rel=1e-6)
    event2 = torch.tensor([0.0, 1.0, 1.0, 0.0])  # events in bins 2 and 0
    want2 = [-math.log(1 - h[0, 0]),
             -math.log((1 - h[1, 0]) * (1 - h[1, 1]) * h[1, 2]),
             -math.log(h[2, 0])]
    assert float(surv(logits, time, event2)) == pytest.approx(sum(want2) / 3, rel=1e-6)
    s = torch.cumprod(1 - h, -1)
    torch.testing.assert_close(DiscreteTimeSurvival.risk(logits), -s.sum(-1))
    with pytest.raises(RuntimeError, match="DiscreteTimeSurvival has no bins"):
        DiscreteTimeSurvival(3)(logits, time, event)


def _tasks():
    return [{"name": "subtype", "kind": "classification", "classes": ["a", "b", "c"], "label": "x"},
            {"name": "os", "kind": "survival", "time": "t", "event": "e"}]


def test_classification_matches_torch_with_smoothing_and_balanced_weights():
    from sklearn.utils.class_weight import compute_class_weight

    train = torch.tensor([0, 0, 0, 1, 2, 2, -1, 0])
    w = balanced_class_weights(train, 3)
    ref_w = compute_class_weight("balanced", classes=np.arange(3), y=train[train >= 0].numpy())
    torch.testing.assert_close(w, torch.tensor(ref_w, dtype=torch.float32))

    torch.manual_seed(0)
    obj = MultiTaskLoss(SupervisedConfig(label_smoothing=0.2), dim=4, tasks=_tasks()[:1])
    obj.fit({"subtype": train})
    z = torch.randn(5, 4)
    y = torch.tensor([2, -1, 0, 1, -1])
    out = obj(z, {"subtype": y})
    logits = obj.heads[0](z)
    keep = y >= 0
    ref = F.cross_entropy(logits[keep], y[keep], weight=w, label_smoothing=0.2)
    torch.testing.assert_close(out["loss/subtype"], ref.detach())
    assert out["n/subtype"] == 3
    # by hand: weighted smoothed CE normalised by the targets' weights
    lp = F.log_softmax(logits[keep], -1).detach()
    yk = y[keep]
    per = [(0.8 * w[t] * -lp[i, t] + 0.2 / 3 * (w * -lp[i]).sum()) for i, t in enumerate(yk.tolist())]
    assert float(out["loss"].detach()) == pytest.approx(float(sum(per) / w[yk].sum()), rel=1e-5)
    # garbage at masked rows changes nothing
    z2 = z.clone()
    z2[1] = 1e4
    z2[4] = -3e3
    torch.testing.assert_close(obj(z2, {"subtype": y})["loss"], out["loss"])


def test_multitask_missing_labels_and_unfitted():
    torch.manual_seed(0)
    obj = MultiTaskLoss(SupervisedConfig(n_bins=2, task_weights={"os": 0.5}), dim=4, tasks=_tasks())
    with pytest.raises(RuntimeError, match=r"MultiTaskLoss\.fit\(train_labels\) must run before training"):
        obj(torch.randn(3, 4), {"subtype": torch.tensor([0, 1, 2])})
    obj.fit({"subtype": torch.tensor([0, 1, 2, 2]), "os/time": torch.tensor([1.0, 2.0, 3.0, float("nan")]),
             "os/event": torch.tensor([1.0, 1.0, 0.0, 1.0])})
    assert obj.survival[1].cuts.tolist() == [1.5]
    z = torch.randn(3, 4, requires_grad=True)
    labels = {"subtype": torch.tensor([-1, -1, -1]), "os/time": torch.tensor([1.0, float("nan"), 2.5]),
              "os/event": torch.tensor([1.0, 1.0, 0.0])}
    out = obj(z, labels)
    assert float(out["loss/subtype"]) == 0.0 and out["n/subtype"] == 0 and out["n/os"] == 2
    surv_ref = obj.survival[1](obj.heads[1](z), labels["os/time"], labels["os/event"])
    torch.testing.assert_close(out["loss"], 0.5 * surv_ref)
    out["loss"].backward()
    head0 = obj.heads[0].net[-1].weight
    assert head0.grad is not None and head0.grad.abs().sum() == 0  # in the graph, zero gradient
    assert z.grad[1].abs().sum() == 0 and z.grad[0].abs().sum() > 0
    pred = obj.predict(z.detach())
    assert pred["subtype"].shape == (3, 3) and pred["os"].shape == (3,)
    # checkpoints carry fitted weights and bins
    fresh = MultiTaskLoss(SupervisedConfig(n_bins=2), dim=4, tasks=_tasks())
    fresh.load_state_dict(obj.state_dict())
    assert fresh.survival[1].cuts.tolist() == [1.5] and bool(fresh.class_weights_fitted_0)


def test_cox_multitask_and_registry():
    tasks = _tasks() + [{"name": "slide_grade", "kind": "classification", "n_classes": 2, "level": "slide"}]
    obj = OBJECTIVES.build(SupervisedConfig(survival_loss="cox", class_weighting=None), dim=4, tasks=tasks)
    assert [t.name for t in obj.tasks] == ["subtype", "os"]  # slide-level tasks have no patient labels
    z = torch.randn(4, 4)
    labels = {"os/time": torch.tensor([1.0, 2.0, 3.0, 4.0]), "os/event": torch.tensor([1.0, 0.0, 1.0, 1.0])}
    out = obj(z, labels)
    ref = cox_ph_loss(obj.heads[1](z)[:, 0], labels["os/time"], labels["os/event"])
    torch.testing.assert_close(out["loss"], ref)
    assert out["n/subtype"] == 0


def test_quantile_cuts_ignore_censored_and_missing():
    cuts = quantile_cuts([1.0, 2.0, 3.0, 100.0, float("nan")], [1, 1, 1, 0, 1], n_bins=2)
    assert cuts.tolist() == [2.0]
