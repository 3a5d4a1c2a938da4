"""Patient-level splits: disjoint, seeded, and nobody dropped silently."""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest

from mgi.errors import TrainingError
from mgi.train.splits import make_splits


def _inputs(tmp_path: Path, expr_cases: list[str], qc_rows: list[tuple[str, str, int]]):
    adata = anndata.AnnData(np.ones((len(expr_cases), 2), np.float32),
                            obs=pd.DataFrame(index=expr_cases))
    adata.write_h5ad(tmp_path / "e.h5ad")
    qc = pd.DataFrame(qc_rows, columns=["case_id", "status", "n_items"])
    qc.insert(0, "image_id", [f"img{i}" for i in range(len(qc))])
    qc.to_csv(tmp_path / "qc.tsv", sep="\t", index=False)
    return tmp_path / "e.h5ad", tmp_path / "qc.tsv"


def test_splits_are_patient_level_seeded_and_complete(tmp_path: Path):
    cases = [f"C{i:02d}" for i in range(20)]
    qc_rows = [(c, "ok", 5) for c in cases[:18]] + [("C05", "ok", 3), ("C18", "failed", 0)]
    expr, qc = _inputs(tmp_path, cases, qc_rows)
    a = make_splits(expression_path=expr, qc_path=qc, val_fraction=0.2, test_fraction=0.25, seed=3)
    b = make_splits(expression_path=expr, qc_path=qc, val_fraction=0.2, test_fraction=0.25, seed=3)
    c = make_splits(expression_path=expr, qc_path=qc, val_fraction=0.2, test_fraction=0.25, seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)
    assert a["case_id"].is_unique  # a patient with two images is in one split
    counts = a["split"].value_counts()
    assert counts["test"] == round(18 * 0.25) and counts["val"] == round(18 * 0.2)
    # C18 (failed image) and C19 (no image) are listed, not dropped
    assert set(a.loc[a["split"] == "unpaired", "case_id"]) == {"C18", "C19"}


def test_too_few_paired_patients_is_a_clear_error(tmp_path: Path):
    expr, qc = _inputs(tmp_path, ["A", "B"], [("A", "ok", 1), ("B", "ok", 1)])
    with pytest.raises(TrainingError, match="at least 3"):
        make_splits(expression_path=expr, qc_path=qc, val_fraction=0.2, test_fraction=0.2, seed=0)
