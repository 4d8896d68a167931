"""Atomic outputs: a full disk is named as such, and the earlier output is left as it was."""

import errno
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from universal.core.atomic import DiskFullError, atomic_output
from universal.core.tsv import one_line


def test_no_space_left_names_the_output_and_keeps_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "table.tsv"
    target.write_text("old\n")
    with pytest.raises(DiskFullError, match=r"table\.tsv: cannot write it, the disk \(or the quota\) is full.*"
                                            r"Free space in") as caught:
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert caught.value.errno == errno.ENOSPC
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["table.tsv"]


def test_an_unexplained_writer_error_on_a_full_disk_is_named_disk_full(tmp_path: Path, monkeypatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10 << 30, 10 << 30, 4096))
    with pytest.raises(DiskFullError, match=r"final\.pt: cannot write it.*basic_ios::clear"):
        with atomic_output(tmp_path / "final.pt"):
            raise RuntimeError("basic_ios::clear: iostream error")


def test_other_errors_pass_unchanged(tmp_path: Path, monkeypatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10 << 30, 1 << 30, 9 << 30))
    with pytest.raises(RuntimeError, match=r"^basic_ios::clear$"):
        with atomic_output(tmp_path / "final.pt"):
            raise RuntimeError("basic_ios::clear")


def test_nested_outputs_name_the_innermost(tmp_path: Path) -> None:
    with pytest.raises(DiskFullError, match=r"case_1: cannot write it") as caught:
        with atomic_output(tmp_path / "store.zarr") as store, atomic_output(store / "case_1"):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert "store.zarr:" not in str(caught.value)


def test_a_multi_line_error_becomes_one_table_line() -> None:
    assert one_line("first problem:\n  - a\r\n  - b\tc\n") == "first problem: | - a | - b c"


def test_the_command_reports_a_full_disk_as_an_error(tmp_path: Path, monkeypatch, capsys) -> None:
    from universal import cli
    from universal.data import dicom_convert

    def full(*args, **kwargs):
        with atomic_output(tmp_path / "out" / "img" / "P1.nii.gz"):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dicom_convert, "convert_series", full)
    assert cli.main(["dicom-to-nifti", "--input", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "P1.nii.gz: cannot write it, the disk (or the quota) is full" in capsys.readouterr().err
