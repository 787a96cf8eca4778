"""benchmarks/io.py on a tiny cohort: every cell runs, the JSON is written, cold cells say what the disk did."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def iob():
    spec = importlib.util.spec_from_file_location("io_bench", ROOT / "benchmarks" / "io.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_disk_use_arithmetic(iob):
    # 2,000 sectors (1.024 MB) and 500 ms busy over 2 s
    got = iob.disk_use((100, 1000, 7), (2100, 1500, 17), 2.0)
    assert got == {"MB": 1.0, "MB_per_s": 0.5, "busy_share": 0.25, "reads": 10}
    assert iob.disk_use(None, (1, 2, 3), 1.0) is None and iob.disk_counters(None) is None


def test_pages_activated_reads_vmstat(iob, monkeypatch, tmp_path):
    vmstat = tmp_path / "vmstat"
    vmstat.write_text("pgactivate_extra 1\npgactivate 12345\npgdeactivate 7\n")
    real = iob.Path

    def fake(p, *a):
        return real(vmstat) if str(p) == "/proc/vmstat" else real(p, *a)

    monkeypatch.setattr(iob, "Path", fake)
    assert iob.pages_activated() == 12345
    vmstat.unlink()
    assert iob.pages_activated() is None


def test_tiny_run_writes_every_cell(iob, tmp_path):
    out = tmp_path / "io.json"
    assert iob.main(["--slides", "8", "--patches", "40", "--dim", "16", "--reads", "6", "--repeats", "1",
                     "--workers", "0,2", "--batch", "2", "--arena-mb", "1", "--dir", str(tmp_path / "cohort"), "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    r = d["results"]
    for fmt in ("hdf5", "store"):
        for cache in ("cold", "warm"):
            for nw in (0, 2):
                assert r[f"{fmt}_{cache}_nw{nw}"]["slides_per_s"] > 0
            assert f"{fmt}_{cache}_nw2_b2" in r and f"{fmt}_{cache}_nw2_count" in r
    assert "none_warm_nw2_transfer" in r
    cells = {f"{cache}_nw{nw}{b}" for cache in ("cold", "warm") for nw in (0, 2) for b in ("", "_b2")}
    assert set(d["speedup"]) == cells | {"cold_nw2_count", "warm_nw2_count"}
    if iob.block_device(tmp_path) is not None:  # a file system on a block device: cold cells say what it did
        assert d["cold_vs_disk"]["device"] == iob.block_device(tmp_path)
        assert set(d["cold_vs_disk"]["cells"]) == {c for c in d["speedup"] if c.startswith("cold")}
        dev = r["store_cold_nw0"]["device_during_cell"]
        assert dev["MB_per_s"] >= 0 and 0 <= dev["busy_share"] <= 1
        assert "device_during_cell" not in r["store_warm_nw0"]
    else:
        assert d["cold_vs_disk"] is None
    if iob.pages_activated() is not None:  # Linux: warm cells say how many pages the kernel promoted per page read
        assert r["store_warm_nw0"]["pages_activated_per_page_read"] >= 0
        assert "pages_activated_per_page_read" not in r["store_cold_nw0"]
