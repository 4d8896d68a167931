"""What a DICOM-SEG segment says about its class: SNOMED CT codes from ``config/snomed.yaml`` (a private scheme where
DICOM has no concept) and the recommended display colour, sRGB converted to DICOM's scaled CIELab.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from universal.core.classes import UniversalClass
from universal.core.project import CONFIG_DIR

if TYPE_CHECKING:
    pass

LOCAL = "local"  # the type of a class without a SNOMED CT concept in config/snomed.yaml
LOCAL_SCHEME = "99UNIVERSAL"  # private coding scheme designator (DICOM PS3.3 8.2: private schemes begin with 99)
_CODE_KEYS = {"scheme", "value", "meaning", "pydicom", "note"}
_ROW_KEYS = {"category", "type", "modifier", "region"}
_SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                         [0.2126729, 0.7151522, 0.0721750],
                         [0.0193339, 0.1191920, 0.9503041]])
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])

log = logging.getLogger(__name__)


class DicomSegError(ValueError):
    """A DICOM-SEG cannot be written as asked; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Code:
    """A coded concept: ``value`` in the coding scheme ``scheme`` (SCT is SNOMED CT) and its ``meaning``."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class SegmentCodes:
    """The codes of one segment: property category and type, laterality modifier and anatomic region (optional)."""

    category: Code
    type: Code
    modifier: Code | None = None
    region: Code | None = None


@dataclass(frozen=True)
class CodeTable:
    """The coded concepts of the classes (``config/snomed.yaml``): named codes, a row per class name, a default
    row per class kind."""

    codes: dict[str, Code]
    rows: dict[str, dict[str, str]]
    defaults: dict[str, dict[str, str]]
    source: str = "<memory>"

    def for_class(self, cls: UniversalClass) -> SegmentCodes:
        """The codes of ``cls``; a class without a row takes its kind's default row (with a warning)."""
        row = self.rows.get(cls.name)
        if row is None:
            log.warning("%s has no row for class %r; it is coded with the default row of a %s", self.source,
                        cls.name, cls.kind)
            row = self.defaults[cls.kind]
        return SegmentCodes(
            category=self.codes[row["category"]],
            type=local_code(cls) if row["type"] == LOCAL else self.codes[row["type"]],
            modifier=self.codes[row["modifier"]] if "modifier" in row else None,
            region=self.codes[row["region"]] if "region" in row else None,
        )


def local_code(cls: UniversalClass) -> Code:
    """The private code of a class: scheme 99UNIVERSAL, value UNIV<label value, 4 digits>, meaning its name."""
    return Code(f"UNIV{cls.index:04d}", LOCAL_SCHEME, cls.name)


def default_code_table_path() -> Path:
    """The code table shipped with the project (``config/snomed.yaml``)."""
    return CONFIG_DIR / "snomed.yaml"


def load_code_table(path: str | Path | None = None) -> CodeTable:
    """Read and check a code table; raises :class:`DicomSegError` naming the file and the entry for any problem."""
    path = Path(path) if path is not None else default_code_table_path()
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise DicomSegError(f"{path}: cannot read the code table: {err}") from err
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), dict) for k in ("codes", "classes", "defaults")):
        raise DicomSegError(f"{path}: expected mappings 'codes', 'classes' and 'defaults'")
    codes = {name: _parse_code(path, name, entry) for name, entry in doc["codes"].items()}
    rows = {str(name): _parse_row(path, f"classes.{name}", row, codes) for name, row in doc["classes"].items()}
    defaults = {kind: _parse_row(path, f"defaults.{kind}", doc["defaults"].get(kind), codes)
                for kind in ("organ", "tumour")}
    return CodeTable(codes, rows, defaults, str(path))


def _parse_code(path: Path, name: str, entry: object) -> Code:
    where = f"{path}: codes.{name}"
    if not isinstance(entry, dict):
        raise DicomSegError(f"{where}: expected a mapping, got {entry!r}")
    unknown = set(entry) - _CODE_KEYS
    if unknown:
        raise DicomSegError(f"{where}: unknown keys {sorted(unknown)}")
    values = {}
    for key, limit in (("scheme", 16), ("value", 16), ("meaning", 64)):  # DICOM SH, SH and LO lengths
        value = entry.get(key)
        if not isinstance(value, str) or not value.strip() or len(value) > limit:
            raise DicomSegError(f"{where}: {key} must be a text of 1..{limit} characters, got {value!r}")
        values[key] = value
    return Code(values["value"], values["scheme"], values["meaning"])


def _parse_row(path: Path, where: str, row: object, codes: dict[str, Code]) -> dict[str, str]:
    where = f"{path}: {where}"
    if not isinstance(row, dict):
        raise DicomSegError(f"{where}: expected a mapping, got {row!r}")
    unknown = set(row) - _ROW_KEYS
    if unknown:
        raise DicomSegError(f"{where}: unknown keys {sorted(unknown)}")
    for key in ("category", "type"):
        if key not in row:
            raise DicomSegError(f"{where}: missing required key {key!r}")
    for key, name in row.items():
        if name not in codes and not (key == "type" and name == LOCAL):
            raise DicomSegError(f"{where}: {key} names {name!r}, which is not in 'codes'")
    return {key: str(name) for key, name in row.items()}


def rgb_to_cielab(rgb: Sequence[int]) -> tuple[float, float, float]:
    """CIE L*a*b* of an sRGB colour (three values 0-255) relative to the D65 white: L* in 0..100, a* and b* about
    -128..127."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    t = _SRGB_TO_XYZ @ linear / _D65_WHITE
    delta = 6.0 / 29.0
    f = np.where(t > delta**3, np.cbrt(t), t / (3.0 * delta**2) + 4.0 / 29.0)
    return float(116.0 * f[1] - 16.0), float(500.0 * (f[0] - f[1])), float(200.0 * (f[1] - f[2]))


def dicom_cielab(rgb: Sequence[int]) -> tuple[int, int, int]:
    """The Recommended Display CIELab Value of an sRGB colour: L* 0..100 and a*, b* -128..127 scaled linearly
    to 0..65535 (DICOM PS3.3 C.10.7.1.1)."""
    lightness, a, b = rgb_to_cielab(rgb)
    scaled = (lightness / 100.0 * 65535.0, (a + 128.0) / 255.0 * 65535.0, (b + 128.0) / 255.0 * 65535.0)
    return tuple(int(np.clip(round(v), 0, 65535)) for v in scaled)  # type: ignore[return-value]
