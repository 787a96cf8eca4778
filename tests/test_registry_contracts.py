"""Contracts every registered component keeps, enumerated from the registries (a new one cannot escape).

* configs: each registered name has a config dataclass whose ``name`` is that name; every config field is a
  parameter of the component (read somewhere) and every component option is a config field, with the same
  default (options are declared in two places today; this keeps them in step);
* aggregators: packed slides -> (B, dim) slide and (T, dim) token embeddings, packing-invariant, mask-aware,
  differentiable, rebuilt identically from a state dict;
* case models: (S, d) slides of P patients -> (P, d), invariant to the order of a patient's slides;
* modality towers and objectives: each builds from its default config and runs forward/backward.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest
import torch

from slidefm.data.batch import pack_slides
from slidefm.modalities import MODALITY_ENCODERS
from slidefm.models.aggregators import AGGREGATORS, build_aggregator
from slidefm.models.case import CASE_MODELS, build_case_transformer
from slidefm.objectives import OBJECTIVES

REGISTRIES = {"aggregator": AGGREGATORS, "case model": CASE_MODELS, "modality encoder": MODALITY_ENCODERS,
              "objective": OBJECTIVES}
# Passed by the code that builds the component (widths, the student network, tasks), not configured.
BUILD_EXTRAS = {"in_dim", "out_dim", "dim", "embed_dim", "student", "tasks", "expert_dims", "genes", "weight"}
IN_DIM = 12


def _entries():
    return [(kind, name) for kind, reg in REGISTRIES.items() for name in reg.names()]


def _canonical(v):
    """Defaults that mean the same: tuples and lists alike (YAML has only lists); None and an empty container
    (the components read ``x or {}``)."""
    if isinstance(v, (list, tuple)):
        return [_canonical(x) for x in v] or None
    if isinstance(v, dict):
        return {k: _canonical(x) for k, x in v.items()} or None
    return v


def _options(fn) -> dict[str, inspect.Parameter]:
    """Keyword options of a builder; through ``**kwargs`` into the class it returns."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    params = dict(inspect.signature(target).parameters)
    params.pop("self", None)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        ret = typing.get_type_hints(fn).get("return")
        assert inspect.isclass(ret), f"{fn.__name__} takes **kwargs: annotate the class it returns"
        params = {k: p for k, p in params.items() if p.kind is not p.VAR_KEYWORD}
        params.update({k: p for k, p in _options(ret).items() if k not in params})
    return {k: p for k, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


@pytest.mark.parametrize("kind,name", _entries())
def test_config_and_component_declare_the_same_options(kind, name):
    reg = REGISTRIES[kind]
    cls = reg.config_class(name)
    assert cls is not None and dataclasses.is_dataclass(cls), f"{kind} '{name}' has no config dataclass"
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert fields["name"].default == name
    params = _options(reg.get(name))
    unread = sorted(set(fields) - {"name"} - set(params))
    assert not unread, f"{kind} '{name}': config fields the component never takes: {unread}"
    unsettable = sorted(k for k, p in params.items()
                        if p.default is not inspect.Parameter.empty and k not in fields and k not in BUILD_EXTRAS)
    assert not unsettable, f"{kind} '{name}': options missing from {cls.__name__}: {unsettable}"
    for k, f in fields.items():
        if k == "name" or params[k].default is inspect.Parameter.empty:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        p = params[k].default
        assert _canonical(default) == _canonical(p), \
            f"{kind} '{name}'.{k}: {cls.__name__} says {default!r}, the component {p!r}"


def _slides(lens=(7, 1, 12), seed=0, mask=False):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(n, IN_DIM, generator=g) for n in lens]
    pos = [torch.randperm(36, generator=g)[:n] for n in lens]
    x = pack_slides(feats, [torch.stack([p % 6, p // 6], 1) for p in pos])
    if mask:
        x.token_mask = torch.rand(x.tokens.shape[0], generator=g) < 0.3
    return x


@pytest.fixture(params=AGGREGATORS.names())
def aggregator(request):
    torch.manual_seed(0)
    return request.param, build_aggregator(AGGREGATORS.config_class(request.param)(), in_dim=IN_DIM).eval()


def test_aggregator_shapes_and_packing(aggregator):
    name, agg = aggregator
    x = _slides()
    with torch.no_grad():
        out = agg(x)
        assert out.slide.shape == (3, agg.dim) and out.tokens.shape == (x.tokens.shape[0], agg.dim), name
        assert torch.isfinite(out.slide).all() and torch.isfinite(out.tokens).all()
        for i, n in enumerate(x.lengths.tolist()):  # the same slide alone: same embedding
            s, e = int(x.offsets[i]), int(x.offsets[i + 1])
            alone = agg(pack_slides([x.tokens[s:e]], [x.positions[s:e]]))
            torch.testing.assert_close(alone.slide[0], out.slide[i], atol=2e-5, rtol=1e-4, msg=name)
            torch.testing.assert_close(alone.tokens, out.tokens[s:e], atol=2e-5, rtol=1e-4, msg=name)


def test_aggregator_mask_gradients_and_state(aggregator):
    name, agg = aggregator
    x, xm = _slides(), _slides(mask=True)
    assert xm.token_mask.any()
    with torch.no_grad():
        a, b = agg(x).slide, agg(xm).slide
        none_masked = _slides()
        none_masked.token_mask = torch.zeros(x.tokens.shape[0], dtype=torch.bool)
        torch.testing.assert_close(agg(none_masked).slide, a, msg=f"{name}: an all-False mask changed the output")
    assert not torch.allclose(a, b), f"{name} ignores token_mask"
    agg.train()
    out = agg(xm)
    (out.slide.square().mean() + out.tokens.mean()).backward()
    grads = [p.grad for p in agg.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
    assert getattr(agg, "mask_token", None) is None or agg.mask_token.grad is not None, f"{name}: mask unused"
    agg.eval()
    torch.manual_seed(1)
    twin = build_aggregator(AGGREGATORS.config_class(name)(), in_dim=IN_DIM).eval()
    twin.load_state_dict(agg.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(twin(x).slide, agg(x).slide)


@pytest.mark.parametrize("name", CASE_MODELS.names())
def test_case_model_contract(name):
    torch.manual_seed(0)
    cfg = CASE_MODELS.config_class(name)(heads=2)
    case = build_case_transformer(cfg, dim=16).eval()
    emb = torch.randn(6, 16)
    offsets = torch.tensor([0, 2, 3, 6])
    with torch.no_grad():
        out = case(emb, offsets)
        assert out.shape == (3, 16) and torch.isfinite(out).all()
        perm = torch.tensor([1, 0, 2, 5, 3, 4])  # slides reordered within each patient
        torch.testing.assert_close(case(emb[perm], offsets), out, atol=1e-5, rtol=1e-5)
    case.train()
    case(emb, offsets).sum().backward()
    assert all(p.grad is not None for p in case.parameters() if p.requires_grad)


# What each modality tower / objective needs from the code that builds it; a registered name without an
# entry fails test_every_registered_component_has_a_contract_case.
GENES = [f"G{i}" for i in range(20)]


def _tower_case(name, tiny_bert):
    cfg = MODALITY_ENCODERS.config_class(name)()
    if name == "text":
        enc = MODALITY_ENCODERS.build(dataclasses.replace(cfg, model_dir=str(tiny_bert), max_length=16,
                                                          trainable="full"), out_dim=8)
        return enc, lambda: enc(enc.tokenize(["a report", "another, longer report"])), 2
    extra = {"genes": GENES} if name == "geneset_transformer" else {}
    enc = MODALITY_ENCODERS.build(cfg, in_dim=len(GENES), out_dim=8, **extra)
    x = torch.randn(5, len(GENES))
    return enc, lambda: enc(x), 5


TOWERS = {"text", "mlp", "snn", "geneset_transformer"}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, make_tiny_bert):
    return make_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.mark.parametrize("name", MODALITY_ENCODERS.names())
def test_modality_tower_contract(name, tiny_bert):
    enc, run, n = _tower_case(name, tiny_bert)
    enc.train()
    z = run()
    assert z.shape == (n, 8) and torch.isfinite(z).all()
    z.square().mean().backward()
    assert any(p.grad is not None for p in enc.parameters() if p.requires_grad)


def _objective_case(name):
    from slidefm.data.types import Views

    cfg = OBJECTIVES.config_class(name)()
    torch.manual_seed(0)
    if name == "contrastive":
        obj = OBJECTIVES.build(cfg, embed_dim=8)
        pairs = [tuple(p) for p in obj.pairs]
        mods = sorted({m for p in pairs for m in p})
        emb = {m: torch.randn(6, 8, requires_grad=True) for m in mods}
        present = {m: torch.ones(6, dtype=torch.bool) for m in mods}
        return obj, lambda: obj(emb, present), list(emb.values())
    if name == "distillation":
        student = build_aggregator(AGGREGATORS.config_class("vit")(dim=16, depth=1, heads=2), in_dim=IN_DIM)
        obj = OBJECTIVES.build(dataclasses.replace(cfg, out_dim=32, hidden_dim=32, bottleneck_dim=16, n_global=2),
                               student=student)
        g = _slides(lens=(9, 9, 9, 9), mask=True)
        views = Views(global_views=g, local_views=None, n_global=2, n_local=0)
        return obj, lambda: obj(student, views, step=0), list(student.parameters())
    if name == "supervised":
        tasks = [{"name": "subtype", "kind": "classification", "level": "patient", "classes": ["a", "b", "c"]},
                 {"name": "os", "kind": "survival", "level": "patient"}]
        obj = OBJECTIVES.build(cfg, dim=8, tasks=tasks)
        labels = {"subtype": torch.tensor([0, 1, 2, -1, 1, 0]), "os/time": torch.rand(6) * 10 + 1,
                  "os/event": torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])}
        obj.fit(labels)
        x = torch.randn(6, 8, requires_grad=True)
        return obj, lambda: obj(x, labels), [x]
    if name == "expert":
        obj = OBJECTIVES.build(cfg, dim=8, expert_dims={"titan": 5})
        x = torch.randn(6, 8, requires_grad=True)
        present = torch.tensor([True, True, False, True, True, True])
        return obj, lambda: obj(x, {"titan": torch.randn(6, 5)}, {"titan": present}), [x]
    raise KeyError(name)


OBJECTIVE_CASES = {"contrastive", "distillation", "supervised", "expert"}


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_objective_contract(name):
    obj, run, inputs = _objective_case(name)
    out = run()
    loss = out["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss), f"{name}: loss {loss}"
    loss.backward()
    assert any(t.grad is not None and t.grad.abs().sum() > 0 for t in inputs), f"{name}: no gradient reaches inputs"


def test_every_registered_component_has_a_contract_case():
    assert set(MODALITY_ENCODERS.names()) == TOWERS, "add the new modality tower to _tower_case"
    assert set(OBJECTIVES.names()) == OBJECTIVE_CASES, "add the new objective to _objective_case"
    assert AGGREGATORS.names() and CASE_MODELS.names()  # these two share one interface: no per-name case
