"""Per-image QC rows and their merge."""

from __future__ import annotations

import pandas as pd

from mgi.imaging.qc import merge_qc, write_qc_row


def test_write_then_merge_sorts_by_image_id_and_types_numbers(tmp_path):
    mri = {"image_id": "b", "case_id": "c1", "modality": "mri", "status": "ok", "reason": "",
           "n_items": 20, "spacing_mm": 0.94, "level": None, "seconds": 1.5}
    wsi = {"image_id": "a", "case_id": "c2", "modality": "wsi", "status": "failed",
           "reason": "x.svs: no tissue found", "n_items": 0, "mpp": 0.499, "level": 0,
           "seconds": 0.2}
    paths = [write_qc_row(mri, tmp_path / "qc" / "b.tsv"),
             write_qc_row(wsi, tmp_path / "qc" / "a.tsv")]
    assert len(pd.read_csv(paths[0], sep="\t")) == 1
    merged = merge_qc(paths)
    assert merged["image_id"].tolist() == ["a", "b"]
    assert merged["n_items"].tolist() == [0, 20]
    assert merged.loc[0, "mpp"] == 0.499 and pd.isna(merged.loc[1, "mpp"])
    assert merged.loc[1, "spacing_mm"] == 0.94 and pd.isna(merged.loc[1, "level"])
    assert merged.loc[0, "reason"] == "x.svs: no tissue found"


def test_merge_of_nothing_is_an_empty_table():
    merged = merge_qc([])
    assert merged.empty and "status" in merged.columns
