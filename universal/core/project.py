"""Where the project's own configuration lives: ``config/`` of the checkout the package is installed from
(``pip install -e .``, as ``make`` does), holding the class table and the dataset catalog."""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "workflow" / "schemas"
