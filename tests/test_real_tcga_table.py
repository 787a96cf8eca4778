"""benchmarks/real_tcga.py's tables: which runs count as the same recipe run with another training seed."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import real_tcga  # noqa: E402

TASKS = list(real_tcga.PRIMARY)


def _run(deltas, overrides=(), recipe="slidefm_bags", steps=4000, eval_seeds=5, **extra):
    d = dict(zip(TASKS, deltas))
    return {"recipe": recipe, "steps": steps, "overrides": list(overrides), "eval_seeds": eval_seeds,
            "delta_vs_mean_pool": {"patient": d}, "patient": {t: {"value": 0.5 + v} for t, v in d.items()}, **extra}


def test_seed_groups_need_the_same_run_but_the_seed():
    runs = {
        "a_pf": _run([0.01] * 5),
        "a_pfseed1": _run([-0.01] * 5, ["trainer.seed=1", "data.seed=1"]),
        "a_pfseed2": _run([0.0] * 5, ["trainer.seed=2"]),  # data seed not changed: not a repeat
        "a_pfseed3": _run([0.0] * 5, ["trainer.seed=3", "data.seed=3", "model.learned_pcs=16"]),  # another recipe
        "a_pfseed4": _run([0.0] * 5, ["trainer.seed=4", "data.seed=4"], eval_seeds=3),  # other fold assignments
        "a_pfseed5": _run([0.0] * 5, ["trainer.seed=5", "data.seed=5"], steps=1000),
        "b_1000_retrained": _run([0.02] * 5),
        "b_1000_seed1": _run([0.0] * 5, ["trainer.seed=1", "data.seed=1"], seed_of="b_1000_retrained"),
        "b_1000": _run([0.5] * 5),  # the name-derived base, superseded by seed_of
        "lonely_seed1": _run([0.0] * 5, ["trainer.seed=1", "data.seed=1"]),
    }
    assert real_tcga.seed_groups(runs) == {"a_pf": ["a_pf", "a_pfseed1"],
                                           "b_1000_retrained": ["b_1000_retrained", "b_1000_seed1"]}


def test_seed_table_averages_paired_deltas_and_counts_runs_below():
    doc = {"runs": {"r": _run([0.01, -0.002, 0.0, 0.03, -0.01]),
                    "r_seed1": _run([0.03, -0.004, 0.0, -0.01, 0.02], ["data.seed=1", "trainer.seed=1"]),
                    "refused_seed1": {"refused": "nothing to train"}}}
    md = real_tcga.seed_markdown(doc).splitlines()
    assert len(md) == 3 and md[2].startswith("| `r` | patient | 2 |")
    cells = [c.strip() for c in md[2].split("|")[4:-1]]
    # ± is t(0.975, 1) * sd / sqrt(2) over the two runs: 12.706 * |a - b| / 2.
    assert cells == ["+0.020 ±0.127 (0 below)", "-0.003 ±0.013 (2 below)", "+0.000 ±0.000 (0 below)",
                     "+0.010 ±0.254 (1 below)", "+0.005 ±0.191 (1 below)", "+0.006 ±0.010"]
    assert real_tcga.seed_markdown({"runs": {"r": doc["runs"]["r"]}}) == ""


def test_seed_of_must_name_a_stored_run(tmp_path, monkeypatch, capsys):
    import json

    import pytest

    results = tmp_path / "real_tcga.json"
    results.write_text(json.dumps({"runs": {"b_1000_retrained": _run([0.0] * 5), "t_300": {"refused": "no"}}}))
    monkeypatch.setattr(real_tcga, "RESULTS", results)
    monkeypatch.setattr(real_tcga, "build_cohort", lambda *a: pytest.fail("work started before the check"))
    for bad in ("b_1000", "t_300"):
        with pytest.raises(SystemExit) as e:
            real_tcga.main(["--hipt", str(tmp_path), "--work", str(tmp_path), "--runs", "slidefm:1000:seed1",
                            "--seed-of", bad])
        assert e.value.code == 2 and f"--seed-of {bad}: no such run in" in capsys.readouterr().err


def test_headline_folds_seed_runs_into_one_row_under_its_baseline():
    doc = {"runs": {"r": _run([0.01, -0.002, 0.0, 0.03, -0.01]),
                    "r_seed1": _run([0.03, -0.004, 0.0, -0.01, 0.02], ["data.seed=1", "trainer.seed=1"]),
                    "single": _run([0.001] * 5, recipe="titan", steps=300),
                    "not_headline": _run([0.5] * 5),
                    "gone": {"recipe": "mstar", "refused": "no expression"}}}
    md = real_tcga.headline_markdown(doc, ["r", "single", "gone", "missing"]).split("\n")
    assert md[2] == "| mean pooling | | patient | | " + " | ".join(["0.500"] * 5) + " | |"
    # r and its seed run: values and deltas averaged over the two runs, ± as in the seed table
    assert md[3].startswith("| `slidefm_bags` | 4,000 | patient | 2 | 0.520 (+0.020 ±0.127) | 0.497 (-0.003 ±0.013) |")
    assert md[4] == "| `titan` | 300 | patient | 1 | " + " | ".join(["0.501 (+0.001)"] * 5) + " | +0.001 |"
    assert md[5:] == ["", "`mstar`: refused (no expression)"] and "0.5" not in " ".join(md[5:])
