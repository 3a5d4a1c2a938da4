"""workflow/profiles/slurm, planned (`-n`) on a real cohort: who asks SLURM for what.

Each planned job's resources, as the dry run prints them, are turned into sbatch options by the
executor plugin's own functions, so a GPU request that SLURM would not get (a resource name the
plugin ignores, a count per job where one per node was meant) fails here, not on the cluster.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from .conftest import REPO, env

TRAINING = {"pretrain", "pretrain_ablation", "finetune"}


class Resources(dict):
    """Job resources with the attribute access the plugin uses."""

    __getattr__ = dict.__getitem__


def _value(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def planned_jobs(output: str) -> list[dict]:
    """Rule, threads, resources and shell command of every job a dry run prints."""
    jobs: list[dict] = []
    for line in output.splitlines():
        if match := re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):$", line):
            jobs.append({"rule": match[1], "threads": 1, "resources": Resources(), "shell": ""})
        elif not jobs:
            continue
        elif match := re.match(r"^\s+threads: (\d+)$", line):
            jobs[-1]["threads"] = int(match[1])
        elif match := re.match(r"^\s+resources: (.*)$", line):
            pairs = (item.partition("=") for item in match[1].split(", "))
            jobs[-1]["resources"].update({key: _value(value) for key, _, value in pairs})
        elif line.startswith("Shell command: "):
            jobs[-1]["shell"] = line.removeprefix("Shell command: ")
    return [job for job in jobs if job["rule"] != "all"]


def sbatch_options(job: dict) -> str:
    """The sbatch options the plugin would submit this job with (account left out)."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    fake = SimpleNamespace(resources=job["resources"], threads=job["threads"])
    params = {"run_uuid": "run", "slurm_logfile": "slurm.log", "comment_str": job["rule"],
              "account": "", "partition": f"-p {job['resources']['slurm_partition']}",
              "workdir": "."}
    return get_submit_command(fake, params) + set_gres_string(fake)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("slurm-profile")
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(REPO / name, tmp / name)
    for name in ("workflow", "envs", "cohorts"):
        shutil.copytree(REPO / name, tmp / name)
    return tmp


def plan(workdir: Path, **variables: str) -> list[dict]:
    """The jobs of `snakemake --profile workflow/profiles/slurm -n` on TCGA-LGG."""
    environ = {k: v for k, v in env().items() if not k.startswith(("MGI_SLURM_", "SLURM_"))}
    environ.update(variables)
    result = subprocess.run(
        [str(Path(environ["PATH"].split(os.pathsep)[0]) / "snakemake"), "--profile",
         "workflow/profiles/slurm", "-n", "--configfile", "cohorts/tcga-lgg.yaml"],
        cwd=workdir, env=environ, capture_output=True, text=True, timeout=300, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    jobs = planned_jobs(output)
    assert {job["rule"] for job in jobs} >= TRAINING | {"gdc_query", "splits", "report"}
    return jobs


def test_training_rules_ask_for_one_gpu_on_the_gpu_partition_and_no_other_rule_does(workdir):
    for job in plan(workdir):
        options = sbatch_options(job)
        if job["rule"] in TRAINING:
            assert "--gpus=1" in options and "-p gpu" in options, (job["rule"], options)
            assert "--gres" not in options and "--ntasks-per-node" not in options
        else:
            assert "--gpu" not in options and "--gres" not in options, (job["rule"], options)
            assert "-p cpu" in options, (job["rule"], options)
        assert re.search(r" -t \d+", options) and re.search(r"--mem \d+", options)
        assert f"--cpus-per-task={job['threads']}" in options


def test_partitions_account_and_gpu_model_come_from_the_environment(workdir):
    jobs = plan(workdir, MGI_SLURM_ACCOUNT="lab42", MGI_SLURM_CPU_PARTITION="short",
                MGI_SLURM_GPU_PARTITION="a100q", MGI_SLURM_GPU_MODEL="a100")
    for job in jobs:
        assert job["resources"]["slurm_account"] == "lab42"
        options = sbatch_options(job)
        if job["rule"] in TRAINING:
            assert "-p a100q" in options and "--gpus=a100:1" in options, options
        else:
            assert "-p short" in options and "--gpu" not in options, options


def test_gpus_on_several_nodes_start_one_pretrain_task_per_gpu(workdir):
    jobs = {job["rule"]: job for job in plan(workdir, MGI_SLURM_GPUS="4", MGI_SLURM_NODES="2")}
    pretrain = sbatch_options(jobs["pretrain"])
    # GPUs per node (--gres), not per job (--gpus=4 would spread 4 over both nodes)
    assert "--gres=gpu:4" in pretrain and "--gpus" not in pretrain, pretrain
    assert "--nodes=2" in pretrain and "--ntasks-per-node=4" in pretrain, pretrain
    assert "--cpus-per-task=8" in pretrain  # 32 threads per node over 4 processes
    assert "--devices 4 --num-nodes 2 --threads 32" in jobs["pretrain"]["shell"]
    assert jobs["pretrain"]["resources"]["mpi"] == "srun"  # the rule starts its tasks
    assert "--gpus=1" in sbatch_options(jobs["finetune"])  # one process, one GPU


def test_a_cpu_only_cluster_gets_no_gpu_request(workdir):
    jobs = plan(workdir, MGI_SLURM_GPUS="0")
    for job in jobs:
        options = sbatch_options(job)
        assert "--gpu" not in options and "--gres" not in options, (job["rule"], options)
        assert "-p cpu" in options
    pretrain = next(job for job in jobs if job["rule"] == "pretrain")
    assert "--devices 1 --num-nodes 1" in pretrain["shell"]
