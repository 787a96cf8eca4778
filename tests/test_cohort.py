"""Cohort reader: the contract layout, its variants, cohort.yaml overrides and the tables."""

import pickle

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import lattice_coords, write_cohort, write_slide
from slidefm.cohort import Cohort, TaskSpec, validate_cohort
from slidefm.errors import CohortError, SlidefmError


def _h5(root, sid):
    with h5py.File(root / "features" / f"{sid}.h5") as f:
        feats = f["features"][()]
        coords = f["coords"][()]
    return feats.reshape(-1, feats.shape[-1]), coords


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("batch_dim", [False, True])
@pytest.mark.parametrize("attrs_on", ["coords", "root"])
def test_read_slide_variants(tmp_path, dtype, batch_dim, attrs_on):
    root = write_cohort(tmp_path, n_slides=2, dtype=dtype, batch_dim=batch_dim, attrs_on=attrs_on)
    cohort = Cohort.open(root)
    assert cohort.feature_dim == 16 and cohort.feature_dtype == np.dtype(dtype)  # as slides are handed out
    for sid, psl0 in (("S000", 256), ("S001", 512)):
        s = cohort.read_slide(sid)
        feats, coords = _h5(root, sid)
        # features come in the file's dtype (half the bytes for float16); pack_slides casts them
        assert s.features.dtype == getattr(torch, dtype) and s.coords.dtype == torch.int64
        assert torch.equal(s.features, torch.from_numpy(feats))
        assert torch.equal(s.coords, torch.from_numpy(coords))
        assert s.patch_size_level0 == psl0 and s.step == psl0
        assert torch.equal(s.positions, (s.coords - s.coords.min(0).values) // psl0)
        assert s.num_patches == len(coords)


def test_tables_and_ids(cohort_dir):
    c = Cohort.open(cohort_dir)
    assert c.slide_ids == [f"S{i:03d}" for i in range(6)]
    assert c.patient_ids == ["P000", "P001", "P002"]
    assert c.slides_of("P001") == ["S002", "S003"]
    assert c.slides_of("nobody") == []
    assert list(c.slides.columns[:2]) == ["patient_id", "path"]
    assert "center" in c.slides.columns and "stain_batch" in c.slides.columns
    assert c.clinical.loc["P001", "subtype"] == "luad"
    assert c.patient_report("P000").startswith("report of P000")
    assert c.patient_report("P002") is None  # the fixture leaves the last patient without a report
    assert list(c.expression.obs_names) == ["P000", "P001", "P002"] and c.expression_units == "counts"
    assert c.omics == {}
    assert c.tasks == [TaskSpec("subtype", "classification", "patient", label="subtype"),
                       TaskSpec("os", "survival", "patient", time="os_months", event="os_event")]


def test_optional_tables_absent(tmp_path):
    root = write_cohort(tmp_path, clinical=False, tasks=False, reports=False, expression=False)
    c = Cohort.open(root)
    assert c.clinical is None and c.reports is None and c.expression is None and c.expression_units is None
    assert c.tasks == [] and c.patient_report("P000") is None
    assert validate_cohort(c).problems == []


def test_path_column_and_yaml_overrides(tmp_path):
    root = write_cohort(tmp_path, path_column=True, reports=False, clinical=False, tasks=False, expression=False)
    (root / "meta").mkdir()
    pd.read_csv(root / "slides.csv").to_csv(root / "meta" / "my_slides.csv", index=False)
    (root / "slides.csv").unlink()
    pd.DataFrame({"patient_id": ["P000", "P001", "P002"], "grade": [1, 3, 2]}).to_csv(root / "meta" / "clin.csv", index=False)
    pd.DataFrame({"slide_id": ["S001"], "text": ["slide-level report"]}).to_csv(root / "notes.csv", index=False)
    (root / "t.yaml").write_text(yaml.safe_dump({"tasks": [{"name": "grade", "kind": "classification",
                                                            "label": "grade"}]}))
    rng = np.random.default_rng(0)
    expr = anndata.AnnData(X=rng.random((2, 3)).astype(np.float32),
                           obs=pd.DataFrame({"patient_id": ["P001", "P000"]}, index=["a", "b"]))
    expr.write_h5ad(root / "rna.h5ad")
    mut = anndata.AnnData(X=np.array([[0, 1], [1, 0], [1, 1]], np.float32),
                          obs=pd.DataFrame(index=["P000", "P001", "P002"]))
    mut.write_h5ad(root / "mut.h5ad")
    (root / "cohort.yaml").write_text(yaml.safe_dump({
        "slides": "meta/my_slides.csv", "clinical": "meta/clin.csv", "reports": "notes.csv", "tasks": "t.yaml",
        "expression": {"path": "rna.h5ad", "units": "tpm"},
        "omics": {"mutations": {"path": "mut.h5ad", "units": "binary"}},
    }))
    c = Cohort.open(root)
    assert c.slide_path("S002") == root / "h5" / "S002.h5"
    assert c.read_slide("S002").num_patches > 0
    assert c.clinical.loc["P001", "grade"] == 3
    assert c.reports.iloc[0].to_dict() == {"patient_id": "P000", "slide_id": "S001", "text": "slide-level report"}
    assert c.patient_report("P000") == "slide-level report"
    assert list(c.expression.obs_names) == ["P001", "P000"] and c.expression_units == "tpm"
    adata, units = c.omics["mutations"]
    assert units == "binary" and list(adata.obs_names) == ["P000", "P001", "P002"]
    assert c.tasks[0].level == "patient"
    assert [p for p in validate_cohort(c).problems if p.level == "error"] == []


def test_features_dir_override(tmp_path):
    root = write_cohort(tmp_path, n_slides=2, clinical=False, tasks=False, reports=False, expression=False)
    (root / "features").rename(root / "uni_v2")
    (root / "cohort.yaml").write_text("features: uni_v2\n")
    assert Cohort.open(root).read_slide("S000").num_patches > 0


def test_identifiers_stay_strings(tmp_path):
    root = tmp_path / "c"
    rng = np.random.default_rng(0)
    for sid in ("001", "NA"):
        write_slide(root / "features" / f"{sid}.h5", rng.random((3, 4)).astype(np.float32),
                    lattice_coords(rng, 3, 256), {"patch_size_level0": 256})
    pd.DataFrame({"slide_id": ["001", "NA"], "patient_id": ["007", "NA"]}).to_csv(root / "slides.csv", index=False)
    c = Cohort.open(root)
    assert c.slide_ids == ["001", "NA"] and c.patient_ids == ["007", "NA"]
    assert c.read_slide("NA").num_patches == 3


def test_open_errors(tmp_path):
    with pytest.raises(CohortError, match="not found"):
        Cohort.open(tmp_path / "nowhere")
    (tmp_path / "c").mkdir()
    with pytest.raises(CohortError, match=r"slides.csv.*required file not found"):
        Cohort.open(tmp_path / "c")
    pd.DataFrame({"slide": ["a"]}).to_csv(tmp_path / "c" / "slides.csv", index=False)
    with pytest.raises(CohortError, match=r"missing required column\(s\) \['slide_id', 'patient_id'\]"):
        Cohort.open(tmp_path / "c")
    (tmp_path / "c" / "cohort.yaml").write_text("slides: {path: x.csv}\n")
    with pytest.raises(CohortError, match=r"cohort.yaml \[slides\]: expected a path"):
        Cohort.open(tmp_path / "c")
    (tmp_path / "c" / "cohort.yaml").write_text("expression: {path: e.h5ad, units: fpkm}\n")
    with pytest.raises(CohortError, match="units 'fpkm' not one of counts, tpm, log"):
        Cohort.open(tmp_path / "c")


def test_unknown_slide_and_unreadable_file(cohort_dir):
    c = Cohort.open(cohort_dir)
    with pytest.raises(SlidefmError, match="not in slides.csv"):
        c.read_slide("S999")
    (cohort_dir / "features" / "S002.h5").write_bytes(b"not hdf5")
    with pytest.raises(SlidefmError, match=r"features/S002.h5 \[slide S002\]: cannot open as HDF5"):
        c.read_slide("S002")


def test_reader_is_picklable(cohort_dir):
    c = Cohort.open(cohort_dir)
    r = pickle.loads(pickle.dumps(c.reader))
    a, b = r("S003"), c.read_slide("S003")
    assert torch.equal(a.features, b.features) and torch.equal(a.positions, b.positions)


def test_validation_finds_what_opening_does_not_read(cohort_dir):
    (cohort_dir / "features" / "S001.h5").unlink()
    c = Cohort.open(cohort_dir)  # lazily: opening does not touch slide files
    report = validate_cohort(c)
    assert not report.ok and [str(p) for p in report.errors] == [
        "error: features/S001.h5 [slide S001, slides.csv line 3]: file not found"]


def _mutations(root, name="mut.h5ad"):
    anndata.AnnData(X=np.array([[0, 1], [1, 0], [1, 1]], np.float32),
                    obs=pd.DataFrame(index=["P000", "P001", "P002"])).write_h5ad(root / name)


@pytest.mark.parametrize("form", ["top_level", "under_omics", "bare_file_name"])
def test_cohort_yaml_omics_forms(tmp_path, form):
    """The contract puts other omics tables at the top level of cohort.yaml; `omics:` works too."""
    root = write_cohort(tmp_path, reports=False, tasks=False)
    _mutations(root)
    spec = {"path": "mut.h5ad", "units": "binary"}
    doc = {"top_level": {"mutations": spec}, "under_omics": {"omics": {"mutations": spec}},
           "bare_file_name": {"mutations": "mut.h5ad"}}[form]
    (root / "cohort.yaml").write_text(yaml.safe_dump({"name": "my-cohort", **doc}))
    c = Cohort.open(root)
    adata, units = c.omics["mutations"]
    assert list(adata.obs_names) == ["P000", "P001", "P002"]
    assert units == ("continuous" if form == "bare_file_name" else "binary")
    problems = validate_cohort(c).problems
    assert [p for p in problems if p.level == "error"] == []
    # Metadata is kept out of the way with one warning, never an error.
    (name_warning,) = [p for p in problems if p.where == "name"]
    assert name_warning.level == "warning" and "ignored" in name_warning.message


def test_cohort_yaml_other_keys(tmp_path):
    root = write_cohort(tmp_path, reports=False, tasks=False, expression=False)
    _mutations(root)
    (root / "cohort.yaml").write_text(yaml.safe_dump({"reprots": "r.csv", "version": 2, "tags": ["liver"]}))
    problems = validate_cohort(Cohort.open(root)).problems
    by_key = {p.where: p for p in problems}
    assert all(p.level == "warning" for p in problems) and set(by_key) == {"reprots", "version", "tags"}
    assert "did you mean 'reports'?" in by_key["reprots"].message
    # The same table under both forms is ambiguous: an error naming it.
    (root / "cohort.yaml").write_text(yaml.safe_dump({"mutations": {"path": "mut.h5ad"},
                                                      "omics": {"mutations": {"path": "mut.h5ad"}}}))
    with pytest.raises(CohortError, match=r"cohort.yaml \[mutations\]: table declared twice"):
        Cohort.open(root)
    # A top-level table spec with bad units is an error like any table.
    (root / "cohort.yaml").write_text(yaml.safe_dump({"mutations": {"path": "mut.h5ad", "units": "percent"}}))
    with pytest.raises(CohortError, match=r"\[mutations\]: units 'percent' not one of"):
        Cohort.open(root)
