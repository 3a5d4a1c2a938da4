"""mgi predict: a bundle applied to patients' raw files gives evaluate's masks, voxel for voxel;
a patient with a missing image is a failed row."""

from __future__ import annotations

import anndata as ad
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from mgi.acquire import folder
from mgi.checkpoint import save_finetuned, save_pretrained
from mgi.cli import main
from mgi.evaluate.predict import read_profile
from mgi.evaluate.segmentation import evaluate_variant
from mgi.expression.tokens import build_sequences, write_sequences
from mgi.imaging.mri import build_mri_bank
from mgi.imaging.mri.build import layout_of
from mgi.imaging.qc import merge_qc, write_qc_row
from mgi.io import write_tsv
from mgi.options import EvaluateSettings, FinetuneSettings, stage_settings
from mgi.train.finetune import build_variant
from tests.acquire.local_files import write_lgg_patient, write_sheet, write_star
from tests.evaluate.test_segmentation import small
from tests.train.conftest import schema_defaults


def pretrain_stub(res) -> None:
    """pretrain/model.pt, which the bundle of mgi (a pre-trained variant) carries."""
    save_pretrained(res / "pretrain/model.pt", state_dict={}, gene_config={}, image_config={},
                    best_epoch=1)

CASES = ["P0", "P1", "P2", "P3", "P4"]
SPLITS = ["train", "train", "train", "test", "test"]


def evaluate_untrained_mgi(res, typed, profiles, splits, *, bundle) -> None:
    """results/ of a finished run from its banks' QC rows and profiles: qc.tsv, splits,
    sequences and encoding, an untrained `mgi` checkpoint, evaluate's masks, and its bundle."""
    write_tsv(merge_qc(sorted((res / "images" / "qc").glob("*.tsv"))), res / "images/qc.tsv")
    write_tsv(splits, res / "splits.tsv")
    seqs = build_sequences(ad.concat(profiles, merge="same", uns_merge="same"), splits,
                           config=typed.expression)
    write_sequences(seqs, sequences_path=res / "expression/sequences.npz",
                    vocab_path=res / "expression/vocab.tsv")
    seqs.encoding.save(res / "expression/encoding.npz")
    torch.manual_seed(0)
    model = build_variant("mgi", typed, vocab_size=len(seqs.vocab), seq_len=8, in_chans=3)
    save_finetuned(res / "finetune/mgi/model.pt", variant="mgi", state_dict=model.state_dict(),
                   settings=typed, vocab_size=len(seqs.vocab), in_chans=3, best_epoch=1,
                   val_dice=0.5)
    pretrain_stub(res)
    evaluate_variant(
        model_path=res / "finetune/mgi/model.pt", sequences_path=res / "expression/sequences.npz",
        splits_path=res / "splits.tsv", qc_path=res / "images/qc.tsv",
        settings=stage_settings(EvaluateSettings, {"evaluate": {"threshold": 0.5}}),
        patients_path=res / "finetune/mgi/test_patients.tsv",
        slices_path=res / "finetune/mgi/test_slices.tsv",
        predictions_path=res / "finetune/mgi/test_predictions.h5")
    assert main(["export", "--variant", "mgi", "--results", str(res), "--out", str(bundle),
                 "--threshold", "0.5"]) == 0


def test_predict_from_raw_files_gives_evaluates_masks(tmp_path):
    raw, res = tmp_path / "raw", tmp_path / "results"
    settings = small(schema_defaults({
        "cohort": "tiny", "source": "synthetic", "seed": 0,
        "imaging": {"modality": "mri", "mri": {"image_px": 16}},
        "expression": {"seq_len": 8, "n_bins": 11},
        "model": {"embed_dim": 16,
                  "gene_encoder": {"kind": "mamba", "d_model": 16, "n_layers": 1, "d_state": 4},
                  "image_encoder": {"patch_size": 4, "width": 32, "depth": 1, "num_heads": 2}},
    }))
    typed = stage_settings(FinetuneSettings, settings)
    # Training side: each study banked as the imaging stage does, profiles encoded on train.
    profiles = []
    for i, case in enumerate(CASES):
        study = write_lgg_patient(raw, case, slices=4, px=32)
        write_star(raw / f"{case}.tsv", seed=i)
        row = folder.patient_row(case, study, layout=layout_of(study),
                                 labels=folder.label_pattern("seg", "labels"), raw_dir=raw,
                                 options=typed.imaging.mri, choices=[])
        qc = build_mri_bank(image_id=case, case_id=case, series_root=row["path"],
                            mask_dir=row["mask_path"] or None,
                            out_path=res / "images" / f"{case}.h5", options=typed.imaging.mri)
        write_qc_row(qc, res / "images" / "qc" / f"{case}.tsv")
        profiles.append(read_profile(raw / f"{case}.tsv", case_id=case))
    splits = pd.DataFrame({"case_id": CASES, "split": SPLITS})
    evaluate_untrained_mgi(res, typed, profiles, splits, bundle=tmp_path / "mgi.mgi")

    # New patients: the test patients from their raw files, and one whose image is missing.
    sheet = write_sheet(tmp_path / "new" / "samples.tsv", [
        {"case_id": "P3", "expression": str(raw / "P3.tsv"), "image": str(raw / "P3")},
        {"case_id": "P4", "expression": str(raw / "P4.tsv"), "image": str(raw / "P4")},
        {"case_id": "NEW1", "expression": str(raw / "P0.tsv"), "image": str(raw / "gone")},
    ])
    out = tmp_path / "predict"
    assert main(["predict", "--bundle", str(tmp_path / "mgi.mgi"), "--samples", str(sheet),
                 "--out", str(out)]) == 0
    for case in ("P3", "P4"):
        mine = nib.load(out / "masks" / f"{case}.nii.gz")
        theirs = nib.load(res / "finetune/mgi/predictions" / f"{case}.nii.gz")
        np.testing.assert_array_equal(np.asarray(mine.dataobj), np.asarray(theirs.dataobj))
        np.testing.assert_array_equal(mine.affine, theirs.affine)
        assert (out / "overlays" / f"{case}.png").read_bytes()[:4] == b"\x89PNG"
    volumes = pd.read_csv(out / "volumes.tsv", sep="\t", keep_default_na=False)
    assert volumes["case_id"].tolist() == ["P3", "P4", "NEW1"]
    assert volumes["status"].tolist() == ["ok", "ok", "failed"]
    assert "gone: MR study folder not found" in volumes.loc[2, "reason"]
    p3 = np.asarray(nib.load(out / "masks/P3.nii.gz").dataobj)
    assert int(volumes.loc[0, "tumour_voxels"]) == int(p3.sum())
    assert sorted(pd.read_csv(out / "qc.tsv", sep="\t")["image_id"]) == ["P3", "P4"]


def test_predict_slides_gives_evaluates_tile_masks_and_areas(tmp_path):
    """A slide model: new slides tiled as training tiled them (bundle's stain reference and
    seed); tile masks as evaluate wrote them, area = tumour fraction x tile area."""
    from PIL import Image

    from mgi.imaging.slides import tile_slide
    from mgi.imaging.stain import make_normaliser, save_normaliser
    from tests.imaging.conftest import make_slide

    raw, res = tmp_path / "raw", tmp_path / "results"
    settings = small(schema_defaults({
        "cohort": "tiny", "source": "synthetic", "seed": 0,
        "imaging": {"modality": "wsi", "wsi": {"tile_px": 32, "mpp": 2.0, "max_tiles": 10,
                                               "tissue_min": 0.3,
                                               "stain": {"method": "reinhard"}}},
        "expression": {"seq_len": 8, "n_bins": 11},
        "model": {"embed_dim": 16,
                  "gene_encoder": {"kind": "mamba", "d_model": 16, "n_layers": 1, "d_state": 4},
                  "image_encoder": {"patch_size": 4, "width": 32, "depth": 1, "num_heads": 2}},
    }))
    typed = stage_settings(FinetuneSettings, settings)
    cases, splits_ = ["S0", "S1", "S2"], ["train", "train", "test"]
    slides = {}
    for case in cases:
        (raw / case).mkdir(parents=True)
        slides[case] = make_slide(raw / case)
    wsi = typed.imaging.wsi
    tissue = np.broadcast_to(np.array([205, 110, 170], np.uint8)[None, :, None, None],
                             (4, 3, 32, 32)).copy()
    tissue[:, :, ::3] = 120  # some contrast for the reference's statistics
    normaliser = make_normaliser("reinhard").fit(tissue)
    save_normaliser(normaliser, res / "images/stain_reference.json")
    profiles = []
    for i, case in enumerate(cases):
        write_star(raw / f"{case}.tsv", seed=i)
        qc = tile_slide(image_id=case, case_id=case, slide_path=slides[case].path,
                        mask_path=slides[case].annotation, out_path=res / "images" / f"{case}.h5",
                        qc_png_path=res / "images" / f"{case}.png", tile_px=wsi.tile_px,
                        mpp=wsi.mpp, mpp_fallback=wsi.mpp_fallback, tissue_min=wsi.tissue_min,
                        max_tiles=wsi.max_tiles, seed=0, normaliser=normaliser)
        assert qc["status"] == "ok", qc
        write_qc_row(qc, res / "images" / "qc" / f"{case}.tsv")
        profiles.append(read_profile(raw / f"{case}.tsv", case_id=case))
    splits = pd.DataFrame({"case_id": cases, "split": splits_})
    evaluate_untrained_mgi(res, typed, profiles, splits, bundle=tmp_path / "mgi.mgi")

    sheet = write_sheet(tmp_path / "new" / "samples.tsv", [
        {"case_id": "S2", "expression": str(raw / "S2.tsv"), "image": str(slides["S2"].path)},
        {"case_id": "NEW1", "expression": str(raw / "S0.tsv"), "image": str(raw / "gone.svs")},
    ])
    out = tmp_path / "predict"
    assert main(["predict", "--bundle", str(tmp_path / "mgi.mgi"), "--samples", str(sheet),
                 "--out", str(out)]) == 0
    theirs = sorted(p.name for p in (res / "finetune/mgi/predictions/S2").glob("*.png"))
    mine = sorted(p.name for p in (out / "masks/S2").glob("*.png"))
    assert mine == theirs and len(mine) == 10
    fraction = 0.0
    for name in mine:
        a = np.asarray(Image.open(out / "masks/S2" / name))
        b = np.asarray(Image.open(res / "finetune/mgi/predictions/S2" / name))
        np.testing.assert_array_equal(a, b)
        fraction += a.mean()
    volumes = pd.read_csv(out / "volumes.tsv", sep="\t", keep_default_na=False)
    assert volumes.columns.tolist() == ["case_id", "tiles", "tumour_area_mm2", "status",
                                        "reason"]
    assert volumes["status"].tolist() == ["ok", "failed"]
    assert "gone.svs: slide file not found" in volumes.loc[1, "reason"]
    assert int(volumes.loc[0, "tiles"]) == 10
    tile_mm2 = (32 * 2.0 / 1000) ** 2
    assert float(volumes.loc[0, "tumour_area_mm2"]) == pytest.approx(fraction * tile_mm2)
    assert (out / "overlays/S2.png").is_file()
