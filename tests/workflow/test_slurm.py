"""The workflow through a real SLURM cluster (snakemake-executor-plugin-slurm), against a local run.

Opt-in (MGI_SLURM_TESTS=1) and needs a controller that answers `sinfo`: `.ci/slurm-demo` brings
up a one-node cluster on this machine and runs these. The demo's workflow (its config, every
rule and variant, on a smaller cohort with fewer epochs: see DEMO_SMALLER) runs twice, locally
and through `snakemake --executor slurm --profile workflow/profiles/slurm` with GPU requests off,
with the same threads per job; then pre-training runs as two srun tasks (DDP over gloo).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from .conftest import REPO, env, make_workdir

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

TRAINING = {"pretrain", "finetune"}
# Both runs use the same threads per job, so that CPU training sums in the same order.
THREADS = min(2, os.cpu_count() or 1)
SET_THREADS = ["--set-threads", f"pretrain={THREADS}", "finetune=1", "evaluate=1",
               "tile_slide=1"]
# The local cluster has no GPUs and no accounting: no GPU request (training still goes to the
# `gpu` partition, to see the routing), squeue for job states, and the plugin's logs kept.
SLURM_ENV = {"MGI_SLURM_GPUS": "0", "MGI_SLURM_GPU_PARTITION": "gpu"}
SLURM_ARGS = ["--executor", "slurm", "--profile", "workflow/profiles/slurm",
              "--slurm-status-command", "squeue", "--slurm-no-account",
              "--slurm-keep-successful-logs", "--slurm-init-seconds-before-status-checks", "2"]
# The demo config with a smaller cohort and fewer epochs: the same rules, variants and per-image
# jobs, in minutes rather than the full demo's 20 (run twice, it made CI 71 minutes long). What
# is compared is equality with the local run and the routing of jobs, not the demo's results.
DEMO_SMALLER = {"synthetic": {"n_cases": 24}, "pretrain": {"epochs": 20},
                "finetune": {"epochs": 1}, "evaluate": {"bootstrap": 200}}


@pytest.fixture(scope="module")
def cluster() -> str:
    if os.environ.get("MGI_SLURM_TESTS") != "1":
        pytest.skip("SLURM tests are opt-in: .ci/slurm-demo brings a cluster up and sets "
                    "MGI_SLURM_TESTS=1")
    result = subprocess.run(["sinfo", "-h", "-o", "%P %a %D %T"], capture_output=True,
                            text=True, check=False)
    if result.returncode != 0 or not result.stdout.strip():
        pytest.fail(f"MGI_SLURM_TESTS=1 but no SLURM controller answers sinfo: "
                    f"{result.stderr.strip() or 'no partitions'} (run .ci/slurm-demo up)")
    return result.stdout


def snakemake(workdir: Path, *args: str, **variables: str) -> float:
    """Run snakemake in `workdir` with MGI_SLURM_* `variables`; its wall time in seconds."""
    environ = {k: v for k, v in env().items() if not k.startswith(("MGI_SLURM_", "SLURM_"))}
    environ.update(variables)
    start = time.perf_counter()
    result = subprocess.run([str(Path(environ["PATH"].split(os.pathsep)[0]) / "snakemake"),
                             *args], cwd=workdir, env=environ, capture_output=True, text=True,
                            timeout=3000, check=False)
    (workdir / "snakemake.out").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({result.returncode}) in "
                             f"{workdir}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def demo(cluster, tmp_path_factory) -> dict:
    """The demo config made smaller (DEMO_SMALLER), run locally and through SLURM."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    for section, values in DEMO_SMALLER.items():
        config[section].update(values)
    runs = {name: make_workdir(tmp_path_factory.mktemp(name), config)
            for name in ("local", "slurm")}
    seconds = {
        "local": snakemake(runs["local"], "--cores", str(THREADS), *SET_THREADS),
        "slurm": snakemake(runs["slurm"], *SLURM_ARGS, "--cores", str(THREADS), *SET_THREADS,
                           **SLURM_ENV),
    }
    print(f"demo wall time: local {seconds['local']:.0f} s, SLURM {seconds['slurm']:.0f} s")
    return {"config": config, "seconds": seconds, **runs}


def rule_logs(workdir: Path, cohort: str) -> dict[Path, str]:
    """Every rule log of the cohort, with its text."""
    root = workdir / "logs" / cohort
    return {path.relative_to(root): path.read_text() for path in sorted(root.rglob("*.log"))}


def job_ids(text: str) -> set[str]:
    return set(re.findall(r"SLURM_JOB_ID=(\d+)", text))


def test_every_rule_ran_as_its_own_sbatch_job(demo):
    logs = rule_logs(demo["slurm"], demo["config"]["cohort"])
    assert len(logs) > 10
    ids = {path: job_ids(text) for path, text in logs.items()}
    assert all(len(found) == 1 for found in ids.values()), ids
    every = [next(iter(found)) for found in ids.values()]
    assert len(set(every)) == len(every)  # one job per rule instance: one per image, too
    per_image = [path for path in logs if path.parts[0] in ("mri_bank", "tile_slide")]
    assert len(per_image) >= 2


def test_training_went_to_the_gpu_partition_and_everything_else_to_the_cpu_one(demo):
    for path, text in rule_logs(demo["slurm"], demo["config"]["cohort"]).items():
        rule = path.parts[0].removesuffix(".log")
        partition = re.search(r"SLURM_JOB_ID=\d+ \(partition (\w+)", text)[1]
        assert partition == ("gpu" if rule in TRAINING else "cpu"), (path, partition)


def test_the_plugin_kept_its_slurm_log_of_every_job(demo):
    slurm_logs = demo["slurm"] / ".snakemake" / "slurm_logs"
    for path, text in rule_logs(demo["slurm"], demo["config"]["cohort"]).items():
        rule = path.parts[0].removesuffix(".log")
        (job,) = job_ids(text)
        found = list((slurm_logs / f"rule_{rule}").rglob(f"{job}.log"))
        assert found, f"no plugin log {slurm_logs}/rule_{rule}/**/{job}.log for {path}"
        assert "--executor slurm-jobstep" in found[0].read_text()  # the job ran snakemake


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def assert_same_tensors(a: dict, b: dict, what: Path) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), (what, key)


def h5_items(path: Path) -> dict[str, object]:
    """Every dataset's values and every attribute of an HDF5 file, by name."""
    items: dict[str, object] = {}

    def add(name: str, node) -> None:
        items.update({f"{name}@{key}": value for key, value in node.attrs.items()})
        if isinstance(node, h5py.Dataset):
            items[name] = node[()]

    with h5py.File(path) as handle:
        add("", handle)
        handle.visititems(add)
    return items


def assert_same_h5(a: Path, b: Path) -> None:
    items_a, items_b = h5_items(a), h5_items(b)
    assert items_a.keys() == items_b.keys(), a
    for name, value in items_a.items():
        np.testing.assert_array_equal(value, items_b[name], err_msg=f"{a}: {name}")


def without_seconds(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t").drop(columns="seconds")


def test_results_equal_the_local_run(demo):
    """Every artefact, compared as data: tables and arrays exactly, models tensor by tensor.

    Files with a clock in them are compared without it (the `seconds` of qc.tsv and of the
    training curves); HDF5, npz
    and h5ad files are compared by content, not bytes (their containers store write times).
    """
    cohort = demo["config"]["cohort"]
    local, slurm = (demo[name] / "results" / cohort for name in ("local", "slurm"))
    same_bytes = ["splits.tsv", "expression/vocab.tsv"]
    variants = demo["config"]["finetune"]["variants"]
    for variant in variants:
        same_bytes += [f"finetune/{variant}/test_patients.tsv",
                       f"finetune/{variant}/test_slices.tsv"]
    for name in same_bytes:
        assert (local / name).read_bytes() == (slurm / name).read_bytes(), name
    pd.testing.assert_frame_equal(without_seconds(local / "images/qc.tsv"),
                                  without_seconds(slurm / "images/qc.tsv"))

    with np.load(local / "expression/sequences.npz") as a, \
            np.load(slurm / "expression/sequences.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert_same_h5(local / "expression/expression.h5ad", slurm / "expression/expression.h5ad")
    banks = sorted(p.name for p in (local / "images").glob("*.h5"))
    assert banks and banks == sorted(p.name for p in (slurm / "images").glob("*.h5"))
    for bank in banks:
        assert_same_h5(local / "images" / bank, slurm / "images" / bank)

    # training on CPU with the same threads is deterministic: the same weights, to the bit
    assert_same_tensors(state_dict(local / "pretrain/model.pt"),
                        state_dict(slurm / "pretrain/model.pt"), local / "pretrain/model.pt")
    pd.testing.assert_frame_equal(without_seconds(local / "pretrain/history.tsv"),
                                  without_seconds(slurm / "pretrain/history.tsv"))
    assert (json.loads((local / "pretrain/retrieval.json").read_text())
            == json.loads((slurm / "pretrain/retrieval.json").read_text()))
    for variant in variants:
        folder = Path("finetune") / variant
        assert_same_tensors(state_dict(local / folder / "model.pt"),
                            state_dict(slurm / folder / "model.pt"), folder)
        pd.testing.assert_frame_equal(without_seconds(local / folder / "history.tsv"),
                                      without_seconds(slurm / folder / "history.tsv"))
        assert_same_h5(local / folder / "test_predictions.h5",
                       slurm / folder / "test_predictions.h5")
    assert (json.loads((local / "report/metrics.json").read_text())
            == json.loads((slurm / "report/metrics.json").read_text()))


def test_pretrain_runs_as_two_srun_tasks_joined_by_ddp(cluster, tmp_path, tiny_config):
    """MGI_SLURM_PROCESSES=2: the rule asks the plugin for 2 tasks, srun starts them, gloo."""
    workdir = make_workdir(tmp_path, tiny_config)
    snakemake(workdir, *SLURM_ARGS, "--cores", "2", "results/tiny/pretrain/retrieval.json",
              MGI_SLURM_GPUS="0", MGI_SLURM_PROCESSES="2")
    log = (workdir / "logs/tiny/pretrain.log").read_text()
    assert "starting 2 training processes: srun --nodes=1 --ntasks-per-node=2" in log
    assert "task 0 of 2)" in log and "task 1 of 2)" in log
    assert "Starting with 2 processes" in log and "distributed_backend=gloo" in log
    assert len(job_ids(log)) == 1  # both tasks in the job the plugin submitted
    retrieval = json.loads((workdir / "results/tiny/pretrain/retrieval.json").read_text())
    assert retrieval["device"].startswith("2 processes")
    history = pd.read_csv(workdir / "results/tiny/pretrain/history.tsv", sep="\t")
    assert history["negatives"].eq(4).all()  # 2 pairs per process, scored against all 4
