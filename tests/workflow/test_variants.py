"""The fine-tuning variants as the workflow plans them (-n, no network): which pre-training each
starts from, one pre-training per gene-encoder ablation kind, and what evaluation writes."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import yaml

from mgi.variants import VARIANTS

from .conftest import REPO, make_workdir, run


def planned(work: Path, *args: str) -> list[dict]:
    """Rule, outputs and shell words of every job of a dry run."""
    result = run(["snakemake", "--cores", "1", "-n", "-p", *args], work)
    jobs: list[dict] = []
    for line in (result.stdout + result.stderr).splitlines():
        if match := re.fullmatch(r"(?:local)?(?:rule|checkpoint) (\w+):", line):
            jobs.append({"rule": match[1], "outputs": [], "shell": []})
        elif jobs and (match := re.fullmatch(r" +output: (.*)", line)):
            jobs[-1]["outputs"] = match[1].split(", ")
        elif jobs and line.startswith("Shell command: "):
            jobs[-1]["shell"] = shlex.split(line.removeprefix("Shell command: "))
    return jobs


def option(words: list[str], name: str) -> str | None:
    return words[words.index(name) + 1] if name in words else None


def test_each_variant_starts_from_its_pretraining_and_each_ablation_kind_pretrains_once(
        tmp_path: Path):
    work = make_workdir(tmp_path, yaml.safe_load((REPO / "config.yaml").read_text()))
    shutil.copytree(REPO / "cohorts", work / "cohorts")
    config = yaml.safe_load((REPO / "cohorts/tcga-lgg.yaml").read_text())
    assert set(config["finetune"]["variants"]) == set(VARIANTS)
    main_kind = config["model"]["gene_encoder"]["kind"]
    jobs = planned(work, "--configfile", "cohorts/tcga-lgg.yaml")
    root = "results/tcga-lgg"

    ablations = {job["outputs"][0]: job for job in jobs if job["rule"] == "pretrain_ablation"}
    others = sorted({"mamba", "transformer", "mlp"} - {main_kind})
    assert sorted(ablations) == [f"{root}/pretrain/ablation/{kind}/model.pt" for kind in others]
    for kind in others:
        words = ablations[f"{root}/pretrain/ablation/{kind}/model.pt"]["shell"]
        settings = json.loads(option(words, "--settings"))
        assert settings["model"]["gene_encoder"]["kind"] == kind
        assert settings["model"]["gene_encoder"]["d_model"] == config["model"]["gene_encoder"][
            "d_model"]  # only the kind differs from the main pre-training
        assert option(words, "--out-dir") == f"{root}/pretrain/ablation/{kind}"

    finetunes = {option(job["shell"], "--variant"): job["shell"]
                 for job in jobs if job["rule"] == "finetune"}
    assert set(finetunes) == set(VARIANTS)
    for variant, spec in VARIANTS.items():
        pretrained = option(finetunes[variant], "--pretrained")
        if not spec.pretrained:
            assert pretrained is None, variant
        elif spec.gene_kind(main_kind) == main_kind:
            assert pretrained == f"{root}/pretrain/model.pt", variant
        else:
            assert pretrained == f"{root}/pretrain/ablation/{spec.gene_kind(main_kind)}/model.pt"

    evaluate = next(job for job in jobs if job["rule"] == "evaluate")
    variant = option(evaluate["shell"], "--model").split("/")[-2]
    folder = f"{root}/finetune/{variant}"
    assert option(evaluate["shell"], "--predictions-dir") == f"{folder}/predictions"
    assert option(evaluate["shell"], "--status") == f"{folder}/status.json"
