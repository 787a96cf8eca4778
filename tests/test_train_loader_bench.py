"""benchmarks/train_loader.py on a tiny cohort: every cell runs and the JSON is written."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_tiny_run_writes_every_cell(tmp_path):
    spec = importlib.util.spec_from_file_location("train_loader_bench", ROOT / "benchmarks" / "train_loader.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "train_loader.json"
    assert mod.main(["--slides", "12", "--patches", "60", "--dim", "16", "--batch-size", "2", "--repeats", "1",
                     "--arena-mb", "1,4", "--read-ahead", "4,0", "--dir", str(tmp_path / "cohort"),
                     "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    r = d["results"]
    assert set(r) == {"warm_nw0", "arena1_nw2", "arena4_nw2", "readahead4_nw0", "readahead0_nw0",
                      "readahead4_nw2", "readahead0_nw2"}
    assert d["cohort"]["patients"] == 6 and d["cohort"]["slides_per_epoch"] == 6
    for key, cell in r.items():
        if key.startswith("readahead"):
            assert cell["cold_epoch_s"] > 0 and len(cell["warm_epoch_s"]) == 2
        else:
            assert cell["slides_per_s"] > 0 and len(cell["runs_s"][0]) == 2  # epochs 2 and 3
