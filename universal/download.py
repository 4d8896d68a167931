"""Download public datasets with checksums, resume and retries, and extract their archives safely.

The catalog (``config/datasets.yaml``) says how each dataset is obtained (its ``source``); this module does it:

- :func:`fetch` streams one URL to ``<dest>.partial``, resumes an interrupted download with an HTTP ``Range``
  request, retries transient failures with exponential backoff, verifies the checksum and only then renames the
  file to ``dest``. A file whose checksum the catalog does not know yet gets one recorded in ``<dest>.sha256``
  (with a WARNING), so every later run verifies it.
- :func:`safe_extract` unpacks a tar or zip archive after checking every member (no absolute paths, no ``..``,
  no links, no device files) and renames the result into place only when complete.
- :func:`check_manual` says what is missing from a dataset that must be downloaded by hand.
- :func:`download_dataset` dispatches on the catalog entry's ``source.kind``.

A local mirror (``mirror=`` or the ``UNIVERSAL_MIRROR`` environment variable) replaces the scheme and host of
every URL, for sites that keep copies of the public datasets (and for tests on 127.0.0.1).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import stat
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from universal.catalog import CatalogError, DatasetEntry, find_cases

log = logging.getLogger(__name__)

MIRROR_ENV = "UNIVERSAL_MIRROR"
USER_AGENT = "universal-download/0.1 (+https://github.com/; python urllib)"
PROGRESS_EVERY_S = 5.0
MAX_BACKOFF_S = 120.0
# Statuses worth trying again: the server is busy or broken for now, not refusing us for good.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
ZENODO_URL = "https://zenodo.org/records/{record}/files/{name}?download=1"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ZIP_SUFFIXES = (".zip",)


class DownloadError(RuntimeError):
    """A download, a checksum, an archive or a manual dataset failed; the message says which and why."""


class _Retry(Exception):
    """A transient failure of one attempt: the download is tried again after a pause."""


# ----------------------------------------------------------------------------------------------------------
# Checksums


def file_digests(path: Path, algorithms: tuple[str, ...] = ("sha256",), chunk: int = 1 << 20) -> dict[str, str]:
    """Hex digests of a file for each hashlib algorithm name, in one pass over the file."""
    hashers = {name: hashlib.new(name) for name in algorithms}
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            for hasher in hashers.values():
                hasher.update(block)
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


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
    tmp = record.with_name(record.name + ".partial")
    tmp.write_text(f"{digest}  {dest.name}\n")  # the format of sha256sum, so `sha256sum -c` can check it too
    tmp.replace(record)


def _mismatches(digests: dict[str, str], expected: dict[str, str]) -> list[str]:
    return [f"expected {name} {want}, got {digests[name]}" for name, want in expected.items()
            if digests[name] != want]


# ----------------------------------------------------------------------------------------------------------
# One file over HTTP(S)


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
          backoff_s: float = 1.0, timeout_s: float = 60, chunk: int = 1 << 20) -> Path:
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
    """
    dest = Path(dest)
    expected = {name: value.strip().lower() for name, value in (("sha256", sha256), ("md5", md5)) if value}
    recorded = _read_record(dest) if not sha256 else None
    if recorded:
        expected["sha256"] = recorded
    algorithms = tuple(dict.fromkeys(("sha256", *expected)))
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
    _download(url, partial, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s, chunk=chunk)
    digests = file_digests(partial, algorithms)
    problems = _mismatches(digests, expected)
    if problems:
        partial.unlink()
        source = f" (recorded in {checksum_record(dest)})" if recorded else ""
        raise DownloadError(f"{url}: checksum mismatch: {'; '.join(problems)}{source}; the download was deleted")
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


# ----------------------------------------------------------------------------------------------------------
# Archives


def archive_kind(path: Path) -> str | None:
    """``"tar"`` or ``"zip"`` by the file name's suffix, or None for a file that is not an archive."""
    name = Path(path).name.lower()
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    if name.endswith(ZIP_SUFFIXES):
        return "zip"
    return None


def _path_problem(name: str) -> str | None:
    """Why a member name (or catalog file name) is unsafe as a relative path, or None when it is safe."""
    if not name or "\x00" in name:
        return "an empty name or a NUL byte"
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        return "an absolute path"
    if ".." in re.split(r"[\\/]+", name):
        return "a '..' component"
    return None


def _tar_problem(member: tarfile.TarInfo) -> str | None:
    if member.issym() or member.islnk():
        return f"a link (to {member.linkname!r}); links are refused"
    if not (member.isfile() or member.isdir()):
        return "a device file, FIFO or other special file"
    return _path_problem(member.name)


def _zip_problem(info: zipfile.ZipInfo) -> str | None:
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        return "a link; links are refused"
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "a device file, FIFO or other special file"
    return _path_problem(info.filename)


def safe_extract(archive: Path, target: Path) -> list[Path]:
    """Extract a .tar(.gz/.bz2/.xz), .tgz or .zip archive into ``target`` and return the extracted files.

    Every member is checked before anything is written: absolute paths, ``..`` components, links of any kind
    (symbolic or hard: refused altogether, since no dataset needs them and they could point outside
    ``target``) and device files or FIFOs raise :class:`DownloadError` naming the archive and the member.
    The archive is extracted into ``<target>.partial`` (tar with the ``"data"`` filter where Python has it),
    which is renamed to ``target`` when complete; ``target`` must not exist or be an empty folder.
    Compressed tars are read twice (once to check, once to extract).
    """
    archive, target = Path(archive), Path(target)
    kind = archive_kind(archive)
    if kind is None:
        raise DownloadError(f"{archive}: not a supported archive (expected one of {TAR_SUFFIXES + ZIP_SUFFIXES})")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DownloadError(f"{archive}: cannot extract into {target}: it exists and is not an empty folder")
    partial = target.with_name(target.name + ".partial")
    try:
        if kind == "tar":
            files = _extract_tar(archive, partial)
        else:
            files = _extract_zip(archive, partial)
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise DownloadError(f"{archive}: cannot extract: {err}") from err
    except DownloadError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if target.exists():
        target.rmdir()
    partial.replace(target)
    log.info("%s: extracted %d files into %s", archive, len(files), target)
    return [target / name for name in files]


def _refuse(archive: Path, name: str, problem: str) -> None:
    raise DownloadError(f"{archive}: refusing to extract member {name!r}: {problem}; nothing was extracted")


def _extract_tar(archive: Path, partial: Path) -> list[str]:
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for member in members:
            if problem := _tar_problem(member):
                _refuse(archive, member.name, problem)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        if hasattr(tarfile, "data_filter"):
            tar.extractall(partial, members=members, filter="data")
        else:  # Python < 3.10.12 / 3.11.4: every member was checked above
            tar.extractall(partial, members=members)
    return sorted(m.name for m in members if m.isfile())


def _extract_zip(archive: Path, partial: Path) -> list[str]:
    with zipfile.ZipFile(archive) as zipped:
        infos = zipped.infolist()
        for info in infos:
            if problem := _zip_problem(info):
                _refuse(archive, info.filename, problem)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        zipped.extractall(partial, members=infos)
    return sorted(i.filename for i in infos if not i.is_dir())


# ----------------------------------------------------------------------------------------------------------
# Datasets


def check_manual(entry: DatasetEntry, root: Path) -> list[str]:
    """What is missing from a dataset downloaded by hand into ``root`` (an empty list when it is complete).

    Checks that the folder exists, that every path or glob in ``source.expected`` (relative to ``root``)
    matches, and that :func:`universal.catalog.find_cases` finds the cases of the entry's layout.
    """
    root = Path(root)
    if not root.is_dir():
        return [f"the dataset folder {root} does not exist"]
    problems = []
    for pattern in entry.source.get("expected") or []:
        if _path_problem(str(pattern)) or not any(root.glob(str(pattern))):
            problems.append(f"expected {pattern!r} in {root}: not found")
    try:
        find_cases(entry, root)
    except CatalogError as err:
        problems.append(str(err))
    return problems


def resolve_mirror(mirror: str | None) -> str | None:
    """The mirror to use: the argument if given, else the ``UNIVERSAL_MIRROR`` environment variable, else None."""
    return mirror if mirror is not None else (os.environ.get(MIRROR_ENV) or None)


def apply_mirror(url: str, mirror: str | None) -> str:
    """Replace the scheme and host of ``url`` by the mirror's (``http://host[:port][/prefix]``); keep the path."""
    if not mirror:
        return url
    base, parts = urlsplit(mirror), urlsplit(url)
    if base.scheme not in ("http", "https") or not base.netloc:
        raise DownloadError(f"mirror {mirror!r} must look like http(s)://host[:port][/prefix]")
    return urlunsplit((base.scheme, base.netloc, base.path.rstrip("/") + parts.path, parts.query, parts.fragment))


def download_dataset(entry: DatasetEntry, root: Path, *, mirror: str | None = None, downloads: Path | None = None,
                     retries: int = 5, backoff_s: float = 1.0, timeout_s: float = 60) -> Path:
    """Obtain the dataset of a catalog entry into its folder ``root`` and return ``root``.

    By ``source.kind``:

    - ``url``: ``url``, optional ``sha256``/``md5``, optional ``filename`` (default: the URL's last path
      segment), optional ``archive: true`` to extract the file into ``root``;
    - ``zenodo``: ``record`` (int) and ``files``: a list of ``{name, md5 or sha256, archive (optional),
      into (optional folder under root for an archive, default its name without the suffix)}``;
    - ``idc``: ``collection``, downloaded with the ``idc-index`` package (DICOM series);
    - ``manual``: verified with :func:`check_manual`; raises with the problems and ``instructions``;
    - ``generated``: nothing to do (``universal demo-data`` writes it).

    Plain files go straight into ``root``; archives are kept in ``downloads`` (default
    ``<root's parent>/.downloads/<key>``) and extracted atomically. An archive whose target folder already
    has content is not fetched again. ``mirror`` (default: ``$UNIVERSAL_MIRROR``) replaces every URL's
    scheme and host.
    """
    root = Path(root)
    kind = entry.source.get("kind")
    mirror = resolve_mirror(mirror)
    downloads = Path(downloads) if downloads is not None else root.parent / ".downloads" / entry.key
    options = {"retries": retries, "backoff_s": backoff_s, "timeout_s": timeout_s}
    if kind == "generated":
        log.info("dataset %r is generated locally (universal demo-data); nothing to download", entry.key)
    elif kind == "manual":
        _require_manual(entry, root)
    elif kind == "url":
        _download_url(entry, root, downloads, mirror, options)
    elif kind == "zenodo":
        _download_zenodo(entry, root, downloads, mirror, options)
    elif kind == "idc":
        _download_idc(entry, root)
    else:
        raise DownloadError(f"dataset {entry.key!r}: unknown source kind {kind!r}")
    return root


def _require_manual(entry: DatasetEntry, root: Path) -> None:
    problems = check_manual(entry, root)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        instructions = entry.source.get("instructions") or "(the catalog gives no instructions)"
        raise DownloadError(f"dataset {entry.key!r} ({entry.name}) must be downloaded by hand and is not complete "
                            f"in {root}:\n{listed}\nHow to get it: {instructions}")
    log.info("dataset %r: the manual download in %s is complete", entry.key, root)


def _checksums(entry: DatasetEntry, spec: dict) -> dict[str, str | None]:
    sha256, md5 = spec.get("sha256"), spec.get("md5")
    for name, value in (("sha256", sha256), ("md5", md5)):
        if value is not None and not re.fullmatch(r"[0-9a-fA-F]+", str(value)):
            raise DownloadError(f"dataset {entry.key!r}: {name} {value!r} is not a hex digest")
    return {"sha256": sha256, "md5": md5}


def _safe_name(entry: DatasetEntry, name: str) -> str:
    if problem := _path_problem(name):
        raise DownloadError(f"dataset {entry.key!r}: file name {name!r} is unsafe: {problem}")
    return name


def _fetch_into(entry: DatasetEntry, url: str, name: str, checks: dict, root: Path, downloads: Path,
                archive: bool, into: str, options: dict) -> None:
    """Fetch one file into ``root``, or fetch an archive into ``downloads`` and extract it to ``root/into``."""
    if not archive:
        fetch(url, root / name, checks["sha256"], md5=checks["md5"], **options)
        return
    target = root / into
    if target.is_dir() and any(target.iterdir()):
        log.info("dataset %r: %s already has content; not downloading %s again", entry.key, target, name)
        return
    path = fetch(url, downloads / name, checks["sha256"], md5=checks["md5"], **options)
    safe_extract(path, target)


def _download_url(entry: DatasetEntry, root: Path, downloads: Path, mirror: str | None, options: dict) -> None:
    source = entry.source
    if not source.get("url"):
        raise DownloadError(f"dataset {entry.key!r}: source kind 'url' needs a 'url'")
    name = source.get("filename") or unquote(PurePosixPath(urlsplit(source["url"]).path).name)
    if not name:
        raise DownloadError(f"dataset {entry.key!r}: cannot name the file of {source['url']}: give 'filename'")
    _fetch_into(entry, apply_mirror(source["url"], mirror), _safe_name(entry, name), _checksums(entry, source),
                root, downloads, bool(source.get("archive")), ".", options)


def _download_zenodo(entry: DatasetEntry, root: Path, downloads: Path, mirror: str | None, options: dict) -> None:
    record, files = entry.source.get("record"), entry.source.get("files")
    if not isinstance(record, int) or isinstance(record, bool):
        raise DownloadError(f"dataset {entry.key!r}: zenodo 'record' must be an integer, got {record!r}")
    if not files or not all(isinstance(f, dict) and f.get("name") for f in files):
        raise DownloadError(f"dataset {entry.key!r}: zenodo 'files' must be a list of {{name, md5 or sha256}}")
    for spec in files:
        name = _safe_name(entry, str(spec["name"]))
        url = apply_mirror(ZENODO_URL.format(record=record, name=quote(name)), mirror)
        archive = bool(spec.get("archive"))
        into = spec.get("into") or _strip_archive_suffix(PurePosixPath(name).name)
        _fetch_into(entry, url, name, _checksums(entry, spec), root, downloads, archive, _safe_name(entry, into),
                    options)


def _strip_archive_suffix(name: str) -> str:
    for suffix in TAR_SUFFIXES + ZIP_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _download_idc(entry: DatasetEntry, root: Path) -> None:
    """Download an IDC collection's DICOM series into ``root/<source.dicom_dir>`` (default ``dicom``), then, with
    ``source.convert`` (``image``: a template of DICOM attributes under ``root``, ``modality``: default CT),
    convert each series to NIfTI (:mod:`universal.dicom_convert`). Series that fail are reported and left out;
    the layout check of the dataset then names the cases that are missing."""
    collection = entry.source.get("collection")
    if not collection:
        raise DownloadError(f"dataset {entry.key!r}: source kind 'idc' needs a 'collection'")
    convert = entry.source.get("convert")
    if convert is not None and not (isinstance(convert, dict) and convert.get("image")):
        raise DownloadError(f"dataset {entry.key!r}: source.convert must be a mapping with an 'image' template")
    try:
        from idc_index import IDCClient
    except ImportError:
        try:
            from idc_index.index import IDCClient
        except ImportError as err:
            raise DownloadError(f"dataset {entry.key!r} comes from the NCI Imaging Data Commons collection "
                                f"{collection!r}; downloading it needs the idc-index package: "
                                f"pip install idc-index") from err
    dicom_dir = _dicom_dir(entry, root)
    dicom_dir.mkdir(parents=True, exist_ok=True)
    log.info("dataset %r: downloading IDC collection %r into %s", entry.key, collection, dicom_dir)
    IDCClient().download_from_selection(collection_id=collection, downloadDir=str(dicom_dir))
    if convert is not None:
        convert_idc_download(entry, root)


def convert_idc_download(entry: DatasetEntry, root: Path) -> list:
    """Convert the downloaded DICOM series of an IDC entry to NIfTI as its ``source.convert`` says; returns the
    per-series results (also in ``root/conversion.tsv``)."""
    from universal.dicom_convert import ConversionError, convert_series

    convert = entry.source["convert"]
    try:
        results = convert_series(_dicom_dir(entry, root), root, str(convert["image"]),
                                 str(convert.get("modality", "CT")))
    except ConversionError as err:
        raise DownloadError(f"dataset {entry.key!r}: {err}") from err
    failed = [r for r in results if r.status == "failed"]
    if failed:
        log.warning("dataset %r: %d series could not be converted (see %s): %s", entry.key, len(failed),
                    root / "conversion.tsv", "; ".join(f"{r.folder}: {r.error}" for r in failed[:5]))
    return results


def _dicom_dir(entry: DatasetEntry, root: Path) -> Path:
    """Where an IDC entry's DICOM series go: ``root/<source.dicom_dir>`` (default ``dicom``), inside ``root``."""
    relative = str(entry.source.get("dicom_dir", "dicom"))
    if _path_problem(relative):
        raise DownloadError(f"dataset {entry.key!r}: {relative!r} must be a relative path inside the dataset folder")
    return root / relative
