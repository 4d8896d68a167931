"""Paths built from outside data (archive members, catalog file names, DICOM headers, case ids) checked to stay
inside the folder they are meant for."""

from __future__ import annotations

import re


def relative_path_problem(name: str) -> str | None:
    """Why ``name`` is unsafe as a path relative to a folder (it could leave it), or None when it is safe."""
    if not name or "\x00" in name:
        return "an empty name or a NUL byte"
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        return "an absolute path"
    if ".." in re.split(r"[\\/]+", name):
        return "a '..' component"
    return None


def file_name_problem(name: str) -> str | None:
    """Why ``name`` is unsafe as one file name inside a folder (a separator, ``..``, a hidden or empty name,
    control characters), or None when it is safe. Case ids become file names this way."""
    if "/" in name or "\\" in name:
        return "a path separator"
    if not name or name.startswith("."):
        return "an empty name, or one starting with '.' (also '.' and '..')"
    if any(ord(ch) < 32 for ch in name):
        return "a control character"
    return None
