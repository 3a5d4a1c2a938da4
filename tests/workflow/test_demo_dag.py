"""The whole workflow on a tiny synthetic cohort, in a temporary folder (slow: trains models)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from mgi.expression.gtf import genomic_order, read_gene_positions
from mgi.expression.tokens import read_sequences
from mgi.imaging.bank import read_bank

from .conftest import make_workdir, run
from .test_slurm_profile import planned_jobs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, request) -> Path:
    """One complete run of the tiny MRI config; its folder."""
    from .conftest import TINY_CONFIG

    work = make_workdir(tmp_path_factory.mktemp("dag"), TINY_CONFIG)
    run(["snakemake", "--cores", "2"], work)
    return work


def test_whole_dag_writes_report_and_metrics(finished_run: Path):
    report = finished_run / "results/tiny/report"
    html = (report / "report.html").read_text()
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["segmentation"]) == {"mgi", "mgi_image_only"}
    for variant in metrics["segmentation"].values():
        assert 0.0 <= variant["dice"] <= 1.0
        assert variant["dice_ci_low"] <= variant["dice"] <= variant["dice_ci_high"]
    assert "mgi_vs_mgi_image_only" in metrics["comparison"]
    assert metrics["pretrain"]["gene_to_image_chance_at_1"] == pytest.approx(
        1 / metrics["pretrain"]["test_patients"])
    # self-contained: figures embedded, nothing fetched
    assert html.count("data:image/png;base64,") >= 5
    assert "src=\"http" not in html
    assert "published, not measured here" in html


def test_gene_attribution_is_complete_and_checked_against_the_planted_genes(finished_run: Path):
    report = finished_run / "results/tiny/report"
    table = pd.read_csv(report / "gene_attribution.tsv", sep="\t", keep_default_na=False)
    summary = json.loads((report / "gene_attribution.json").read_text())
    assert summary["n_patients"] == 4 and summary["splits"] == ["val", "test"]  # held out
    assert summary["planted_truth"] and summary["max_abs_delta"] < 1e-2
    assert table["mean_abs"].is_monotonic_decreasing and (table["n_patients"] > 0).all()
    planted = pd.read_csv(finished_run / "data/tiny/raw/synthetic_genes.tsv", sep="\t")
    marked = table.loc[table["planted"] != "", "gene_name"]
    assert set(marked) <= set(planted["gene_name"]) and len(marked) > 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["attribution"]["planted_in_top_k"] == (table["planted"][:20] != "").sum()


def test_snakemake_report_bundles_the_report_metrics_and_figures(finished_run: Path):
    run(["snakemake", "--cores", "1", "--report", "report.zip"], finished_run)
    with zipfile.ZipFile(finished_run / "report.zip") as bundle:
        files = {Path(n).name for n in bundle.namelist() if n.startswith("report/data/raw/")}
        page = bundle.read("report/report.html").decode()
    assert {"report.html", "metrics.json", "gene_attribution.tsv", "pretrain_curves.png",
            "finetune_curves.png", "dice.png", "gene_attribution.png"} <= files
    assert "MGI on cohort" in page  # workflow/report/workflow.rst, with the config filled in


def test_demo_report_opens_in_headless_chromium(finished_run: Path):
    from ..evaluate.test_report_browser import check_report, open_report
    from .conftest import TINY_CONFIG

    seen = open_report(finished_run / "results/tiny/report/report.html")
    check_report(seen, variants=TINY_CONFIG["finetune"]["variants"])


def test_every_stage_left_its_artifacts(finished_run: Path):
    results = finished_run / "results/tiny"
    qc = pd.read_csv(results / "images/qc.tsv", sep="\t")
    assert (qc["status"] == "ok").all() and len(qc) == 8
    splits = pd.read_csv(results / "splits.tsv", sep="\t")
    assert set(splits["split"]) == {"train", "val", "test"}
    assert splits["case_id"].is_unique
    history = pd.read_csv(results / "pretrain/history.tsv", sep="\t")
    assert list(history["epoch"]) == [1, 2]
    for variant in ("mgi", "mgi_image_only"):
        patients = pd.read_csv(results / f"finetune/{variant}/test_patients.tsv", sep="\t")
        assert set(patients["case_id"]) == set(splits.loc[splits["split"] == "test", "case_id"])
    logs = finished_run / "logs/tiny"
    assert (logs / "pretrain.log").stat().st_size > 0


def test_second_run_has_nothing_to_do(finished_run: Path):
    result = run(["snakemake", "--cores", "2", "-n"], finished_run)
    assert "Nothing to be done" in result.stdout + result.stderr


def test_one_images_bank_can_be_the_target(finished_run: Path):
    result = run(["snakemake", "--cores", "1", "-n", "-p", "-f",
                  "results/tiny/images/DEMO-SY-0001.h5"], finished_run)
    jobs = planned_jobs(result.stdout)
    assert [job["rule"] for job in jobs] == ["mri_bank"]
    assert "--image-id DEMO-SY-0001 --raw-dir data/tiny/raw " in jobs[0]["shell"]


def test_pretrain_threads_set_the_jobs_threads_and_rerun_nothing(finished_run: Path):
    """pretrain.threads is how the job runs: its threads, not a setting passed to the stage."""
    (finished_run / "one.yaml").write_text("pretrain: {threads: 1}\n")
    one = ["--configfile", "config.yaml", "one.yaml"]
    result = run(["snakemake", "--cores", "2", "-n", *one], finished_run)
    assert "Nothing to be done" in result.stdout + result.stderr
    for config, threads in ((one, 1), ([], 2)):
        result = run(["snakemake", "--cores", "2", "-n", "-p", "--forcerun", "pretrain",
                      "results/tiny/pretrain/model.pt", *config], finished_run)
        (job,) = [job for job in planned_jobs(result.stdout) if job["rule"] == "pretrain"]
        assert job["threads"] == threads and f"--threads {threads} " in job["shell"]
        assert '"threads"' not in job["shell"]


def test_wsi_modality_tiles_slides_and_trains(tmp_path: Path, tiny_config: dict):
    """Slides instead of MRI, and the other expression options: genomic order from the GTF."""
    tiny_config["imaging"]["modality"] = "wsi"
    tiny_config["splits"] = {"val_fraction": 0.25, "test_fraction": 0.25}
    tiny_config["synthetic"]["n_slides"] = 6
    tiny_config["expression"].update(order="genomic", normalize="fpkm_uq", values="continuous")
    work = make_workdir(tmp_path, tiny_config)
    run(["snakemake", "--cores", "2"], work)

    gtf = work / "data/tiny/raw/reference/gencode.annotation.gtf.gz"
    log = (work / "logs/tiny/gene_sequences.log").read_text()
    assert gtf.is_file() and "genes on" in log  # read_gene_positions logged its summary
    seqs = read_sequences(work / "results/tiny/expression/sequences.npz",
                          vocab_path=work / "results/tiny/expression/vocab.tsv")
    assert seqs.attrs["config"]["order"] == "genomic"
    assert (seqs.token_ids == seqs.token_ids[0]).all()  # one genomic order for every case
    place = genomic_order(read_gene_positions(gtf))
    genes = seqs.vocab.set_index("token_id").loc[seqs.token_ids[0, 1:], "gene_id"]
    assert place.loc[genes].is_monotonic_increasing
    qc = pd.read_csv(work / "results/tiny/images/qc.tsv", sep="\t")
    assert len(qc) == 6 and (qc["status"] == "ok").all()
    assert (work / f"results/tiny/images/qc/{qc['image_id'][0]}.png").stat().st_size > 0
    # tiles are Macenko-normalised (the default) against one reference fitted for the cohort
    reference = json.loads((work / "results/tiny/images/stain_reference.json").read_text())
    assert reference["method"] == "macenko" and len(reference["reference_slides"]) == 6
    bank = read_bank(work / f"results/tiny/images/{qc['image_id'][0]}.h5")
    assert json.loads(bank.attrs["stain_normalisation"])["stain_matrix"] == reference[
        "stain_matrix"]
    metrics = json.loads((work / "results/tiny/report/metrics.json").read_text())
    assert set(metrics["segmentation"]) == {"mgi", "mgi_image_only"}
