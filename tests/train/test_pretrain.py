"""Contrastive pre-training end to end on a tiny cohort: outputs, resume, DDP, divergence."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mgi.errors import ConfigError, TrainingError
from mgi.evaluate.report import KEPT_BY
from mgi.options import PretrainSettings, stage_settings
from mgi.train.pretrain import KEEP_BY, pretrain, selection_score
from tests.train.conftest import REPO, TinyCohort, settings_json


def run_in_process(cohort: TinyCohort, out_dir: Path, **pretrain_opts) -> dict:
    settings = stage_settings(PretrainSettings, settings_json(cohort, **pretrain_opts))
    return pretrain(sequences_path=cohort.sequences, splits_path=cohort.splits, qc_path=cohort.qc,
                    settings=settings, out_dir=out_dir, threads=1)


def cli(cohort: TinyCohort, out_dir: Path, **pretrain_opts) -> list[str]:
    """The `mgi pretrain` command line of the workflow rule, for a subprocess."""
    return [sys.executable, "-m", "mgi.cli", "pretrain", "--sequences", str(cohort.sequences),
            "--splits", str(cohort.splits), "--qc", str(cohort.qc),
            "--settings", settings_json(cohort, **pretrain_opts), "--out-dir", str(out_dir),
            "--threads", "1"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_pretrain_writes_model_curves_tensorboard_and_retrieval(tiny_cohort, tmp_path):
    out = tmp_path / "out"
    retrieval = run_in_process(tiny_cohort, out)
    history = pd.read_csv(out / "history.tsv", sep="\t")
    # 8 training patients in batches of 4: 2 steps per epoch, one row per epoch
    assert history["epoch"].tolist() == [1, 2, 3, 4]
    assert history["step"].tolist() == [2, 4, 6, 8]
    assert history["negatives"].eq(4).all()
    assert np.isfinite(history[["train_loss", "val_loss", "val_recall_at_1"]].to_numpy()).all()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    saved = json.loads((out / "retrieval.json").read_text())
    assert saved["test"] == json.loads(json.dumps(retrieval["test"]))
    for direction in ("gene_to_image", "image_to_gene"):
        scores = saved["test"][direction]
        assert {"recall@1", "recall@5", "recall@10", "chance@1", "p_recall@1"} <= set(scores)
    assert saved["test"]["n_patients"] == 2 and saved["device"].startswith("CPU")
    model = torch.load(out / "model.pt", map_location="cpu", weights_only=False)
    assert model["gene_config"]["kind"] == "mamba" and 1 <= model["best_epoch"] <= 4


@pytest.mark.parametrize("keep_by", ["val_mean_rank", "val_loss", "last"])
def test_the_kept_epoch_is_the_one_its_rule_picks_from_the_history(tiny_cohort, tmp_path,
                                                                     keep_by):
    out = tmp_path / keep_by
    retrieval = run_in_process(tiny_cohort, out, epochs=4, keep_by=keep_by)
    history = pd.read_csv(out / "history.tsv", sep="\t")
    ranks = history["val_mean_rank"] + history["val_image_to_gene_mean_rank"]
    expected = {
        "val_mean_rank": history.loc[min(history.index, key=lambda i: (ranks[i],
                                                                       history["val_loss"][i]))],
        "val_loss": history.loc[history["val_loss"].idxmin()],
        "last": history.iloc[-1],
    }[keep_by]["epoch"]
    model = torch.load(out / "model.pt", map_location="cpu", weights_only=False)
    assert retrieval["best_epoch"] == model["best_epoch"] == expected
    assert json.loads((out / "retrieval.json").read_text())["kept_by"] == keep_by


def test_patience_stops_where_the_full_run_went_no_better_and_keeps_its_best_so_far(
        tiny_cohort, tmp_path):
    full = tmp_path / "full"
    run_in_process(tiny_cohort, full, epochs=6, keep_by="val_loss", checkpoint_every=0)
    rows = pd.read_csv(full / "history.tsv", sep="\t")
    # where patience 1 must stop: the first epoch no better than the best before it
    best, stop = 1, len(rows)
    for epoch in rows["epoch"][1:]:
        if rows["val_loss"][epoch - 1] < rows["val_loss"][best - 1]:
            best = epoch
        else:
            stop = epoch
            break
    assert stop < len(rows), "the tiny run improved every epoch: no stop to check"
    short = tmp_path / "short"
    retrieval = run_in_process(tiny_cohort, short, epochs=6, keep_by="val_loss",
                               checkpoint_every=0, patience=1)
    kept = pd.read_csv(short / "history.tsv", sep="\t")
    # the same epochs as the full run (same schedule), up to the stop
    columns = [c for c in rows.columns if c != "seconds"]
    pd.testing.assert_frame_equal(kept[columns], rows[columns].iloc[:stop])
    assert retrieval["best_epoch"] == best


def test_selection_scores_order_epochs_and_name_a_wrong_rule():
    early = {"epoch": 3, "val_loss": 2.9, "val_mean_rank": 9.0, "val_image_to_gene_mean_rank": 8.0}
    late = {"epoch": 9, "val_loss": 4.1, "val_mean_rank": 5.0, "val_image_to_gene_mean_rank": 6.0}
    tie = {**late, "epoch": 10, "val_loss": 3.0}
    assert selection_score(late, keep_by="val_mean_rank") < selection_score(early,
                                                                            keep_by="val_mean_rank")
    assert selection_score(tie, keep_by="val_mean_rank") < selection_score(late,
                                                                           keep_by="val_mean_rank")
    assert selection_score(early, keep_by="val_loss") < selection_score(late, keep_by="val_loss")
    assert selection_score(late, keep_by="last") < selection_score(early, keep_by="last")
    with pytest.raises(ConfigError, match=r"pretrain\.keep_by: 'best'"):
        selection_score(late, keep_by="best")


def test_the_schema_the_trainer_and_the_report_know_the_same_keep_by_rules():
    import yaml

    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    enum = schema["properties"]["pretrain"]["properties"]["keep_by"]["enum"]
    assert tuple(enum) == KEEP_BY and set(KEPT_BY) == set(KEEP_BY)


def test_a_wrong_keep_by_stops_before_any_training(tiny_cohort, tmp_path):
    with pytest.raises(ConfigError, match=r"pretrain\.keep_by: 'best' is not one of"):
        run_in_process(tiny_cohort, tmp_path / "out", keep_by="best")
    assert not (tmp_path / "out" / "history.tsv").exists()


def test_dataloader_workers_do_not_change_the_result(tiny_cohort, tmp_path):
    """Every draw is seeded by (seed, epoch, patient), so worker processes read the same pairs."""
    run_in_process(tiny_cohort, tmp_path / "w0", epochs=2, num_workers=0)
    run_in_process(tiny_cohort, tmp_path / "w2", epochs=2, num_workers=2)
    a, b = weights(tmp_path / "w0" / "model.pt"), weights(tmp_path / "w2" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_accumulation_steps_once_per_group_of_batches(tiny_cohort, tmp_path):
    run_in_process(tiny_cohort, tmp_path / "out", batch_size=2, accumulate=2, epochs=2)
    history = pd.read_csv(tmp_path / "out" / "history.tsv", sep="\t")
    # 4 batches of 2 patients per epoch, 2 batches per optimiser step
    assert history["step"].tolist() == [2, 4]


def test_a_non_finite_loss_stops_with_a_clear_message(tiny_cohort, tmp_path, monkeypatch):
    monkeypatch.setattr("mgi.train.data.to_model_input",
                        lambda pixels: np.full(pixels.shape, np.nan, np.float32))
    with pytest.raises(TrainingError, match=r"loss is not finite at epoch 1, step 1.*pretrain\.lr"):
        run_in_process(tiny_cohort, tmp_path / "out")
    assert not (tmp_path / "out" / "model.pt").exists()


def test_a_checkpoint_of_other_settings_is_not_resumed(tiny_cohort, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    run_in_process(tiny_cohort, out, epochs=2)
    first = weights(out / "model.pt")
    run_in_process(tiny_cohort, out, epochs=2, lr=0.001)  # other settings: starts afresh
    assert "starting afresh" in caplog.text
    changed = weights(out / "model.pt")
    assert any(not torch.equal(first[k], changed[k]) for k in first)
    run_in_process(tiny_cohort, out, epochs=2, lr=0.001, checkpoint_every=5)  # execution only
    assert "resuming from" in caplog.text
    assert all(torch.equal(changed[k], v) for k, v in weights(out / "model.pt").items())


@pytest.mark.slow
def test_kill_and_resume_gives_the_weights_of_an_uninterrupted_run(tiny_cohort, tmp_path):
    opts = {"epochs": 12, "checkpoint_every": 1}
    whole = tmp_path / "whole"
    subprocess.run(cli(tiny_cohort, whole, **opts), check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli(tiny_cohort, killed, **opts), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # a few more steps
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.pt").exists(), "the run finished before it could be killed"
    step = torch.load(last, map_location="cpu", weights_only=False)["step"]
    assert 1 <= step < 24

    resumed = subprocess.run(cli(tiny_cohort, killed, **opts), check=True, capture_output=True,
                             text=True)
    assert f"step {step}" in resumed.stderr and "resuming from" in resumed.stderr
    expected = weights(whole / "model.pt")
    got = weights(killed / "model.pt")
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name
    # the curves are whole too: one row per epoch, as the uninterrupted run wrote them
    a = pd.read_csv(whole / "history.tsv", sep="\t").drop(columns="seconds")
    b = pd.read_csv(killed / "history.tsv", sep="\t").drop(columns="seconds")
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.slow
def test_ddp_over_two_cpu_processes_gathers_negatives_from_both(tiny_cohort, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_in_process(tiny_cohort, single, epochs=2)
    result = subprocess.run(cli(tiny_cohort, ddp, epochs=2, devices=2), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stderr + result.stdout
    history = pd.read_csv(ddp / "history.tsv", sep="\t")
    # each process holds 2 of the 4 pairs and scores them against all 4
    assert history["negatives"].eq(4).all()
    reference = pd.read_csv(single / "history.tsv", sep="\t")
    # the same global batches and gradients: the curves agree up to float summation order
    np.testing.assert_allclose(history["train_loss"], reference["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(history["val_loss"], reference["val_loss"], rtol=1e-4)
    assert json.loads((ddp / "retrieval.json").read_text())["device"].startswith("2 processes")
