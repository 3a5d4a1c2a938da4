"""DVC over the Snakemake workflow: the same stages, a `dvc repro` that is then up to date, a remote
round trip that recomputes nothing (for DVC or for Snakemake), and experiments over config keys."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
from pathlib import Path, PurePosixPath

import pytest
import yaml

from .conftest import BIN, REPO, TINY_CONFIG, make_workdir, run

pytestmark = pytest.mark.slow

# Config keys a rule reads other than through its --settings argument (common.smk, expression.smk).
# `cohort` is left out: it names every path, which DVC interpolates from config.yaml.
OTHER_CONFIG_READS = {
    "expression_matrix": {"expression.normalize", "expression.duplicate_profiles"},
    "export": {"evaluate.threshold"},
}
# Files a stage writes that no rule declares, and which DVC must therefore not track either.
UNDECLARED = ("results/tiny/pretrain/checkpoints/", "results/tiny/pretrain/tensorboard/")


def _command_parts(cmd: str) -> tuple[list[str], list[str]]:
    """The --allowed-rules and the targets of a stage's `snakemake ... -- targets` command."""
    words = shlex.split(cmd)
    assert words[:3] == ["snakemake", "--cores", "all"], cmd
    split = words.index("--")
    options: dict[str, list[str]] = {}
    for word in words[3:split]:
        if word.startswith("--"):
            option = options.setdefault(word, [])
        else:
            option.append(word)
    assert set(options) <= {"--allowed-rules", "--forcerun"}, cmd
    return options["--allowed-rules"], words[split + 1:]


def _within(path: str, container: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(container))


def test_dvc_stages_ask_snakemake_for_pipeline_outputs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        body = stage.get("do", stage)
        rules, targets = _command_parts(body["cmd"])
        assert rules and targets, name
        assert all(t.startswith(("data/${cohort}/", "results/${cohort}/")) for t in targets)
        outs = [next(iter(o)) if isinstance(o, dict) else o
                for key in ("outs", "metrics", "plots") for o in body.get(key, [])]
        assert all(any(_within(t, o) for o in outs) for t in targets), name


def _planned_jobs(dry_run: str) -> list[dict]:
    """The jobs of a `snakemake -n -p` listing: rule, outputs, inputs, config keys they read."""
    jobs: list[dict] = []
    for line in dry_run.splitlines():
        if match := re.fullmatch(r"(?:local)?(?:rule|checkpoint) (\w+):", line):
            jobs.append({"rule": match[1], "outputs": set(), "inputs": set(), "keys": set()})
        elif jobs and (match := re.fullmatch(r" +(input|output): (.*)", line)):
            jobs[-1][f"{match[1]}s"].update(match[2].split(", "))
        elif jobs and line.startswith("Shell command: "):
            words = shlex.split(line.removeprefix("Shell command: "))
            if "--settings" in words:
                jobs[-1]["keys"].update(json.loads(words[words.index("--settings") + 1]))
            jobs[-1]["keys"].update(OTHER_CONFIG_READS.get(jobs[-1]["rule"], ()))
    return [job for job in jobs if job["outputs"]]  # not `all`


def _snakemake_jobs(work: Path, variants: list[str]) -> list[dict]:
    """Every job of the tiny cohort's DAG, the acquisition (a checkpoint, run first) and the
    variants' bundles (stage export) and the folds table (stage crossval), no part of the
    default target, included."""
    run(["snakemake", "--cores", "1", "data/tiny/raw/images.tsv"], work)
    acquire = run(["snakemake", "--cores", "1", "-n", "-p", "-F", "data/tiny/raw/images.tsv"], work)
    bundles = [f"results/tiny/export/{variant}.mgi" for variant in variants]
    rest = run(["snakemake", "--cores", "1", "-n", "-p", "all", *bundles,
                "results/tiny/cv/runs.tsv"], work)  # stage crossval's (one split: folds only)
    return _planned_jobs(acquire.stdout) + _planned_jobs(rest.stdout)


def _dvc_stages(work: Path) -> dict[str, dict]:
    """dvc.yaml's stages as DVC resolves them for the config in `work`."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo.init(str(work), no_scm=True) as repo:
        stages = {}
        for stage in repo.index.stages:
            rules, targets = _command_parts(stage.cmd)
            stages[stage.name] = {
                "rules": set(rules), "targets": targets,
                "outs": [str(out.def_path) for out in stage.outs],
                "deps": [str(dep.def_path) for dep in stage.deps
                         if not isinstance(dep, ParamsDependency)],
                "params": [key for dep in stage.deps if isinstance(dep, ParamsDependency)
                           for key in dep.params],
            }
    return stages


@pytest.mark.parametrize("variant", ["mri_rank", "wsi_genomic"])
def test_dvc_stages_cover_every_snakemake_rule(tmp_path: Path, tiny_config: dict, variant: str):
    """Outputs both ways, inputs as deps, the keys each rule reads as params, the rules each
    stage may run: for MR series (rank order) and for slides with the genomic order's GTF."""
    if variant == "wsi_genomic":
        tiny_config["imaging"]["modality"] = "wsi"
        tiny_config["expression"]["order"] = "genomic"
    work = make_workdir(tmp_path, tiny_config)
    jobs = _snakemake_jobs(work, tiny_config["finetune"]["variants"])
    stages = _dvc_stages(work)
    rules = {job["rule"] for job in jobs}
    assert {"synthesize", "image_qc", "pretrain", "finetune", "evaluate", "report"} <= rules
    if variant == "wsi_genomic":
        assert {"stain_reference", "tile_slide"} <= rules
        (sequences,) = [job for job in jobs if job["rule"] == "gene_sequences"]
        assert "data/tiny/raw/reference/gencode.annotation.gtf.gz" in sequences["inputs"]

    owner = {}  # output file -> the stage whose outs hold it
    for job in jobs:
        for output in job["outputs"]:
            holders = [name for name, stage in stages.items()
                       if any(_within(output, out) for out in stage["outs"])]
            assert len(holders) == 1, f"{job['rule']}: {output} is in the outs of {holders}"
            owner[output] = holders[0]
    for job in jobs:  # each job is one stage's
        (job["stage"],) = {owner[output] for output in job["outputs"]}
    for name, stage in stages.items():
        for out in stage["outs"]:
            assert any(_within(output, out) for output in owner), f"{name}: no rule writes {out}"
        for target in stage["targets"]:
            assert owner.get(target) == name, f"{name} asks Snakemake for {target}"
        own = [job for job in jobs if job["stage"] == name]
        # the stage may run its jobs' rules, and no rule of the DAG besides
        assert own and {job["rule"] for job in own} == stage["rules"] & rules, name
        for job in own:
            for path in job["inputs"]:
                assert owner.get(path) == name or any(_within(path, d) for d in stage["deps"]), (
                    f"stage {name}: rule {job['rule']} reads {path}, which is not a dep")
            for key in job["keys"]:
                assert any(key == p or key.startswith(p + ".") for p in stage["params"]), (
                    f"stage {name}: rule {job['rule']} reads config key {key}, not a param")
    # the resumable training state is no rule's output: DVC neither caches nor deletes it
    assert not any(_within(f"{UNDECLARED[0]}last.ckpt", out)
                   for stage in stages.values() for out in stage["outs"])


def _git_commit(work: Path, message: str) -> None:
    run(["git", "add", "-A"], work)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], work)


# The tiny config with one fine-tuning variant: each DVC stage is a Snakemake start of its own.
DVC_CONFIG = {**TINY_CONFIG, "finetune": {**TINY_CONFIG["finetune"], "variants": ["mgi"]}}


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory) -> Path:
    """A git + DVC working copy of the tiny cohort after one `dvc repro`, dvc.lock committed."""
    work = make_workdir(tmp_path_factory.mktemp("dvc"), DVC_CONFIG)
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__",
                                                                               "*.egg-info"))
    for name in (".dvc/config", ".dvc/.gitignore", ".gitignore", "Makefile"):
        (work / name).parent.mkdir(exist_ok=True)
        shutil.copy(REPO / name, work / name)
    run(["git", "init", "-q"], work)
    _git_commit(work, "clone")
    first = run(["dvc", "repro"], work)
    assert "Running stage 'report'" in first.stdout
    _git_commit(work, "results")
    return work


def test_dvc_repro_runs_the_demo_and_then_is_up_to_date(dvc_repo: Path):
    work = dvc_repo
    metrics = json.loads((work / "results/tiny/report/metrics.json").read_text())
    assert set(metrics["segmentation"]) == {"mgi"}

    second = run(["dvc", "repro"], work)
    assert "Running stage" not in second.stdout
    assert "up to date" in second.stdout
    status = run(["dvc", "status"], work)
    assert "up to date" in status.stdout
    # Snakemake agrees that nothing is left to do after DVC's run
    dry = run(["snakemake", "--cores", "1", "-n"], work)
    assert "Nothing to be done" in dry.stdout + dry.stderr
    # metrics and plots from the report's inputs
    (shown,) = json.loads(run(["dvc", "metrics", "show", "--json"], work).stdout).values()
    assert shown["data"]["results/tiny/report/metrics.json"]["data"]["cohort"] == "tiny"
    plots = json.loads(run(["dvc", "plots", "show", "--json"], work).stdout)["data"]
    assert {"Pre-training loss", "Pre-training validation recall@1",
            "results/tiny/finetune/mgi/history.tsv"} <= set(plots)
    # the resumable training state stays in the working copy, outside the cache
    assert (work / "results/tiny/pretrain/checkpoints/last.ckpt").is_file()


def _file_digests(root: Path, folders: tuple[str, ...]) -> dict[str, str]:
    """md5 of every file under `folders` of `root`, by relative path."""
    return {str(path.relative_to(root)): hashlib.md5(path.read_bytes()).hexdigest()
            for folder in folders for path in sorted((root / folder).rglob("*"))
            if path.is_file()}


def _written_logs(work: Path) -> set[str]:
    """Rule logs with something in them: the rules that really ran in `work`."""
    return {str(path.relative_to(work)) for path in (work / "logs").rglob("*.log")
            if path.stat().st_size}


@pytest.fixture(scope="module")
def pulled_clone(dvc_repo: Path, tmp_path_factory) -> Path:
    """A `git clone` of the DVC working copy that got its results with `make dvc-pull` from a
    local-folder remote the first copy pushed to."""
    remote = tmp_path_factory.mktemp("remote")
    run(["dvc", "remote", "add", "--default", "shared", str(remote)], dvc_repo)
    _git_commit(dvc_repo, "remote")
    run(["dvc", "push"], dvc_repo)
    clone = tmp_path_factory.mktemp("clone") / "work"
    run(["git", "clone", "-q", str(dvc_repo), str(clone)], dvc_repo)
    # the Makefile's recipe itself, with this environment's tools (-o: no .venv to install)
    run(["make", "-o", ".venv/.installed", "dvc-pull", f"BIN={BIN}"], clone)
    return clone


def test_dvc_pull_into_a_clone_gives_the_results_without_recomputing(dvc_repo: Path,
                                                                      pulled_clone: Path):
    folders = ("data/tiny", "results/tiny")
    pushed = {path: digest for path, digest in _file_digests(dvc_repo, folders).items()
              if not path.startswith(UNDECLARED)}
    assert _file_digests(pulled_clone, folders) == pushed

    status = run(["dvc", "status"], pulled_clone)
    assert "up to date" in status.stdout
    repro = run(["dvc", "repro"], pulled_clone)
    assert "Running stage" not in repro.stdout
    # the timestamps DVC restored do not make Snakemake rerun work
    dry = run(["snakemake", "--cores", "1", "-n"], pulled_clone)
    assert "Nothing to be done" in dry.stdout + dry.stderr
    # no rule ran in the clone: `snakemake --touch` leaves the logs it creates empty
    assert not _written_logs(pulled_clone)


def test_dvc_exp_run_with_a_config_key_reruns_only_the_stages_downstream(pulled_clone: Path):
    # a checkout may leave a raw file newer than every result: each stage's Snakemake still runs
    # only the stage's own rules
    raw = pulled_clone / "data/tiny/raw/clinical.tsv"
    os.utime(raw, (raw.stat().st_atime, raw.stat().st_mtime + 3600))

    exp = run(["dvc", "exp", "run", "-S", "config.yaml:evaluate.bootstrap=200"], pulled_clone)
    ran = set(re.findall(r"Running stage '([^']+)'", exp.stdout))
    # export@mgi's params name the evaluate section (for its threshold), so DVC runs it too, and
    # so is crossval's (its runs' evaluation): with one split and one seed, the folds table
    assert ran == {"evaluate@mgi", "report", "export@mgi", "crossval"}
    assert _written_logs(pulled_clone) == {"logs/tiny/evaluate/mgi.log", "logs/tiny/report.log",
                                           "logs/tiny/export/mgi.log", "logs/tiny/cv/folds.log",
                                           "logs/tiny/cv/runs.log"}

    shown = json.loads(run(["dvc", "exp", "show", "--json"], pulled_clone).stdout)
    params = [entry["data"]["params"]["config.yaml"]["data"]["evaluate"]["bootstrap"]
              for entry in shown if entry["rev"] == "workspace"]
    assert params == [200]
    assert "up to date" in run(["dvc", "status"], pulled_clone).stdout
