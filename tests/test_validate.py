"""`slidefm check`: every bad-input case of the contract, run through the real CLI."""

import json

import anndata
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import lattice_coords, write_cohort, write_slide
from slidefm.cli import main


def run_check(capsys, root, *extra):
    code = main(["check", str(root), *extra])
    out = capsys.readouterr()
    return code, out.out + out.err


def slide(root, sid, n=10, dim=16, dtype="float32", coords=None, feats=None, **attrs):
    rng = np.random.default_rng(1)
    n = n if feats is None else len(feats)
    feats = rng.standard_normal((n, dim)).astype(dtype) if feats is None else feats
    coords = lattice_coords(rng, n, 256) if coords is None else coords
    write_slide(root / "features" / f"{sid}.h5", feats, coords, attrs or {"patch_size_level0": 256})


def edit_csv(path, fn):
    df = pd.read_csv(path, dtype={"patient_id": str, "slide_id": str})
    fn(df)
    df.to_csv(path, index=False)


def _nan(root):
    feats = np.random.default_rng(0).standard_normal((30, 16)).astype(np.float16)
    feats[7, 3] = np.nan
    feats[21, 0] = np.inf
    slide(root, "S002", feats=feats)


def _dup_coords(root):
    c = lattice_coords(np.random.default_rng(0), 10, 256)
    c[6] = c[2]
    slide(root, "S003", coords=c)


def _dup_slide(root):
    edit_csv(root / "slides.csv", lambda df: df.__setitem__("slide_id", df["slide_id"].replace("S004", "S001")))


BAD = {
    # name: (mutation, expected fragments that must all appear on one line of the output)
    "missing_h5": (lambda r: (r / "features" / "S001.h5").unlink(),
                   ["features/S001.h5", "slide S001, slides.csv line 3", "file not found"]),
    "unreadable_h5": (lambda r: (r / "features" / "S001.h5").write_bytes(b"\x00garbage"),
                      ["features/S001.h5", "slide S001", "cannot open as HDF5"]),
    "no_features": (lambda r: _drop(r, "S002", "features"),
                    ["features/S002.h5", "slide S002, slides.csv line 4", "no 'features' dataset"]),
    "no_coords": (lambda r: _drop(r, "S002", "coords"), ["features/S002.h5", "slide S002", "no 'coords' dataset"]),
    "n_mismatch": (lambda r: write_slide(r / "features" / "S003.h5", np.ones((5, 16), np.float32),
                                         lattice_coords(np.random.default_rng(0), 4, 256), {"patch_size_level0": 256}),
                   ["features/S003.h5", "slide S003", "'features' has 5 rows but 'coords' has 4"]),
    "zero_patches": (lambda r: write_slide(r / "features" / "S003.h5", np.zeros((0, 16), np.float32),
                                           np.zeros((0, 2), np.int64), {"patch_size_level0": 256}),
                     ["features/S003.h5", "slide S003", "zero patches"]),
    "nan_inf": (_nan, ["features/S002.h5", "slide S002", "patch rows 7, 21", "2 patch(es) with NaN/Inf"]),
    "dim_differs": (lambda r: slide(r, "S005", dim=8), ["features/S005.h5", "slide S005, slides.csv line 7",
                                                        "D=8", "D=16"]),
    "dup_coords": (_dup_coords, ["features/S003.h5", "slide S003", "patch rows 2 and 6", "duplicate coordinate"]),
    "dup_slide_id": (_dup_slide, ["slides.csv", "lines 3, 6", "slide S001", "duplicate slide_id"]),
    "no_clinical_row": (lambda r: edit_csv(r / "clinical.csv", lambda df: df.drop(index=1, inplace=True)),
                        ["clinical.csv", "patient P001 (slide S002, S003)", "no row for this patient",
                         "subtype, os"]),
    "non_numeric_time": (lambda r: edit_csv(r / "clinical.csv", lambda df: df.__setitem__(
        "os_months", df["os_months"].astype(object).where(df.index != 1, "ten"))),
        ["clinical.csv", "line 3", "'os_months' is not a number"]),
    "event_not_01": (lambda r: edit_csv(r / "clinical.csv", lambda df: df.__setitem__("os_event", [0, 2, 1])),
                     ["clinical.csv", "line 3", "must be 0 (censored) or 1 (event)"]),
    "negative_time": (lambda r: edit_csv(r / "clinical.csv", lambda df: df.__setitem__("os_months", [1.0, 2.0, -3.0])),
                      ["clinical.csv", "line 4", "negative survival time"]),
    "unknown_label_column": (lambda r: (r / "tasks.yaml").write_text(yaml.safe_dump({"tasks": [
        {"name": "grade", "kind": "classification", "label": "grade"}]})),
        ["tasks.yaml", "task grade", "column(s) ['grade'] not in clinical.csv"]),
    "clinical_no_patient_id": (lambda r: edit_csv(r / "clinical.csv", lambda df: df.rename(
        columns={"patient_id": "case"}, inplace=True)), ["clinical.csv", "header", "'patient_id'"]),
    "reports_no_text": (lambda r: edit_csv(r / "reports.csv", lambda df: df.rename(
        columns={"text": "report"}, inplace=True)), ["reports.csv", "header", "missing required column 'text'"]),
    "slides_no_patient_id": (lambda r: edit_csv(r / "slides.csv", lambda df: df.drop(
        columns="patient_id", inplace=True)), ["slides.csv", "header", "['patient_id']"]),
    "bad_split": (lambda r: edit_csv(r / "clinical.csv", lambda df: df.__setitem__("split", ["train", "dev", "test"])),
                  ["clinical.csv", "line 3", "split must be one of train, val, test"]),
    "bad_task_kind": (lambda r: (r / "tasks.yaml").write_text(yaml.safe_dump({"tasks": [
        {"name": "x", "kind": "regression", "label": "subtype"}]})),
        ["tasks.yaml", "task x", "kind 'regression' not one of"]),
    # Coordinates that are not one tiling (a few px off is snapped; scattered points are not a grid).
    "scattered_coords": (lambda r: slide(r, "S001", coords=np.random.default_rng(3).choice(10**6, (40, 2), False), n=40),
                         ["features/S001.h5", "slide S001", "implausible grid", "have a neighbouring patch"]),
    "stride_below_patch": (lambda r: slide(r, "S001", coords=lattice_coords(np.random.default_rng(0), 40, 4), n=40),
                           ["features/S001.h5", "slide S001", "implausible grid", "stride 4 px", "patch size 256"]),
    "negative_counts": (lambda r: _expression(r, np.array([[1, 2], [3, -4], [0, 1]], np.float32)),
                        ["expression.h5ad", "obs rows 1 (patient P001)", "negative values"]),
}


def _drop(root, sid, name):
    import h5py

    with h5py.File(root / "features" / f"{sid}.h5", "a") as f:
        del f[name]


def _expression(root, x, obs=("P000", "P001", "P002")):
    anndata.AnnData(X=x, obs=pd.DataFrame(index=list(obs))).write_h5ad(root / "expression.h5ad")


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_reported(tmp_path, capsys, case):
    root = write_cohort(tmp_path)
    mutate, fragments = BAD[case]
    mutate(root)
    code, out = run_check(capsys, root)
    assert code != 0, out
    assert "Traceback" not in out
    lines = [ln for ln in out.splitlines() if "error:" in ln]
    assert any(all(f in ln for f in fragments) for ln in lines), f"{fragments} not on one error line of:\n{out}"


def test_valid_cohort_passes_with_summary(tmp_path, capsys):
    code, out = run_check(capsys, write_cohort(tmp_path))
    assert code == 0, out
    assert "6 slides, 3 patients" in out
    assert "feature dim D: 16" in out
    assert "patients with report: 66.7%" in out
    assert "patients with expression: 100.0% (counts)" in out
    assert "labelled for task subtype: 100.0%" in out
    assert "slides per site (2 sites): A 4, B 2" in out
    assert "OK: 0 error(s), 0 warning(s)" in out


def test_every_problem_listed_at_once(tmp_path, capsys):
    root = write_cohort(tmp_path)
    for name in ("missing_h5", "nan_inf", "negative_time", "dup_slide_id"):
        BAD[name][0](root)
    code, out = run_check(capsys, root, "--json")
    assert code == 1
    doc = json.loads(out)
    assert doc["ok"] is False
    errors = [p for p in doc["problems"] if p["level"] == "error"]
    assert {p["file"] for p in errors} >= {"features/S001.h5", "features/S002.h5", "clinical.csv", "slides.csv"}
    assert doc["summary"]["slides"] == 6


def test_quick_skips_value_scan(tmp_path, capsys):
    root = write_cohort(tmp_path)
    _nan(root)
    assert run_check(capsys, root, "--quick")[0] == 0
    assert run_check(capsys, root)[0] == 1


def test_unknown_patients_are_warnings(tmp_path, capsys):
    root = write_cohort(tmp_path)
    pd.DataFrame({"patient_id": ["P000", "P999"], "text": ["a", "b"]}).to_csv(root / "reports.csv", index=False)
    _expression(root, np.ones((3, 2), np.float32), obs=("P000", "P001", "GHOST"))
    code, out = run_check(capsys, root)
    assert code == 0, out
    assert any("warning: reports.csv [line 3]" in ln and "not in slides.csv" in ln for ln in out.splitlines())
    assert any("warning: expression.h5ad [obs rows 2]" in ln and "GHOST" in ln for ln in out.splitlines())


def test_json_output(tmp_path, capsys):
    code, out = run_check(capsys, write_cohort(tmp_path), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["ok"] is True and doc["problems"] == []
    s = doc["summary"]
    assert s["slides"] == 6 and s["patients"] == 3 and s["feature_dim"] == 16
    assert s["share_with_label"] == {"subtype": 1.0, "os": 1.0}
    assert s["patches_per_slide"]["min"] >= 20 and s["patches_per_slide"]["max"] <= 40


def test_unopenable_cohort(tmp_path, capsys):
    """Nothing to check: one line on stderr and exit 2, like every other command."""
    assert main(["check", str(tmp_path / "missing")]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.splitlines() == [
        f"slidefm check: error: {tmp_path / 'missing'}: cohort directory not found"]


def test_trident_layout_accepted(tmp_path, capsys):
    """Features (1, N, D) float32 and TRIDENT's attributes on coords; no cohort.yaml, only slides.csv."""
    root = tmp_path / "trident"
    rng = np.random.default_rng(0)
    for i, (psl0, overlap) in enumerate([(512, 0), (1024, 0), (512, 32)]):
        stride = psl0 - overlap * psl0 // 256
        n = 25
        coords = lattice_coords(rng, n, stride, origin=(3 * stride + 17, 11))
        attrs = {"patch_size_level0": psl0, "patch_size": 256, "target_magnification": 20,
                 "level0_magnification": 40 if psl0 == 512 else 80, "overlap": overlap}
        write_slide(root / "features" / f"TCGA-{i}.h5", rng.standard_normal((n, 32)).astype(np.float32), coords,
                    attrs=attrs, batch_dim=True)
    pd.DataFrame({"slide_id": [f"TCGA-{i}" for i in range(3)], "patient_id": ["A", "A", "B"]}).to_csv(
        root / "slides.csv", index=False)
    code, out = run_check(capsys, root)
    assert code == 0, out
    assert "3 slides, 2 patients" in out and "feature dim D: 32 (float32 x3)" in out


def test_check_names_only_the_largest_sites():
    """TCGA has ~500 tissue source sites: the summary names the 12 largest and counts the rest."""
    from slidefm.commands.check import format_summary

    sites = {f"S{i:03d}": 1000 - i for i in range(40)}
    summary = {"root": "c", "slides": 40, "patients": 40, "slides_per_site": sites}
    line = next(x for x in format_summary(summary) if "per site" in x)
    assert line.startswith("  slides per site (40 sites): S000 1000, S001 999")
    assert "S011 989 (+28 more sites)" in line and "S012" not in line
