"""Where training processes come from: this process, Fabric, torchrun, or srun in a SLURM job.

The srun path itself runs on a real cluster in tests/workflow/test_slurm.py (two gloo tasks).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mgi.cli import main
from mgi.errors import ConfigError
from mgi.train.launch import slurm_job, srun_command

ARGV = ["python", "-m", "mgi.cli", "pretrain", "--devices", "2"]
BATCH_JOB = {"SLURM_JOB_ID": "12"}  # the plugin's batch step: only the job id is left


def command(environ: dict, *, processes: int = 2, nodes: int = 1, threads: int = 8):
    return srun_command(ARGV, processes_per_node=processes, nodes=nodes, threads=threads,
                        environ=environ)


def test_one_process_trains_where_it_is_even_in_a_slurm_job():
    assert command(BATCH_JOB, processes=1) is None


def test_outside_slurm_fabric_starts_the_processes_of_one_node():
    assert command({}) is None


def test_outside_slurm_several_nodes_are_refused_with_the_way_out():
    with pytest.raises(ConfigError, match=r"2 node\(s\).*workflow/profiles/slurm.*torchrun"):
        command({}, nodes=2)


def test_processes_that_torchrun_started_train():
    assert command({"LOCAL_RANK": "1", **BATCH_JOB}) is None


def test_in_a_slurm_allocation_srun_starts_one_task_per_process_on_every_node():
    assert command(BATCH_JOB, processes=4, nodes=2, threads=32) == [
        "srun", "--nodes=2", "--ntasks-per-node=4", "--cpus-per-task=8", "--kill-on-bad-exit=1",
        *ARGV]


def test_each_task_gets_at_least_one_cpu():
    assert "--cpus-per-task=1" in command(BATCH_JOB, processes=4, threads=2)


def test_the_tasks_srun_started_train_instead_of_starting_more():
    task = {**BATCH_JOB, "SLURM_STEP_ID": "0", "SLURM_NTASKS": "8", "SLURM_PROCID": "5"}
    assert command(task, processes=4, nodes=2) is None


def test_a_one_task_job_step_asking_for_more_processes_names_the_profile_fix():
    # the plugin's usual job step (srun -n1) cannot start more tasks: the rule needs mpi=srun
    step = {**BATCH_JOB, "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "uuid"}
    with pytest.raises(ConfigError, match=r"mpi=srun and tasks_per_node"):
        command(step)


def test_an_interactive_slurm_shell_lets_fabric_start_the_node_processes():
    shell = {**BATCH_JOB, "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "bash"}
    assert command(shell) is None


def test_slurm_job_names_job_partition_node_step_and_task():
    environ = {"SLURM_JOB_ID": "7", "SLURM_JOB_PARTITION": "gpu", "SLURMD_NODENAME": "n1",
               "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}
    assert slurm_job(environ) == "SLURM_JOB_ID=7 (partition gpu, node n1, step 0, task 1 of 2)"
    assert slurm_job({"SLURM_JOB_ID": "7"}) == "SLURM_JOB_ID=7 (node unknown)"
    assert slurm_job({}) is None


def pretrain_argv(tmp_path: Path, *extra: str) -> list[str]:
    settings = {"model": {}, "pretrain": {"devices": 1, "num_nodes": 1}, "imaging": {},
                "expression": {}, "seed": 0}
    return ["pretrain", "--sequences", str(tmp_path / "s.npz"), "--splits", "x", "--qc", "y",
            "--settings", json.dumps(settings), "--out-dir", str(tmp_path), "--threads", "4",
            *extra]


@pytest.fixture
def no_slurm(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_NTASKS", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


class Replaced(Exception):
    """os.execvp, which never returns, in a test."""


def test_cli_pretrain_restarts_itself_under_srun_with_the_rule_layout(tmp_path, no_slurm):
    started = []

    def execvp(file: str, args: list[str]) -> None:
        started.append(args)
        raise Replaced

    no_slurm.setenv("SLURM_JOB_ID", "12")
    no_slurm.setattr("os.execvp", execvp)
    argv = pretrain_argv(tmp_path, "--devices", "2", "--num-nodes", "3")
    with pytest.raises(Replaced):
        main(argv)
    srun, *rest = started[0]
    assert srun == "srun"
    assert rest[:4] == ["--nodes=3", "--ntasks-per-node=2", "--cpus-per-task=2",
                        "--kill-on-bad-exit=1"]
    assert rest[5:] == ["-m", "mgi.cli", *argv]  # the same command, by this interpreter


def test_cli_pretrain_over_several_nodes_outside_slurm_is_one_clear_error(tmp_path, no_slurm,
                                                                          capsys):
    assert main(pretrain_argv(tmp_path, "--num-nodes", "2")) == 1
    err = capsys.readouterr().err
    assert "mgi pretrain: error:" in err and "torchrun" in err and "Traceback" not in err


def test_cli_logs_the_slurm_job_it_runs_in(tmp_path, no_slurm, caplog):
    no_slurm.setenv("SLURM_JOB_ID", "99")
    caplog.set_level("INFO", logger="mgi")
    main(["qc-merge", str(tmp_path / "missing.tsv"), "--out", str(tmp_path / "out.tsv")])
    assert "running in SLURM_JOB_ID=99" in caplog.text
