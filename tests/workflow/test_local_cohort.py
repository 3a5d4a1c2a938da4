"""source local through the workflow: a sample sheet's files, read in place, to sequences."""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest

from tests.acquire.local_files import write_lgg_patient, write_sheet, write_star

from .conftest import make_workdir, run

pytestmark = pytest.mark.slow

SPLITS = ["train", "train", "val", "test", "train", "val"]


def test_a_local_cohort_runs_to_splits_and_sequences_with_the_sheets_splits(
    tmp_path: Path, tiny_config: dict
):
    mine = tmp_path / "mine"
    rows = []
    for i, split in enumerate(SPLITS):
        case = f"L{i}"
        write_star(mine / "expr" / f"{case}.tsv", seed=i, n_genes=60)
        write_lgg_patient(mine / "mri", f"{case}_mr", slices=4, px=32)
        rows.append({"case_id": case, "expression": f"expr/{case}.tsv",
                     "image": f"mri/{case}_mr", "split": split, "site": f"s{i % 2}"})
    write_sheet(mine / "samples.tsv", rows)
    config = {**tiny_config, "cohort": "mine", "source": "local",
              "sources": {"local": {"samples": str(mine / "samples.tsv")}}}
    config["imaging"]["mri"].update(sequences=["T1 pre", "FLAIR", "T1 post"],
                                    missing_sequence="flair")
    (tmp_path / "work").mkdir()
    work = make_workdir(tmp_path / "work", config)
    targets = ["results/mine/splits.tsv", "results/mine/expression/sequences.npz"]
    run(["snakemake", *targets, "--cores", "2"], work)

    splits = pd.read_csv(work / "results/mine/splits.tsv", sep="\t")
    assert splits["case_id"].tolist() == [r["case_id"] for r in rows]
    assert splits["split"].tolist() == SPLITS
    images = pd.read_csv(work / "data/mine/raw/images.tsv", sep="\t")
    assert images["path"].tolist() == [str((mine / "mri" / f"L{i}_mr").resolve())
                                       for i in range(6)]
    clinical = pd.read_csv(work / "data/mine/raw/clinical.tsv", sep="\t")
    assert clinical["site"].tolist() == [r["site"] for r in rows]
    qc = pd.read_csv(work / "results/mine/images/qc.tsv", sep="\t")
    assert (qc["status"] == "ok").all(), qc["reason"].tolist()
    adata = anndata.read_h5ad(work / "results/mine/expression/expression.h5ad")
    assert adata.obs_names.tolist() == [r["case_id"] for r in rows]
    with np.load(work / "results/mine/expression/sequences.npz", allow_pickle=True) as seqs:
        assert len(seqs.files) > 0
    assert not (work / "data/mine/raw/expression").exists()  # nothing copied
