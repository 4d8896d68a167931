"""Sample sheets: the CTs a user wants segmented, as a TSV of ``case_id`` and ``image`` (one row per CT).

The columns and their rules are the JSON schema ``workflow/schemas/samples.schema.yaml``; this module applies it
row by row and adds what a schema cannot say: case ids are unique, each image exists and is in a format the
pipeline reads. Every problem of every row is reported at once, each naming the sheet, the row (1 is the first
row under the header) and the column. A relative image path is taken relative to the sheet's folder, so a sheet
can travel with its images.
"""

from __future__ import annotations

import csv
from pathlib import Path

import jsonschema
import yaml

from universal.core.project import SCHEMA_DIR
from universal.data.catalog import Case
from universal.data.images import READABLE_FORMATS, is_readable_image

SCHEMA_PATH = SCHEMA_DIR / "samples.schema.yaml"


class SampleSheetError(ValueError):
    """A sample sheet is malformed; the message lists every problem with its row and column."""


def sample_sheet_name(path: str | Path) -> str:
    """The name a sample sheet's cases go by (their ``dataset`` and prediction folder): its file name without
    the extension, e.g. ``cases`` for ``cases.tsv``."""
    return Path(path).name.split(".")[0]


def read_sample_sheet(path: str | Path) -> list[Case]:
    """The cases of a sample sheet, in its row order, with absolute image paths and no labels.

    Raises :class:`SampleSheetError` listing every problem (missing or unknown columns, a case id the schema
    refuses, a duplicate case id, a missing image, an image format the pipeline cannot read).
    """
    path = Path(path)
    rows = _read_rows(path)
    validator = jsonschema.Draft202012Validator(yaml.safe_load(SCHEMA_PATH.read_text()))
    problems: list[str] = []
    seen: dict[str, int] = {}
    cases = []
    for number, row in enumerate(rows, start=1):
        row_problems = [f"row {number}, column {_column(err)}: {err.message}" for err in validator.iter_errors(row)]
        case_id, image = row.get("case_id", ""), row.get("image", "")
        if case_id in seen:
            row_problems.append(f"row {number}, column case_id: {case_id!r} repeats row {seen[case_id]}")
        seen.setdefault(case_id, number)
        if image:
            image_path = (path.parent / image).resolve()
            if not image_path.exists():
                row_problems.append(f"row {number}, column image: {image_path} does not exist")
            elif not is_readable_image(image_path):
                row_problems.append(f"row {number}, column image: {image_path.name} is not in a readable format "
                                    f"(readable: {READABLE_FORMATS})")
            cases.append(Case(sample_sheet_name(path), case_id, image_path, None))
        problems += row_problems
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise SampleSheetError(f"sample sheet {path}: {len(problems)} problem(s):\n{listed}")
    return cases


def _read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a TSV as dicts (blank lines skipped); raises :class:`SampleSheetError` for an unreadable file,
    no header, no rows or rows with more fields than the header."""
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            rows = [row for row in reader if any((value or "").strip() for value in row.values())]
            header = reader.fieldnames
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise SampleSheetError(f"sample sheet {path}: cannot read it: {err}") from err
    if not header:
        raise SampleSheetError(f"sample sheet {path}: empty; expected a header line 'case_id<TAB>image'")
    if not rows:
        raise SampleSheetError(f"sample sheet {path}: no rows under the header")
    for number, row in enumerate(rows, start=1):
        if None in row:
            raise SampleSheetError(f"sample sheet {path}: row {number} has more fields than the header "
                                   f"({', '.join(header)}); is it tab-separated?")
    return [{key: (value or "").strip() for key, value in row.items()} for row in rows]


def _column(error: jsonschema.ValidationError) -> str:
    """The column a schema error is about (the missing or unexpected one where the error is about the row)."""
    if error.path:
        return str(error.path[-1])
    if error.validator == "required":
        return error.message.split("'")[1]
    if error.validator == "additionalProperties":
        return "(unexpected)"
    return "(row)"
