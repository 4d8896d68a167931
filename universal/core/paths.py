"""Paths built from outside data (archive members, catalog file names, DICOM headers, case ids) checked to stay
inside the folder they are meant for.

:func:`relative_path_problem` and :func:`file_name_problem` say why a name is unsafe; :func:`join_inside` joins a
folder and an untrusted relative path and raises :class:`PathEscapeError` when the result could leave the folder.
The checks are lexical (no file system access): an absolute path, a drive letter, a ``..`` component or a NUL
byte is refused wherever it comes from.
"""

from __future__ import annotations

import re
from pathlib import Path

SEPARATORS = re.compile(r"[\\/]+")


class PathEscapeError(ValueError):
    """A path built from outside data would leave the folder it belongs in; the message names both."""


def relative_path_problem(name: str) -> str | None:
    """Why ``name`` is unsafe as a path relative to a folder (it could leave it), or None when it is safe."""
    if not name or "\x00" in name:
        return "an empty name or a NUL byte"
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        return "an absolute path"
    if ".." in SEPARATORS.split(name):
        return "a '..' component"
    return None


def file_name_problem(name: str) -> str | None:
    """Why ``name`` is unsafe as one file or folder name (it could name another folder), or None when it is safe."""
    if problem := relative_path_problem(name):
        return problem
    if SEPARATORS.search(name):
        return "a path separator ('/' or '\\')"
    if name.strip() in (".", ""):
        return "no name ('.' or blanks only)"
    return None


def join_inside(folder: str | Path, relative: str, what: str) -> Path:
    """``folder / relative`` for an untrusted ``relative`` (``what`` says where it came from, for the message);
    raises :class:`PathEscapeError` when ``relative`` is absolute, has a ``..`` component, is empty or holds a NUL
    byte, any of which could put the result outside ``folder``."""
    if problem := relative_path_problem(relative):
        raise PathEscapeError(f"{what} {relative!r} would leave {folder}: it is {problem}; only paths inside the "
                              "folder are followed")
    return Path(folder) / relative
