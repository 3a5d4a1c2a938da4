"""A local fake of the GDC and NBIA APIs (http.server in a thread), with scripted faults.

GDC: POST /files and /cases evaluate the request's "and"/"in" filters over the stored hits and
page them by from/size; GET /data/{id} serves file bytes, honouring `Range: bytes=N-` with 206.
NBIA: GET /getSeries?Collection=... and /getImage?SeriesInstanceUID=... (a zip per series).
Any other GET path is served from `blobs`. Faults are queued per file id / series uid and
consumed one per request:

* "drop"    send the headers for the whole answer, half the body, then close the connection
* "corrupt" send the right number of bytes with one byte flipped (md5 mismatch)
* (status, headers, body)  answer with that status instead, e.g. (429, {"Retry-After": "1"}, "")
* {"headers": {...}}  answer normally, with these extra headers (e.g. a Content-Disposition)

Every request is recorded (method, path, query, headers, JSON body, answered status).
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pandas as pd
import pytest

from mgi.acquire import http as acquire_http
from mgi.acquire.gdc import MANIFEST_COLUMNS


@dataclass
class Seen:
    """One request the fake server answered."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: dict | None
    status: int = 0


@dataclass
class FakeApi:
    """State of the fake server; tests fill it and read `seen`."""

    url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    faults: dict[str, list] = field(default_factory=dict)
    file_hits: list[dict] = field(default_factory=list)
    case_hits: list[dict] = field(default_factory=list)
    series: list[dict] = field(default_factory=list)
    zips: dict[str, list[bytes]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @staticmethod
    def manifest(rows: list[dict]) -> pd.DataFrame:
        """A manifest DataFrame of the given rows."""
        return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)

    @staticmethod
    def zip(members: dict[str, bytes]) -> bytes:
        """A zip archive holding the given members (names written verbatim, unchecked)."""
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as zf:
            for name, data in members.items():
                zf.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data)
        return buffer.getvalue()

    def add_file(self, file_id: str, content: bytes, *, case_id: str = "TCGA-AA-0001",
                 data_type: str = "Gene Expression Quantification",
                 sample_type: str = "Primary Tumor") -> dict:
        """Serve `content` as GDC file `file_id`; return its manifest row."""
        self.files[file_id] = content
        folder = "expression" if data_type.startswith("Gene") else "slides"
        name = f"{file_id}.tsv"
        return {
            "id": file_id, "filename": name, "md5": hashlib.md5(content).hexdigest(),
            "size": len(content), "state": "released", "case_id": case_id,
            "data_type": data_type, "sample_type": sample_type,
            "path": f"{folder}/{file_id}/{name}", "sample_barcode": f"{case_id}-01A",
        }

    @staticmethod
    def file_hit(file_id: str, *, case_id: str, sample: str, sample_type: str = "Primary Tumor",
                 data_type: str = "Gene Expression Quantification", content: bytes = b"x",
                 project: str = "TCGA-AA", workflow: str = "STAR - Counts",
                 strategy: str = "RNA-Seq", access: str = "open") -> dict:
        """A GDC /files hit with the fields the acquire code asks for."""
        return {
            "id": file_id, "file_id": file_id, "file_name": f"{file_id}.counts.tsv",
            "md5sum": hashlib.md5(content).hexdigest(), "file_size": len(content),
            "state": "released", "access": access, "data_type": data_type,
            "experimental_strategy": strategy, "analysis": {"workflow_type": workflow},
            "cases": [{"submitter_id": case_id, "project": {"project_id": project},
                       "samples": [{"submitter_id": sample, "sample_type": sample_type}]}],
        }

    @staticmethod
    def always(fault: object) -> Persistent:
        """Wrap a fault so that it repeats for every later request of its key."""
        return Persistent(fault)

    def requests_to(self, prefix: str) -> list[Seen]:
        """The recorded requests whose path starts with `prefix`."""
        with self.lock:
            return [s for s in self.seen if s.path.startswith(prefix)]

    def next_fault(self, key: str):
        with self.lock:
            queue = self.faults.get(key) or []
            if not queue:
                return None
            fault = queue[0]
            if len(queue) > 1 or not isinstance(fault, Persistent):
                queue.pop(0)
            return fault.fault if isinstance(fault, Persistent) else fault


@dataclass(frozen=True)
class Persistent:
    """A fault repeated for every request once it is reached."""

    fault: object


def _values(obj: object, dotted: str) -> list:
    items = [obj]
    for part in dotted.split("."):
        found = []
        for item in items:
            value = item.get(part) if isinstance(item, dict) else None
            if isinstance(value, list):
                found.extend(value)
            elif value is not None:
                found.append(value)
        items = found
    return items


def matches(hit: dict, flt: dict) -> bool:
    """Evaluate a GDC filter ("and" of "in") on one hit."""
    op, content = flt["op"], flt["content"]
    if op == "and":
        return all(matches(hit, part) for part in content)
    if op == "in":
        return bool(set(map(str, _values(hit, content["field"]))) & set(content["value"]))
    raise ValueError(f"fake GDC: unsupported filter op {op!r}")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    api: FakeApi

    def log_message(self, format: str, *args: object) -> None:  # silence the default stderr log
        pass

    def _record(self, body: dict | None) -> Seen:
        parts = urlsplit(self.path)
        seen = Seen(self.command, parts.path, parse_qs(parts.query), dict(self.headers), body)
        with self.api.lock:
            self.api.seen.append(seen)
        return seen

    def _send(self, seen: Seen, status: int, body: bytes, headers: dict | None = None,
              content_type: str = "application/json") -> None:
        seen.status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _fault(self, seen: Seen, key: str) -> object:
        """The next fault of `key`; a status fault is answered here and gives "answered"."""
        fault = self.api.next_fault(key)
        if isinstance(fault, tuple):
            status, headers, text = fault
            text = text.replace("{token}", self.headers.get("X-Auth-Token", ""))
            self._send(seen, status, text.encode(), headers, "text/plain")
            return "answered"
        return fault

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        seen = self._record(body)
        endpoint = seen.path.rstrip("/").rsplit("/", 1)[-1]
        if endpoint not in ("files", "cases"):
            self._send(seen, 404, b'{"message": "no such endpoint"}')
            return
        if self._fault(seen, endpoint) == "answered":
            return
        hits = self.api.file_hits if endpoint == "files" else self.api.case_hits
        hits = [h for h in hits if matches(h, body["filters"])]
        start, size = int(body.get("from", 0)), int(body.get("size", 10))
        page = hits[start:start + size]
        answer = {"data": {"hits": page, "pagination": {
            "count": len(page), "total": len(hits), "from": start, "size": size}},
            "warnings": {}}
        self._send(seen, 200, json.dumps(answer).encode())

    def do_GET(self) -> None:
        seen = self._record(None)
        if seen.path.startswith("/data/"):
            self._data(seen, seen.path[len("/data/"):])
        elif seen.path.endswith("/getSeries"):
            collection = seen.query.get("Collection", [""])[0]
            rows = [s for s in self.api.series if s.get("Collection") == collection]
            self._send(seen, 200, json.dumps(rows).encode() if rows else b"")
        elif seen.path.endswith("/getImage"):
            uid = seen.query.get("SeriesInstanceUID", [""])[0]
            if self._fault(seen, uid) == "answered":
                return
            versions = self.api.zips.get(uid)
            if not versions:
                self._send(seen, 404, b"unknown series", content_type="text/plain")
                return
            with self.api.lock:
                data = versions.pop(0) if len(versions) > 1 else versions[0]
            self._send(seen, 200, data, content_type="application/zip")
        elif seen.path in self.api.blobs:
            self._send(seen, 200, self.api.blobs[seen.path], content_type="application/zip")
        else:
            self._send(seen, 404, b"not found", content_type="text/plain")

    def _data(self, seen: Seen, file_id: str) -> None:
        fault = self._fault(seen, file_id)
        if fault == "answered":
            return
        content = self.api.files.get(file_id)
        if content is None:
            self._send(seen, 404, b'{"message": "file not found"}')
            return
        start = 0
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes="):
            start = int(ranged[len("bytes="):].split("-")[0])
            if start >= len(content):
                self._send(seen, 416, b"", {"Content-Range": f"bytes */{len(content)}"})
                return
        body = content[start:]
        extra = fault.get("headers", {}) if isinstance(fault, dict) else {}
        if fault == "corrupt":
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        status = 206 if start else 200
        headers = {"Content-Range": f"bytes {start}-{len(content) - 1}/{len(content)}"} \
            if start else {}
        headers.update(extra)
        if fault != "drop":
            self._send(seen, status, body, headers, "application/octet-stream")
            return
        seen.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def fake_api():
    """A running fake GDC/NBIA server on 127.0.0.1 (port chosen by the OS); its state object."""
    api = FakeApi()
    handler = type("Handler", (_Handler,), {"api": api})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record (instead of waiting) every backoff sleep of the acquire code."""
    slept: list[float] = []
    monkeypatch.setattr(acquire_http.time, "sleep", slept.append)
    return slept


def study_listing(truth, *, collection: str = "TCGA-LGG") -> list[dict]:
    """A generated study's series as NBIA's getSeries lists them (one row per series)."""
    rows = []
    for uid, series in sorted(truth.series.items()):
        files = sorted(p for p in series.folder.iterdir() if p.suffix == ".dcm")
        rows.append({"SeriesInstanceUID": uid, "PatientID": truth.case_id, "Modality": "MR",
                     "SeriesDescription": series.description, "ImageCount": len(files),
                     "Collection": collection, "StudyInstanceUID": series.study_uid})
    return rows


def zip_folder(folder) -> bytes:
    """The .dcm files of a series folder as the zip NBIA's getImage answers."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.glob("*.dcm")):
            archive.write(path, arcname=path.name)
    return buffer.getvalue()
