"""The input a model was trained on, stored in its checkpoint so that inference feeds it the same.

Like nnU-Net's plans file, this travels with the weights: a checkpoint that carries a ``preprocessing`` record is
run on that grid, with that window and that sliding-window size, whatever the caller asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Array orientations the pipeline can feed a model (universal.core.volume reorients every CT to RAS+).
ORIENTATIONS = ("RAS",)


@dataclass(frozen=True)
class Preprocessing:
    """What a model's input looks like.

    ``spacing_mm``: voxel size of the model grid (x, y, z), mm. ``window_hu``: (low, high) HU clipped and mapped
    linearly onto [0, 1]. ``roi``: sliding-window size (x, y, z), voxels of the model grid. ``orientation``: axis
    codes of the array; ``"RAS"``: the indices grow toward the patient's right, anterior and superior (NIfTI's
    RAS+, what :func:`universal.core.volume.load_nifti` and MONAI's ``Orientationd("RAS")`` give).
    """

    spacing_mm: tuple[float, float, float]
    window_hu: tuple[float, float]
    roi: tuple[int, int, int]
    orientation: str = "RAS"

    def to_dict(self) -> dict:
        """Plain, JSON-able values (loadable with ``torch.load(weights_only=True)``)."""
        return {"spacing_mm": list(self.spacing_mm), "window_hu": list(self.window_hu), "roi": list(self.roi),
                "orientation": self.orientation}

    @classmethod
    def from_dict(cls, data: Mapping, source: str | Path) -> Preprocessing:
        """Parse and check a record; raises ValueError naming ``source`` and the key that is wrong."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: preprocessing must be a mapping, got {type(data).__name__}")
        known = {"spacing_mm", "window_hu", "roi", "orientation"}
        unknown = sorted(set(data) - known)
        missing = sorted(known - {"orientation"} - set(data))
        if unknown or missing:
            raise ValueError(f"{source}: preprocessing keys missing {missing}, unknown {unknown}")
        spacing = _numbers(data["spacing_mm"], 3, float, "spacing_mm", source)
        window = _numbers(data["window_hu"], 2, float, "window_hu", source)
        roi = _numbers(data["roi"], 3, int, "roi", source)
        orientation = data.get("orientation", "RAS")
        if any(s <= 0 for s in spacing) or any(r <= 0 for r in roi):
            raise ValueError(f"{source}: preprocessing spacing_mm {spacing} and roi {roi} must be positive")
        if window[1] <= window[0]:
            raise ValueError(f"{source}: preprocessing window_hu {window} must be (low, high) with high > low")
        if orientation not in ORIENTATIONS:
            raise ValueError(f"{source}: preprocessing orientation {orientation!r} is not supported; this pipeline "
                             f"feeds models {ORIENTATIONS} arrays")
        return cls(spacing, window, roi, orientation)  # type: ignore[arg-type]


def _numbers(value: object, length: int, kind: type, key: str, source: str | Path) -> tuple:
    """``value`` as a tuple of ``length`` numbers of ``kind``; raises ValueError naming ``source`` and ``key``."""
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise ValueError(f"{source}: preprocessing {key} must be {length} numbers, got {value!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)) for v in value):
        raise ValueError(f"{source}: preprocessing {key} must be {length} {kind.__name__} values, got {value!r}")
    return tuple(kind(v) for v in value)


# The original's inference input (dataset/dataloader.py, test.py, pred_pseudo.py): Orientationd("RAS"), Spacingd to
# 1.5 mm, ScaleIntensityRanged(-175, 250 → 0, 1, clip), 96³ sliding windows.
ORIGINAL_PREPROCESSING = Preprocessing((1.5, 1.5, 1.5), (-175.0, 250.0), (96, 96, 96), "RAS")
