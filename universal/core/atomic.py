"""Outputs written under a temporary name and renamed when complete, so a killed job never leaves a half output
that looks done.

The temporary name sits next to the target and keeps its extensions, so that writers that pick the format from
the name still work: ``case.nii.gz`` is written as ``case.partial.nii.gz``, ``store.zarr`` as
``store.partial.zarr``, ``table.tsv`` as ``table.partial.tsv``. The same works for folders (a zarr store, an
OME-Zarr image, a dataset folder).

A write that fails for want of disk space or quota raises :class:`DiskFullError` naming the output, whatever the
writer raised (an ``OSError`` with ENOSPC or EDQUOT, or a C++ stream error such as torch's "basic_ios::clear"
when the file system is then nearly full).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL = "partial"
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
NEARLY_FULL_BYTES = 1 << 20  # below this much free space, a writer's unexplained I/O error is taken for a full disk


class DiskFullError(OSError):
    """An output could not be written for want of disk space or quota; the message names the output and the fix."""


def partial_name(path: str | Path) -> Path:
    """The temporary sibling of ``path``: ``.partial`` inserted before its first extension (or appended)."""
    path = Path(path)
    stem, dot, extensions = path.name.partition(".")
    name = f"{stem}.{PARTIAL}.{extensions}" if dot and stem else f"{path.name}.{PARTIAL}"
    return path.with_name(name)


def is_partial(name: str) -> bool:
    """Whether a file or folder name is a temporary output of :func:`atomic_output` (one of its dotted parts is
    ``partial``)."""
    return PARTIAL in name.split(".")[1:]


def remove(path: Path) -> None:
    """Remove a file, a link or a folder tree at ``path``; nothing when it does not exist."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield the temporary path to write ``path`` at (a file or a folder; parents created); on a normal exit it
    replaces ``path``, on an exception it is removed and ``path`` is left as it was.

    A leftover temporary output of a killed earlier run is removed first. A folder that replaces an existing
    folder removes the old one just before the rename (a file replaces a file atomically).
    """
    final = Path(path)
    tmp = partial_name(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove(tmp)
    try:
        yield tmp
    except BaseException as err:
        full = disk_full_error(err, final, f"nothing half-written was left and an earlier {final.name} is untouched")
        remove(tmp)
        if full is not None:
            raise full from err
        raise
    if tmp.is_dir():
        remove(final)
    os.replace(tmp, final)


def disk_full_error(err: BaseException, path: Path, kept: str) -> DiskFullError | None:
    """A :class:`DiskFullError` naming ``path`` when ``err``, raised while writing it, means that the disk or the
    quota is full (else None); ``kept`` says what the failed write left, for the message. Call it before freeing
    any space: an unexplained writer error counts only while the file system is nearly full."""
    if not _disk_full(err, path.parent):
        return None
    return DiskFullError(errno.ENOSPC, f"{path}: cannot write it, the disk (or the quota) is full "
                         f"({type(err).__name__}: {err}); {kept}. Free space in {path.parent} (or write elsewhere) "
                         "and rerun")


def _disk_full(err: BaseException, folder: Path) -> bool:
    """Whether ``err`` means the disk or quota is full: ENOSPC/EDQUOT, or an I/O error of a writer that does not
    say why (torch's C++ writer: "basic_ios::clear") while ``folder``'s file system has almost no space left."""
    if isinstance(err, DiskFullError):
        return False  # an inner output already said so
    if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
        return True
    if not isinstance(err, (OSError, RuntimeError)):
        return False
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL_BYTES
    except OSError:
        return False
