"""End-to-end training: every recipe composes from the real configs and learns on a synthetic cohort."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_module

from slidefm.config import register_configs

# Tiny model sizes so every recipe trains in seconds on a CPU; everything else is the recipe's own.
TINY_VIT = ["model.aggregator.dim=32", "model.aggregator.depth=1", "model.aggregator.heads=2"]
TINY = {
    "slidefm": [*TINY_VIT, "model.embed_dim=32", "model.case.depth=1", "model.case.heads=2",
                "objectives.distillation.out_dim=64", "objectives.distillation.hidden_dim=64", "objectives.distillation.bottleneck_dim=32", "model.expression.hidden_dims=[32]"],
    "slidefm_bags": [*TINY_VIT, "model.embed_dim=32", "model.case.depth=1", "model.case.heads=2",
                     "objectives.distillation.out_dim=64", "objectives.distillation.hidden_dim=64",
                     "objectives.distillation.bottleneck_dim=32", "model.expression.hidden_dims=[32]"],
    "mstar": ["model.aggregator.dim=32", "model.embed_dim=32", "model.aggregator.heads=2",
              "model.expression.hidden_dims=[32]", "data.max_tokens=256"],
    "threads": ["model.aggregator.dim=32", "model.aggregator.hidden=32", "model.aggregator.attn_dim=16",
                "model.embed_dim=32", "model.expression.hidden_dims=[32]", "data.max_tokens=256"],
    "titan": [*TINY_VIT, "model.embed_dim=32", "objectives.distillation.out_dim=64", "objectives.distillation.hidden_dim=64", "objectives.distillation.bottleneck_dim=32"],
    "moozy_stage1": [*TINY_VIT, "model.embed_dim=32", "objectives.distillation.out_dim=64", "objectives.distillation.hidden_dim=64", "objectives.distillation.bottleneck_dim=32",
                     "data.views.global_size=10", "data.views.local_size=6"],
    "moozy_stage2": [*TINY_VIT, "model.embed_dim=32", "model.case.depth=1", "model.case.heads=2"],
}
COMMON = ["data.batch_size=8", "trainer.log_every_n_steps=1", "trainer.progress_bar=false", "data.num_workers=0"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, make_synth_cohort):
    return make_synth_cohort(tmp_path_factory.mktemp("cohort") / "c")


def compose_cfg(recipe: str, cohort, run_dir, *extra: str, text_dir=None, drop: tuple[str, ...] = ()):
    register_configs()
    tiny = [o for o in TINY[recipe] if not o.startswith(drop)] if drop else TINY[recipe]
    over = [f"recipe={recipe}", f"data.cohort={cohort}", f"run_dir={run_dir}", *tiny, *COMMON, *extra]
    with initialize_config_module("slidefm.recipes", version_base="1.3"):
        cfg = compose("config", overrides=over)
    if text_dir is not None and cfg.model.report is not None:
        cfg.model.report.model_dir = str(text_dir)
        cfg.model.report.max_length = 64
    return cfg


def losses_by_step(run_dir) -> dict[int, float]:
    m = pd.read_csv(run_dir / "logs" / "metrics.csv").dropna(subset=["train/loss"])
    return dict(zip(m["step"].astype(int), m["train/loss"]))


def losses(run_dir, key="train/loss") -> list[float]:
    m = pd.read_csv(run_dir / "logs" / "metrics.csv")
    return m[key].dropna().tolist()


def cfg_has_distillation(recipe: str) -> bool:
    return recipe in ("slidefm", "slidefm_bags", "titan", "moozy_stage1")


@pytest.mark.parametrize("recipe", list(TINY))
def test_recipe_trains_and_loss_goes_down(recipe, cohort, tiny_text_dir, tmp_path):
    from slidefm.train.run import train

    steps = 30
    extra = [f"trainer.max_steps={steps}", "optim.warmup_steps=3", "optim.lr=1e-3"]
    if cfg_has_distillation(recipe):
        # A 30-step test cannot wait out the recipes' teacher-temperature ramps: hold it constant.
        extra.append("objectives.distillation.warmup_teacher_temp_steps=0")
    cfg = compose_cfg(recipe, cohort, tmp_path, *extra, text_dir=tiny_text_dir)
    out = train(cfg)
    assert out["global_step"] == steps
    ck = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(ck, map_location="cpu", weights_only=True)
    assert state["slidefm"]["config"]["recipe"] == recipe
    assert (tmp_path / "config.yaml").exists()
    ls = losses(tmp_path)
    assert len(ls) >= steps - 1
    k = 8
    first, last = sum(ls[:k]) / k, sum(ls[-k:]) / k
    assert last < first, f"{recipe}: loss did not go down ({first:.4f} -> {last:.4f})"


def test_typo_in_override_fails_before_running(cohort, tmp_path):

    with pytest.raises(Exception, match="n_globl|not in struct|Could not override"):
        compose_cfg("moozy_stage1", cohort, tmp_path, "data.views.n_globl=3")
    with pytest.raises(Exception, match="depht|not in struct|Could not override"):
        compose_cfg("mstar", cohort, tmp_path, "model.aggregator.depht=3")


def test_resume_with_other_settings_is_refused_in_one_line(cohort, tmp_path):
    """The same command in the same run directory resumes (a requeued job); changed training settings are
    refused before anything is written, naming the setting; a longer max_steps continues the run."""
    from slidefm.errors import SlidefmError
    from slidefm.train.run import train

    train(compose_cfg("moozy_stage1", cohort, tmp_path, "trainer.max_steps=2"))
    before = (tmp_path / "config.yaml").read_text()
    with pytest.raises(SlidefmError) as e:
        train(compose_cfg("moozy_stage1", cohort, tmp_path, "trainer.max_steps=2", "data.views.crop=share",
                          "optim.lr=0.01"))
    msg = str(e.value)
    assert "\n" not in msg and "data.views.crop: 'grid' -> 'share'" in msg and "optim.lr" in msg, msg
    assert "use a new hydra.run.dir" in msg
    assert (tmp_path / "config.yaml").read_text() == before
    out = train(compose_cfg("moozy_stage1", cohort, tmp_path, "trainer.max_steps=3", "data.num_workers=0"))
    assert out["global_step"] == 3


def test_resume_reproduces_uninterrupted_run(cohort, tmp_path):
    from slidefm.train.run import train

    common = ["optim.total_steps=12", "optim.warmup_steps=2", "data.views.noise_std=0.1", "trainer.log_every_n_steps=1"]
    full = tmp_path / "full"
    train(compose_cfg("moozy_stage1", cohort, full, "trainer.max_steps=12", *common))
    split = tmp_path / "split"
    train(compose_cfg("moozy_stage1", cohort, split, "trainer.max_steps=7", *common))
    out = train(compose_cfg("moozy_stage1", cohort, split, "trainer.max_steps=12", *common))
    assert out["global_step"] == 12
    a = torch.load(full / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(split / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after resume")
    # The resumed run's log continues the first one: every step once, losses equal to the full run's.
    full_log, split_log = losses_by_step(full), losses_by_step(split)
    assert list(split_log) == list(range(12))
    assert split_log == full_log


def test_bad_cohort_fails_before_training(cohort, tmp_path):
    import shutil

    from slidefm.errors import CohortError
    from slidefm.train.run import train

    bad = tmp_path / "bad"
    shutil.copytree(cohort, bad)
    victim = sorted((bad / "features").glob("*.h5"))[0]
    victim.write_bytes(b"not hdf5")
    with pytest.raises(CohortError, match=victim.stem):
        train(compose_cfg("mstar", bad, tmp_path / "run", "trainer.max_steps=2"))
    assert not (tmp_path / "run").exists()  # nothing written for a cohort that fails validation


def test_geneset_transformer_gets_the_fitted_gene_order(cohort, tmp_path):
    """Gene sets name genes; the tower must map them through the training transform's gene order."""
    import anndata as ad

    import slidefm
    from slidefm.api import load_checkpoint
    from slidefm.train.run import train

    names = list(ad.read_h5ad(cohort / "expression.h5ad").var_names)
    sets = {f"s{i}": names[i::5] for i in range(5)}
    cfg = compose_cfg("threads", cohort, tmp_path, "trainer.max_steps=2", "model/expression=geneset_transformer",
                      "data.expression.n_top_genes=50", "model.expression.dim=16", "model.expression.heads=2",
                      drop=("model.expression.",))
    cfg.model.expression.gene_sets = sets
    train(cfg)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    fitted = load_checkpoint(ckpt)["slidefm"]["preprocessing"]["expression"]["genes"]
    tower = slidefm.load(ckpt).model.towers["expression"]
    assert list(tower.set_names) == list(sets)
    for s, name in enumerate(tower.set_names):
        members = {fitted[g] for g in tower.gene_of[tower.set_of == s].tolist()}
        assert members and members <= set(sets[name])


def test_trainable_text_tower_trains_and_embeds_text(cohort, tiny_text_dir, tmp_path):
    """Reports tokenised in the loader and encoded by a fine-tuned tower; export's embed_text uses it."""
    import slidefm
    from slidefm.train.run import train

    cfg = compose_cfg("mstar", cohort, tmp_path, "trainer.max_steps=2", "model.report.trainable=last_n",
                      "model.report.n_trainable_layers=1", text_dir=tiny_text_dir)
    out = train(cfg)
    assert out["global_step"] == 2
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    backbone = [k for k in state if k.startswith("model.towers.report.backbone.")]
    assert backbone  # the text backbone is part of the trained model
    enc = slidefm.load(ckpt)
    z = enc.embed_text(["grade 3 carcinoma", "benign tissue"])
    assert z.shape == (2, 32) and torch.isfinite(z).all()
