"""A catalog entry's dataset obtained as its ``source`` says: url, zenodo, idc, manual or generated."""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path, PurePosixPath
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from universal.core.atomic import atomic_output
from universal.core.paths import relative_path_problem
from universal.data.catalog import CatalogError, DatasetEntry, find_cases
from universal.data.download.archives import (
    TAR_SUFFIXES,
    ZIP_SUFFIXES,
    archive_kind,
    check_archive_opens,
    safe_extract,
)
from universal.data.download.errors import DownloadError
from universal.data.download.fetch import fetch

log = logging.getLogger(__name__)

MIRROR_ENV = "UNIVERSAL_MIRROR"
ZENODO_URL = "https://zenodo.org/records/{record}/files/{name}?download=1"


def check_manual(entry: DatasetEntry, root: Path) -> list[str]:
    """What is missing from a dataset downloaded by hand into ``root`` (an empty list when it is complete).

    Checks that the folder exists, that every path or glob in ``source.expected`` (relative to ``root``)
    matches, and that :func:`universal.data.catalog.find_cases` finds the cases of the entry's layout.
    """
    root = Path(root)
    if not root.is_dir():
        return [f"the dataset folder {root} does not exist"]
    problems = []
    for pattern in entry.source.get("expected") or []:
        if relative_path_problem(str(pattern)) or not any(root.glob(str(pattern))):
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
    - ``local``: a dataset already on disk (e.g. a private one): checked like ``manual``;
    - ``generated``: nothing to do (``universal demo-data`` writes it).

    Plain files go straight into ``root``; archives are kept in ``downloads`` (default
    ``<root's parent>/.downloads/<key>``) and extracted atomically; an archive already extracted (its
    :func:`extraction_marker`) is not fetched again, and a target folder with other content is an error.
    ``mirror`` (default: ``$UNIVERSAL_MIRROR``) replaces every URL's scheme and host.
    """
    root = Path(root)
    kind = entry.source.get("kind")
    mirror = resolve_mirror(mirror)
    downloads = Path(downloads) if downloads is not None else root.parent / ".downloads" / entry.key
    options = {"retries": retries, "backoff_s": backoff_s, "timeout_s": timeout_s}
    if kind == "generated":
        log.info("dataset %r is generated locally (universal demo-data); nothing to download", entry.key)
    elif kind in ("manual", "local"):
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
    local = entry.source.get("kind") == "local"
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        if local:
            raise DownloadError(f"dataset {entry.key!r} ({entry.name}) is a local dataset and is not complete in "
                                f"{root}:\n{listed}\nCheck the folder in the config's datasets and the catalog layout")
        instructions = entry.source.get("instructions") or "(the catalog gives no instructions)"
        raise DownloadError(f"dataset {entry.key!r} ({entry.name}) must be downloaded by hand and is not complete "
                            f"in {root}:\n{listed}\nHow to get it: {instructions}")
    log.info("dataset %r: the %s dataset in %s is complete", entry.key, "local" if local else "manual download",
             root)


def _checksums(entry: DatasetEntry, spec: dict) -> dict[str, str | None]:
    sha256, md5 = spec.get("sha256"), spec.get("md5")
    for name, value in (("sha256", sha256), ("md5", md5)):
        if value is not None and not re.fullmatch(r"[0-9a-fA-F]+", str(value)):
            raise DownloadError(f"dataset {entry.key!r}: {name} {value!r} is not a hex digest")
    return {"sha256": sha256, "md5": md5}


def _safe_name(entry: DatasetEntry, name: str) -> str:
    if problem := relative_path_problem(name):
        raise DownloadError(f"dataset {entry.key!r}: file name {name!r} is unsafe: {problem}")
    return name


def extraction_marker(archive: Path) -> Path:
    """The file that records a completed extraction of ``archive`` (beside it, ``<archive>.extracted``, holding the
    target folder): an archive is extracted again unless it exists, names the same target and the target has
    content."""
    return archive.with_name(archive.name + ".extracted")


def _fetch_into(entry: DatasetEntry, url: str, name: str, checks: dict, root: Path, downloads: Path,
                archive: bool, into: str, options: dict) -> None:
    """Fetch one file into ``root``, or fetch an archive into ``downloads`` and extract it to ``root/into``.

    Whether an archive was extracted is decided by its :func:`extraction_marker`, never by its target having
    content: a target that holds files but no completed extraction (a stray file, an interrupted run, files put
    there by hand) is an error that names it, and nothing is changed.
    """
    if not archive:
        fetch(url, root / name, checks["sha256"], md5=checks["md5"], **options)
        return
    target, marker = root / into, extraction_marker(downloads / name)
    has_content = target.exists() and (not target.is_dir() or any(target.iterdir()))
    if has_content and marker.is_file() and marker.read_text().strip() == str(target):
        log.info("dataset %r: %s was extracted into %s; not downloading it again", entry.key, name, target)
        return
    if has_content:
        raise DownloadError(f"dataset {entry.key!r}: {target} already has content, but no extraction of {name} into "
                            f"it was completed ({marker} is missing): a stray file, an interrupted run or files put "
                            f"there by hand. Nothing was changed. Move the content of {target} away and rerun; if it "
                            f"is the complete content of {name}, write the line {target} into {marker} instead")
    kind = archive_kind(downloads / name)
    validate = None if kind is None else functools.partial(check_archive_opens, kind=kind)
    path = fetch(url, downloads / name, checks["sha256"], md5=checks["md5"], validate=validate, **options)
    safe_extract(path, target)
    with atomic_output(marker) as tmp:
        tmp.write_text(f"{target}\n")


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
    convert each series to NIfTI (:mod:`universal.data.dicom_convert`). Series that fail are reported and left out;
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
    from universal.data.dicom_convert import ConversionError, convert_series

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
    if relative_path_problem(relative):
        raise DownloadError(f"dataset {entry.key!r}: {relative!r} must be a relative path inside the dataset folder")
    return root / relative
