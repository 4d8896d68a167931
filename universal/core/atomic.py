"""Outputs written under a temporary name and renamed when complete, so a killed job never leaves a half output
that looks done.

The temporary name sits next to the target and keeps its extensions, so that writers that pick the format from
the name still work: ``case.nii.gz`` is written as ``case.partial.nii.gz``, ``store.zarr`` as
``store.partial.zarr``, ``table.tsv`` as ``table.partial.tsv``. The same works for folders (a zarr store, an
OME-Zarr image, a dataset folder).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL = "partial"


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
    except BaseException:
        remove(tmp)
        raise
    if tmp.is_dir():
        remove(final)
    os.replace(tmp, final)
