"""The python part of benchmarks/gpu_check.sh: run the GPU tests and GPU benchmarks as time-limited parts.

    benchmarks/gpu_check.sh                 # on a CUDA machine: < 8 minutes, one JSON object on stdout
    python benchmarks/gpu_check.py --dry-run  # anywhere: canned benchmark parts, real (skipped) tests

Parts, each a separate process with its own timeout (clipped to what is left of --budget):

    device  torch/CUDA versions, device name, datasheet bf16 peak (benchmarks/aggregators.bf16_peak_flops)
    tests   pytest tests/gpu with a JUnit XML report, parsed into counts, failures and skip reasons
    mfu     aggregators.py --sections gpu_mfu     (goal: >= 40% of the datasheet bf16 peak)
    packed  aggregators.py --sections gpu_packed  (goal: >= 2x over padded)
    slide   aggregators.py --sections gpu_slide   (goal: < 1 s and < 8 GB per 100k-patch slide, RoPE and ALiBi)

Without CUDA the benchmark parts are skipped (the tests still run and report as skipped). A part that
fails or times out is recorded with its status and stderr tail; the others still run. The JSON is
written atomically to benchmarks/results/gpu_check.json after every part, so even a killed run leaves
what it measured; the final document is printed as ONE JSON object on stdout (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import _common

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUDGET_S = 450.0  # under the 8-minute promise, with room for start-up and the final write
# part -> default timeout (s); benchmarks get what they need, the tests the rest
TIMEOUTS = {"device": 60.0, "tests": 230.0, "mfu": 60.0, "packed": 60.0, "slide": 90.0}
BENCH_PARTS = ("mfu", "packed", "slide")
GOALS = {"mfu_vs_datasheet": 0.40, "packed_speedup": 2.0, "slide_wall_s": 1.0, "slide_peak_gb": 8.0}


# ---------------------------------------------------------------- pieces tested on CPU (tests/test_gpu_check.py)
def parse_junit(path: str | Path) -> dict:
    """Counts, failures (test, message), skip reasons and the slowest tests (seconds: for sizing a rerun inside
    the device time) from a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "total": 0, "failures": [], "skip_reasons": {}}
    times: list[tuple[float, str]] = []
    for suite in suites:
        for case in suite.iter("testcase"):
            out["total"] += 1
            name = f"{case.get('classname', '')}::{case.get('name', '')}".lstrip(":")
            try:
                times.append((float(case.get("time") or 0.0), name))
            except ValueError:
                pass
            kinds = {child.tag: child for child in case}
            if "failure" in kinds or "error" in kinds:
                child = kinds.get("failure", kinds.get("error"))
                out["failed" if child.tag == "failure" else "errors"] += 1
                msg = (child.get("message") or child.text or "").strip()
                out["failures"].append({"test": name, "kind": child.tag, "message": msg[:500]})
            elif "skipped" in kinds:
                out["skipped"] += 1
                reason = (kinds["skipped"].get("message") or "").strip() or "(no reason)"
                out["skip_reasons"][reason] = out["skip_reasons"].get(reason, 0) + 1
            else:
                out["passed"] += 1
    out["slowest"] = [{"test": n, "s": round(t, 2)} for t, n in sorted(times, reverse=True)[:10]]
    return out


def goals_summary(doc: dict) -> dict:
    """Per goal: True / False / None (not measured); 'all' is True only if every goal was measured and met."""
    g: dict = {}
    mfu = doc.get("mfu") or {}
    g["mfu_ge_40pct_datasheet"] = mfu.get("meets_goal") if "mfu_vs_datasheet" in mfu else None
    packed = doc.get("packed") or {}
    g["packed_ge_2x"] = packed.get("meets_goal") if "speedup" in packed else None
    slide = doc.get("slide") or {}
    for pos in ("rope", "alibi"):
        r = slide.get(pos) or {}
        g[f"slide_{pos}_lt_1s_8gb"] = r.get("meets_goal") if "wall_s" in r else None
    t = doc.get("tests") or {}
    g["tests_pass"] = (t.get("failed", 0) == 0 and t.get("errors", 0) == 0 and t.get("passed", 0) > 0
                       and t.get("status") == "ok") if "total" in t else None
    g["all"] = all(v is True for v in g.values())
    return g


def clip_timeout(default: float, started: float, budget: float, now: float | None = None) -> float:
    """A part's timeout: its default, but never past the overall budget (at least 1 s)."""
    left = budget - ((now if now is not None else time.monotonic()) - started)
    return max(1.0, min(default, left))


def run_part(cmd: list[str], timeout: float, env: dict | None = None, grace: float = 15.0) -> dict:
    """Run one part; returns status ok / failed / timeout, wall time, rc, stdout, stderr tail.

    On timeout the part first gets SIGINT (pytest then still writes its JUnit file with the tests that
    finished) and ``grace`` seconds to exit, then SIGKILL.
    """
    import signal

    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        return {"status": "timeout", "timeout_s": timeout, "wall_s": time.perf_counter() - t,
                "stderr_tail": (stderr or "")[-2000:], "stdout": stdout or ""}
    return {"status": "ok" if proc.returncode == 0 else "failed", "returncode": proc.returncode,
            "wall_s": time.perf_counter() - t, "timeout_s": timeout, "stderr_tail": (stderr or "")[-2000:],
            "stdout": stdout or ""}


def read_section(path: Path, section: str) -> dict | None:
    """The section written by aggregators.py --out PATH, or None."""
    try:
        return json.loads(path.read_text()).get(section)
    except (OSError, ValueError, AttributeError):
        return None


def write_atomic(path: Path, doc: dict) -> None:
    _common.write_atomic(path, doc, default=str)  # anything not JSON as a string, as printed


def carried_wheels(site: str | None) -> dict[str, str]:
    """{distribution: version} installed from .whl/ by gpu_check.sh into ``site`` (empty without one)."""
    import importlib.metadata as md

    if not site:
        return {}
    return {d.metadata["Name"]: d.version for d in md.distributions(path=[site])}


# ---------------------------------------------------------------- children
def child_device() -> dict:
    import platform

    import torch

    sys.path.insert(0, str(HERE))
    from aggregators import bf16_peak_flops

    info = {"torch": torch.__version__, "cuda_built": torch.backends.cuda.is_built(), "cuda": torch.version.cuda,
            "python": platform.python_version(), "cuda_available": torch.cuda.is_available(),
            "carried": carried_wheels(os.environ.get("GPU_CHECK_SITE"))}
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak, matched = bf16_peak_flops(name)
        props = torch.cuda.get_device_properties(0)
        info |= {"name": name, "count": torch.cuda.device_count(), "capability": list(torch.cuda.get_device_capability()),
                 "memory_gb": props.total_memory / 1e9, "datasheet_bf16_flop_s": peak, "datasheet_match": matched}
        try:
            import importlib.util

            info["xformers"] = importlib.util.find_spec("xformers") is not None
        except (ImportError, ValueError):
            info["xformers"] = False
    return info


FAKE = {  # --dry-run: what the benchmark parts print on an H100 (shape only, numbers invented)
    "gpu_mfu": {"device": "NVIDIA H100 80GB HBM3 (dry run)", "step_s": 0.5, "mfu_vs_datasheet": 0.45,
                "datasheet_bf16_flop_s": 989.4e12, "meets_goal": True, "goal": 0.4},
    "gpu_packed": {"speedup": 2.5, "meets_goal": True, "goal": 2.0},
    "gpu_slide": {"rope": {"wall_s": 0.4, "peak_gpu_mem_gb": 3.1, "meets_goal": True},
                  "alibi": {"wall_s": 1.3, "peak_gpu_mem_gb": 3.3, "meets_goal": False}},
}


def child_fake(section: str, out: Path, behaviour: str) -> int:
    if behaviour == "hang":
        time.sleep(3600)
    if behaviour == "fail":
        print("Traceback (most recent call last):\nRuntimeError: CUDA error: an illegal memory access (dry run)",
              file=sys.stderr)
        return 1
    write_atomic(out, {section: FAKE[section]})
    return 0


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(HERE / "results" / "gpu_check.json"))
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all parts together")
    p.add_argument("--parts", default="device,tests,mfu,packed,slide")
    p.add_argument("--dry-run", action="store_true", help="canned benchmark parts (no GPU needed); tests run for real")
    p.add_argument("--fake", action="append", default=[], metavar="PART=ok|fail|hang",
                   help="dry run: make a benchmark part succeed, fail or hang (tests of this script)")
    p.add_argument("--timeout", action="append", default=[], metavar="PART=SECONDS", help="override a part's timeout")
    p.add_argument("--pytest-args", default="", help="extra arguments for the tests part (space separated)")
    p.add_argument("--_child", choices=("device", "fake"), help=argparse.SUPPRESS)
    p.add_argument("--_section", help=argparse.SUPPRESS)
    p.add_argument("--_behaviour", default="ok", help=argparse.SUPPRESS)
    p.add_argument("--_file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child == "device":
        print(json.dumps(child_device()))
        return 0
    if args._child == "fake":
        return child_fake(args._section, Path(args._file), args._behaviour)

    started = time.monotonic()
    timeouts = dict(TIMEOUTS)
    for item in args.timeout:
        k, v = item.split("=", 1)
        timeouts[k] = float(v)
    fakes = dict(item.split("=", 1) for item in args.fake)
    work = Path(tempfile.mkdtemp(prefix="gpu_check."))  # the parts' JSON and JUnit files; removed at the end
    # gpu_check.sh's hard limit sends SIGTERM: exit through the finally below (and subprocess.run kills the part)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return _run(args, work, started, timeouts, fakes)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args, work: Path, started: float, timeouts: dict, fakes: dict) -> int:
    out = Path(args.out)
    py = sys.executable
    doc: dict = {"script": "benchmarks/gpu_check.sh", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "budget_s": args.budget, "dry_run": args.dry_run, "goals_spec": GOALS, "parts": {}}
    parts = [x for x in args.parts.split(",") if x]

    def record(name: str, res: dict) -> None:
        res.pop("stdout", None)
        doc["parts"][name] = res
        doc["goals"] = goals_summary(doc)
        doc["wall_s"] = time.monotonic() - started
        write_atomic(out, doc)
        print(f"[gpu_check] {name}: {res['status']} in {res.get('wall_s', 0):.0f} s", file=sys.stderr)

    cuda = False
    if "device" in parts:
        res = run_part([py, __file__, "--_child", "device"], clip_timeout(timeouts["device"], started, args.budget))
        if res["status"] == "ok":
            try:
                doc["device"] = json.loads(res["stdout"].strip().splitlines()[-1])
            except (ValueError, IndexError):
                res["status"] = "failed"
        cuda = bool(doc.get("device", {}).get("cuda_available"))
        record("device", res)
    if "tests" in parts:
        junit = work / "gpu_tests.junit.xml"
        env = dict(os.environ)
        if cuda and not args.dry_run:
            env["SLIDEFM_GPU_TESTS"] = "require"  # on a GPU machine a skip-for-no-CUDA would hide a broken setup
        cmd = [py, "-m", "pytest", "tests/gpu", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}",
               "-o", "junit_family=xunit2", *args.pytest_args.split()]
        res = run_part(cmd, clip_timeout(timeouts["tests"], started, args.budget), env)
        tests: dict = {"status": res["status"], "wall_s": res["wall_s"]}
        if junit.exists():
            try:
                tests |= parse_junit(junit)
            except ET.ParseError as e:
                tests["junit_error"] = str(e)
        if res["status"] == "failed" and tests.get("failed", 0) + tests.get("errors", 0) == 0:
            tests["stderr_tail"] = res["stderr_tail"][-1500:] or res["stdout"][-1500:]
        if res["status"] == "timeout":
            tests["note"] = "timed out: counts cover the tests that finished before (no JUnit file when none did)"
        if res["status"] == "failed" and tests.get("failed", 0) + tests.get("errors", 0) > 0:
            tests["status"] = "ok"  # pytest ran; the failures are in the counts (goal tests_pass is False)
            res["note"] = "pytest exit 1: test failures"
        doc["tests"] = tests
        record("tests", res)
    for part in BENCH_PARTS:
        if part not in parts:
            continue
        section = f"gpu_{part}"
        if not cuda and not args.dry_run:
            doc[part] = {"skipped": "no CUDA device"}
            record(part, {"status": "skipped", "reason": "no CUDA device", "wall_s": 0.0})
            continue
        if clip_timeout(timeouts[part], started, args.budget) <= 1.0:
            doc[part] = {"skipped": "time budget used up"}
            record(part, {"status": "skipped", "reason": "time budget used up", "wall_s": 0.0})
            continue
        part_out = work / f"{section}.json"
        if args.dry_run:
            cmd = [py, __file__, "--_child", "fake", "--_section", section, "--_file", str(part_out),
                   "--_behaviour", fakes.get(part, "ok")]
        else:
            cmd = [py, str(HERE / "aggregators.py"), "--sections", section, "--out", str(part_out)]
        res = run_part(cmd, clip_timeout(timeouts[part], started, args.budget))
        got = read_section(part_out, section)
        if res["status"] == "ok" and got is None:
            res["status"] = "failed"
            res["note"] = "no result written"
        doc[part] = got if got is not None else {"error": res["status"], "stderr_tail": res["stderr_tail"][-1500:]}
        record(part, res)
    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    doc["wall_s"] = time.monotonic() - started
    doc["goals"] = goals_summary(doc)
    write_atomic(out, doc)
    print(json.dumps(doc, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
