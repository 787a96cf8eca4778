"""Every notebook in evals/notebooks runs top to bottom in a real Jupyter kernel on a synthetic cohort."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "evals" / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    import anndata
    from slidefm.cli import main
    from slidefm.cohort import Cohort
    from slidefm.evals.baseline import mean_pool_adata

    d = tmp_path_factory.mktemp("nb")
    assert main(["synth", str(d / "cohort"), "--patients", "60", "--dim", "32", "--seed", "3"]) == 0
    ad = mean_pool_adata(Cohort.open(d / "cohort"))
    rng = np.random.default_rng(0)
    emb = anndata.AnnData(ad.X + rng.normal(0, 0.05, ad.X.shape).astype(np.float32), obs=ad.obs)
    emb.write_h5ad(d / "emb.h5ad")
    steps = np.arange(0, 500, 10)
    train = pd.DataFrame({"step": steps, "epoch": steps // 100, "train/loss": 5 * np.exp(-steps / 200) + 0.1,
                          "train/loss_contrastive": 3 * np.exp(-steps / 150), "train/rankme": 40 - steps / 50})
    val = pd.DataFrame({"step": steps[::10], "epoch": steps[::10] // 100, "val/loss": 5 * np.exp(-steps[::10] / 250)})
    # Two tasks keep the run short; every notebook still meets a classification and a survival task.
    (d / "tasks.yaml").write_text("tasks:\n  - {name: subtype, kind: classification, label: subtype}\n"
                                  "  - {name: os, kind: survival, time: os_months, event: os_event}\n")
    run = d / "run" / "csv" / "version_0"
    run.mkdir(parents=True)
    pd.concat([train, val]).to_csv(run / "metrics.csv", index=False)
    return d


def test_notebooks_are_parameterised_and_output_free():
    import nbformat

    assert [p.stem for p in NOTEBOOKS] == ["01_pretraining_diagnostics", "02_probe_results", "03_survival_analysis",
                                          "04_site_confounding", "05_embedding_atlas"]
    for p in NOTEBOOKS:
        nb = nbformat.read(p, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, p
        for name in ("embeddings", "cohort", "run_dir", "out"):
            assert f"{name} =" in tagged[0].source
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{p} has stored outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, inputs, tmp_path):
    import papermill as pm

    out = tmp_path / "out"
    params = dict(embeddings=str(inputs / "emb.h5ad"), cohort=str(inputs / "cohort"), out=str(out), quick=True,
                  tasks=str(inputs / "tasks.yaml"))
    if path.stem.startswith("01"):
        params["run_dir"] = str(inputs / "run")
    # A failing cell raises PapermillExecutionError, which fails the test.
    pm.execute_notebook(str(path), str(tmp_path / path.name), parameters=params, kernel_name="python3",
                        progress_bar=False, cwd=str(tmp_path))
    produced = sorted(p.name for p in out.rglob("*.png"))
    assert produced, "the notebook wrote no figure"
    expected = {"01": "training_curves.png", "02": "roc_subtype.png", "03": "km_os.png",
                "04": "robustness_index.png", "05": "atlas.png"}[path.stem[:2]]
    assert expected in produced
    if path.stem.startswith("02"):
        res = pd.read_csv(out / "probes" / "results.csv")
        assert {"model", "mean_pool"} <= set(res.model)


def test_diagnostics_without_run_dir(inputs, tmp_path):
    """Notebook 01's fallback: a metrics.csv path instead of a run directory."""
    from slidefm.evals import diagnostics

    df = diagnostics.load_metrics(next((inputs / "run").rglob("metrics.csv")))
    assert df["step"].is_unique and {"train/loss", "val/loss", "train/rankme"} <= set(df.columns)
    flags = diagnostics.collapse_flags(df)
    assert flags == []  # RankMe 40 -> 30 is no collapse
    df.loc[df.index[-1], "train/rankme"] = 2.0
    assert any("collapse" in f for f in diagnostics.collapse_flags(df))
