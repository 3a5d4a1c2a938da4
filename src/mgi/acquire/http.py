"""HTTP plumbing shared by the GDC and TCIA clients: sessions, retries, safe paths and archives.

requests has no retry policy of its own, and urllib3's `Retry` (mounted through an HTTPAdapter)
retries only the request, not a body stream that breaks half way, which is where large downloads
fail; so the loop below is written by hand and used both for plain requests (`send`) and, with
the same classification of errors, by the resumable downloads in `mgi.acquire.gdc`.

Secrets: a token lives only in the session's `X-Auth-Token` header. Every message that could
quote a server answer goes through `redact`, so a server that echoes the token back cannot put
it in a log line or an error.
"""

from __future__ import annotations

import email.utils
import logging
import os
import re
import shutil
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath, PureWindowsPath

import requests

from mgi.errors import AcquireError

log = logging.getLogger(__name__)

TOKEN_HEADER = "X-Auth-Token"
USER_AGENT = "mgi-acquire/0.1 (+requests)"
DEFAULT_TIMEOUT = (15.0, 300.0)  # connect, read (seconds between bytes)
MAX_DELAY_S = 300.0  # longest wait between two attempts, Retry-After included
# Errors worth another attempt: the network, a timeout, a body cut short.
TRANSIENT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)
_SNIPPET = 300


class TransientError(Exception):
    """One attempt failed in a way worth retrying (network, 429, 5xx, short or bad body)."""

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def new_session(*, token: str | None = None) -> requests.Session:
    """Return a requests Session with our User-Agent and, if given, the token header."""
    session = requests.Session()
    session.headers["User-Agent"] = USER_AGENT
    if token:
        session.headers[TOKEN_HEADER] = token
    return session


class SessionPerThread:
    """One Session per worker thread (Session is not documented as thread-safe); closes them all."""

    def __init__(self, *, token: str | None = None) -> None:
        self._token = token
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def get(self) -> requests.Session:
        """The calling thread's session, created on first use."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = new_session(token=self._token)
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        """Close every session handed out."""
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def __enter__(self) -> SessionPerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def redact(text: str, *sources: requests.Session | requests.PreparedRequest | str | None) -> str:
    """Return `text` with every token (a string, or a session's or request's header) as '***'."""
    for source in sources:
        secret = source if isinstance(source, str) else (
            source.headers.get(TOKEN_HEADER) if source is not None else None
        )
        if secret:
            text = text.replace(str(secret), "***")
    return text


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date); None if absent."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def check_status(response: requests.Response, *, what: str) -> None:
    """Return if the answer is a success; raise TransientError (429, 5xx) or AcquireError."""
    status = response.status_code
    if status < 400:
        return
    snippet = _body_snippet(response)
    reason = redact(f"HTTP {status} {response.reason or ''}".strip() + snippet, response.request)
    if status == 429 or status >= 500:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        response.close()
        raise TransientError(reason, retry_after=retry_after)
    response.close()
    raise AcquireError(f"{what}: {reason}")


def pause(attempt: int, *, backoff: float, retry_after: float | None) -> float:
    """Sleep before attempt `attempt + 1`: Retry-After if the server sent one, else exponential."""
    delay = retry_after if retry_after is not None else backoff * 2 ** attempt
    delay = min(max(delay, 0.0), MAX_DELAY_S)
    time.sleep(delay)
    return delay


def send(
    session: requests.Session,
    method: str,
    url: str,
    *,
    what: str,
    retries: int = 5,
    backoff: float = 0.5,
    timeout: tuple[float, float] = DEFAULT_TIMEOUT,
    **kwargs: object,
) -> requests.Response:
    """Return the successful response to one request, retried on transient failures.

    Retries (at most `retries` times) on connection errors, timeouts, 429 (waiting Retry-After
    seconds when given) and 5xx, with exponential backoff `backoff * 2**attempt`; any other
    4xx raises AcquireError at once. `what` names the request in messages.
    """
    for attempt in range(retries + 1):
        try:
            response = session.request(method, url, timeout=timeout, **kwargs)
            check_status(response, what=what)
            return response
        except TRANSIENT_ERRORS as err:
            failure = TransientError(redact(f"{type(err).__name__}: {err}", session))
        except TransientError as err:
            failure = err
        if attempt == retries:
            raise AcquireError(f"{what}: gave up after {retries + 1} attempts; "
                               f"last failure: {failure.reason}")
        delay = pause(attempt, backoff=backoff, retry_after=failure.retry_after)
        log.warning("%s: %s; retry %d/%d after %.1f s",
                    what, failure.reason, attempt + 1, retries, delay)
    raise AssertionError("unreachable")  # pragma: no cover


def safe_relative(root: str | os.PathLike[str], relative: str, *, what: str) -> Path:
    """Return root/relative, refusing absolute paths, drive letters, '..' and escaping links."""
    text = str(relative)
    posix = PurePosixPath(text.replace("\\", "/"))
    if (not text.strip() or posix.is_absolute() or PureWindowsPath(text).drive
            or ".." in posix.parts):
        raise AcquireError(f"{what}: path {text!r} is absolute or contains '..'; expected a "
                           f"path relative to {root} that stays inside it")
    root = Path(root)
    target = root.joinpath(*posix.parts)
    resolved_root = root.resolve()
    if not target.resolve().is_relative_to(resolved_root):
        raise AcquireError(f"{what}: path {text!r} resolves outside {root} (a symbolic link?)")
    return target


def extract_zip(
    archive: str | os.PathLike[str], dest: str | os.PathLike[str], *,
    keep_suffix: str | tuple[str, ...] | None = None, flatten: bool = False,
) -> list[Path]:
    """Extract a zip archive into `dest`; return the written files.

    Every member name is checked before anything is written: an absolute name, a drive letter or
    a '..' part rejects the whole archive (AcquireError), since zipfile.extract would silently
    rewrite such names instead. `keep_suffix` keeps only members ending so (case-insensitive;
    one suffix or a tuple of them);
    `flatten` drops the member's folders (two members with one name is then an error).
    """
    dest = Path(dest)
    suffixes = (keep_suffix,) if isinstance(keep_suffix, str) else keep_suffix
    suffixes = tuple(x.lower() for x in suffixes) if suffixes else None
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            targets: dict[Path, zipfile.ZipInfo] = {}
            for member in members:
                target = safe_relative(dest, member.filename, what=f"{archive}: member")
                if suffixes and not member.filename.lower().endswith(suffixes):
                    continue
                if flatten:
                    target = dest / target.name
                if target in targets:
                    raise AcquireError(f"{archive}: two members would be written to {target}")
                targets[target] = member
            for target, member in targets.items():
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
    except zipfile.BadZipFile as err:
        raise AcquireError(f"{archive}: not a valid zip archive ({err})") from err
    return list(targets)


@contextmanager
def temporary_dir(beside: Path) -> Iterator[Path]:
    """Yield a fresh hidden folder next to `beside` (same file system); removed afterwards."""
    import tempfile

    beside.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{beside.name}.", suffix=".partial", dir=beside.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(src: Path, dest: Path) -> None:
    """Move folder `src` onto `dest`, replacing any folder there (renames, no copy)."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(src, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dest)


def stream_to_file(
    session: requests.Session, url: str, path: Path, *, what: str, params: dict | None = None,
    timeout: tuple[float, float] = DEFAULT_TIMEOUT,
) -> int:
    """GET `url` into `path` in one attempt; return the bytes written (raises TransientError)."""
    try:
        with session.get(url, params=params, stream=True, timeout=timeout) as response:
            check_status(response, what=what)
            written = 0
            with path.open("wb") as out:
                for chunk in response.iter_content(1 << 16):
                    out.write(chunk)
                    written += len(chunk)
            return written
    except TRANSIENT_ERRORS as err:
        raise TransientError(redact(f"{type(err).__name__}: {err}", session)) from err


def _body_snippet(response: requests.Response) -> str:
    """The start of an error answer's body (read at most 2 kB, streamed or not)."""
    try:
        data = next(response.iter_content(2048), b"")
    except (requests.RequestException, RuntimeError):
        data = b""
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else str(data)
    text = re.sub(r"\s+", " ", text).strip()
    return f": {text[:_SNIPPET]}" if text else ""
