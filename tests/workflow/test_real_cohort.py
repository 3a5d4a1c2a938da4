"""`source: gdc` end to end against a local server that answers like the GDC and TCIA APIs.

The cohort config is the shipped `cohorts/tcga-lgg.yaml`; only the API addresses, the mask
source and a few sizes are overridden, by a second config file after it, as a user would.
The server serves a small synthetic cohort in the real formats: STAR files, and per patient a
realistic MR study (`mgi.acquire.studies`: localizers, DWI and ADC, sagittal and coronal
distractors, site-specific names, a T1-weighted FLAIR trap, a 3-D sagittal post-contrast T1,
series on other grids, motion, another frame of reference) as DICOM zips, plus LGG mask folders.
Snakemake then queries, downloads, chooses each patient's series per role from the DICOM tags,
registers and banks them, splits the patients and builds the gene sequences.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mgi.acquire.studies import StudyTruth, write_cohort_studies
from mgi.acquire.synthetic import SyntheticCohortConfig, write_cohort
from tests.acquire.conftest import FakeApi, _Handler, study_listing, zip_folder

from .conftest import REPO, make_workdir, run

pytestmark = pytest.mark.slow

COHORT = SyntheticCohortConfig(n_cases=8, n_genes=80, n_linked_genes=5, slices=6, image_px=32,
                               n_slides=0, seed=4)


def serve_cohort(api: FakeApi, raw: Path, studies: Path, labels: Path) -> dict[str, StudyTruth]:
    """Fill the fake API: the synthetic cohort's STAR files (written in `raw`) from the GDC, and
    for each case a realistic MR study (written in `studies`: many series, site-specific names,
    traps, other grids) from TCIA; LGG-style FLAIR masks into `labels`."""
    manifest = pd.read_csv(raw / "manifest.tsv", sep="\t", dtype=str)
    case_ids = sorted(manifest["case_id"])
    truths = write_cohort_studies(studies, case_ids=case_ids, seed=4, size=32)
    for row in manifest.itertuples():
        content = (raw / row.path).read_bytes()
        hit = api.file_hit(row.id, case_id=row.case_id, sample=f"{row.case_id}-01A",
                           content=content, project="TCGA-LGG")
        hit["file_name"] = row.filename
        api.file_hits.append(hit)
        api.files[row.id] = content
        api.case_hits.append({"submitter_id": row.case_id, "project": {"project_id": "TCGA-LGG"},
                              "disease_type": "Gliomas", "demographic": {"gender": "female"},
                              "diagnoses": [{"age_at_diagnosis": 12000}]})
        truth = truths[row.case_id]
        api.series.extend(study_listing(truth))
        for uid, series in truth.series.items():
            api.zips[uid] = [zip_folder(series.folder)]
        lgg = row.case_id.replace("-", "_") + "_19960909"
        masks = truth.write_lgg_masks(labels / "written" / row.case_id)
        (labels / lgg).mkdir(parents=True)
        for mask in sorted(masks.glob("*_mask.tif")):
            number = mask.name.removesuffix("_mask.tif").rsplit("_", 1)[1]
            shutil.copyfile(mask, labels / lgg / f"{lgg}_{number}_mask.tif")
    shutil.rmtree(labels / "written")
    return truths


@pytest.fixture
def local_api():
    api = FakeApi()
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Handler,), {"api": api}))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield api
    server.shutdown()
    server.server_close()


def test_a_cohort_is_fetched_from_a_local_gdc_and_tcia(tmp_path: Path, local_api: FakeApi):
    source = tmp_path / "source"
    write_cohort(source, config=COHORT)
    truths = serve_cohort(local_api, source, tmp_path / "studies", tmp_path / "labels")
    cases = sorted(truths)

    (tmp_path / "work").mkdir()
    work = make_workdir(tmp_path / "work", yaml.safe_load((REPO / "config.yaml").read_text()))
    shutil.copytree(REPO / "cohorts", work / "cohorts")
    overrides = {
        "sources": {"gdc": {"api_url": local_api.url, "project_ids": ["TCGA-LGG"],
                            "parallel": 2},
                    "tcia": {"api_url": local_api.url, "collection": "TCGA-LGG",
                             "masks_url": str(tmp_path / "labels")}},
        "imaging": {"mri": {"image_px": 32}},
        "expression": {"seq_len": 32, "min_fraction_expressed": 0.0},
    }
    # A second config file overrides the cohort's keys, merged key by key (nested values given
    # with --config arrive as strings, so a file is the override to use for nested keys).
    (work / "local-api.yaml").write_text(yaml.safe_dump(overrides))
    targets = ["results/tcga-lgg/splits.tsv", "results/tcga-lgg/expression/sequences.npz"]
    args = ["snakemake", *targets, "--cores", "2", "--configfile", "cohorts/tcga-lgg.yaml",
            "local-api.yaml"]
    run(args, work)

    raw = work / "data/tcga-lgg/raw"
    manifest = pd.read_csv(raw / "manifest.tsv", sep="\t", dtype=str)
    assert sorted(manifest["case_id"]) == cases
    for row in manifest.itertuples():  # every file in place and verified
        data = (raw / row.path).read_bytes()
        assert hashlib.md5(data).hexdigest() == row.md5
        assert data == local_api.files[row.id]
    assert pd.read_csv(raw / "download_failures.tsv", sep="\t").empty
    images = pd.read_csv(raw / "images.tsv", sep="\t", dtype=str)
    assert sorted(images["case_id"]) == cases and images["mask_path"].str.len().gt(0).all()
    qc = pd.read_csv(work / "results/tcga-lgg/images/qc.tsv", sep="\t")
    assert (qc["status"] == "ok").all() and len(qc) == len(cases), qc["reason"].tolist()
    # every role's series, chosen from the DICOM tags, is the one each study was written with
    for case, truth in truths.items():
        table = pd.read_csv(raw / "radiology" / case / "series.tsv", sep="\t", dtype=str)
        chosen = dict(zip(table["sequence"], table["SeriesInstanceUID"], strict=True))
        assert chosen == {r: truth.roles[r] for r in ("T1 pre", "FLAIR", "T1 post")
                          if r in truth.roles}, (case, truth.kind)
    audit = pd.read_csv(raw / "series_choice.tsv", sep="\t", dtype=str)
    assert set(audit["SeriesInstanceUID"]) == {u for t in truths.values() for u in t.series}
    # every channel on the FLAIR's grid, motion registered away (tcga-lgg: register rigid)
    for case, metrics in zip(qc["case_id"], qc["registration"].map(json.loads), strict=True):
        assert set(metrics) == {"T1 pre", "T1 post"} & set(truths[case].roles), case
    splits = pd.read_csv(work / "results/tcga-lgg/splits.tsv", sep="\t")
    assert sorted(splits["case_id"]) == cases
    # the requests went to the local server: queried, then downloaded, then the MR series
    paths = [seen.path for seen in local_api.seen]
    assert "/files" in paths and "/cases" in paths
    assert sum(p.startswith("/data/") for p in paths) == len(manifest)
    fetched = sum(p.endswith("/getImage") for p in paths)
    listed = sum(len(t.series) for t in truths.values())
    assert 3 * len(cases) <= fetched < listed  # what could serve a role, not every series
    # a rerun has nothing to do and fetches nothing
    before = len(local_api.seen)
    again = run([*args, "-n"], work)
    assert "Nothing to be done" in again.stdout + again.stderr
    assert len(local_api.seen) == before
