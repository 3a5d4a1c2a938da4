"""NCI Genomic Data Commons: the cohort's open files and clinical fields, and resumable downloads.

Queries follow the GDC API users guide (https://docs.gdc.cancer.gov/API/Users_Guide/Search_and_Retrieval/):
POST a JSON body with `filters` (nested "and"/"in" operators), `fields` (comma-separated),
`format`, `size`, `from` and `sort` to `/files` or `/cases`, and page through
`data.pagination.total`. Files come from `/data/{file_id}`, which answers `Range` requests with
206, so an interrupted file is resumed from its `.partial` rather than fetched again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import requests

from mgi.acquire.http import (
    DEFAULT_TIMEOUT,
    TRANSIENT_ERRORS,
    SessionPerThread,
    TransientError,
    check_status,
    pause,
    redact,
    safe_relative,
    send,
)
from mgi.errors import AcquireError
from mgi.progress import progress as progress_bar

log = logging.getLogger(__name__)

EXPRESSION_DATA_TYPE = "Gene Expression Quantification"
SLIDE_DATA_TYPE = "Slide Image"
PRIMARY_TUMOR = "Primary Tumor"
# gdc-client manifest columns, then ours; the synthetic cohort writes the first nine too.
MANIFEST_COLUMNS = [
    "id", "filename", "md5", "size", "state", "case_id", "data_type", "sample_type", "path",
    "sample_barcode",
]
FOLDER_OF_DATA_TYPE = {EXPRESSION_DATA_TYPE: "expression", SLIDE_DATA_TYPE: "slides"}
FILE_FIELDS = [
    "file_id", "file_name", "md5sum", "file_size", "state", "access", "data_type",
    "experimental_strategy", "analysis.workflow_type", "cases.submitter_id",
    "cases.project.project_id", "cases.samples.submitter_id", "cases.samples.sample_type",
]
CASE_FIELDS = ["submitter_id", "case_id", "project.project_id", "disease_type", "primary_site"]
CASE_EXPAND = ["demographic", "diagnoses"]
DEMOGRAPHIC_COLUMNS = ["gender", "race", "ethnicity", "vital_status", "days_to_death",
                       "age_at_index"]
DIAGNOSIS_COLUMNS = ["age_at_diagnosis", "primary_diagnosis", "tumor_grade", "morphology",
                     "tissue_or_organ_of_origin", "days_to_last_follow_up", "year_of_diagnosis"]
CLINICAL_COLUMNS = ["case_id", "project_id", "disease_type", "primary_site",
                    *DEMOGRAPHIC_COLUMNS, *DIAGNOSIS_COLUMNS]
FAILURE_COLUMNS = ["id", "filename", "case_id", "data_type", "path", "reason"]
_MD5 = re.compile(r"^[0-9a-f]{32}$")
_CHUNK = 1 << 16


# --- queries ------------------------------------------------------------------------------------


def _in(field_name: str, values: Iterable[str]) -> dict:
    return {"op": "in", "content": {"field": field_name, "value": list(values)}}


def expression_filters(*, project_ids: list[str], workflow_type: str) -> dict:
    """GDC filters for the projects' open gene expression files of one workflow."""
    return {"op": "and", "content": [
        _in("cases.project.project_id", project_ids),
        _in("data_type", [EXPRESSION_DATA_TYPE]),
        _in("analysis.workflow_type", [workflow_type]),
        _in("access", ["open"]),
    ]}


def slide_filters(*, project_ids: list[str], strategies: list[str]) -> dict:
    """GDC filters for the projects' open slide images of the given experimental strategies."""
    return {"op": "and", "content": [
        _in("cases.project.project_id", project_ids),
        _in("data_type", [SLIDE_DATA_TYPE]),
        _in("experimental_strategy", strategies),
        _in("access", ["open"]),
    ]}


def case_filters(*, project_ids: list[str], case_ids: list[str] | None = None) -> dict:
    """GDC filters for cases of the projects (only the given submitter ids, if any)."""
    content = [_in("project.project_id", project_ids)]
    if case_ids is not None:
        content.append(_in("submitter_id", case_ids))
    return {"op": "and", "content": content}


def _query(
    session: requests.Session, url: str, *, filters: dict, fields: list[str],
    expand: list[str] | None, sort: str, page_size: int, retries: int, backoff: float,
) -> list[dict]:
    if page_size < 1:
        raise AcquireError(f"{url}: page_size must be at least 1, got {page_size}")
    hits: list[dict] = []
    start = 0
    while True:
        body = {"filters": filters, "fields": ",".join(fields), "format": "json",
                "size": page_size, "from": start, "sort": sort}
        if expand:
            body["expand"] = ",".join(expand)
        response = send(session, "POST", url, json=body, what=f"GDC query {url} (from {start})",
                        retries=retries, backoff=backoff)
        try:
            data = response.json()["data"]
            page, total = data["hits"], int(data["pagination"]["total"])
        except (ValueError, KeyError, TypeError) as err:
            raise AcquireError(f"GDC query {url}: answer lacks data.hits or "
                               f"data.pagination.total ({type(err).__name__}: {err})") from err
        hits.extend(page)
        start += len(page)
        if start >= total:
            break
        if not page:
            raise AcquireError(f"GDC query {url}: page from {start} is empty but "
                               f"pagination.total is {total}; the result changed while paging?")
    log.info("GDC %s: %d hit(s)", url.rsplit("/", 1)[-1], len(hits))
    return hits


def query_files(
    session: requests.Session, api_url: str, *, filters: dict, fields: list[str] = FILE_FIELDS,
    page_size: int = 500, retries: int = 5, backoff: float = 0.5,
) -> list[dict]:
    """Return every file hit of `filters` from `{api_url}/files`, reading all pages."""
    return _query(session, f"{api_url.rstrip('/')}/files", filters=filters, fields=fields,
                  expand=None, sort="file_id:asc", page_size=page_size, retries=retries,
                  backoff=backoff)


def query_cases(
    session: requests.Session, api_url: str, *, filters: dict, fields: list[str] = CASE_FIELDS,
    expand: list[str] = CASE_EXPAND, page_size: int = 500, retries: int = 5,
    backoff: float = 0.5,
) -> list[dict]:
    """Return every case hit of `filters` from `{api_url}/cases`, with the `expand` groups."""
    return _query(session, f"{api_url.rstrip('/')}/cases", filters=filters, fields=fields,
                  expand=expand, sort="submitter_id:asc", page_size=page_size,
                  retries=retries, backoff=backoff)


# --- manifest -----------------------------------------------------------------------------------


def build_manifest(hits: list[dict]) -> pd.DataFrame:
    """Return the manifest rows (MANIFEST_COLUMNS) of GDC file hits, one per single-case file.

    `path` is `expression/{id}/{filename}` or `slides/{id}/{filename}` by data_type; a file of
    several cases (or none) is skipped with a warning; a sample is chosen as a primary tumour
    first, then the smallest sample barcode. An unsafe file name or a malformed md5 or size
    raises AcquireError.
    """
    rows = []
    for hit in hits:
        file_id = str(hit.get("file_id") or hit.get("id") or "")
        cases = hit.get("cases") or []
        if len(cases) != 1:
            log.warning("GDC file %s (%s) belongs to %d cases; skipped", file_id,
                        hit.get("file_name"), len(cases))
            continue
        case = cases[0]
        samples = sorted(case.get("samples") or [],
                         key=lambda s: (s.get("sample_type") != PRIMARY_TUMOR,
                                        str(s.get("submitter_id", ""))))
        sample = samples[0] if samples else {}
        if len(samples) > 1:
            log.info("GDC file %s lists %d samples; using %s", file_id, len(samples),
                     sample.get("submitter_id"))
        rows.append(_manifest_row(hit, file_id, case, sample))
    frame = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    repeated = frame["id"][frame["id"].duplicated()]
    if not repeated.empty:
        raise AcquireError(f"GDC answer lists file id(s) {sorted(set(repeated))[:5]} twice")
    return frame.sort_values(["data_type", "case_id", "id"], ignore_index=True)


def _manifest_row(hit: dict, file_id: str, case: dict, sample: dict) -> dict:
    name = str(hit.get("file_name") or "")
    data_type = str(hit.get("data_type") or "")
    md5 = str(hit.get("md5sum") or "").lower()
    where = f"GDC file {file_id or '?'}"
    if not re.fullmatch(r"[A-Za-z0-9-]+", file_id):
        raise AcquireError(f"{where}: field 'file_id' {file_id!r} is not a GDC UUID")
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise AcquireError(f"{where}: field 'file_name' {name!r} is not a plain file name")
    if data_type not in FOLDER_OF_DATA_TYPE:
        raise AcquireError(f"{where}: field 'data_type' {data_type!r}, expected one of "
                           f"{sorted(FOLDER_OF_DATA_TYPE)}")
    if not _MD5.match(md5):
        raise AcquireError(f"{where}: field 'md5sum' {md5!r} is not 32 hex digits")
    size = hit.get("file_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise AcquireError(f"{where}: field 'file_size' {size!r} is not a byte count")
    case_id = str(case.get("submitter_id") or "")
    if not case_id:
        raise AcquireError(f"{where}: field 'cases.submitter_id' is empty")
    return {
        "id": file_id, "filename": name, "md5": md5, "size": size,
        "state": str(hit.get("state") or ""), "case_id": case_id, "data_type": data_type,
        "sample_type": str(sample.get("sample_type") or ""),
        "path": f"{FOLDER_OF_DATA_TYPE[data_type]}/{file_id}/{name}",
        "sample_barcode": str(sample.get("submitter_id") or ""),
    }


def _is_normal(sample_type: str) -> bool:
    return "normal" in sample_type.casefold()


def choose_primary_profiles(manifest: pd.DataFrame) -> pd.DataFrame:
    """Return the manifest with one expression profile per case; other rows are kept as they are.

    Rule, per case, over its expression rows:

    1. profiles of normal tissue (a sample_type containing "Normal", e.g. "Solid Tissue
       Normal", "Blood Derived Normal") never stand for the case; a case with only such
       profiles loses its expression rows;
    2. a "Primary Tumor" profile comes before any other tumour profile (recurrent, metastatic);
    3. then the lexicographically smallest sample barcode (`sample_barcode`), then the smallest
       file id, which makes the choice deterministic.

    The dropped profiles are logged, one line each, and left out of the returned table.
    """
    is_expr = manifest["data_type"] == EXPRESSION_DATA_TYPE
    expr = manifest[is_expr]
    normal = expr["sample_type"].map(_is_normal)
    for _, row in expr[normal].iterrows():
        log.info("case %s: dropped expression file %s (%s, sample %s): normal tissue",
                 row["case_id"], row["id"], row["sample_type"], row["sample_barcode"])
    tumour = expr[~normal].assign(_rank=lambda f: (f["sample_type"] != PRIMARY_TUMOR).astype(int))
    tumour = tumour.sort_values(["case_id", "_rank", "sample_barcode", "id"])
    first = ~tumour["case_id"].duplicated()
    for _, row in tumour[~first].iterrows():
        log.info("case %s: dropped expression file %s (%s, sample %s): another profile of the "
                 "case was chosen", row["case_id"], row["id"], row["sample_type"],
                 row["sample_barcode"])
    n_dropped = int((~first).sum() + normal.sum())
    if n_dropped:
        log.info("kept one expression profile per case: %d case(s), %d file(s) dropped",
                 int(first.sum()), n_dropped)
    kept = tumour[first].drop(columns="_rank")
    return pd.concat([kept, manifest[~is_expr]], ignore_index=True)


def limit_cases(manifest: pd.DataFrame, max_cases: int | None) -> pd.DataFrame:
    """Return the rows of the first `max_cases` expression cases (sorted by id); all if None."""
    if max_cases is None:
        return manifest.reset_index(drop=True)
    cases = sorted(set(manifest.loc[manifest["data_type"] == EXPRESSION_DATA_TYPE, "case_id"]))
    keep = set(cases[:max_cases])
    return manifest[manifest["case_id"].isin(keep)].reset_index(drop=True)


def clinical_table(cases: list[dict], *, case_ids: list[str]) -> pd.DataFrame:
    """Return one row per case id (CLINICAL_COLUMNS, sorted), flattened from GDC case hits.

    demographic fields come from the case's demographic; diagnosis fields from its diagnosis
    flagged `diagnosis_is_primary_disease` if any, else the first listed. A case id without a
    hit keeps empty fields (logged).
    """
    by_id = {str(c.get("submitter_id")): c for c in cases}
    rows = []
    missing = []
    for case_id in sorted(set(case_ids)):
        case = by_id.get(case_id)
        if case is None:
            missing.append(case_id)
            rows.append({"case_id": case_id})
            continue
        demographic = case.get("demographic") or {}
        diagnoses = case.get("diagnoses") or []
        diagnosis = next((d for d in diagnoses if d.get("diagnosis_is_primary_disease") is True),
                         diagnoses[0] if diagnoses else {})
        row = {"case_id": case_id, "project_id": (case.get("project") or {}).get("project_id"),
               "disease_type": case.get("disease_type"), "primary_site": case.get("primary_site")}
        row.update({k: demographic.get(k) for k in DEMOGRAPHIC_COLUMNS})
        row.update({k: diagnosis.get(k) for k in DIAGNOSIS_COLUMNS})
        rows.append(row)
    if missing:
        log.warning("GDC /cases has no record for %d case(s), clinical fields left empty: %s",
                    len(missing), missing[:5])
    table = pd.DataFrame(rows, columns=CLINICAL_COLUMNS)
    for column in ("days_to_death", "age_at_index", "age_at_diagnosis", "days_to_last_follow_up",
                   "year_of_diagnosis"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype("Int64")
    return table


# --- downloads ----------------------------------------------------------------------------------


@dataclass
class DownloadSummary:
    """What one download_files call did: file ids downloaded, already present, failed (id, why)."""

    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    bytes_downloaded: int = 0

    def line(self) -> str:
        """One-line human summary."""
        return (f"{len(self.downloaded)} file(s) downloaded ({self.bytes_downloaded / 1e6:.1f} "
                f"MB), {len(self.skipped)} already present, {len(self.failed)} failed")


@dataclass(frozen=True)
class _File:
    id: str
    md5: str
    size: int | None  # None: not known in advance (a reference file); the md5 still decides
    target: Path

    @property
    def partial(self) -> Path:
        return self.target.with_name(self.target.name + ".partial")


class _Progress:
    """A progress bar of bytes (and files done, as its postfix) shared by the workers."""

    def __init__(self, total: int, *, n_files: int = 0) -> None:
        self._bar = progress_bar(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                 desc="GDC download")
        self._lock = threading.Lock()
        self.fetched = 0  # bytes received from the server, all files together
        self.n_files, self.files_done = n_files, 0
        self._bar.set_postfix_str(f"0/{n_files} files", refresh=False)

    def file_done(self) -> None:
        with self._lock:
            self.files_done += 1
            self._bar.set_postfix_str(f"{self.files_done}/{self.n_files} files")

    def move(self, delta: int, *, fetched: int = 0) -> None:
        with self._lock:
            self._bar.update(delta)
            self.fetched += fetched

    def close(self) -> None:
        self._bar.close()


def _manifest_files(manifest: pd.DataFrame, raw_dir: Path) -> list[_File]:
    for column in ("id", "md5", "size", "path"):
        if column not in manifest.columns:
            raise AcquireError(f"manifest: missing column {column!r}; found {list(manifest)}")
    files = []
    for row in manifest.itertuples(index=False):
        where = f"manifest row of file {row.id}"
        md5 = str(row.md5).lower()
        if not _MD5.match(md5):
            raise AcquireError(f"{where}: md5 {row.md5!r} is not 32 hex digits")
        try:
            size = None if row.size is None or row.size == "" else int(row.size)
        except (TypeError, ValueError) as err:
            raise AcquireError(f"{where}: size {row.size!r} is not a byte count") from err
        if size is not None and size < 0:
            raise AcquireError(f"{where}: size {size} is negative")
        target = safe_relative(raw_dir, str(row.path), what=where)
        files.append(_File(id=str(row.id), md5=md5, size=size, target=target))
    for what, values in (("id", [f.id for f in files]), ("path", [f.target for f in files])):
        seen: set = set()
        repeated = {v for v in values if v in seen or seen.add(v)}
        if repeated:
            raise AcquireError(f"manifest: {what}(s) {sorted(map(str, repeated))[:5]} listed "
                               "more than once")
    return files


def _md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _content_range_start(value: str | None) -> int | None:
    match = re.match(r"^\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*$", value or "")
    return int(match.group(1)) if match else None


def _fetch_once(
    session: requests.Session, item: _File, url: str, *, report: Callable[[int, int], None],
    timeout: tuple[float, float],
) -> None:
    """One attempt: resume or start `item.partial`, then check size and md5 (TransientError)."""
    partial = item.partial
    offset = partial.stat().st_size if partial.exists() else 0
    known = item.size is not None
    if known and offset > item.size:
        partial.unlink()
        offset = 0
    report(offset, 0)
    if not known or offset < item.size or item.size == 0:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        what = f"GDC file {item.id} ({url})"
        with session.get(url, headers=headers, stream=True, timeout=timeout) as response:
            if offset and response.status_code == 416:  # our partial is not a prefix
                partial.unlink()
                report(0, 0)
                raise TransientError(f"{what}: server refused the resume at byte {offset}")
            check_status(response, what=what)
            if offset and response.status_code == 206:
                start = _content_range_start(response.headers.get("Content-Range"))
                if start != offset:
                    partial.unlink()
                    report(0, 0)
                    raise TransientError(f"{what}: resumed at byte {start}, asked for {offset}")
                mode = "ab"
            else:
                if offset:
                    log.info("%s: server ignored the Range request; starting over", what)
                offset, mode = 0, "wb"
                report(0, 0)
            with partial.open(mode) as out:
                for chunk in response.iter_content(_CHUNK):
                    out.write(chunk)
                    offset += len(chunk)
                    report(offset, len(chunk))
    size = partial.stat().st_size
    if known and size < item.size:
        raise TransientError(f"file {item.id}: connection ended after {size} of {item.size} bytes")
    if known and size > item.size:
        partial.unlink()
        report(0, 0)
        raise TransientError(f"file {item.id}: got {size} bytes, the manifest says {item.size}; "
                             "partial file deleted")
    md5 = _md5_of(partial)
    if md5 != item.md5:
        partial.unlink()
        report(0, 0)
        raise TransientError(f"file {item.id}: md5 {md5} differs from the manifest's {item.md5}; "
                             "file deleted")


def _download_one(
    item: _File, *, api_url: str, sessions: SessionPerThread, progress: _Progress, retries: int,
    backoff: float, timeout: tuple[float, float],
) -> tuple[str, str]:
    """Return ("downloaded" | "skipped" | "failed", reason) for one manifest file."""
    counted = 0

    def report(file_bytes: int, fetched: int) -> None:
        nonlocal counted
        progress.move(file_bytes - counted, fetched=fetched)
        counted = file_bytes

    if item.target.is_file():
        size = item.target.stat().st_size
        if item.size in (None, size) and _md5_of(item.target) == item.md5:
            report(size, 0)
            return "skipped", ""
        log.warning("file %s: %s has the wrong size or md5; deleted, downloading again",
                    item.id, item.target)
        item.target.unlink()
    item.target.parent.mkdir(parents=True, exist_ok=True)
    session = sessions.get()
    url = f"{api_url.rstrip('/')}/data/{item.id}"
    failure = TransientError("no attempt made")
    for attempt in range(retries + 1):
        try:
            _fetch_once(session, item, url, report=report, timeout=timeout)
            os.replace(item.partial, item.target)
            return "downloaded", ""
        except AcquireError as err:  # a 4xx other than 429: retrying will not help
            return "failed", redact(str(err), session)
        except TransientError as err:
            failure = err
        except TRANSIENT_ERRORS as err:
            failure = TransientError(f"file {item.id}: {type(err).__name__}: {err}")
        if attempt < retries:
            delay = pause(attempt, backoff=backoff, retry_after=failure.retry_after)
            log.warning("%s; retry %d/%d after %.1f s", redact(failure.reason, session),
                        attempt + 1, retries, delay)
    return "failed", redact(f"gave up after {retries + 1} attempts; last failure: "
                            f"{failure.reason}", session)


def download_files(
    manifest: pd.DataFrame,
    raw_dir: str | os.PathLike[str],
    *,
    api_url: str,
    parallel: int = 4,
    token: str | None = None,
    retries: int = 5,
    backoff: float = 0.5,
    timeout: tuple[float, float] = DEFAULT_TIMEOUT,
) -> DownloadSummary:
    """Download every manifest file to raw_dir/path; return what was downloaded, skipped, failed.

    Each file streams from `{api_url}/data/{id}` into `{path}.partial`, which a later attempt
    (or run) resumes with `Range: bytes=N-`; only a file of the manifest's size and md5 is
    renamed into place. Connection errors, timeouts, 429 (after Retry-After seconds) and 5xx
    are retried `retries` times with exponential backoff; so is a wrong md5, after deleting the
    bytes. A file that still fails is reported in `failed`, and never left at its path (a
    `.partial` of an interrupted file is kept, to be resumed). A file already in place with the
    right size and md5 is skipped. Paths must stay inside raw_dir (AcquireError before anything
    is fetched). `token` is sent as X-Auth-Token and never logged.
    """
    raw_dir = Path(raw_dir)
    files = _manifest_files(manifest, raw_dir)
    summary = DownloadSummary()
    progress = _Progress(sum(f.size or 0 for f in files), n_files=len(files))
    with SessionPerThread(token=token) as sessions, \
            ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        results = pool.map(
            lambda item: _download_one(item, api_url=api_url, sessions=sessions,
                                       progress=progress, retries=retries, backoff=backoff,
                                       timeout=timeout),
            files,
        )
        for item, (status, reason) in zip(files, results, strict=True):
            progress.file_done()
            if status == "downloaded":
                summary.downloaded.append(item.id)
            elif status == "skipped":
                summary.skipped.append(item.id)
            else:
                summary.failed.append((item.id, reason))
                log.error("file %s failed: %s", item.id, reason)
    progress.close()
    summary.bytes_downloaded = progress.fetched
    log.info("GDC download: %s", summary.line())
    return summary


def failures_table(manifest: pd.DataFrame, summary: DownloadSummary) -> pd.DataFrame:
    """Return the manifest rows of the failed files with the reason (FAILURE_COLUMNS)."""
    reasons = dict(summary.failed)
    rows = manifest[manifest["id"].isin(reasons)]
    table = rows.assign(reason=rows["id"].map(reasons))
    return table.reindex(columns=FAILURE_COLUMNS).reset_index(drop=True)
