"""The one check of paths built from outside data: they stay inside their folder."""

from pathlib import Path

import pytest

from universal.core.paths import PathEscapeError, file_name_problem, join_inside, relative_path_problem


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "\\\\server\\share", "C:x", "", "a\x00b",
                                  "a\\..\\..\\x"])
def test_unsafe_relative_paths_are_named(name: str) -> None:
    assert relative_path_problem(name) is not None
    with pytest.raises(PathEscapeError, match="would leave"):
        join_inside(Path("/data/out"), name, "test value")


def test_safe_relative_paths_are_joined() -> None:
    assert join_inside(Path("/data/out"), "img/case_1.nii.gz", "template") == Path("/data/out/img/case_1.nii.gz")
    assert join_inside(Path("/data/out"), "a..b/c", "template") == Path("/data/out/a..b/c")


@pytest.mark.parametrize("name", ["a/b", "a\\b", ".", "..", " ", "/x", ""])
def test_file_names_must_be_one_component(name: str) -> None:
    assert file_name_problem(name) is not None


def test_ordinary_file_names_pass() -> None:
    assert file_name_problem("PANCREAS_0001") is None and file_name_problem("1.2.840.113619.2") is None
