"""finetune.pretrained: fine-tune one cohort from another cohort's pre-training.

The shipped pair (tcga-glioma-pretrain, tcga-lgg-finetune) is planned without network; two tiny
synthetic cohorts of different gene sets run for real, the second fine-tuning from the first's
pre-training with its sequences encoded by the first's encoding.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import anndata
import pandas as pd
import pytest
import yaml

from .conftest import REPO, make_workdir, run

pytestmark = pytest.mark.slow

PRETRAIN = "results/tcga-glioma-pretrain"


def _workdir(tmp_path: Path) -> Path:
    work = make_workdir(tmp_path, yaml.safe_load((REPO / "config.yaml").read_text()))
    shutil.copytree(REPO / "cohorts", work / "cohorts")
    return work


def _planned(out: str) -> list[str]:
    return re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):", out, flags=re.M)


def test_the_glioma_pair_is_planned_the_finetuning_without_its_own_pretraining(tmp_path: Path):
    work = _workdir(tmp_path)
    pretrain = run(["snakemake", f"{PRETRAIN}/pretrain/model.pt", "--cores", "1", "-n", "-p",
                    "--configfile", "cohorts/tcga-glioma-pretrain.yaml"], work)
    out = pretrain.stdout + pretrain.stderr
    assert "pretrain" in _planned(out) and "--encoding " + PRETRAIN in out
    assert '"project_ids": ["TCGA-LGG", "TCGA-GBM"]' in out
    for name in ("pretrain/model.pt", "pretrain/history.tsv", "pretrain/retrieval.json",
                 "expression/encoding.npz"):  # what the pre-training cohort leaves
        (work / PRETRAIN / name).parent.mkdir(parents=True, exist_ok=True)
        (work / PRETRAIN / name).touch()
    finetune = run(["snakemake", "--cores", "1", "-n", "-p", "--configfile",
                    "cohorts/tcga-lgg-finetune.yaml"], work)
    out = finetune.stdout + finetune.stderr
    planned = _planned(out)
    assert "pretrain" not in planned and "pretrain_ablation" not in planned
    assert planned.count("finetune") == 5 and "gene_sequences" in planned
    assert f"--from-encoding {PRETRAIN}/expression/encoding.npz" in out
    assert out.count(f"--pretrained {PRETRAIN}/pretrain/model.pt") == 2  # mgi, mgi_image_only
    assert f"--retrieval {PRETRAIN}/pretrain/retrieval.json" in out
    assert "results/tcga-lgg-finetune/pretrain" not in out


@pytest.mark.parametrize(("pretrained", "variants", "message"), [
    ("results/a/pretrain/model.pt", ["mgi", "mgi_transformer"],
     r"finetune.variants: \['mgi_transformer'\] need a pre-training with their own gene encoder"),
    ("exports/glioma.ckpt", ["mgi"],
     r"expected the path of another cohort's .*pretrain/model.pt or of an exported bundle"),
    ("exports/glioma.mgi", ["mgi", "mgi_transformer"],
     r"finetune.variants: \['mgi_transformer'\] need a pre-training with their own gene encoder"),
    ("results/tiny/pretrain/model.pt", ["mgi"], r"is this cohort's own pre-training"),
])
def test_unusable_pretrained_settings_are_config_errors(tmp_path: Path, tiny_config: dict,
                                                         pretrained: str, variants: list[str],
                                                         message: str):
    tiny_config["finetune"].update(pretrained=pretrained, variants=variants)
    result = run(["snakemake", "--cores", "1", "-n"], make_workdir(tmp_path, tiny_config),
                 check=False)
    assert result.returncode != 0
    assert re.search(message, result.stdout + result.stderr), result.stderr[-2000:]


def test_a_bundle_is_unbundled_and_no_pretraining_is_planned(tmp_path: Path, tiny_config: dict):
    tiny_config["finetune"].update(pretrained="exports/first.mgi", variants=["mgi", "vit_scratch"])
    work = make_workdir(tmp_path, tiny_config)
    (work / "exports").mkdir()
    (work / "exports" / "first.mgi").touch()
    cohort = f"results/{tiny_config['cohort']}"
    result = run(["snakemake", "--cores", "1", "-n", "-p"], work)
    out = result.stdout + result.stderr
    planned = _planned(out)
    assert planned.count("unbundle_pretrained") == 1
    assert "pretrain" not in planned and "pretrain_ablation" not in planned
    assert "report" not in planned  # a bundle has no pre-training curves or retrieval
    assert planned.count("finetune") == 2 and planned.count("evaluate") == 2
    assert "attribute" in planned and "gene_sequences" in planned
    assert f"mgi unbundle --bundle exports/first.mgi --pretrain {cohort}/pretrained/model.pt " \
        f"--encoding {cohort}/pretrained/encoding.npz" in out
    assert f"--from-encoding {cohort}/pretrained/encoding.npz" in out
    assert out.count(f"--pretrained {cohort}/pretrained/model.pt") == 1  # mgi only
    assert f"--model {cohort}/pretrained/model.pt" in out  # the attribution's
    assert f"{cohort}/pretrain/" not in out
    export = run(["snakemake", "--cores", "1", "-n", "-p", f"{cohort}/export/mgi.mgi"], work)
    assert f"--pretrain {cohort}/pretrained/model.pt" in export.stdout + export.stderr
    report = run(["snakemake", "--cores", "1", "-n", f"{cohort}/report/report.html"], work,
                 check=False)
    assert report.returncode != 0
    assert "is a bundle: it carries no pre-training history.tsv" in (
        report.stdout + report.stderr)


def test_a_cohort_of_other_genes_finetunes_from_another_cohorts_pretraining(
        tmp_path: Path, tiny_config: dict):
    first = dict(tiny_config, cohort="first", seed=1)
    first["synthetic"] = dict(first["synthetic"], n_slides=0)
    first["pretrain"] = dict(first["pretrain"], epochs=1)
    work = make_workdir(tmp_path, first)
    run(["snakemake", "--cores", "2", "results/first/pretrain/model.pt"], work)
    # the same generator (gene ids are drawn per seed) and more patients; then ten of the
    # genes are dropped from its expression matrix before its sequences are made
    second = dict(tiny_config, cohort="second", seed=1)
    second["synthetic"] = dict(second["synthetic"], n_slides=0, n_cases=10)
    second["finetune"] = dict(second["finetune"], variants=["mgi"], epochs=1,
                              pretrained="results/first/pretrain/model.pt")
    (work / "second.yaml").write_text(yaml.safe_dump(second, sort_keys=False))
    config = ["--configfile", "second.yaml"]
    run(["snakemake", "results/second/expression/expression.h5ad", "--cores", "2", *config],
        work)
    h5ad = work / "results/second/expression/expression.h5ad"
    adata = anndata.read_h5ad(h5ad)
    encoded = pd.read_csv(work / "results/first/expression/vocab.tsv", sep="\t")["gene_id"]
    dropped = set(encoded.dropna().astype(str)[:10])
    adata[:, ~adata.var_names.isin(dropped)].copy().write_h5ad(h5ad)
    run(["snakemake", "results/second/finetune/mgi/status.json", "--cores", "2", *config], work)
    log = (work / "logs/second/gene_sequences.log").read_text()
    found = re.search(r"(\d+) of the encoding's (\d+) genes found in the cohort, (\d+) missing",
                      log)
    assert found, log[-2000:]
    assert int(found[3]) == 10 and int(found[1]) == int(found[2]) - 10
    assert (work / "results/first/expression/vocab.tsv").read_text() == (
        work / "results/second/expression/vocab.tsv").read_text()
    finetune_log = (work / "logs/second/finetune/mgi.log").read_text()
    assert "pre-trained tensors from results/first/pretrain/model.pt" in finetune_log
    assert '"failed"' not in (work / "results/second/finetune/mgi/status.json").read_text()
    assert not (work / "results/second/pretrain").exists()
