"""`source: gdc` end to end against a local server that answers like the GDC and TCIA APIs.

The cohort config is the shipped `cohorts/tcga-lgg.yaml`; only the API addresses, the mask
source and a few sizes are overridden, by a second config file after it, as a user would.
The server serves a small synthetic cohort in the real formats (STAR files, DICOM zips, LGG
mask folders); Snakemake then queries, downloads, builds the expression matrix, fetches and
banks the MR series, splits the patients and builds the gene sequences.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import threading
import zipfile
from http.server import ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import yaml

from mgi.acquire.synthetic import SyntheticCohortConfig, write_cohort
from tests.acquire.conftest import FakeApi, _Handler

from .conftest import REPO, make_workdir, run

pytestmark = pytest.mark.slow

COHORT = SyntheticCohortConfig(n_cases=8, n_genes=80, n_linked_genes=5, slices=6, image_px=32,
                               n_slides=0, seed=4)


def _zip_series(files: list[Path]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in files:
            zf.write(path, arcname=path.name)
    return buffer.getvalue()


def serve_cohort(api: FakeApi, raw: Path, labels: Path) -> list[str]:
    """Fill the fake API from a synthetic cohort written in `raw`; LGG masks into `labels`."""
    manifest = pd.read_csv(raw / "manifest.tsv", sep="\t", dtype=str)
    cases = []
    for row in manifest.itertuples():
        content = (raw / row.path).read_bytes()
        hit = api.file_hit(row.id, case_id=row.case_id, sample=f"{row.case_id}-01A",
                           content=content, project="TCGA-LGG")
        hit["file_name"] = row.filename
        api.file_hits.append(hit)
        api.files[row.id] = content
        cases.append(row.case_id)
        api.case_hits.append({"submitter_id": row.case_id, "project": {"project_id": "TCGA-LGG"},
                              "disease_type": "Gliomas", "demographic": {"gender": "female"},
                              "diagnoses": [{"age_at_diagnosis": 12000}]})
        for folder in sorted((raw / "radiology" / row.case_id).iterdir()):
            files = sorted(folder.glob("*.dcm"))
            first = pydicom.dcmread(files[0], stop_before_pixels=True)
            api.series.append({"SeriesInstanceUID": first.SeriesInstanceUID,
                               "PatientID": row.case_id, "Modality": "MR",
                               "SeriesDescription": first.SeriesDescription,
                               "ImageCount": len(files), "Collection": "TCGA-LGG"})
            api.zips[first.SeriesInstanceUID] = [_zip_series(files)]
        lgg = row.case_id.replace("-", "_") + "_19960909"
        (labels / lgg).mkdir(parents=True)
        for mask in (raw / "masks" / row.case_id).glob("*_mask.tif"):
            number = mask.name.removesuffix("_mask.tif").rsplit("_", 1)[1]
            shutil.copyfile(mask, labels / lgg / f"{lgg}_{number}_mask.tif")
    return sorted(cases)


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
    cases = serve_cohort(local_api, source, tmp_path / "labels")

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
    assert (qc["status"] == "ok").all() and len(qc) == len(cases)
    splits = pd.read_csv(work / "results/tcga-lgg/splits.tsv", sep="\t")
    assert sorted(splits["case_id"]) == cases
    # the requests went to the local server: queried, then downloaded, then the MR series
    paths = [seen.path for seen in local_api.seen]
    assert "/files" in paths and "/cases" in paths
    assert sum(p.startswith("/data/") for p in paths) == len(manifest)
    assert sum(p.endswith("/getImage") for p in paths) == 3 * len(cases)
    # a rerun has nothing to do and fetches nothing
    before = len(local_api.seen)
    again = run([*args, "-n"], work)
    assert "Nothing to be done" in again.stdout + again.stderr
    assert len(local_api.seen) == before
