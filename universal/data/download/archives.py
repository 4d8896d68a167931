"""Archives extracted safely: every member checked before anything is written, renamed into place when complete."""

from __future__ import annotations

import logging
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

from universal.core.atomic import atomic_output
from universal.core.paths import relative_path_problem
from universal.core.tsv import one_line
from universal.data.download.errors import DownloadError

log = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ZIP_SUFFIXES = (".zip",)
# Limits on what one archive may unpack to, read from its member headers before anything is written (decompression
# bombs). The largest public CT datasets are a few hundred GB and about a million files (DICOM slices); one archive
# holds at most that.
MAX_ARCHIVE_BYTES = 1 << 40  # 1 TiB
MAX_ARCHIVE_MEMBERS = 5_000_000


def archive_kind(path: Path) -> str | None:
    """``"tar"`` or ``"zip"`` by the file name's suffix, or None for a file that is not an archive."""
    name = Path(path).name.lower()
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    if name.endswith(ZIP_SUFFIXES):
        return "zip"
    return None


def _tar_problem(member: tarfile.TarInfo) -> str | None:
    if member.issym() or member.islnk():
        return f"a link (to {member.linkname!r}); links are refused"
    if not (member.isfile() or member.isdir()):
        return "a device file, FIFO or other special file"
    return relative_path_problem(member.name)


def _zip_problem(info: zipfile.ZipInfo) -> str | None:
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        return "a link; links are refused"
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "a device file, FIFO or other special file"
    return relative_path_problem(info.filename)


def safe_extract(archive: Path, target: Path, *, max_bytes: int = MAX_ARCHIVE_BYTES,
                 max_members: int = MAX_ARCHIVE_MEMBERS) -> list[Path]:
    """Extract a .tar(.gz/.bz2/.xz), .tgz or .zip archive into ``target`` and return the extracted files.

    Every member is checked before anything is written: absolute paths, ``..`` components, links of any kind
    (symbolic or hard: refused altogether, since no dataset needs them and they could point outside
    ``target``) and device files or FIFOs raise :class:`DownloadError` naming the archive and the member; so do
    more than ``max_members`` members, more than ``max_bytes`` bytes unpacked (by the member headers) and more
    bytes than the disk has free. The archive is extracted under a temporary name (tar with the ``"data"`` filter
    where Python has it), which is renamed to ``target`` when complete; ``target`` must not exist or be an empty
    folder. Compressed tars are read twice (once to check, once to extract).
    """
    archive, target = Path(archive), Path(target)
    kind = archive_kind(archive)
    if kind is None:
        raise DownloadError(f"{archive}: not a supported archive (expected one of {TAR_SUFFIXES + ZIP_SUFFIXES})")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DownloadError(f"{archive}: cannot extract into {target}: it exists and is not an empty folder")
    limits = (max_bytes, max_members)
    try:
        with atomic_output(target) as partial:
            files = (_extract_tar if kind == "tar" else _extract_zip)(archive, partial, limits)
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as err:
        raise DownloadError(f"{archive}: cannot extract: {err}; if the file is incomplete or not a {kind} archive "
                            f"(e.g. an error page), delete it (and {archive.name}.sha256 beside it, if any) and "
                            "download it again") from err
    log.info("%s: extracted %d files into %s", archive, len(files), target)
    return [target / name for name in files]


def _refuse(archive: Path, name: str, problem: str) -> None:
    raise DownloadError(f"{archive}: refusing to extract member {name!r}: {problem}; nothing was extracted")


def _check_size(archive: Path, partial: Path, sizes: list[int], limits: tuple[int, int]) -> None:
    """Refuse an archive whose members (``sizes``, bytes unpacked) exceed the limits or the free disk space."""
    max_bytes, max_members = limits
    total = sum(sizes)
    if len(sizes) > max_members:
        raise DownloadError(f"{archive}: refusing to extract {len(sizes)} members, more than the limit of "
                            f"{max_members} (a decompression bomb?); nothing was extracted. If the archive is "
                            "genuine, raise max_members")
    if total > max_bytes:
        raise DownloadError(f"{archive}: refusing to extract {total / 1e9:.1f} GB, more than the limit of "
                            f"{max_bytes / 1e9:.1f} GB (a decompression bomb?); nothing was extracted. If the archive "
                            "is genuine, raise max_bytes")
    free = shutil.disk_usage(partial.parent).free
    if total > free:
        raise DownloadError(f"{archive}: it unpacks to {total / 1e9:.1f} GB, but {partial.parent} has only "
                            f"{free / 1e9:.1f} GB free; nothing was extracted. Free space there and rerun")


def _extract_tar(archive: Path, partial: Path, limits: tuple[int, int]) -> list[str]:
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for member in members:
            if problem := _tar_problem(member):
                _refuse(archive, member.name, problem)
        _check_size(archive, partial, [m.size for m in members], limits)
        partial.mkdir()
        if hasattr(tarfile, "data_filter"):
            tar.extractall(partial, members=members, filter="data")
        else:  # Python < 3.10.12 / 3.11.4: every member was checked above
            tar.extractall(partial, members=members)
    return sorted(m.name for m in members if m.isfile())


def _extract_zip(archive: Path, partial: Path, limits: tuple[int, int]) -> list[str]:
    with zipfile.ZipFile(archive) as zipped:
        infos = zipped.infolist()
        for info in infos:
            if problem := _zip_problem(info):
                _refuse(archive, info.filename, problem)
        _check_size(archive, partial, [i.file_size for i in infos], limits)
        partial.mkdir()
        zipped.extractall(partial, members=infos)
    return sorted(i.filename for i in infos if not i.is_dir())


def check_archive_opens(path: Path, kind: str) -> None:
    """Raise :class:`DownloadError` unless ``path`` opens as a ``kind`` (``"tar"`` or ``"zip"``) archive: its
    first member (tar) or its member list (zip) can be read. Meant for a download just completed, before its
    checksum is recorded."""
    try:
        if kind == "tar":
            with tarfile.open(path, "r:*") as tar:
                tar.next()
        else:
            with zipfile.ZipFile(path) as zipped:
                zipped.infolist()
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as err:
        raise DownloadError(f"the download does not open as a {kind} archive ({one_line(err)}): the server sent "
                            "something else, an error page or an incomplete file") from err
