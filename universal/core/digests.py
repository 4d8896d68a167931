"""Digests of files, read once in blocks: download checksums and the identity of a checkpoint."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_digests(path: Path, algorithms: tuple[str, ...] = ("sha256",), chunk: int = 1 << 20) -> dict[str, str]:
    """Hex digests of a file for each hashlib algorithm name, in one pass over the file."""
    hashers = {name: hashlib.new(name) for name in algorithms}
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            for hasher in hashers.values():
                hasher.update(block)
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}
