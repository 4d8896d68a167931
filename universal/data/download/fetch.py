"""One file over HTTP(S): resumable, retried with backoff, checksum-verified, renamed when complete."""

from __future__ import annotations

import http.client
import logging
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from universal.core.atomic import atomic_output, disk_full_error
from universal.core.digests import file_digests
from universal.data.download.errors import DownloadError

log = logging.getLogger(__name__)

USER_AGENT = "universal-download/0.1 (+https://github.com/; python urllib)"
PROGRESS_EVERY_S = 5.0
MAX_BACKOFF_S = 120.0
# Statuses worth trying again: the server is busy or broken for now, not refusing us for good.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
HTML_SUFFIXES = (".html", ".htm")
HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body")
SNIFF_BYTES = 1024


class _Retry(Exception):
    """A transient failure of one attempt: the download is tried again after a pause."""


def checksum_record(dest: Path) -> Path:
    """Where the sha256 of a download whose checksum the catalog does not give is recorded."""
    return dest.with_name(dest.name + ".sha256")


def _read_record(dest: Path) -> str | None:
    record = checksum_record(dest)
    if not record.is_file():
        return None
    words = record.read_text().split()
    return words[0].lower() if words else None


def _write_record(dest: Path, digest: str) -> None:
    record = checksum_record(dest)
    with atomic_output(record) as tmp:
        tmp.write_text(f"{digest}  {dest.name}\n")  # the format of sha256sum, so `sha256sum -c` can check it too


def html_page_title(path: Path) -> str | None:
    """The title (or "" without one) of ``path`` when its first bytes are an HTML page, else None."""
    with Path(path).open("rb") as handle:
        head = handle.read(SNIFF_BYTES)
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if not start.startswith(HTML_STARTS):
        return None
    match = re.search(rb"<title[^>]*>([^<]*)", head, flags=re.IGNORECASE)
    return match[1].decode("utf-8", "replace").strip() if match else ""


def _refuse_html(url: str, dest: Path, title: str) -> DownloadError:
    return DownloadError(f"{url}: the server returned an HTML page (title {title!r}) instead of {dest.name}: a login, "
                         "consent or error page? Nothing was kept and no checksum was recorded. Check the URL and your "
                         f"access; for a login-gated file, download it in a browser and put it at {dest}")


def _mismatches(digests: dict[str, str], expected: dict[str, str]) -> list[str]:
    return [f"expected {name} {want}, got {digests[name]}" for name, want in expected.items()
            if digests[name] != want]


class _Progress:
    """Progress lines on stderr (bytes, percent, MB/s), at most one every ``PROGRESS_EVERY_S`` seconds."""

    def __init__(self, name: str, start_bytes: int):
        self.name = name
        self.start_bytes = start_bytes
        self.started = self.last = time.monotonic()

    def update(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        rate = (done - self.start_bytes) / max(now - self.started, 1e-9) / 1e6
        of_total = f" of {total / 1e6:.1f} MB ({100 * done / total:.0f}%)" if total else ""
        print(f"{self.name}: {done / 1e6:.1f} MB{of_total}, {rate:.1f} MB/s", file=sys.stderr, flush=True)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a ``Content-Range: bytes A-B/T`` (or ``bytes */T``) header."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    first, total = match.groups()
    return (int(first) if first else None), (int(total) if total != "*" else None)


def _attempt(url: str, partial: Path, timeout_s: float, chunk: int) -> None:
    """One try at completing ``partial``: resume from its size; raise :class:`_Retry` on a transient failure."""
    offset = partial.stat().st_size if partial.exists() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and offset:
            if _content_range(err.headers.get("Content-Range"))[1] == offset:
                return  # the partial file already holds every byte
            partial.unlink()
            raise _Retry(f"HTTP 416 for a resume at byte {offset}; starting again from zero") from err
        if err.code in RETRY_STATUSES or err.code >= 500:
            raise _Retry(f"HTTP {err.code} {err.reason}") from err
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason} (not retried: check the URL, and that the "
                            f"file is public or your access to it)") from err
    with response:
        if offset and response.status == 206:
            first, total = _content_range(response.headers.get("Content-Range"))
            if first != offset:
                partial.unlink()
                raise _Retry(f"the server resumed at byte {first}, not {offset}; starting again from zero")
            mode = "ab"
        elif response.status == 200:
            if offset:
                log.info("%s: the server ignored the Range request; downloading again from zero", url)
            offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        else:
            raise _Retry(f"unexpected HTTP status {response.status}")
        done = offset
        progress = _Progress(PurePosixPath(urlsplit(url).path).name or url, offset)
        with partial.open(mode) as out:
            while block := response.read(chunk):
                out.write(block)
                done += len(block)
                progress.update(done, total)
    if total is not None and done != total:
        if done > total:
            partial.unlink()
        raise _Retry(f"incomplete download: {done} of {total} bytes")


def _download(url: str, partial: Path, *, retries: int, backoff_s: float, timeout_s: float, chunk: int) -> None:
    """Complete ``partial`` with up to ``retries`` further attempts after the first, pausing 1, 2, 4, ... x backoff."""
    for attempt in range(retries + 1):
        try:
            _attempt(url, partial, timeout_s, chunk)
            return
        except (_Retry, urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as err:
            reason = getattr(err, "reason", None) or err
            if attempt == retries:
                kept = f"; {partial} is kept so the next run resumes" if partial.exists() else ""
                raise DownloadError(f"{url}: download failed after {retries + 1} attempts, last: {reason}{kept}") \
                    from err
            pause = min(backoff_s * 2**attempt, MAX_BACKOFF_S)
            log.warning("%s: attempt %d of %d failed (%s); retrying in %.1f s", url, attempt + 1, retries + 1,
                        reason, pause)
            time.sleep(pause)


def fetch(url: str, dest: Path, sha256: str | None, *, md5: str | None = None, retries: int = 5,
          backoff_s: float = 1.0, timeout_s: float = 60, chunk: int = 1 << 20,
          validate: Callable[[Path], None] | None = None) -> Path:
    """Download ``url`` to ``dest`` (resumable, retried, verified) and return ``dest``.

    The bytes go to ``<dest>.partial``, which a later call resumes with a ``Range`` request (a server that
    ignores it answers 200 and the download starts again from zero). Connection errors, incomplete bodies and
    HTTP 5xx/408/429 are retried ``retries`` times with exponential backoff starting at ``backoff_s`` seconds;
    other HTTP errors (404, 403, ...) raise :class:`DownloadError` at once. The file is renamed to ``dest``
    only when complete and verified against ``sha256`` and/or ``md5`` (hex; Zenodo publishes md5). On a
    mismatch the partial file is deleted and :class:`DownloadError` names the URL and both digests.

    With no ``sha256`` the digest is computed and recorded in ``<dest>.sha256`` so later runs verify it (with
    a WARNING when no checksum at all was known: put the logged digest into the catalog). An existing
    ``dest`` that matches the known checksums is kept without any network access; one that does not match is
    downloaded again.

    A download that is an HTML page (unless ``dest`` is named .html) is a login, consent or error page served
    instead of the file: it is deleted and :class:`DownloadError` says so, before any checksum is recorded; an
    existing ``dest`` that is such a page (recorded by an earlier version) is downloaded again. ``validate``, when
    given, checks the completed download (e.g. that an archive opens) and raises :class:`DownloadError` to refuse
    it, again before anything is kept or recorded.
    """
    dest = Path(dest)
    expected = {name: value.strip().lower() for name, value in (("sha256", sha256), ("md5", md5)) if value}
    recorded = _read_record(dest) if not sha256 else None
    if recorded:
        expected["sha256"] = recorded
    algorithms = tuple(dict.fromkeys(("sha256", *expected)))
    if dest.is_file() and not dest.name.lower().endswith(HTML_SUFFIXES) and html_page_title(dest) is not None:
        log.warning("%s is an HTML page, not the file; downloading it again", dest)
        dest.unlink()
        if recorded:  # the page's checksum, recorded by an earlier version: forget it
            checksum_record(dest).unlink()
            expected.pop("sha256")
            recorded = None
    if dest.is_file():
        digests = file_digests(dest, algorithms)
        problems = _mismatches(digests, expected)
        if not problems:
            if not expected:
                _record_unknown(url, dest, digests["sha256"])
            log.info("%s: already present and verified", dest)
            return dest
        log.warning("%s exists but does not match (%s); downloading it again", dest, "; ".join(problems))
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    started = time.monotonic()
    try:
        _download(url, partial, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s, chunk=chunk)
    except OSError as err:
        if (full := disk_full_error(err, partial, "what was downloaded is kept, so the next run resumes")) is None:
            raise
        raise full from err
    if not dest.name.lower().endswith(HTML_SUFFIXES) and (title := html_page_title(partial)) is not None:
        partial.unlink()
        raise _refuse_html(url, dest, title)
    digests = file_digests(partial, algorithms)
    problems = _mismatches(digests, expected)
    if problems:
        partial.unlink()
        source = f" (recorded in {checksum_record(dest)})" if recorded else ""
        raise DownloadError(f"{url}: checksum mismatch: {'; '.join(problems)}{source}; the download was deleted")
    if validate is not None:
        try:
            validate(partial)
        except DownloadError as err:
            partial.unlink()
            raise DownloadError(f"{url}: {err}; nothing was kept and no checksum was recorded. Check the URL and "
                                "your access, then rerun") from err
    size = partial.stat().st_size
    partial.replace(dest)
    seconds = max(time.monotonic() - started, 1e-9)
    log.info("%s: %.1f MB in %.1f s (%.1f MB/s), verified", dest, size / 1e6, seconds, size / 1e6 / seconds)
    if not expected:
        _record_unknown(url, dest, digests["sha256"])
    elif not sha256:
        _write_record(dest, digests["sha256"])
    return dest


def _record_unknown(url: str, dest: Path, digest: str) -> None:
    _write_record(dest, digest)
    log.warning("%s: no checksum was known for this file; recorded sha256 %s in %s now, so later runs verify it "
                "(add `sha256: %s` to the dataset's catalog entry)", url, digest, checksum_record(dest), digest)
