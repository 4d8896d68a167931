"""How inference feeds a model: the preprocessing a checkpoint carries, and the user's explicit overrides.

A checkpoint records the grid it was trained on (``preprocessing``,
:class:`universal.model.preprocessing.Preprocessing`: spacing in mm, x y z; the intensity window in HU; the
sliding-window ROI in voxels, x y z; the orientation of the arrays, RAS+), as nnU-Net's plans file does, so a
model runs as it was trained whatever the workflow config says. A value the user gives explicitly overrides the
checkpoint's, with a warning naming both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from universal.core.intensity import DEFAULT_WINDOW_HU
from universal.model.network import ModelConfig
from universal.model.preprocessing import Preprocessing

log = logging.getLogger(__name__)

PREPROCESSING_KEYS = ("spacing_mm", "window_hu", "roi")


@dataclass(frozen=True)
class InferenceSettings:
    """How to run the model: grid spacing (mm, x y z), window (HU), sliding-window ROI (voxels, x y z) and
    overlap, windows per forward pass, probability threshold (for classes without their own in the class table),
    device, whether to export NIfTI label maps and (for DICOM inputs) a DICOM-SEG, whether to keep the per-class
    probabilities (uint8, model grid) in the OME-Zarr, and ``mirror``: left-right mirror test-time augmentation."""

    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    window_hu: tuple[float, float] = DEFAULT_WINDOW_HU
    roi: tuple[int, int, int] = (96, 96, 96)
    overlap: float = 0.5
    sw_batch_size: int = 2
    threshold: float = 0.5
    device: str = "cpu"
    export_nifti: bool = False
    export_dicom_seg: bool = False
    export_probabilities: bool = False
    mirror: bool = False


def settings_from_checkpoint(checkpoint: str | Path, meta: dict, base: InferenceSettings, *,
                             spacing: tuple[float, float, float] | None = None,
                             window_hu: tuple[float, float] | None = None,
                             roi: tuple[int, int, int] | None = None) -> InferenceSettings:
    """``base`` with the checkpoint's spacing, window and ROI, each replaced by the caller's value where one is
    given (logged as a warning when it differs from the checkpoint's).

    Raises ValueError naming the checkpoint when it records no preprocessing and the caller does not give all
    three values.
    """
    recorded = Preprocessing.from_dict(meta["preprocessing"], checkpoint).to_dict() if meta.get("preprocessing") \
        else {}
    given = {"spacing_mm": spacing, "window_hu": window_hu, "roi": roi}
    chosen = {}
    for key in PREPROCESSING_KEYS:
        own = recorded.get(key)
        if given[key] is None and own is None:
            raise ValueError(f"checkpoint {checkpoint} does not record its preprocessing ({key}); give the grid "
                             "spacing, window and ROI it was trained with explicitly (--spacing, --window, --roi)")
        value = tuple(given[key]) if given[key] is not None else tuple(own)
        if own is not None and given[key] is not None and [float(v) for v in value] != [float(v) for v in own]:
            log.warning("%s %s overrides the %s the checkpoint %s was trained with: %s", key, list(value), key,
                        checkpoint, list(own))
        chosen[key] = value
    return replace(base, spacing=tuple(float(v) for v in chosen["spacing_mm"]),
                   window_hu=tuple(float(v) for v in chosen["window_hu"]), roi=tuple(int(v) for v in chosen["roi"]))


def windows_per_pass(checkpoint: str | Path, meta: dict, settings: InferenceSettings) -> InferenceSettings:
    """``settings`` with one sliding window per forward pass when the checkpoint's model normalises with batch
    statistics (the original U-Net): its logits for a window depend on the other windows of the pass, and it was
    trained and evaluated on one window at a time."""
    if not ModelConfig.from_dict(meta["model_config"]).batch_dependent or settings.sw_batch_size == 1:
        return settings
    log.warning("%s normalises with batch statistics: one sliding window per forward pass instead of %d",
                checkpoint, settings.sw_batch_size)
    return replace(settings, sw_batch_size=1)
