"""Progress of long loops: a tqdm bar on an interactive terminal, and nothing extra in log files, where each stage
logs one line per case or step through :mod:`logging`."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], *, desc: str, total: int | None = None, unit: str = "case") -> Iterator[T]:
    """``items`` with a progress bar on stderr when stderr is a terminal (tqdm's ``disable=None``)."""
    yield from tqdm(items, desc=desc, total=total, unit=unit, disable=None, leave=False, file=sys.stderr,
                    dynamic_ncols=True)
