"""Shared fixtures: contract cohorts written with h5py/pandas directly (independent of slidefm.synth)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml


def write_slide(path: Path, features: np.ndarray, coords: np.ndarray, attrs: dict[str, Any] | None = None,
                root_attrs: dict[str, Any] | None = None, batch_dim: bool = False) -> None:
    """One TRIDENT/CLAM-style slide file; ``batch_dim`` stores features as (1, N, D)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features[None] if batch_dim else features)
        c = f.create_dataset("coords", data=coords)
        for k, v in (attrs or {}).items():
            c.attrs[k] = v
        for k, v in (root_attrs or {}).items():
            f.attrs[k] = v


def lattice_coords(rng: np.random.Generator, n: int, step: int, origin=(0, 0), width: int | None = None) -> np.ndarray:
    """``n`` distinct cells of a lattice with stride ``step``, shuffled, offset by ``origin``."""
    width = width or max(2, int(np.ceil(np.sqrt(2 * n))))
    cells = rng.choice(width * width, size=n, replace=False)
    return np.stack([cells % width, cells // width], 1).astype(np.int64) * step + np.asarray(origin, np.int64)


def write_cohort(tmp_path: Path, n_slides: int = 6, slides_per_patient: int = 2, n_range=(20, 40), dim: int = 16,
                 dtype: str = "float16", batch_dim: bool = False, attrs_on: str = "coords", seed: int = 0,
                 clinical: bool = True, tasks: bool = True, reports: bool = True, expression: bool = True,
                 centers: bool = True, cohort_yaml: dict | None = None, path_column: bool = False,
                 name: str = "cohort") -> Path:
    """A small valid cohort under ``tmp_path/name``; patch_size_level0 alternates 256/512 between slides."""
    rng = np.random.default_rng(seed)
    root = tmp_path / name
    root.mkdir(parents=True)
    sids = [f"S{i:03d}" for i in range(n_slides)]
    pids = [f"P{i // slides_per_patient:03d}" for i in range(n_slides)]
    rows = []
    for i, sid in enumerate(sids):
        n = int(rng.integers(n_range[0], n_range[1] + 1))
        psl0 = 256 if i % 2 == 0 else 512
        coords = lattice_coords(rng, n, psl0, origin=(int(rng.integers(0, 5000)), int(rng.integers(0, 5000))))
        feats = rng.standard_normal((n, dim)).astype(dtype)
        attrs = {"patch_size_level0": psl0, "patch_size": 256}
        rel = f"h5/{sid}.h5" if path_column else f"features/{sid}.h5"
        if attrs_on == "coords":
            write_slide(root / rel, feats, coords, attrs=attrs, batch_dim=batch_dim)
        else:
            write_slide(root / rel, feats, coords, root_attrs=attrs, batch_dim=batch_dim)
        row = {"slide_id": sid, "patient_id": pids[i]}
        if path_column:
            row["path"] = rel
        if centers:
            row["center"] = "A" if i % 3 else "B"
        row["stain_batch"] = i % 2
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "slides.csv", index=False)
    patients = list(dict.fromkeys(pids))
    if clinical:
        pd.DataFrame({
            "patient_id": patients,
            "subtype": ["luad" if i % 2 else "lusc" for i in range(len(patients))],
            "os_months": rng.uniform(1, 60, len(patients)).round(1),
            "os_event": [i % 2 for i in range(len(patients))],
            "split": ["train" if i % 3 else "test" for i in range(len(patients))],
        }).to_csv(root / "clinical.csv", index=False)
    if tasks:
        spec = {"tasks": [
            {"name": "subtype", "kind": "classification", "level": "patient", "label": "subtype"},
            {"name": "os", "kind": "survival", "level": "patient", "time": "os_months", "event": "os_event"},
        ]}
        (root / "tasks.yaml").write_text(yaml.safe_dump(spec))
    if reports:
        pd.DataFrame({"patient_id": patients[:-1],
                      "text": [f"report of {p}: adenocarcinoma" for p in patients[:-1]]}).to_csv(
            root / "reports.csv", index=False)
    if expression:
        import anndata

        ad = anndata.AnnData(X=rng.poisson(5, (len(patients), 12)).astype(np.float32),
                             obs=pd.DataFrame(index=pd.Index(patients)),
                             var=pd.DataFrame(index=[f"G{j}" for j in range(12)]))
        ad.write_h5ad(root / "expression.h5ad")
    if cohort_yaml is not None:
        (root / "cohort.yaml").write_text(yaml.safe_dump(cohort_yaml))
    return root


@pytest.fixture
def cohort_dir(tmp_path) -> Path:
    return write_cohort(tmp_path)


# A tiny BERT saved the way users save theirs: every text-tower test loads it through the same
# local-directory path as a real encoder (nothing is downloaded).
TEXT_WORDS = ("the a of with and no is in tumor tumour carcinoma invasive ductal lobular grade benign tissue margin "
              "margins negative positive lymph node nodes metastasis breast biopsy").split()


def _make_tiny_bert(d, seed: int = 0, layers: int = 3):
    """A BertModel (hidden 32) + WordPiece tokenizer over TEXT_WORDS, saved to ``d``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *list("0123456789"), *TEXT_WORDS, "##s", "##ed"]
    d.mkdir(parents=True, exist_ok=True)
    BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(str(d))
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)
    BertModel(cfg).save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def make_tiny_bert():
    """Factory ``make_tiny_bert(dir, seed=0, layers=3) -> dir``."""
    return _make_tiny_bert


def _make_synth_cohort(root: Path, patients: int = 40, seed: int = 3, genes: int = 200, max_side: int = 16) -> Path:
    """``slidefm synth`` (through the CLI) into ``root``: 32-D features, slides 10..``max_side`` patches a side.

    The defaults are the tiny cohort every recipe trains on (tests/test_train.py, tests/gpu/test_gpu_train.py).
    """
    from slidefm.cli import main as cli

    assert cli(["synth", str(root), "--patients", str(patients), "--seed", str(seed), "--dim", "32",
                "--genes", str(genes), "--min-side", "10", "--max-side", str(max_side)]) == 0
    return root


@pytest.fixture(scope="session")
def make_synth_cohort():
    """Factory ``make_synth_cohort(root, patients=40, seed=3, genes=200, max_side=16) -> root``."""
    return _make_synth_cohort


@pytest.fixture(scope="module")
def tiny_text_dir(tmp_path_factory, make_tiny_bert):
    """The tiny BERT of ``make_tiny_bert``, saved once per test module."""
    return make_tiny_bert(tmp_path_factory.mktemp("bert"))
