"""One training process per device, wherever the command runs: locally, or in a SLURM job.

Lightning Fabric joins processes that SLURM's srun or torchrun started (it reads their
environment), and otherwise starts the other processes of one node itself. Inside a SLURM
allocation only srun can place processes on every node of the job with its CPUs and GPUs, so
a training command that asks for several processes there runs itself again under srun, once
per process; each copy then finds itself in an srun step of that size and trains.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Mapping, Sequence

from mgi.errors import ConfigError

log = logging.getLogger(__name__)

# Lightning's own convention: a SLURM job of one of these names is an interactive shell,
# whose single task may start the node's processes itself.
INTERACTIVE_JOB_NAMES = ("bash", "interactive")


def srun_command(
    argv: Sequence[str],
    *,
    processes_per_node: int,
    nodes: int,
    threads: int,
    environ: Mapping[str, str],
) -> list[str] | None:
    """The srun line that starts `argv` once per process, or None where this process trains.

    `threads` are the command's CPU threads on one node, shared by its processes.
    """
    total = processes_per_node * nodes
    if total == 1 or "LOCAL_RANK" in environ:  # one process, or torchrun/Fabric started them
        return None
    where = f"{processes_per_node} process(es) on each of {nodes} node(s)"
    if "SLURM_JOB_ID" not in environ:
        if nodes > 1:
            raise ConfigError(
                f"pretrain asks for {where}: outside SLURM only one node can be used (run it "
                "through workflow/profiles/slurm, or start it on every node with torchrun)"
            )
        return None  # Fabric starts the other processes of this node itself
    if "SLURM_STEP_ID" in environ:  # already a task of a job step
        if int(environ.get("SLURM_NTASKS", "1")) == total:
            return None  # one of the processes that srun started
        if nodes == 1 and environ.get("SLURM_JOB_NAME") in INTERACTIVE_JOB_NAMES:
            return None
        raise ConfigError(
            f"pretrain asks for {where}, but runs as one task of a SLURM job step of "
            f"{environ.get('SLURM_NTASKS', '1')} task(s), which cannot start more: give rule "
            "pretrain the resources mpi=srun and tasks_per_node (workflow/profiles/slurm does "
            "with MGI_SLURM_GPUS or MGI_SLURM_PROCESSES above 1)"
        )
    return [
        "srun",
        f"--nodes={nodes}",
        f"--ntasks-per-node={processes_per_node}",
        f"--cpus-per-task={max(1, threads // processes_per_node)}",
        "--kill-on-bad-exit=1",
        *argv,
    ]


def launch(argv: Sequence[str], *, processes_per_node: int, nodes: int, threads: int) -> None:
    """Replace this process by srun starting `argv` once per process, where one is needed.

    Returns (and the caller trains) where this process is one of the training processes.
    """
    command = srun_command(argv, processes_per_node=processes_per_node, nodes=nodes,
                           threads=threads, environ=os.environ)
    if command is None:
        return
    log.info("starting %d training processes: %s", processes_per_node * nodes,
             shlex.join(command))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(command[0], command)


def slurm_job(environ: Mapping[str, str]) -> str | None:
    """Where in SLURM this process runs, in words (job, partition, node, task), or None."""
    job = environ.get("SLURM_JOB_ID")
    if not job:
        return None
    where = []
    if "SLURM_JOB_PARTITION" in environ:
        where.append(f"partition {environ['SLURM_JOB_PARTITION']}")
    where.append(f"node {environ.get('SLURMD_NODENAME', 'unknown')}")
    if "SLURM_STEP_ID" in environ:
        where.append(f"step {environ['SLURM_STEP_ID']}")
    if "SLURM_PROCID" in environ:
        where.append(f"task {environ['SLURM_PROCID']} of {environ.get('SLURM_NTASKS', '1')}")
    return f"SLURM_JOB_ID={job} ({', '.join(where)})"
