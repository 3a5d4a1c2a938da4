"""evaluate_variant: every variant loads; masks per patient a user can open (NIfTI for MRI, PNG
per slide tile) equal the thresholded probabilities and give the reported 3D Dice; a variant
that failed to train gives header-only tables, empty predictions and a failed status."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mgi.checkpoint import save_failed, save_finetuned
from mgi.evaluate.segmentation import PATIENT_COLUMNS, SLICE_COLUMNS, evaluate_variant
from mgi.imaging.bank import read_bank, write_bank
from mgi.models.metrics import volume_metrics
from mgi.options import EvaluateSettings, FinetuneSettings, stage_settings
from mgi.train.finetune import build_variant, finetune
from mgi.variants import VARIANTS
from tests.train.conftest import TinyCohort, write_tiny_cohort

THRESHOLD = 0.5
VOCAB = 15  # write_tiny_cohort: 12 genes + 3 special tokens
SPACING = {"pixel_spacing": [0.5, 0.75], "spacing": [3.0, 0.25, 0.25]}  # MR bank attrs (mm)


def small(settings: dict) -> dict:
    """Settings with a ViT deep enough for the decoder and small, fast fine-tuning."""
    settings = copy.deepcopy(settings)
    settings["model"]["image_encoder"]["depth"] = 2
    settings["finetune"].update(
        epochs=3, batch_size=8, decoder_channels=4, device="cpu", lr=3e-3,
        unet={"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1})
    return settings


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> TinyCohort:
    """The tiny MR cohort, its banks recording their voxel spacing as mri.py writes it."""
    tiny = write_tiny_cohort(tmp_path_factory.mktemp("evaluate") / "cohort")
    for path in tiny.qc.parent.glob("*.h5"):
        with h5py.File(path, "r+") as h5:
            for key, value in SPACING.items():
                h5.attrs[key] = np.asarray(value, dtype=np.float64)
    tiny.settings = small(tiny.settings)
    return tiny


def evaluate(cohort: TinyCohort, model: Path, out: Path) -> pd.DataFrame:
    return evaluate_variant(
        model_path=model, sequences_path=cohort.sequences, splits_path=cohort.splits,
        qc_path=cohort.qc,
        settings=stage_settings(EvaluateSettings, {"evaluate": {"threshold": THRESHOLD}}),
        patients_path=out / "test_patients.tsv", slices_path=out / "test_slices.tsv",
        predictions_path=out / "test_predictions.h5")


def untrained(variant: str, settings: dict, path: Path) -> Path:
    """A checkpoint of an untrained variant, as fine-tuning writes it."""
    torch.manual_seed(0)
    typed = stage_settings(FinetuneSettings, settings)
    model = build_variant(variant, typed, vocab_size=VOCAB, seq_len=8, in_chans=1)
    save_finetuned(path, variant=variant, state_dict=model.state_dict(), settings=typed,
                   vocab_size=VOCAB, in_chans=1, best_epoch=1, val_dice=0.5)
    return path


@pytest.fixture(scope="module")
def unet_run(cohort: TinyCohort, tmp_path_factory) -> Path:
    """unet_scratch fine-tuned on the tiny cohort and evaluated; the variant's folder."""
    out = tmp_path_factory.mktemp("unet_scratch")
    assert finetune(variant="unet_scratch", sequences_path=cohort.sequences,
                    splits_path=cohort.splits, qc_path=cohort.qc, pretrained_path=None,
                    settings=stage_settings(FinetuneSettings, cohort.settings), out_dir=out)
    evaluate(cohort, out / "model.pt", out)
    return out


def test_status_of_a_trained_variant(unet_run: Path):
    status = json.loads((unet_run / "status.json").read_text())
    checkpoint = torch.load(unet_run / "model.pt", weights_only=False)
    assert status == {"variant": "unet_scratch", "status": "ok",
                      "best_epoch": checkpoint["best_epoch"],
                      "val_dice": pytest.approx(checkpoint["val_dice"])}


def test_nifti_masks_are_the_thresholded_probabilities_and_give_the_reported_dice(
        cohort: TinyCohort, unet_run: Path):
    patients = pd.read_csv(unet_run / "test_patients.tsv", sep="\t")
    with h5py.File(unet_run / "test_predictions.h5") as h5:
        probs = h5["probabilities"][()] / 255.0
        cases = h5["case_id"][()].astype(str)
        coords = h5["coord"][()]
    files = sorted((unet_run / "predictions").iterdir())
    assert [f.name for f in files] == [f"{case}.nii.gz" for case in sorted(patients["case_id"])]
    predicted = 0
    for row in patients.itertuples():
        image = nib.load(unet_run / "predictions" / f"{row.case_id}.nii.gz")
        assert image.get_data_dtype() == np.uint8
        assert image.header.get_zooms() == (0.5, 0.75, 3.0)  # row, column, slice gap
        assert image.header.get_xyzt_units()[0] == "mm"
        masks = np.asanyarray(image.dataobj).transpose(2, 0, 1)  # (slices, rows, columns)
        order = np.argsort(coords[cases == row.case_id], kind="stable")
        expected = probs[cases == row.case_id][order] >= THRESHOLD
        np.testing.assert_array_equal(masks, expected.astype(np.uint8))
        truth = read_bank(cohort.qc.parent / f"{row.case_id}.h5").masks  # in slice order
        dice = volume_metrics(masks.astype(bool), truth.astype(bool))["dice"]
        assert dice == pytest.approx(row.dice, abs=1e-6)
        predicted += int(masks.sum())
    assert predicted > 0  # the check is not on empty masks only


def test_tile_masks_are_one_png_per_tile(cohort: TinyCohort, tmp_path: Path):
    root = tmp_path / "wsi"
    wsi = write_tiny_cohort(root)  # same cohort, its banks rewritten as slide tiles
    for path in wsi.qc.parent.glob("*.h5"):
        bank = read_bank(path)
        pixels = np.clip((bank.images.astype(np.float32) + 1) * 100, 0, 255).astype(np.uint8)
        coords = np.stack([np.arange(len(bank)) * 16 + 1000, np.full(len(bank), 2000)], axis=1)
        write_bank(path, images=np.repeat(pixels, 3, axis=1), masks=bank.masks, coords=coords,
                   attrs={**bank.attrs, "modality": "wsi"})
    settings = copy.deepcopy(cohort.settings)
    settings["imaging"].update(modality="wsi", wsi={**settings["imaging"]["wsi"], "tile_px": 16})
    torch.manual_seed(0)
    typed = stage_settings(FinetuneSettings, settings)
    model = build_variant("unet_scratch", typed, vocab_size=VOCAB, seq_len=8, in_chans=3)
    save_finetuned(root / "model.pt", variant="unet_scratch", state_dict=model.state_dict(),
                   settings=typed, vocab_size=VOCAB, in_chans=3, best_epoch=1, val_dice=0.0)
    patients = evaluate(wsi, root / "model.pt", root)
    with h5py.File(root / "test_predictions.h5") as h5:
        probs = h5["probabilities"][()] / 255.0
        cases = h5["case_id"][()].astype(str)
        image_ids = h5["image_id"][()].astype(str)
        index = h5["index"][()]
    assert sorted(p.name for p in (root / "predictions").iterdir()) == sorted(patients["case_id"])
    for case in patients["case_id"]:
        tiles = sorted((root / "predictions" / case).iterdir())
        assert len(tiles) == (cases == case).sum()
        for i in np.flatnonzero(cases == case):
            png = root / "predictions" / case / f"{image_ids[i]}_x{1000 + 16 * index[i]}_y2000.png"
            mask = np.asarray(Image.open(png))
            assert mask.dtype == bool and mask.shape == (16, 16)
            np.testing.assert_array_equal(mask, probs[i] >= THRESHOLD)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_is_evaluated(cohort: TinyCohort, tmp_path: Path, variant: str):
    patients = evaluate(cohort, untrained(variant, cohort.settings, tmp_path / "model.pt"),
                        tmp_path)
    assert len(patients) == 2 and set(patients["variant"]) == {variant}
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "ok"
    assert len(list((tmp_path / "predictions").iterdir())) == 2


def test_a_variant_that_failed_to_train_gives_empty_results_and_a_failed_status(
        cohort: TinyCohort, tmp_path: Path):
    error = "fine-tuning mgi diverged: the loss is not finite at epoch 3, step 7"
    save_failed(tmp_path / "model.pt", variant="mgi", error=error)
    (tmp_path / "predictions").mkdir()
    (tmp_path / "predictions" / "stale.nii.gz").write_bytes(b"from an earlier run")
    patients = evaluate(cohort, tmp_path / "model.pt", tmp_path)
    assert patients.empty
    for name, columns in (("test_patients.tsv", PATIENT_COLUMNS),
                          ("test_slices.tsv", SLICE_COLUMNS)):
        assert (tmp_path / name).read_text() == "\t".join(columns) + "\n"
    assert list((tmp_path / "predictions").iterdir()) == []
    with h5py.File(tmp_path / "test_predictions.h5") as h5:
        assert h5["probabilities"].shape[0] == 0 and h5.attrs["failed"]
    status = json.loads((tmp_path / "status.json").read_text())
    assert status == {"variant": "mgi", "status": "failed", "stage": "finetune", "error": error}
