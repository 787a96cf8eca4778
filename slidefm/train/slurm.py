"""SLURM helpers: environment detection, the Lightning cluster plugin, resume paths.

Jobs are submitted with hydra-submitit-launcher (``slidefm train -m hydra/launcher=slurm ...``).
submitit owns requeueing: it installs the SIGUSR2 handler that checkpoints its callable and runs
``scontrol requeue``. Lightning must therefore not requeue on its own (its handler would requeue
without a checkpoint of ours), hence ``SLURMEnvironment(auto_requeue=False)``; saving
``last.ckpt`` is done by :class:`slidefm.train.preemption.PreemptionCheckpoint`.
"""

from __future__ import annotations

import os
import subprocess

from slidefm.checkpoint import LAST_CHECKPOINT, resume_checkpoint
from slidefm.errors import SlidefmError

__all__ = [
    "in_slurm_job",
    "in_submitit_job",
    "slurm_job_id",
    "cluster_plugins",
    "check_slurm_layout",
    "requeue_job",
    "resume_checkpoint",
    "LAST_CHECKPOINT",
]


def in_slurm_job() -> bool:
    """True inside a SLURM batch or srun job (not merely on a login node with SLURM installed)."""
    return "SLURM_JOB_ID" in os.environ


def in_submitit_job() -> bool:
    """True when the process runs a submitit-pickled callable (hydra-submitit-launcher jobs)."""
    return "SUBMITIT_EXECUTOR" in os.environ


def slurm_job_id() -> str | None:
    """The id to requeue: the array parent's ``JOBID_TASKID`` for array tasks, else the job id."""
    array_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    task_id = os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_id and task_id:
        return f"{array_id}_{task_id}"
    return os.environ.get("SLURM_JOB_ID")


def check_slurm_layout(devices: int | str | list, num_nodes: int) -> None:
    """Fail early when the SLURM allocation does not match the trainer.

    With fewer SLURM tasks than devices Lightning would spawn the missing ranks itself by
    re-running ``sys.argv`` -- under submitit that is the submitit bootstrap, which breaks.
    """
    if not in_slurm_job():
        return
    if isinstance(devices, (list, tuple)):
        n_devices = len(devices)
    elif isinstance(devices, str):
        if not devices.isdigit():
            raise SlidefmError(
                f"trainer.devices={devices!r}: on SLURM give an explicit device count equal to tasks_per_node"
            )
        n_devices = int(devices)
    else:
        n_devices = int(devices)
    ntasks_per_node = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE", "1")
    # SLURM_TASKS_PER_NODE looks like "4(x2)" for homogeneous multi-node jobs.
    ntasks_per_node = ntasks_per_node.split("(")[0].split(",")[0]
    nnodes = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES", "1"))
    if int(ntasks_per_node) != n_devices or nnodes != int(num_nodes):
        raise SlidefmError(
            f"SLURM job has {ntasks_per_node} task(s) per node on {nnodes} node(s), but the trainer wants "
            f"devices={n_devices}, num_nodes={num_nodes}; set hydra.launcher.tasks_per_node=trainer.devices "
            "and hydra.launcher.nodes=trainer.num_nodes (the slurm launcher config does this by default)"
        )


def cluster_plugins() -> list:
    """Trainer plugins for the current environment: ``[SLURMEnvironment(auto_requeue=False)]`` in a
    SLURM job, else ``[]``.

    Lightning would otherwise auto-detect SLURM with ``auto_requeue=True`` and install its own
    requeue handler, which requeues without our checkpoint and races submitit's.
    """
    if not in_slurm_job():
        return []
    from lightning_fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)]


def requeue_job(job_id: str | None = None) -> None:
    """``scontrol requeue`` the current (or given) job; used when no submitit handler does it."""
    job_id = job_id or slurm_job_id()
    if not job_id:
        raise SlidefmError("not inside a SLURM job: nothing to requeue")
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
