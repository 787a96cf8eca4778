"""End-to-end on a real SLURM cluster (.ci/slurm/start.sh): hydra-submitit-launcher multirun,
two interruptions, exact step count after resuming from last.ckpt.

Skipped when no cluster answers, unless SLIDEFM_REQUIRE_SLURM=1 (set by .ci/run): then it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "tests" / "slurm_app" / "app.py"
MAX_STEPS = 24


def _cluster_state() -> str:
    if shutil.which("sinfo") is None:
        return "sinfo not found"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    states = out.stdout.split()
    if out.returncode != 0 or not any(s.rstrip("*") in ("idle", "mixed", "allocated") for s in states):
        return f"no usable SLURM node (sinfo rc={out.returncode}: {out.stdout.strip()} {out.stderr.strip()})"
    return ""


@pytest.fixture(scope="module")
def slurm_cluster():
    problem = _cluster_state()
    if problem:
        if os.environ.get("SLIDEFM_REQUIRE_SLURM") == "1":
            pytest.fail(f"SLIDEFM_REQUIRE_SLURM=1 but the SLURM cluster is not up: {problem}")
        pytest.skip(f"SLURM cluster not available: {problem}")


def _wait(what: str, predicate, timeout: float, launcher: subprocess.Popen | None = None, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if launcher is not None and launcher.poll() is not None:
            raise AssertionError(f"launcher exited (rc={launcher.returncode}) while waiting for {what}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _progress(run_dir: Path) -> int:
    try:
        return int((run_dir / "progress").read_text() or -1)
    except (FileNotFoundError, ValueError):
        return -1


def _squeue(job_id: str) -> tuple[str, str]:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True, text=True)
    parts = out.stdout.split(maxsplit=1)
    return (parts[0], parts[1].strip()) if len(parts) == 2 else ("", "")


def _release_when_requeued(job_id: str, launcher: subprocess.Popen) -> None:
    """SLURM holds a requeued job ~2 minutes (Reason=BeginTime); start it now to keep the test short."""

    def pending() -> bool:
        state, reason = _squeue(job_id)
        return state == "PENDING" and reason in ("BeginTime", "None", "Priority", "Resources")

    _wait(f"job {job_id} requeued", pending, 90, launcher)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)


def _job_dirs(paths):
    """submitit's per-job folders (named by the SLURM job id), without the uuid-named pickles it writes beside them
    while submitting (a uuid may start with a digit: one was once taken for a job id)."""
    return (p for p in paths if p.name.isdigit() and p.is_dir())


def _diagnostics(sweep_root: Path, launcher_log: Path) -> str:
    parts = [f"--- launcher ---\n{launcher_log.read_text()[-4000:] if launcher_log.exists() else ''}"]
    for p in sorted(sweep_root.rglob("*_log.*"))[-4:] + sorted(sweep_root.rglob("events.jsonl")):
        parts.append(f"--- {p} ---\n{p.read_text()[-3000:]}")
    return "\n".join(parts)


def test_multirun_requeue_resumes_to_exact_step(slurm_cluster, tmp_path):
    sweep_root = tmp_path / "runs"
    name = f"slidefm-test-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(APP.parent), os.environ.get("PYTHONPATH", "")]))
    launcher_log = tmp_path / "launcher.log"
    cmd = [
        sys.executable, str(APP), "-m", f"base_dir={sweep_root}", f"trainer.max_steps={MAX_STEPS}",
        "step_sleep=0.25", f"hydra.launcher.name={name}",
    ]
    job_id = None
    with open(launcher_log, "w") as log:
        launcher = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        submitit_dir = _wait("submission", lambda: next(_job_dirs(sweep_root.glob("*/.submitit/*")), None), 60,
                             launcher)
        job_id = submitit_dir.name
        run_dir = submitit_dir.parent.parent / "0"

        # 1) Preemption/timeout warning as submitit expects it: SIGUSR2 to the job's tasks.
        #    PreemptionCheckpoint saves last.ckpt, then submitit's handler requeues and exits.
        _wait("first run training", lambda: _progress(run_dir) >= 4, 120, launcher)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        _wait("USR2 checkpoint", lambda: any(e["event"] == "preempted" for e in _events(run_dir)), 60, launcher)
        _release_when_requeued(job_id, launcher)

        # 2) An external requeue (admin/preemption): SLURM sends SIGTERM, SIGKILL after KillWait.
        def resumed_and_trained():
            starts = [e for e in _events(run_dir) if e["event"] == "start"]
            return len(starts) == 2 and _progress(run_dir) >= starts[1]["step"] + 3

        _wait("second run training", resumed_and_trained, 120, launcher)
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        _wait("SIGTERM checkpoint",
              lambda: sum(e["event"] == "preempted" for e in _events(run_dir)) == 2, 60, launcher)
        _release_when_requeued(job_id, launcher)

        rc = launcher.wait(timeout=180)
        assert rc == 0, _diagnostics(sweep_root, launcher_log)
    except BaseException as exc:
        raise AssertionError(f"{exc}\n{_diagnostics(sweep_root, launcher_log)}") from exc
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        if job_id is not None:
            subprocess.run(["scancel", job_id], capture_output=True)

    events = _events(run_dir)
    kinds = [e["event"] for e in events]
    assert kinds == ["start", "preempted", "start", "preempted", "start", "end"], events
    starts = [e for e in events if e["event"] == "start"]
    stops = [e for e in events if e["event"] in ("preempted", "end")]
    assert [e["restart"] for e in starts] == ["0", "1", "2"], "one SLURM job, requeued twice"
    assert {e["job"] for e in events} == {job_id}
    assert [e.get("signal") for e in stops[:2]] == [12, 15], "USR2 (submitit) then TERM (scontrol requeue)"
    # Each run resumes exactly where the previous one saved, from run_dir/checkpoints/last.ckpt.
    assert starts[0]["resume"] is None
    for prev, start in zip(stops[:2], starts[1:]):
        assert start["resume"] == str(run_dir / "checkpoints" / "last.ckpt")
        assert start["step"] == prev["step"] > 0
    # No step lost or repeated: the runs' own step counts add up to max_steps.
    assert sum(e["steps_run"] for e in stops) == MAX_STEPS
    final = torch.load(run_dir / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == MAX_STEPS
    # submitit recorded one successful result: the return value of the final run only.
    import pickle

    status, job_return = pickle.loads((submitit_dir / f"{job_id}_0_result.pkl").read_bytes())
    assert status == "success" and job_return.return_value == MAX_STEPS
    # The job leaves the queue once its processes are gone (COMPLETING until then).
    _wait("job to leave the queue", lambda: _squeue(job_id)[0] in ("", "COMPLETED"), 60)


# The tiny moozy_stage1 overrides of tests/test_train.py: a few CPU seconds per step.
TINY_MOOZY = [
    "model.aggregator.dim=32", "model.aggregator.depth=1", "model.aggregator.heads=2", "model.embed_dim=32",
    "objectives.distillation.out_dim=64", "objectives.distillation.hidden_dim=64",
    "objectives.distillation.bottleneck_dim=32", "data.views.global_size=10", "data.views.local_size=6",
    "data.batch_size=8", "data.num_workers=0", "trainer.progress_bar=false",
]


def test_slidefm_train_multirun_on_slurm(slurm_cluster, tmp_path):
    """The real entry point: `slidefm train -m hydra/launcher=slurm recipe=... data.cohort=...`."""
    cohort = tmp_path / "cohort"
    synth = [sys.executable, "-m", "slidefm", "synth", str(cohort), "--patients", "40", "--seed", "3",
             "--dim", "32", "--genes", "200", "--min-side", "10", "--max-side", "16"]
    subprocess.run(synth, check=True, capture_output=True, timeout=300)
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "-m", "slidefm", "train", "-m", "hydra/launcher=slurm", "recipe=moozy_stage1",
        f"data.cohort={cohort}", "trainer.max_steps=3", f"hydra.sweep.dir={sweep}",
        "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10", *TINY_MOOZY,
    ]
    try:
        out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=420)
    finally:
        for job in _job_dirs(sweep.glob(".submitit/*")):
            subprocess.run(["scancel", job.name], capture_output=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    script = next(sweep.glob(".submitit/*/*_submission.sh")).read_text()
    assert "#SBATCH --ntasks-per-node=1" in script and "#SBATCH --signal=USR2@300" in script
    assert "#SBATCH --requeue" in script
    last = torch.load(sweep / "0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 3
