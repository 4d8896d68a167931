"""Tests of universal.data.samples: sample sheets checked row by row, with errors naming the row and column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from universal.core.volume import Volume, save_nifti
from universal.data.samples import SampleSheetError, read_sample_sheet, sample_sheet_name


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "cts"
    for name in ("a.nii.gz", "b.nii"):
        save_nifti(Volume(np.zeros((4, 4, 4), dtype=np.int16), np.eye(4)), folder / name)
    (folder / "c.png").write_bytes(b"\x89PNG")
    return folder


def _sheet(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cases.tsv"
    path.write_text(text)
    return path


def test_rows_become_cases_with_paths_relative_to_the_sheet(tmp_path: Path, images: Path) -> None:
    sheet = _sheet(tmp_path, "case_id\timage\nfirst\tcts/a.nii.gz\n\nsecond.v2\t" f"{images / 'b.nii'}\n")
    cases = read_sample_sheet(sheet)
    assert [(c.dataset, c.case_id, c.image, c.label) for c in cases] == [
        ("cases", "first", images / "a.nii.gz", None), ("cases", "second.v2", images / "b.nii", None)]
    assert sample_sheet_name(tmp_path / "batch.v1.tsv") == "batch"


def test_every_problem_is_named_by_row_and_column(tmp_path: Path, images: Path) -> None:
    sheet = _sheet(tmp_path, "case_id\timage\n"
                             "../escape\tcts/a.nii.gz\n"
                             "twice\tcts/a.nii.gz\n"
                             "twice\tcts/b.nii\n"
                             "gone\tcts/missing.nii.gz\n"
                             "png\tcts/c.png\n")
    with pytest.raises(SampleSheetError) as raised:
        read_sample_sheet(sheet)
    message = str(raised.value)
    assert "4 problem(s)" in message
    assert "row 1, column case_id: '../escape' does not match" in message
    assert "row 3, column case_id: 'twice' repeats row 2" in message
    assert f"row 4, column image: {images / 'missing.nii.gz'} does not exist" in message
    assert "row 5, column image: c.png is not in a readable format (readable: NIfTI (.nii, .nii.gz), NRRD" in message


@pytest.mark.parametrize(("text", "expected"), [
    ("", "empty; expected a header line"),
    ("case_id\timage\n", "no rows under the header"),
    ("case_id,image\nx,cts/a.nii.gz\n", "row 1, column case_id: 'case_id' is a required property"),
    ("case_id\timage\nx\tcts/a.nii.gz\textra\n", "row 1 has more fields than the header"),
    ("case_id\timage\tlabel\nx\tcts/a.nii.gz\ty\n", "row 1, column (unexpected): Additional properties"),
])
def test_malformed_sheets_are_refused(tmp_path: Path, images: Path, text: str, expected: str) -> None:
    with pytest.raises(SampleSheetError, match="sample sheet") as raised:
        read_sample_sheet(_sheet(tmp_path, text))
    assert expected in str(raised.value)
