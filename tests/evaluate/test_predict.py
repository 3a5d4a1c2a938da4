"""mgi predict: a bundle applied to patients' raw files gives evaluate's masks, voxel for voxel;
a patient with a missing image is a failed row."""

from __future__ import annotations

import json

import anndata as ad
import nibabel as nib
import numpy as np
import pandas as pd
import torch

from mgi.acquire import folder
from mgi.checkpoint import save_finetuned
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

CASES = ["P0", "P1", "P2", "P3", "P4"]
SPLITS = ["train", "train", "train", "test", "test"]


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
    write_tsv(merge_qc(sorted((res / "images" / "qc").glob("*.tsv"))), res / "images/qc.tsv")
    adata = ad.concat(profiles, merge="same", uns_merge="same")
    splits = pd.DataFrame({"case_id": CASES, "split": SPLITS})
    write_tsv(splits, res / "splits.tsv")
    seqs = build_sequences(adata, splits, config=typed.expression)
    write_sequences(seqs, sequences_path=res / "expression/sequences.npz",
                    vocab_path=res / "expression/vocab.tsv")
    seqs.encoding.save(res / "expression/encoding.npz")
    torch.manual_seed(0)
    model = build_variant("mgi", typed, vocab_size=len(seqs.vocab), seq_len=8, in_chans=3)
    save_finetuned(res / "finetune/mgi/model.pt", variant="mgi", state_dict=model.state_dict(),
                   settings=typed, vocab_size=len(seqs.vocab), in_chans=3, best_epoch=1,
                   val_dice=0.5)
    evaluate_variant(
        model_path=res / "finetune/mgi/model.pt", sequences_path=res / "expression/sequences.npz",
        splits_path=res / "splits.tsv", qc_path=res / "images/qc.tsv",
        settings=stage_settings(EvaluateSettings, {"evaluate": {"threshold": 0.5}}),
        patients_path=res / "finetune/mgi/test_patients.tsv",
        slices_path=res / "finetune/mgi/test_slices.tsv",
        predictions_path=res / "finetune/mgi/test_predictions.h5")

    # New patients: the test patients from their raw files, and one whose image is missing.
    assert main(["export", "--variant", "mgi", "--results", str(res),
                 "--out", str(tmp_path / "mgi.mgi"),
                 "--settings", json.dumps({"evaluate": {"threshold": 0.5}})]) == 0
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
