"""Shared fixtures: the same random state for every test, the class table, the catalog, and the real example
files of ../shared/data."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from universal.core.classes import load_class_table
from universal.data.catalog import load_catalog

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def same_random_state_for_every_test() -> None:
    """Seed torch, NumPy's global generator and Python's ``random`` before each test, so that a test draws the same
    numbers whichever tests ran before it: a failure seen in the whole suite reproduces when the test runs alone."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


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

