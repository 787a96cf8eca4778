"""Activation checkpointing (``trainer.grad_checkpointing``): same loss and gradients, blocks really recompute."""

from __future__ import annotations

import copy

import pytest
import torch
from hydra import compose, initialize_config_module

import slidefm.models.blocks as blocks
from slidefm.data.batch import pack_slides
from slidefm.models.aggregators.transmil import TransMIL, TransMILConfig
from slidefm.models.aggregators.vit import ViTAggregator, ViTConfig
from slidefm.models.case import CaseConfig, CaseTransformer

IN_DIM = 12


def _slides(lens=(7, 1, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(n, IN_DIM, generator=g, dtype=torch.float64) for n in lens]
    pos = [torch.randperm(36, generator=g)[:n] for n in lens]
    x = pack_slides(feats, [torch.stack([p % 6, p // 6], 1) for p in pos])
    x.tokens = x.tokens.double()
    return x


def _vit():
    return ViTAggregator(ViTConfig(dim=32, depth=3, heads=4, pos="rope", num_registers=1, drop_path=0.2, peg=3), in_dim=IN_DIM)


def _transmil():
    return TransMIL(TransMILConfig(dim=32, depth=2, heads=4, dropout=0.1, drop_path=0.2), in_dim=IN_DIM)


def _case():
    return CaseTransformer(CaseConfig(dim=16, depth=3, heads=4, dropout=0.1, drop_path=0.2))


def _loss_aggregator(model):
    out = model(_slides())
    return (out.slide ** 2).mean() + out.tokens.sin().mean()


def _loss_case(model):
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(6, 16, generator=g, dtype=torch.float64)
    return model(emb, torch.tensor([0, 2, 3, 6])).pow(2).mean()


CASES = {"vit": (_vit, _loss_aggregator, 3), "transmil": (_transmil, _loss_aggregator, 2),
         "case_transformer": (_case, _loss_case, 3)}


@pytest.mark.parametrize("name", list(CASES))
def test_same_loss_and_gradients_with_and_without(name, monkeypatch):
    build, loss_fn, depth = CASES[name]
    torch.manual_seed(0)
    plain = build().double().train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    calls = []
    real = blocks.checkpoint

    def counting(*args, **kw):
        calls.append(kw.get("use_reentrant"))
        return real(*args, **kw)

    monkeypatch.setattr(blocks, "checkpoint", counting)
    # Dropout and per-slide DropPath draw random numbers: the same seed must give the same draws,
    # including during the recomputation in backward (checkpoint preserves the RNG state).
    torch.manual_seed(123)
    l_plain = loss_fn(plain)
    l_plain.backward()
    assert calls == []
    torch.manual_seed(123)
    l_ckpt = loss_fn(ckpt)
    assert calls == [False] * depth  # every block checkpointed, non-reentrant
    l_ckpt.backward()
    torch.testing.assert_close(l_ckpt, l_plain, rtol=0, atol=0)
    g_plain = dict(plain.named_parameters())
    n_grads = 0
    for k, p in ckpt.named_parameters():
        if p.grad is None:
            assert g_plain[k].grad is None, k
            continue
        torch.testing.assert_close(p.grad, g_plain[k].grad, rtol=1e-10, atol=1e-12, msg=k)
        n_grads += 1
    assert n_grads > 10


@pytest.mark.parametrize("name", list(CASES))
def test_inference_is_not_checkpointed(name, monkeypatch):
    build, loss_fn, _ = CASES[name]
    model = build().double()
    model.set_grad_checkpointing(True)
    monkeypatch.setattr(blocks, "checkpoint", lambda *a, **k: pytest.fail("checkpoint used outside training"))
    model.eval()
    loss_fn(model)  # eval mode, grad on
    model.train()
    with torch.no_grad():
        loss_fn(model)  # training mode, no grad (e.g. an EMA teacher)


@pytest.mark.parametrize("enabled", [True, False])
def test_trainer_option_reaches_every_block(enabled):
    from slidefm.config import register_configs
    from slidefm.train.module import SlideFMModule

    register_configs()
    over = ["recipe=slidefm", "data.cohort=unused", "run_dir=unused", f"trainer.grad_checkpointing={enabled}",
            "model.report=null", "model.expression=null", "model.aggregator.dim=32", "model.aggregator.heads=2",
            "model.aggregator.depth=2", "model.case.depth=2", "model.case.heads=2", "model.embed_dim=32",
            "objectives.distillation.out_dim=64", "objectives.distillation.hidden_dim=64",
            "objectives.distillation.bottleneck_dim=32"]
    with initialize_config_module("slidefm.recipes", version_base="1.3"):
        cfg = compose("config", overrides=over)
    from omegaconf import OmegaConf

    module = SlideFMModule(OmegaConf.to_container(cfg, resolve=True), in_dim=IN_DIM)
    found = [m for m in module.model.modules() if isinstance(m, blocks._BlockBase)]
    assert len(found) == 4  # 2 ViT blocks + 2 case-transformer blocks
    assert all(m.grad_checkpointing is enabled for m in found)
