"""The CPU-side logic of benchmarks/gpu_check.sh: peak lookup, JUnit parsing, goals, timeouts, partial JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
from aggregators import bf16_peak_flops  # noqa: E402

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989.4e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA A100-PCIE-40GB", 312e12),
    ("NVIDIA A10", 125e12), ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12),
    ("NVIDIA GeForce RTX 4090", None), ("", None),
])
def test_datasheet_peak_by_device_name(name, peak):
    got, matched = bf16_peak_flops(name)
    assert got == peak
    assert (matched is None) == (peak is None)


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="2" tests="5">
<testcase classname="tests.gpu.test_gpu_attention" name="test_a[sdpa-fp32]" time="0.1"/>
<testcase classname="tests.gpu.test_gpu_attention" name="test_a[flex-bf16]" time="0.1">
  <failure message="AssertionError: flex bf16 forward: rel err 3.1e-02 &gt; 2e-02">trace</failure></testcase>
<testcase classname="tests.gpu.test_gpu_train" name="test_b" time="12.5"><error message="fixture failed">x</error></testcase>
<testcase classname="tests.gpu.test_gpu_attention" name="test_a[xformers-fp32]" time="0">
  <skipped type="pytest.skip" message="xformers is not installed">s</skipped></testcase>
<testcase classname="tests.gpu.test_gpu_attention" name="test_a[xformers-bf16]" time="0">
  <skipped type="pytest.skip" message="xformers is not installed">s</skipped></testcase>
</testsuite></testsuites>"""


def test_parse_junit(tmp_path):
    p = tmp_path / "j.xml"
    p.write_text(JUNIT)
    r = gpu_check.parse_junit(p)
    assert (r["total"], r["passed"], r["failed"], r["errors"], r["skipped"]) == (5, 1, 1, 1, 2)
    assert r["skip_reasons"] == {"xformers is not installed": 2}
    assert r["failures"][0]["test"] == "tests.gpu.test_gpu_attention::test_a[flex-bf16]"
    assert "rel err 3.1e-02" in r["failures"][0]["message"]
    assert r["failures"][1]["kind"] == "error"
    assert r["slowest"][0] == {"test": "tests.gpu.test_gpu_train::test_b", "s": 12.5} and len(r["slowest"]) == 5


def test_goals_summary():
    doc = {"mfu": {"mfu_vs_datasheet": 0.45, "meets_goal": True}, "packed": {"speedup": 1.5, "meets_goal": False},
           "slide": {"rope": {"wall_s": 0.3, "meets_goal": True}, "alibi": {"error": "OOM"}},
           "tests": {"status": "ok", "total": 10, "passed": 10, "failed": 0, "errors": 0}}
    g = gpu_check.goals_summary(doc)
    assert g == {"mfu_ge_40pct_datasheet": True, "packed_ge_2x": False, "slide_rope_lt_1s_8gb": True,
                 "slide_alibi_lt_1s_8gb": None, "tests_pass": True, "all": False}
    # unknown datasheet peak: measured, but the goal cannot be judged
    assert gpu_check.goals_summary({"mfu": {"mfu_vs_datasheet": None, "meets_goal": None}})["mfu_ge_40pct_datasheet"] is None
    assert gpu_check.goals_summary({})["all"] is False  # nothing measured is not a pass
    everything = doc | {"packed": {"speedup": 3, "meets_goal": True},
                        "slide": {p: {"wall_s": 0.5, "meets_goal": True} for p in ("rope", "alibi")}}
    assert gpu_check.goals_summary(everything)["all"] is True
    assert gpu_check.goals_summary(everything | {"tests": {"status": "timeout", "total": 3, "passed": 3}})["all"] is False


def test_clip_timeout():
    assert gpu_check.clip_timeout(60, started=0, budget=450, now=10) == 60
    assert gpu_check.clip_timeout(60, started=0, budget=450, now=420) == 30
    assert gpu_check.clip_timeout(60, started=0, budget=450, now=500) == 1.0


def run_script(*args, env=None, timeout=120):
    # GPU_CHECK_WHEELS: not the checkout's .whl/ (wheels made for the GPU machine's Python, maybe not this one's)
    p = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env={**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WHEELS": "/nonexistent", **(env or {})})
    return p


def make_wheel(folder: Path, name: str = "slidefm_probe", version: str = "1.0") -> Path:
    """A minimal pure-python wheel holding module ``{name}_mod`` (VALUE = 42)."""
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}_mod.py": "VALUE = 42\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{k},,\n" for k in [*files, f"{dist}/RECORD"])
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
    return path


def test_carried_wheels_are_installed_on_the_path_of_every_part(tmp_path):
    """What benchmarks/gpu_wheels.py puts in .whl/ reaches the parts: installed into a scratch directory on
    PYTHONPATH (beside the checkout), and listed in the device part. Scratch directories are removed after."""
    wheels = tmp_path / "whl"
    make_wheel(wheels)
    out = tmp_path / "gpu_check.json"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    p = run_script("--dry-run", "--out", str(out), "--parts", "device",
                   env={"GPU_CHECK_WHEELS": str(wheels), "TMPDIR": str(scratch)})
    assert list(scratch.iterdir()) == []
    assert p.returncode == 0, p.stderr
    assert "1 wheels from" in p.stderr
    assert json.loads(p.stdout)["device"]["carried"] == {"slidefm-probe": "1.0"}
    # a broken wheel stops the script before any part, in one line
    (wheels / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    p = run_script("--dry-run", "--out", str(tmp_path / "x.json"), env={"GPU_CHECK_WHEELS": str(wheels)})
    assert p.returncode == 3 and "could not install the wheels" in p.stderr and not (tmp_path / "x.json").exists()


def test_dry_run_one_json_object_with_failed_and_hung_parts(tmp_path):
    out = tmp_path / "gpu_check.json"
    p = run_script("--dry-run", "--out", str(out), "--fake", "slide=fail", "--fake", "packed=hang",
                   "--timeout", "packed=3", "--pytest-args", "-k test_auto_picks_a_fused_kernel_on_cuda")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)  # the whole stdout is ONE JSON object
    assert json.loads(out.read_text()) == doc
    parts = doc["parts"]
    assert [parts[k]["status"] for k in ("device", "tests", "mfu", "packed", "slide")] == \
        ["ok", "ok", "ok", "timeout", "failed"]
    assert doc["mfu"]["mfu_vs_datasheet"] == 0.45  # the part that worked keeps its figures
    assert doc["packed"]["error"] == "timeout" and doc["slide"]["error"] == "failed"
    assert "illegal memory access" in doc["slide"]["stderr_tail"]
    # tests ran for real and were skipped for want of CUDA, with the reason
    t = doc["tests"]
    if doc["device"]["cuda_available"]:
        pytest.skip("this machine has CUDA: the skip logic is not exercised")
    assert t["total"] == t["skipped"] == 1 and t["passed"] == 0
    assert t["skip_reasons"] == {"GPU test: no CUDA device": 1}
    assert doc["goals"]["mfu_ge_40pct_datasheet"] is True and doc["goals"]["packed_ge_2x"] is None
    assert doc["goals"]["tests_pass"] is False and doc["goals"]["all"] is False


def test_without_cuda_benchmarks_are_skipped_and_a_killed_run_leaves_partial_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    p = run_script("--out", str(out), "--parts", "device,mfu,packed,slide")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    if doc["device"]["cuda_available"]:
        pytest.skip("this machine has CUDA")
    assert doc["mfu"] == {"skipped": "no CUDA device"} and doc["parts"]["slide"]["status"] == "skipped"
    # The hard limit kills the whole script mid-part: what finished before is on disk, valid JSON.
    out2 = tmp_path / "killed.json"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    p = run_script("--dry-run", "--out", str(out2), "--parts", "device,mfu,packed", "--fake", "packed=hang",
                   "--timeout", "packed=300", env={"GPU_CHECK_HARD_LIMIT_S": "25", "TMPDIR": str(scratch)})
    assert p.returncode in (124, 137)
    assert list(scratch.iterdir()) == []  # killed, it still removes its scratch directory
    partial = json.loads(out2.read_text())
    assert partial["parts"]["device"]["status"] == "ok" and partial["mfu"]["mfu_vs_datasheet"] == 0.45
    assert "packed" not in partial["parts"] and "finished" not in partial


def test_require_mode_turns_missing_cuda_into_failures(tmp_path):
    env = {**os.environ, "SLIDEFM_GPU_TESTS": "require"}
    p = subprocess.run([sys.executable, "-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider",
                        "-k", "test_auto_picks_a_fused_kernel_on_cuda"], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=120)
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert p.returncode == 1 and "SLIDEFM_GPU_TESTS=require but no CUDA device" in p.stdout
