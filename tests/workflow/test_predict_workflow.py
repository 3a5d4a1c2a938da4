"""Predictions for new patients through the workflow (slow: trains the tiny models): the test
patients' raw files in a sample sheet, predict.samples set, and the predict target gives
evaluate's masks voxel for voxel."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from .conftest import make_workdir, run

pytestmark = pytest.mark.slow


def planned_rules(work: Path) -> set[str]:
    """The rules of the jobs a dry run of the default target plans."""
    dry = run(["snakemake", "--cores", "1", "-n"], work)
    return set(re.findall(r"^(?:local)?rule (\w+):", dry.stdout, re.M))


def test_predict_target_gives_evaluates_masks_for_the_test_patients(tmp_path: Path,
                                                                      tiny_config: dict):
    tiny_config["finetune"]["variants"] = ["mgi"]
    work = make_workdir(tmp_path, tiny_config)
    res, raw = work / "results/tiny", work / "data/tiny/raw"
    # with predict.samples null, the default target has no predict job
    run(["snakemake", "--cores", "2", "results/tiny/finetune/mgi/predictions",
         "results/tiny/export/mgi.mgi"], work)
    assert "predict" not in planned_rules(work)

    splits = pd.read_csv(res / "splits.tsv", sep="\t")
    test = sorted(splits.loc[splits["split"] == "test", "case_id"])
    assert test
    manifest = pd.read_csv(raw / "manifest.tsv", sep="\t")
    star = manifest[manifest["data_type"] == "Gene Expression Quantification"]
    star = star.set_index("case_id")["path"]
    sheet = work / "new/samples.tsv"
    sheet.parent.mkdir()
    pd.DataFrame({"case_id": test,
                  "expression": [str(raw / star[case]) for case in test],
                  "image": [str(raw / "radiology" / case) for case in test]},
                 ).to_csv(sheet, sep="\t", index=False)
    tiny_config["predict"] = {"samples": "new/samples.tsv", "variant": "mgi"}
    (work / "config.yaml").write_text(yaml.safe_dump(tiny_config, sort_keys=False))

    # with it set, the default target holds the predictions (and nothing else is left to do)
    planned = planned_rules(work)
    assert "predict" in planned and "finetune" not in planned and "export" not in planned
    run(["snakemake", "--cores", "2", "results/tiny/predict/mgi/volumes.tsv"], work)

    out = res / "predict/mgi"
    volumes = pd.read_csv(out / "volumes.tsv", sep="\t", keep_default_na=False)
    assert volumes["case_id"].tolist() == test
    assert (volumes["status"] == "ok").all(), volumes
    for case in test:
        mine = nib.load(out / "masks" / f"{case}.nii.gz")
        theirs = nib.load(res / "finetune/mgi/predictions" / f"{case}.nii.gz")
        np.testing.assert_array_equal(np.asarray(mine.dataobj), np.asarray(theirs.dataobj))
        np.testing.assert_array_equal(mine.affine, theirs.affine)
        row = volumes.set_index("case_id").loc[case]
        assert int(row["tumour_voxels"]) == int(np.asarray(mine.dataobj).sum())
        assert (out / "overlays" / f"{case}.png").is_file()
    assert (work / "logs/tiny/predict/mgi.log").is_file()
