"""Contracts every registered component keeps, enumerated from the registries (a new one cannot escape).

* options exist once: each registered name has a config dataclass whose ``name`` is that name, with a help
  text for every field; the component takes that config object as its first argument and declares no
  option of its own (no parameter named like a config field, anywhere a config class is in scope: read with
  ``ast``); every config field is read (``cfg.<field>``, ``self.cfg.<field>``, ``getattr(cfg, "<field>")``) in
  the component's module, or as ``<component>.cfg.<field>`` by the code that uses it; ``Literal`` choices
  are enforced at build with an error naming the option and its allowed values;
* aggregators: packed slides -> (B, dim) slide and (T, dim) token embeddings, packing-invariant, mask-aware,
  differentiable, rebuilt identically from a state dict;
* case models: (S, d) slides of P patients -> (P, d), invariant to the order of a patient's slides;
* modality towers and objectives: each builds from its default config and runs forward/backward.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import typing
from pathlib import Path

import pytest
import torch

from slidefm.data.batch import pack_slides
from slidefm.data.views import ViewConfig
from slidefm.errors import OptionError
from slidefm.modalities import MODALITY_ENCODERS
from slidefm.models.aggregators import AGGREGATORS, build_aggregator
from slidefm.models.case import CASE_MODELS, build_case_transformer
from slidefm.objectives import OBJECTIVES
from slidefm.registry import choices

REGISTRIES = {"aggregator": AGGREGATORS, "case model": CASE_MODELS, "modality encoder": MODALITY_ENCODERS,
              "objective": OBJECTIVES}
IN_DIM = 12
REPO = Path(__file__).resolve().parent.parent
PACKAGE = [REPO / "slidefm", REPO / "modalities", REPO / "objectives", REPO / "evals"]


def _entries():
    return [(kind, name) for kind, reg in REGISTRIES.items() for name in reg.names()]


def _configs() -> dict[str, type]:
    """Every component config: the registered ones and the views' (consumed by make_views)."""
    out = {cls.__name__: cls for reg in REGISTRIES.values() for cls in reg.configs().values()}
    out[ViewConfig.__name__] = ViewConfig
    return out


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {"name"}


# ------------------------------------------------------------------ options declared once, read somewhere


def duplicate_options(tree: ast.Module, configs: dict[str, set[str]]) -> list[str]:
    """Function parameters with a default that repeat a field of a config class the module defines or
    imports: ``def f(..., depth=6)`` beside ``ViTConfig.depth`` declares the option a second time."""
    in_scope: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name in configs:
            in_scope.add(node.name)
        elif isinstance(node, ast.ImportFrom):
            in_scope |= {a.name for a in node.names if a.name in configs}
    fields = {f: c for c in sorted(in_scope) for f in configs[c]}
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        a = node.args
        positional = a.posonlyargs + a.args
        defaulted = positional[len(positional) - len(a.defaults):] if a.defaults else []
        defaulted += [k for k, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
        out += [f"line {node.lineno}: {node.name}({p.arg}=...) repeats {fields[p.arg]}.{p.arg}"
                for p in defaulted if p.arg in fields]
    return out


def read_options(tree: ast.Module, config_names: set[str]) -> tuple[set[str], set[str]]:
    """(fields read from a config object here, fields read from a component's ``.cfg`` here).

    A read is ``cfg.X``, ``self.cfg.X``, ``<obj>.cfg.X`` (also the second set), ``<ConfigClass>.X`` or
    ``getattr(cfg, "X")``
    (also with the name taken from a tuple of string constants the loop runs over)."""
    def cfg_like(node) -> bool:
        if isinstance(node, ast.Name):
            return node.id == "cfg" or node.id in config_names
        return isinstance(node, ast.Attribute) and node.attr == "cfg"

    local, via_component = set(), set()
    loops: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and isinstance(node.iter, ast.Tuple):
            loops[node.target.id] = {e.value for e in node.iter.elts
                                     if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and cfg_like(node.value):
            local.add(node.attr)
            owner = node.value.value if isinstance(node.value, ast.Attribute) else None
            if owner is not None and not (isinstance(owner, ast.Name) and owner.id == "self"):
                via_component.add(node.attr)  # a built component's options, read by the code using it
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
              and len(node.args) >= 2 and cfg_like(node.args[0])):
            key = node.args[1]
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                local.add(key.value)
            elif isinstance(key, ast.Name):
                local |= loops.get(key.id, set())
    return local, via_component


def _trees() -> dict[str, ast.Module]:
    return {str(p.relative_to(REPO)): ast.parse(p.read_text(), str(p))
            for folder in PACKAGE for p in folder.rglob("*.py")}


def test_the_checks_catch_a_planted_duplicate_and_an_unread_option():
    src = ast.parse(
        "from x import ViTConfig\n"
        "class ViT:\n"
        "    def __init__(self, cfg: ViTConfig, *, in_dim: int, depth: int = 6):\n"
        "        self.heads = cfg.heads\n"
        "        n = getattr(self.cfg, 'pool')\n"
        "def weight(obj):\n"
        "    return obj.cfg.weight\n")
    configs = {"ViTConfig": {"depth", "heads", "pool", "peg", "weight"}}
    assert duplicate_options(src, configs) == ["line 3: __init__(depth=...) repeats ViTConfig.depth"]
    local, via = read_options(src, set(configs))
    assert configs["ViTConfig"] - local == {"depth", "peg"} and via == {"weight"}
    assert duplicate_options(ast.parse("def f(depth=6): pass"), configs) == []  # no config in scope


def test_no_option_is_declared_twice():
    configs = {n: _fields(c) for n, c in _configs().items()}
    bad = [f"{path}: {d}" for path, tree in _trees().items() for d in duplicate_options(tree, configs)]
    assert not bad, "options declared beside their config field (take the config object instead):\n" + "\n".join(bad)


def _builder_module(reg, name) -> str:
    return str(Path(sys.modules[reg.get(name).__module__].__file__).resolve().relative_to(REPO))


def test_every_option_is_read():
    trees = _trees()
    names = set(_configs())
    reads = {path: read_options(tree, names) for path, tree in trees.items()}
    anywhere_via_component = set().union(*(via for _, via in reads.values()))
    homes = {cls: _builder_module(reg, n) for reg in REGISTRIES.values() for n, cls in reg.configs().items()}
    homes[ViewConfig] = "slidefm/data/views.py"  # make_views(features, positions, cfg, rng)
    unread = [f"{cls.__name__}.{f} ({home})" for cls, home in homes.items()
              for f in sorted(_fields(cls) - reads[home][0] - anywhere_via_component)]
    assert not unread, "config options read nowhere (implement them or remove them):\n" + "\n".join(unread)


@pytest.mark.parametrize("kind,name", _entries())
def test_component_takes_its_config_object(kind, name):
    reg = REGISTRIES[kind]
    cls = reg.config_class(name)
    assert cls is not None and dataclasses.is_dataclass(cls), f"{kind} '{name}' has no config dataclass"
    assert next(f for f in dataclasses.fields(cls) if f.name == "name").default == name
    no_help = sorted(f.name for f in dataclasses.fields(cls) if f.name != "name" and not f.metadata.get("help"))
    assert not no_help, f"{cls.__name__}: fields without help: {no_help}"
    builder = reg.get(name)
    target = builder.__init__ if inspect.isclass(builder) else builder
    params = [p for p in inspect.signature(target).parameters.values() if p.name != "self"]
    first, rest = params[0], params[1:]
    assert typing.get_type_hints(target).get(first.name) is cls, \
        f"{kind} '{name}': first parameter must be the config ({first.name}: {cls.__name__})"
    twice = sorted(p.name for p in rest if p.name in _fields(cls))
    assert not twice, f"{kind} '{name}': options taken beside {cls.__name__}: {twice}"
    assert all(p.kind is p.KEYWORD_ONLY for p in rest), f"{kind} '{name}': runtime arguments are keyword-only"


@pytest.mark.parametrize("kind,name", [(k, n) for k, n in _entries() if choices(REGISTRIES[k].config_class(n))])
def test_literal_choices_are_enforced_at_build(kind, name, tiny_bert):
    cls = REGISTRIES[kind].config_class(name)
    for field, allowed in choices(cls).items():
        cfg = dataclasses.replace(cls(), **{field: "no-such-choice"})
        if name == "text":
            cfg = dataclasses.replace(cfg, model_dir=str(tiny_bert))
        with pytest.raises(OptionError, match=rf"{field} must be one of .*{allowed[0]!r}.*got 'no-such-choice'"):
            _build(kind, name, cfg)


def _build(kind, name, cfg):
    """Build one component from ``cfg`` with the runtime arguments its caller would pass."""
    if kind == "aggregator":
        return build_aggregator(cfg, in_dim=IN_DIM)
    if kind == "case model":
        return build_case_transformer(cfg, slide_dim=16)
    if kind == "modality encoder":
        extra = {} if name == "text" else {"in_dim": len(GENES), "genes": GENES} if name == "geneset_transformer" \
            else {"in_dim": len(GENES)}
        return MODALITY_ENCODERS.build(cfg, **extra)
    extra = {"distillation": lambda: {"student": build_aggregator(AGGREGATORS.config_class("mean")(), in_dim=IN_DIM)},
             "supervised": lambda: {"dim": 8,
                                    "tasks": [{"name": "t", "kind": "classification", "classes": ["a", "b"]}]},
             "expert": lambda: {"dim": 8, "expert_dims": {"e": 4}}}.get(name, dict)()
    return OBJECTIVES.build(cfg, **extra)


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
    case = build_case_transformer(cfg, slide_dim=16).eval()
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
        obj = OBJECTIVES.build(cfg)
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


def test_composed_config_unpickles_in_a_fresh_process(tmp_path):
    """submitit pickles the composed config for the SLURM job: its schema classes must resolve in a process
    that never built them."""
    import pickle
    import subprocess
    import sys

    from hydra import compose, initialize_config_module

    from slidefm.config import register_configs

    register_configs()
    with initialize_config_module("slidefm.recipes", version_base="1.3"):
        cfg = compose("config", overrides=["recipe=moozy_stage1", f"data.cohort={tmp_path}", f"run_dir={tmp_path}"])
    (tmp_path / "cfg.pkl").write_bytes(pickle.dumps(cfg))
    code = ("import pickle, sys; c = pickle.load(open(sys.argv[1], 'rb')); "
            "print(c.model.aggregator.pos, c._metadata.object_type.__name__)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cfg.pkl")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["alibi", "TrainConfig"]


def test_config_get_reads_every_node_kind_alike():
    """One getter for dataclass, DictConfig and dict nodes (positions and aggregators read options with it)."""
    from dataclasses import dataclass

    from omegaconf import OmegaConf

    from slidefm.models.aggregators.vit import ViTAggregator, ViTConfig
    from slidefm.registry import config_get

    @dataclass
    class Views:
        crop: str = "share"

    for node in ({"data": {"views": {"crop": "share"}}}, OmegaConf.create({"data": {"views": {"crop": "share"}}}),
                 {"data": {"views": Views()}}):
        assert config_get(node, "data", "views", "crop") == "share"
        assert config_get(node, "data", "tokens") is None
        assert config_get(node, "model", "aggregator", "pos", default="rope") == "rope"
    for cfg in (ViTConfig(pos="none", peg=0), {"pos": "none", "peg": 0}, OmegaConf.create({"pos": "none"})):
        assert not ViTAggregator.needs_positions(cfg)
    assert ViTAggregator.needs_positions({"pos": "none", "peg": 3}) and ViTAggregator.needs_positions({})
