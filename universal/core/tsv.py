"""Tab-separated tables written atomically: a temporary file next to the target, renamed when complete."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from universal.core.atomic import atomic_output

LINE_BREAKS = re.compile(r"\s*[\r\n]+\s*")


def one_line(text: object) -> str:
    """``text`` as one line for a table cell: line breaks (and the blanks around them) become `` | ``, tabs
    spaces, so that a multi-line error stays one row for line-oriented readers (grep, awk, cut)."""
    return LINE_BREAKS.sub(" | ", str(text).strip()).replace("\t", " ")


def write_tsv(path: str | Path, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Write a header and rows as TSV to ``path`` (parents created, written atomically); None becomes ""."""
    with atomic_output(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(["" if value is None else value for value in row] for row in rows)


def read_tsv_rows(path: str | Path) -> list[dict[str, str]]:
    """The rows of a TSV with a header line, as dicts of strings."""
    with Path(path).open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))
