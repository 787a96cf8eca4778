"""Export on CUDA gives the CPU export's embeddings (RoPE and ALiBi models, slide and token level).

Tolerance: max |cuda - cpu| <= 1e-4 x max |cpu| with TF32 off (both fp32; kernels differ only in
summation order), and cosine similarity >= 0.99999 per slide.
"""

from __future__ import annotations

import numpy as np
import pytest

from test_train import compose_cfg

REL_TOL = 1e-4
pytestmark = pytest.mark.usefixtures("no_tf32")  # both exports in plain fp32


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, make_synth_cohort):
    return make_synth_cohort(tmp_path_factory.mktemp("gpu-export-cohort") / "c", patients=12, seed=5, genes=50,
                             max_side=30)


@pytest.fixture(scope="module")
def checkpoints(cohort, tmp_path_factory, make_tiny_bert):
    """Tiny checkpoints trained on CPU: house recipe (RoPE + PEG) and moozy_stage1 (ALiBi, registers)."""
    from slidefm.train.run import train

    text = make_tiny_bert(tmp_path_factory.mktemp("bert"))
    out = {}
    for recipe in ("slidefm", "moozy_stage1"):
        run = tmp_path_factory.mktemp(f"run-{recipe}")
        cfg = compose_cfg(recipe, cohort, run, "trainer.max_steps=2", "optim.warmup_steps=1",
                          "trainer.accelerator=cpu", text_dir=text)
        train(cfg)
        out[recipe] = run / "checkpoints" / "last.ckpt"
    return out


def close(a: np.ndarray, b: np.ndarray, what: str) -> None:
    err = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))
    assert err <= REL_TOL, f"{what}: max rel err {err:.2e} > {REL_TOL:.0e}"


@pytest.mark.parametrize("recipe", ["slidefm", "moozy_stage1"])
def test_export_on_cuda_equals_cpu(recipe, checkpoints, cohort, tmp_path):
    import h5py

    import slidefm
    from slidefm.cohort import Cohort
    from slidefm.export import ExportConfig, export_embeddings

    res = {}
    for dev in ("cpu", "cuda"):
        enc = slidefm.load(checkpoints[recipe], device=dev)
        assert enc.device.type == dev
        cfg = ExportConfig(progress=False, num_workers=0, tokens=True)
        out = tmp_path / f"{dev}.h5ad"
        adata, tokens_path = export_embeddings(enc, Cohort.open(cohort), out, cfg)
        with h5py.File(tokens_path) as f:
            toks = {sid: f["tokens"][sid][:] for sid in list(f["tokens"])}
        res[dev] = (np.asarray(adata.X), list(adata.obs_names), toks)
    (xc, ids_c, tc), (xg, ids_g, tg) = res["cpu"], res["cuda"]
    assert ids_c == ids_g and np.isfinite(xg).all()
    close(xg, xc, f"{recipe} slide embeddings")
    cos = (xg * xc).sum(1) / (np.linalg.norm(xg, axis=1) * np.linalg.norm(xc, axis=1))
    assert cos.min() >= 0.99999, f"{recipe}: min cosine {cos.min():.6f}"
    assert tc.keys() == tg.keys()
    for sid in tc:
        close(tg[sid], tc[sid], f"{recipe} tokens of {sid}")


def test_encoder_on_cuda_single_slide_matches_cpu(checkpoints, cohort):
    """The in-memory API path (embed_slide) too, on the largest slide."""
    import slidefm
    from slidefm.cohort import Cohort

    c = Cohort.open(cohort)
    sid = max(c.slide_ids, key=lambda s: len(c.read_slide(s).features))
    s = c.read_slide(sid)
    cpu = slidefm.load(checkpoints["moozy_stage1"], device="cpu")
    gpu = slidefm.load(checkpoints["moozy_stage1"], device="cuda")
    a = cpu.embed_slide(s.features, s.coords, patch_size_level0=s.patch_size_level0).numpy()
    b = gpu.embed_slide(s.features, s.coords, patch_size_level0=s.patch_size_level0).numpy()
    close(b, a, f"embed_slide {sid}")
