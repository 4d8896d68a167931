"""Tab-separated tables written atomically: a temporary file next to the target, renamed when complete."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path

from universal.core.atomic import atomic_output


def write_tsv(path: str | Path, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Write a header and rows as TSV to ``path`` (parents created, written atomically); None becomes ""."""
    with atomic_output(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(["" if value is None else value for value in row] for row in rows)


def one_line(error: object) -> str:
    """An error message as one TSV field: line breaks and tabs folded into ' | ' and spaces."""
    return " | ".join(line.strip() for line in str(error).splitlines() if line.strip()).replace("\t", " ")


def read_tsv_rows(path: str | Path) -> list[dict[str, str]]:
    """The rows of a TSV with a header line, as dicts of strings."""
    with Path(path).open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))
