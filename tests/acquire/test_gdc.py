"""GDC client against the local fake API: paging, profile choice, resumable checked downloads."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging

import pandas as pd
import pytest
import requests

from mgi import cli
from mgi.acquire import gdc, remote
from mgi.acquire.http import parse_retry_after
from mgi.errors import AcquireError
from mgi.io import read_tsv

TOKEN = "s3cr3t-token-value"
EXPR = gdc.EXPRESSION_DATA_TYPE


def _content(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


def _download(api, rows, raw_dir, **kwargs) -> gdc.DownloadSummary:
    options = {"parallel": 2, "retries": 3, "backoff": 0.5} | kwargs
    return gdc.download_files(api.manifest(rows), raw_dir, api_url=api.url, **options)


# --- queries ------------------------------------------------------------------------------------


def test_query_files_reads_every_page_and_filters_by_workflow(fake_api):
    fake_api.file_hits = [
        fake_api.file_hit(f"f{i:02d}", case_id=f"TCGA-AA-{i:04d}", sample=f"TCGA-AA-{i:04d}-01A")
        for i in range(7)
    ] + [fake_api.file_hit("other", case_id="TCGA-AA-0099", sample="x", workflow="HTSeq"),
         fake_api.file_hit("ctrl", case_id="TCGA-AA-0098", sample="y", access="controlled"),
         fake_api.file_hit("gbm", case_id="TCGA-BB-0001", sample="z", project="TCGA-GBM")]
    filters = gdc.expression_filters(project_ids=["TCGA-AA"], workflow_type="STAR - Counts")
    with requests.Session() as session:
        hits = gdc.query_files(session, fake_api.url, filters=filters, page_size=3)

    assert sorted(h["file_id"] for h in hits) == [f"f{i:02d}" for i in range(7)]
    posts = fake_api.requests_to("/files")
    assert [p.body["from"] for p in posts] == [0, 3, 6]
    assert all(p.body["size"] == 3 and p.body["format"] == "json" for p in posts)
    assert set(posts[0].body["fields"].split(",")) >= {"file_id", "md5sum", "file_size",
                                                       "cases.submitter_id"}


def test_filters_follow_the_gdc_syntax():
    flt = gdc.slide_filters(project_ids=["TCGA-LGG"], strategies=["Diagnostic Slide"])
    assert flt == {"op": "and", "content": [
        {"op": "in", "content": {"field": "cases.project.project_id", "value": ["TCGA-LGG"]}},
        {"op": "in", "content": {"field": "data_type", "value": ["Slide Image"]}},
        {"op": "in", "content": {"field": "experimental_strategy", "value": ["Diagnostic Slide"]}},
        {"op": "in", "content": {"field": "access", "value": ["open"]}},
    ]}
    fields = [c["content"]["field"] for c in gdc.expression_filters(
        project_ids=["P"], workflow_type="STAR - Counts")["content"]]
    assert fields == ["cases.project.project_id", "data_type", "analysis.workflow_type", "access"]


def test_query_error_never_quotes_the_token(fake_api, sleeps):
    fake_api.faults["files"] = [(401, {}, "bad token {token}")]
    with requests.Session() as session:
        session.headers["X-Auth-Token"] = TOKEN
        with pytest.raises(AcquireError, match="HTTP 401") as info:
            gdc.query_files(session, fake_api.url, filters=gdc.case_filters(project_ids=["P"]))
    assert TOKEN not in str(info.value)
    assert fake_api.requests_to("/files")[0].headers["X-Auth-Token"] == TOKEN


# --- manifest -----------------------------------------------------------------------------------


def test_build_manifest_paths_by_data_type(fake_api):
    hits = [fake_api.file_hit("e1", case_id="TCGA-AA-0001", sample="TCGA-AA-0001-01A"),
            fake_api.file_hit("s1", case_id="TCGA-AA-0001", sample="TCGA-AA-0001-01Z",
                              data_type="Slide Image")]
    hits.append({**hits[0], "file_id": "pooled", "id": "pooled",
                 "cases": hits[0]["cases"] * 2})
    manifest = gdc.build_manifest(hits)
    assert list(manifest.columns) == gdc.MANIFEST_COLUMNS
    paths = dict(zip(manifest["id"], manifest["path"], strict=True))
    assert paths == {"e1": "expression/e1/e1.counts.tsv", "s1": "slides/s1/s1.counts.tsv"}
    assert manifest.set_index("id").loc["e1", "sample_barcode"] == "TCGA-AA-0001-01A"


@pytest.mark.parametrize("name", ["../escape.tsv", "a/b.tsv", ".."])
def test_build_manifest_rejects_unsafe_file_names(fake_api, name):
    hit = {**fake_api.file_hit("e1", case_id="C", sample="S"), "file_name": name}
    with pytest.raises(AcquireError, match="file_name"):
        gdc.build_manifest([hit])


def test_choose_primary_profiles_keeps_one_tumour_profile_per_case(fake_api, caplog):
    h = fake_api.file_hit
    hits = [
        h("a-rec", case_id="A", sample="A-02A", sample_type="Recurrent Tumor"),
        h("a-01b", case_id="A", sample="A-01B"),
        h("a-01a-z", case_id="A", sample="A-01A"),
        h("a-01a-b", case_id="A", sample="A-01A"),
        h("a-nrm", case_id="A", sample="A-11A", sample_type="Solid Tissue Normal"),
        h("b-rec", case_id="B", sample="B-02A", sample_type="Recurrent Tumor"),
        h("b-nrm", case_id="B", sample="B-10A", sample_type="Blood Derived Normal"),
        h("c-nrm", case_id="C", sample="C-11A", sample_type="Solid Tissue Normal"),
        h("a-slide", case_id="A", sample="A-01Z", data_type="Slide Image"),
    ]
    with caplog.at_level(logging.INFO, logger="mgi.acquire.gdc"):
        chosen = gdc.choose_primary_profiles(gdc.build_manifest(hits))

    expr = chosen[chosen["data_type"] == EXPR].set_index("case_id")["id"].to_dict()
    assert expr == {"A": "a-01a-b", "B": "b-rec"}  # C has only normal tissue
    assert "a-slide" in set(chosen["id"])
    for dropped in ("a-rec", "a-01b", "a-01a-z", "a-nrm", "b-nrm", "c-nrm"):
        assert dropped in caplog.text


def test_limit_cases_keeps_the_first_cases_by_id(fake_api):
    rows = [fake_api.add_file(f"f{c}", b"x", case_id=c) for c in ("C", "A", "B")]
    kept = gdc.limit_cases(fake_api.manifest(rows), 2)
    assert sorted(kept["case_id"]) == ["A", "B"]


# --- downloads ----------------------------------------------------------------------------------


def test_download_resumes_after_a_dropped_connection(fake_api, tmp_path, sleeps):
    content = _content(200_000)
    row = fake_api.add_file("f1", content)
    fake_api.faults["f1"] = ["drop"]
    summary = _download(fake_api, [row], tmp_path)

    assert summary.downloaded == ["f1"] and not summary.failed
    assert (tmp_path / row["path"]).read_bytes() == content
    assert not (tmp_path / (row["path"] + ".partial")).exists()
    first, second = fake_api.requests_to("/data/f1")
    assert "Range" not in first.headers
    start = int(second.headers["Range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= len(content) // 2  # resumed from the bytes kept, not from zero
    assert second.status == 206
    assert sleeps == [0.5]


def test_a_server_file_name_never_chooses_where_the_file_goes(fake_api, tmp_path, sleeps):
    content = _content(5000)
    row = fake_api.add_file("f1", content)
    evil = 'attachment; filename="../../../evil.tsv"; filename*=UTF-8\'\'%2E%2E%2Fevil.tsv'
    fake_api.faults["f1"] = [{"headers": {"Content-Disposition": evil}}]
    raw = tmp_path / "raw"
    summary = _download(fake_api, [row], raw)
    assert summary.downloaded == ["f1"]
    assert fake_api.requests_to("/data/f1")[0].status == 200
    assert (raw / row["path"]).read_bytes() == content
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
                     if p.is_file())
    assert written == [f"raw/{row['path']}"]  # the manifest's path, nothing beside or above


def test_download_honours_retry_after_on_429(fake_api, tmp_path, sleeps):
    row = fake_api.add_file("f1", _content(1000))
    fake_api.faults["f1"] = [(429, {"Retry-After": "1"}, "slow down")]
    summary = _download(fake_api, [row], tmp_path)
    assert summary.downloaded == ["f1"]
    assert sleeps == [1.0]
    assert [s.status for s in fake_api.requests_to("/data/f1")] == [429, 200]


def test_download_retries_a_503_with_backoff(fake_api, tmp_path, sleeps):
    row = fake_api.add_file("f1", _content(1000))
    fake_api.faults["f1"] = [(503, {}, "busy"), (503, {}, "busy")]
    summary = _download(fake_api, [row], tmp_path, backoff=0.25)
    assert summary.downloaded == ["f1"]
    assert sleeps == [0.25, 0.5]
    assert (tmp_path / row["path"]).read_bytes() == _content(1000)


def test_persistent_md5_mismatch_leaves_no_file_and_is_reported(fake_api, tmp_path, sleeps):
    good = fake_api.add_file("good", _content(500, 2))
    bad = fake_api.add_file("bad", _content(500, 3))
    fake_api.faults["bad"] = [fake_api.always("corrupt")]
    summary = _download(fake_api, [good, bad], tmp_path, retries=2)

    assert summary.downloaded == ["good"]
    assert [fid for fid, _ in summary.failed] == ["bad"]
    assert "md5" in summary.failed[0][1]
    assert not (tmp_path / bad["path"]).exists()
    assert not (tmp_path / (bad["path"] + ".partial")).exists()
    assert len(fake_api.requests_to("/data/bad")) == 3


def test_second_run_downloads_nothing(fake_api, tmp_path, sleeps):
    rows = [fake_api.add_file(f"f{i}", _content(3000, i)) for i in range(3)]
    first = _download(fake_api, rows, tmp_path)
    assert sorted(first.downloaded) == ["f0", "f1", "f2"]
    n_requests = len(fake_api.requests_to("/data/"))

    second = _download(fake_api, rows, tmp_path)
    assert sorted(second.skipped) == ["f0", "f1", "f2"] and not second.downloaded
    assert len(fake_api.requests_to("/data/")) == n_requests


def test_a_wrong_existing_file_is_replaced(fake_api, tmp_path, sleeps):
    row = fake_api.add_file("f1", _content(800))
    target = tmp_path / row["path"]
    target.parent.mkdir(parents=True)
    target.write_bytes(b"\0" * 800)  # right size, wrong md5
    summary = _download(fake_api, [row], tmp_path)
    assert summary.downloaded == ["f1"]
    assert hashlib.md5(target.read_bytes()).hexdigest() == row["md5"]


@pytest.mark.parametrize("path", ["../outside.tsv", "expression/../../outside.tsv",
                                  "/tmp/absolute.tsv", "C:\\evil.tsv"])
def test_paths_outside_the_raw_folder_are_rejected(fake_api, tmp_path, path):
    row = {**fake_api.add_file("f1", b"data"), "path": path}
    with pytest.raises(AcquireError, match="path"):
        _download(fake_api, [row], tmp_path / "raw")
    assert not fake_api.requests_to("/data/")


def test_token_is_sent_but_never_in_errors_or_logs(fake_api, tmp_path, sleeps, caplog):
    row = fake_api.add_file("f1", _content(100))
    denied = fake_api.add_file("f2", _content(100, 5))
    fake_api.faults["f2"] = [fake_api.always((403, {}, "token {token} has no access"))]
    with caplog.at_level(logging.DEBUG):
        summary = _download(fake_api, [row, denied], tmp_path, token=TOKEN)

    assert summary.downloaded == ["f1"]
    (failed_id, reason), = summary.failed
    assert failed_id == "f2" and "HTTP 403" in reason
    assert TOKEN not in reason
    assert TOKEN not in caplog.text
    assert len(fake_api.requests_to("/data/f2")) == 1  # a 403 is not retried
    assert all(s.headers.get("X-Auth-Token") == TOKEN for s in fake_api.requests_to("/data/"))


def test_parse_retry_after_accepts_seconds_and_dates():
    from datetime import UTC, datetime

    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    now = datetime(2024, 1, 1, 0, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Mon, 01 Jan 2024 00:00:05 GMT", now=now) == 5.0


# --- the CLI actions ----------------------------------------------------------------------------


def _settings(api_url: str, **gdc_extra) -> str:
    return json.dumps({
        "sources": {"gdc": {"api_url": api_url, "project_ids": ["TCGA-AA"],
                            "workflow_type": "STAR - Counts",
                            "slide_strategies": ["Diagnostic Slide"], "max_cases": None,
                            "parallel": 2, "token_env": "MGI_TEST_GDC_TOKEN"} | gdc_extra,
                    "tcia": {"api_url": api_url, "collection": "TCGA-AA", "masks_url": None}},
        "imaging": {"modality": "wsi", "mri": {"sequences": ["FLAIR"]}},
    })


def test_gdc_query_writes_manifest_and_clinical(fake_api, tmp_path):
    h = fake_api.file_hit
    fake_api.file_hits = [
        h("e1", case_id="TCGA-AA-0001", sample="TCGA-AA-0001-01A"),
        h("e1n", case_id="TCGA-AA-0001", sample="TCGA-AA-0001-11A",
          sample_type="Solid Tissue Normal"),
        h("e2", case_id="TCGA-AA-0002", sample="TCGA-AA-0002-01A"),
        h("e3", case_id="TCGA-AA-0003", sample="TCGA-AA-0003-01A"),
        h("s1", case_id="TCGA-AA-0001", sample="TCGA-AA-0001-01Z", data_type="Slide Image",
          strategy="Diagnostic Slide"),
        h("s3", case_id="TCGA-AA-0003", sample="TCGA-AA-0003-01Z", data_type="Slide Image",
          strategy="Diagnostic Slide"),
        h("t1", case_id="TCGA-AA-0001", sample="TCGA-AA-0001-01A", data_type="Slide Image",
          strategy="Tissue Slide"),
    ]
    fake_api.case_hits = [
        {"submitter_id": f"TCGA-AA-000{i}", "project": {"project_id": "TCGA-AA"},
         "disease_type": "Gliomas", "demographic": {"gender": "female", "vital_status": "Alive"},
         "diagnoses": [{"age_at_diagnosis": 10000 + i, "primary_diagnosis": "Astrocytoma"}]}
        for i in (1, 2, 3)
    ]
    manifest_path, clinical_path = tmp_path / "raw/manifest.tsv", tmp_path / "raw/clinical.tsv"
    args = argparse.Namespace(settings=_settings(fake_api.url, max_cases=2),
                              manifest=str(manifest_path), clinical=str(clinical_path),
                              raw_dir=None, images=None)
    remote.run("gdc-query", args)

    manifest = read_tsv(manifest_path, required=gdc.MANIFEST_COLUMNS)
    assert list(manifest.columns) == gdc.MANIFEST_COLUMNS
    assert sorted(manifest["id"]) == ["e1", "e2", "s1"]  # max_cases 2; no normal, no tissue
    clinical = read_tsv(clinical_path, required=["case_id", "project_id", "gender"])
    assert clinical["case_id"].tolist() == ["TCGA-AA-0001", "TCGA-AA-0002"]
    assert clinical["age_at_diagnosis"].tolist() == ["10001", "10002"]
    assert clinical["primary_diagnosis"].eq("Astrocytoma").all()


def test_gdc_download_writes_failures_and_keeps_going(fake_api, tmp_path, sleeps, monkeypatch):
    monkeypatch.setenv("MGI_TEST_GDC_TOKEN", TOKEN)
    raw = tmp_path / "raw"
    rows = [fake_api.add_file("ok", _content(300)),
            {**fake_api.add_file("gone", b"abc"), "id": "missing-id",
             "path": "expression/missing-id/x.tsv"}]
    raw.mkdir()
    pd.DataFrame(rows).to_csv(raw / "manifest.tsv", sep="\t", index=False)
    args = argparse.Namespace(settings=_settings(fake_api.url), manifest=str(raw / "manifest.tsv"),
                              clinical=None, raw_dir=str(raw), images=None)
    remote.run("gdc-download", args)

    assert (raw / "expression").is_dir() and (raw / "slides").is_dir()
    assert (raw / rows[0]["path"]).read_bytes() == _content(300)
    failures = read_tsv(raw / "download_failures.tsv", required=["id", "reason"])
    assert failures["id"].tolist() == ["missing-id"]
    assert "HTTP 404" in failures["reason"][0] and TOKEN not in failures["reason"][0]


def test_gdc_download_fails_when_no_expression_file_arrives(fake_api, tmp_path, sleeps,
                                                            capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    row = {**fake_api.add_file("gone", b"abc"), "id": "nope", "path": "expression/nope/x.tsv"}
    pd.DataFrame([row]).to_csv(raw / "manifest.tsv", sep="\t", index=False)
    rc = cli.main(["acquire", "gdc-download", "--settings", _settings(fake_api.url),
                   "--manifest", str(raw / "manifest.tsv"), "--raw-dir", str(raw)])
    assert rc == 1
    assert "none of its 1 expression file(s) could be downloaded" in capsys.readouterr().err
    assert read_tsv(raw / "download_failures.tsv")["id"].tolist() == ["nope"]


# --- the GTF reference file ----------------------------------------------------------------------


def _gtf_args(api_url: str, out, *, md5: str, size: int | None = None) -> argparse.Namespace:
    settings = json.loads(_settings(api_url, gtf={"file_id": "ref-gtf", "md5": md5,
                                                  "size": size}))
    return argparse.Namespace(settings=json.dumps(settings), manifest=None, clinical=None,
                              raw_dir=None, images=None, out=str(out))


def test_gtf_reference_file_resumes_without_a_known_size_and_checks_md5(
    fake_api, tmp_path, sleeps
):
    content = _content(150_000)
    fake_api.add_file("ref-gtf", content)
    fake_api.faults["ref-gtf"] = ["drop"]
    out = tmp_path / "raw" / "reference" / "gencode.annotation.gtf.gz"
    remote.run("gtf", _gtf_args(fake_api.url, out, md5=hashlib.md5(content).hexdigest()))
    assert out.read_bytes() == content
    _first, second = fake_api.requests_to("/data/ref-gtf")
    assert second.headers["Range"].startswith("bytes=") and second.status == 206
    remote.run("gtf", _gtf_args(fake_api.url, out, md5=hashlib.md5(content).hexdigest()))
    assert len(fake_api.requests_to("/data/ref-gtf")) == 2  # in place: nothing fetched again


def test_gtf_with_the_wrong_md5_is_refused_and_not_kept(fake_api, tmp_path, sleeps):
    fake_api.add_file("ref-gtf", _content(1000))
    out = tmp_path / "reference" / "gencode.annotation.gtf.gz"
    with pytest.raises(AcquireError, match=r"ref-gtf \(GTF .*could not be downloaded.*md5"):
        remote.run("gtf", _gtf_args(fake_api.url, out, md5="0" * 32))
    assert not out.exists() and not list(out.parent.glob("*.partial"))
