"""Shared fixtures: the class table, the catalog, and the real example files of ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from universal.catalog import load_catalog
from universal.classes import load_class_table

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def classes():
    return load_class_table()


@pytest.fixture(scope="session")
def catalog(classes):
    return load_catalog(None, classes)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real example files (``UNIVERSAL_SHARED_DATA``, default ../shared/data beside the repository)."""
    root = Path(os.environ.get("UNIVERSAL_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not root.is_dir():
        pytest.skip(f"real example data not found at {root} (set UNIVERSAL_SHARED_DATA to its folder)")
    return root

