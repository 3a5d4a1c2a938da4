"""Folds and seeds through the workflow: cohorts/demo-cv.yaml's design on the tiny cohort, run
for real, and planned on TCGA-LGG with 5 folds x 3 seeds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from mgi.checkpoint import load_finetuned
from mgi.io import read_tsv

from .conftest import REPO, TINY_CONFIG, make_workdir, run
from .test_slurm_profile import planned_jobs

DEMO_CV = yaml.safe_load((REPO / "cohorts/demo-cv.yaml").read_text())


def design_of(config: dict, *, folds: int | None = None) -> dict:
    """The tiny config with demo-cv.yaml's design: its strata, seeds, variants and folds (or
    `folds`: every (variant, fold, seed) is a job, and each job a torch start of its own)."""
    config = yaml.safe_load(yaml.safe_dump(config))
    config["splits"].update({k: DEMO_CV["splits"][k] for k in ("folds", "stratify")})
    config["finetune"].update({k: DEMO_CV["finetune"][k] for k in ("seeds", "variants")})
    if folds is not None:
        config["splits"]["folds"] = folds
    return config


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory) -> tuple[Path, dict]:
    """The tiny cohort run to its report with demo-cv.yaml's seeds and variants, 2 folds."""
    config = design_of(TINY_CONFIG, folds=2)
    config["pretrain"]["epochs"] = config["finetune"]["epochs"] = 1
    workdir = make_workdir(tmp_path_factory.mktemp("cv"), config)
    run(["snakemake", "--cores", "2"], workdir)
    return workdir / "results" / "tiny", config


@pytest.mark.slow
def test_every_patient_is_tested_once_per_seed_by_its_folds_run(cv_run):
    root, config = cv_run
    folds, seeds = config["splits"]["folds"], config["finetune"]["seeds"]
    assignment = read_tsv(root / "cv" / "folds.tsv", required=["case_id", "fold", "stratum"])
    paired = assignment[assignment["fold"] != "unpaired"]
    assert sorted(paired["fold"].unique()) == [str(k) for k in range(folds)]
    for k in range(folds):
        splits = read_tsv(root / f"cv/fold{k}/splits.tsv")
        test = set(splits.loc[splits["split"] == "test", "case_id"])
        assert test == set(paired.loc[paired["fold"] == str(k), "case_id"])
        # the fold's pre-training held its test patients out: its retrieval is scored on them,
        # and it trained on the fold's train patients only
        retrieval = json.loads((root / f"cv/fold{k}/pretrain/seed{config['seed']}/"
                                "retrieval.json").read_text())
        assert set(retrieval["test"]["cases"]) == test
        assert retrieval["train"]["n_patients"] == (splits["split"] == "train").sum()
        for variant in config["finetune"]["variants"]:
            for seed in seeds:
                scored = read_tsv(root / f"cv/fold{k}/finetune/{variant}/seed{seed}/"
                                  "test_patients.tsv")
                assert set(scored["case_id"]) == test
    runs = read_tsv(root / "cv" / "runs.tsv", required=["variant", "fold", "seed", "status"])
    assert len(runs) == len(config["finetune"]["variants"]) * folds * len(seeds)
    assert set(runs["status"]) == {"ok"}
    pooled = read_tsv(root / "report" / "test_patients.tsv")
    assert len(pooled) == len(config["finetune"]["variants"]) * len(paired) * len(seeds)
    assert not pooled.duplicated(["variant", "case_id", "seed"]).any()


@pytest.mark.slow
def test_seeds_change_the_weights_and_nothing_else(cv_run):
    root, config = cv_run
    a, b = (load_finetuned(root / f"cv/fold0/finetune/mgi/seed{s}/model.pt")
            for s in config["finetune"]["seeds"][:2])
    assert a.settings.seed != b.settings.seed
    assert a.settings.__class__(**{**a.settings.__dict__, "seed": b.settings.seed}) == b.settings
    assert (a.vocab_size, a.in_chans) == (b.vocab_size, b.in_chans)
    assert a.state_dict.keys() == b.state_dict.keys()
    assert any(not torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


@pytest.mark.slow
def test_the_report_pools_folds_and_seeds(cv_run):
    root, config = cv_run
    metrics = json.loads((root / "report" / "metrics.json").read_text())
    folds, seeds = config["splits"]["folds"], config["finetune"]["seeds"]
    assert metrics["design"]["folds"] == folds and metrics["design"]["seeds"] == seeds
    for variant in config["finetune"]["variants"]:
        entry = metrics["segmentation"][variant]
        assert entry["status"] == "ok" and entry["n_runs"] == folds * len(seeds)
        assert {(r["fold"], r["seed"]) for r in entry["runs"]} == {
            (k, s) for k in range(folds) for s in seeds}
        assert entry["dice_ci_low"] <= entry["dice"] <= entry["dice_ci_high"]
    comparison = metrics["comparison"]["mgi_vs_vit_scratch_genes"]
    assert comparison["n_seeds"] == len(seeds) and "folds ×" in comparison["finding"]
    assert len(metrics["pretrain_folds"]) == folds
    html = (root / "report" / "report.html").read_text()
    assert 'id="runs"' in html and 'id="fold-retrieval"' in html
    assert (root / "report" / "figures" / "dice_runs.png").stat().st_size > 1000


@pytest.mark.slow
def test_a_new_seed_trains_only_its_own_runs(cv_run):
    root, config = cv_run
    workdir = root.parents[1]
    more = yaml.safe_load(yaml.safe_dump(config))
    more["finetune"]["seeds"] = [*config["finetune"]["seeds"], 7]
    (workdir / "more.yaml").write_text(yaml.safe_dump(more))
    jobs = planned_jobs(run(["snakemake", "-n", "--configfile", "more.yaml"], workdir).stdout)
    counts = pd.Series([job["rule"] for job in jobs]).value_counts().to_dict()
    n_new = len(config["finetune"]["variants"]) * config["splits"]["folds"]
    assert counts == {"run_finetune": n_new, "run_evaluate": n_new, "crossval": 1, "report": 1}


def test_tcga_lgg_with_5_folds_and_3_seeds_plans_one_gpu_job_per_variant_fold_and_seed(
        tmp_path: Path):
    from .test_slurm_profile import sbatch_options

    make_workdir(tmp_path, yaml.safe_load((REPO / "config.yaml").read_text()))
    (tmp_path / "cohorts").mkdir()
    (tmp_path / "cohorts" / "tcga-lgg.yaml").write_bytes((REPO / "cohorts/tcga-lgg.yaml")
                                                         .read_bytes())
    (tmp_path / "cv.yaml").write_text(yaml.safe_dump({
        "splits": {"folds": 5, "stratify": "tumor_grade"},
        "finetune": {"seeds": [0, 1, 2]}}))
    result = run(["snakemake", "--profile", "workflow/profiles/slurm", "-n", "--configfile",
                  "cohorts/tcga-lgg.yaml", "cv.yaml"], tmp_path)
    jobs = planned_jobs(result.stdout + result.stderr)
    variants = yaml.safe_load((REPO / "cohorts/tcga-lgg.yaml").read_text())["finetune"][
        "variants"]
    runs = [job for job in jobs if job["rule"] == "run_finetune"]
    keys = sorted(re.search(r"cv/fold(\d+)/finetune/(\w+)/seed(\d+)", job["shell"]).groups()
                  for job in runs)
    assert keys == sorted((str(k), v, str(s)) for v in variants for k in range(5)
                          for s in range(3))
    pretrainings = [job for job in jobs if job["rule"] == "fold_pretrain"]
    assert len(pretrainings) == 5  # one per fold: the seeds of fine-tuning share it
    ablations = [job for job in jobs if job["rule"] == "fold_pretrain_ablation"]
    assert len(ablations) == 5 * 2  # mgi_transformer's and mgi_mlp's encoders, per fold
    assert not {"pretrain", "finetune"} & {job["rule"] for job in jobs}
    for job in runs + pretrainings + ablations:
        options = sbatch_options(job)
        assert "--gpus=1" in options and "-p gpu" in options, (job["rule"], options)
    for job in jobs:
        if job["rule"] not in {"run_finetune", "fold_pretrain", "fold_pretrain_ablation"}:
            assert "--gpu" not in sbatch_options(job), job["rule"]


def test_one_split_and_one_seed_plan_no_fold_or_run_and_pass_no_design_keys(tmp_path: Path):
    config = yaml.safe_load(yaml.safe_dump(TINY_CONFIG))
    config["splits"]["folds"] = 1
    config["finetune"]["seeds"] = [config["seed"]]
    work = make_workdir(tmp_path, config)
    run(["snakemake", "--cores", "1", "data/tiny/raw/images.tsv"], work)
    result = run(["snakemake", "-n", "-p", "--cores", "1"], work)
    jobs = planned_jobs(result.stdout)
    rules = {job["rule"] for job in jobs}
    assert {"pretrain", "finetune", "evaluate", "report"} <= rules
    assert not {r for r in rules if r.startswith(("fold", "run_", "crossval"))}
    assert sum("--settings" in job["shell"] for job in jobs) >= 5
    for job in jobs:  # the stages' settings as before folds and seeds existed
        if "--settings" in job["shell"]:
            assert '"folds"' not in job["shell"] or job["rule"] == "report", job["rule"]
            assert '"seeds"' not in job["shell"] or job["rule"] == "report", job["rule"]


def test_pretrain_seeds_pretrain_each_fold_once_per_seed_and_must_match(tmp_path: Path):
    config = design_of(TINY_CONFIG)
    config["finetune"]["variants"] = ["mgi", "mgi_mlp", "vit_scratch"]  # mgi_mlp: an ablation
    config["pretrain"]["seeds"] = list(config["finetune"]["seeds"])
    work = make_workdir(tmp_path, config)
    run(["snakemake", "--cores", "1", "data/tiny/raw/images.tsv"], work)
    jobs = planned_jobs(run(["snakemake", "-n", "-p", "--cores", "1"], work).stdout)
    counts = pd.Series([job["rule"] for job in jobs]).value_counts()
    folds, seeds = config["splits"]["folds"], len(config["finetune"]["seeds"])
    assert counts["fold_pretrain"] == counts["fold_pretrain_ablation"] == folds * seeds
    assert counts["run_finetune"] == 3 * folds * seeds
    for job in jobs:  # run (mgi, fold f, seed s) starts from fold f's pre-training of seed s
        if job["rule"] == "run_finetune" and "--variant mgi " in job["shell"]:
            fold, seed = re.search(r"cv/fold(\d+)/finetune/mgi/seed(\d+)", job["shell"]).groups()
            assert f"--pretrained results/tiny/cv/fold{fold}/pretrain/seed{seed}/model.pt" in (
                job["shell"])

    config["pretrain"]["seeds"] = [0, 5]
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    refused = run(["snakemake", "-n", "--cores", "1"], work, check=False)
    assert refused.returncode != 0
    assert "pretrain.seeds: [0, 5]; each fine-tuning seed starts from the pre-training of the " \
           "same seed" in refused.stdout + refused.stderr
    config["pretrain"]["seeds"] = None
    config["finetune"]["variants"] = ["mgi", "vit_scratch"]
    config["finetune"]["pretrained"] = "elsewhere/results/other/pretrain/model.pt"
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    refused = run(["snakemake", "-n", "--cores", "1"], work, check=False)
    assert "a fold's pre-training must not see its test patients" in refused.stdout + refused.stderr
