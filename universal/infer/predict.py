"""Inference on CT volumes: load the model once, then for each case resample, sliding-window predict,
post-process, map back to the input grid through the probabilities (:mod:`universal.infer.source_grid`) and write an
OME-Zarr prediction (optionally NIfTI label maps too).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference

from universal.core.atomic import atomic_output
from universal.core.classes import ClassTable
from universal.core.intensity import DEFAULT_WINDOW_HU, window
from universal.core.sides import body_midline_x_mm
from universal.core.volume import Volume, VolumeError, load_nifti, resample
from universal.data.catalog import Case
from universal.infer.ome import write_prediction
from universal.infer.postprocess import postprocess_masks
from universal.infer.source_grid import label_map_on_source_grid
from universal.model.network import ModelConfig, load_checkpoint
from universal.model.preprocessing import Preprocessing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceSettings:
    """How to run the model: grid spacing (mm, x y z), window (HU), sliding-window ROI (voxels) and overlap.

    A checkpoint that records its preprocessing replaces spacing, window and ROI (:func:`settings_from_checkpoint`).
    """

    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    window_hu: tuple[float, float] = DEFAULT_WINDOW_HU
    roi: tuple[int, int, int] = (96, 96, 96)
    overlap: float = 0.5
    sw_batch_size: int = 2
    threshold: float = 0.5
    device: str = "cpu"
    export_nifti: bool = False


def settings_from_checkpoint(checkpoint: str | Path, meta: dict, base: InferenceSettings) -> InferenceSettings:
    """``base`` with the grid spacing, window and ROI of the checkpoint when it records its ``preprocessing``
    (``meta`` as :func:`load_checkpoint` returns it): the weights fit that input alone, whatever was asked for
    (a difference is logged). Checkpoints without preprocessing (or with an empty record) keep ``base``.
    """
    if not meta.get("preprocessing"):
        return base
    own = Preprocessing.from_dict(meta["preprocessing"], checkpoint)
    chosen = replace(base, spacing=own.spacing_mm, window_hu=own.window_hu, roi=own.roi)
    asked = (tuple(base.spacing), tuple(base.window_hu), tuple(base.roi))
    if asked != (chosen.spacing, chosen.window_hu, chosen.roi):
        log.warning("%s carries its preprocessing: spacing %s mm, window %s HU, ROI %s instead of the requested "
                    "%s mm, %s HU, %s", checkpoint, chosen.spacing, chosen.window_hu, chosen.roi, *asked)
    return chosen


def windows_per_pass(checkpoint: str | Path, meta: dict, settings: InferenceSettings) -> InferenceSettings:
    """``settings`` with one sliding window per forward pass when the checkpoint's model normalises with batch
    statistics (the original U-Net): its logits for a window depend on the other windows of the pass, and it was
    trained and evaluated on one window at a time."""
    if not ModelConfig.from_dict(meta["model_config"]).batch_dependent or settings.sw_batch_size == 1:
        return settings
    log.warning("%s normalises with batch statistics: one sliding window per forward pass instead of %d",
                checkpoint, settings.sw_batch_size)
    return replace(settings, sw_batch_size=1)


@dataclass
class CasePrediction:
    """Organ and tumour label maps (uint8, universal values) on the input's RAS grid, and the probability maps'
    mid-line used for side decisions."""

    image: Volume
    organs: np.ndarray
    tumours: np.ndarray
    midline_x_mm: float


@dataclass
class GridPrediction:
    """What the model says on its own grid: per-class probabilities and post-processed masks, both
    (classes, X, Y, Z) in class-table channel order (classes that did not run stay 0), and the body midline (RAS x,
    mm) that the side rules used."""

    probabilities: np.ndarray
    masks: np.ndarray
    midline_x_mm: float


def predict_on_grid(model: torch.nn.Module, grid: Volume, classes: ClassTable, settings: InferenceSettings,
                    predicted: list[str] | None = None) -> GridPrediction:
    """Run the model on a CT already on its grid (RAS+, HU; ``settings.spacing`` is not applied here): window,
    Gaussian-weighted sliding window, sigmoid, threshold and post-processing by the class table's rules.

    ``predicted`` names the classes whose heads run (default: all). Training's validation calls this too, so
    validation Dice is the Dice of what inference outputs on the model grid.
    """
    inputs = window(grid.array, *settings.window_hu)[None, None].to(settings.device)
    channels = classes.channels(predicted if predicted is not None else classes.names)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=settings.device.startswith("cuda"))
    with torch.inference_mode(), autocast:
        logits = sliding_window_inference(inputs, settings.roi, settings.sw_batch_size,
                                          lambda x: model(x, classes=channels), overlap=settings.overlap,
                                          mode="gaussian")
    probabilities = np.zeros((len(classes), *grid.shape), dtype=np.float32)
    probabilities[channels] = torch.sigmoid(logits[0].float()).cpu().numpy()
    midline = body_midline_x_mm(grid)
    masks = postprocess_masks(probabilities > settings.threshold, classes, grid.affine, midline)
    return GridPrediction(probabilities, masks, midline)


def predict_volume(model: torch.nn.Module, image: Volume, classes: ClassTable, settings: InferenceSettings,
                   predicted: list[str] | None = None) -> CasePrediction:
    """Predict one CT (RAS+ volume in HU) and return label maps on its own grid.

    ``predicted`` names the classes whose heads run (default: all); the others stay empty.
    """
    grid = resample(Volume(image.array.astype(np.float32), image.affine), settings.spacing, order=1)
    on_grid = predict_on_grid(model, grid, classes, settings, predicted)
    masks, probabilities, midline = on_grid.masks, on_grid.probabilities, on_grid.midline_x_mm
    maps = [label_map_on_source_grid(masks, probabilities, [classes.channel(c.name) for c in group],
                                     [c.index for c in group], grid.spacing, image.shape, image.spacing,
                                     settings.threshold)
            for group in (classes.organs(), classes.tumours())]
    return CasePrediction(image, maps[0], maps[1], midline)


def export_nifti(prediction: np.ndarray, source_affine: np.ndarray, path: Path) -> None:
    """Write a RAS label map as NIfTI in the source file's own orientation and affine (4x4, voxel -> RAS mm)."""
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")),
                                                nib.orientations.io_orientation(source_affine))
    data = nib.orientations.apply_orientation(prediction, transform).astype(np.uint8)
    image = nib.Nifti1Image(data, source_affine)
    image.set_qform(source_affine, code=1)
    image.set_sform(source_affine, code=1)
    with atomic_output(path) as tmp:
        nib.save(image, str(tmp))


def infer_cases(cases: list[Case], checkpoint: str | Path, classes: ClassTable, out_dir: str | Path,
                settings: InferenceSettings) -> list[str]:
    """Predict every case into ``out_dir/<case_id>.ome.zarr``, loading the model once.

    A case that fails (unreadable or malformed image) is logged and listed in ``out_dir/failed.tsv``; the
    others go on. Returns the failed case ids.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, meta = load_checkpoint(checkpoint, expected_class_names=classes.names, map_location=settings.device)
    model.eval()
    settings = windows_per_pass(checkpoint, meta, settings_from_checkpoint(checkpoint, meta, settings))
    predicted = list(meta.get("extra", {}).get("trained_classes", classes.names))
    untrained = [n for n in classes.names if n not in predicted]
    if untrained:
        log.warning("no training case annotated %s: their heads never learned, so they are not predicted",
                    untrained)
    failed: list[tuple[str, str]] = []
    for number, case in enumerate(cases, start=1):
        start = time.perf_counter()
        try:
            image = load_nifti(case.image)
        except VolumeError as err:
            failed.append((case.case_id, str(err)))
            log.error("case %s failed: %s", case.case_id, err)
            continue
        prediction = predict_volume(model, image, classes, settings, predicted)
        source_affine = nib.load(str(case.image)).affine  # the file's own affine (header only)
        attrs = {"case_id": case.case_id, "dataset": case.dataset, "source_image": str(case.image),
                 "source_affine": source_affine.tolist(), "checkpoint": str(checkpoint),
                 "midline_x_mm": prediction.midline_x_mm, "threshold": settings.threshold,
                 "spacing_model_mm": list(settings.spacing), "class_table_digest": classes.digest(),
                 "predicted_classes": predicted}
        hu = np.clip(np.rint(image.array), -32768, 32767).astype(np.int16)
        write_prediction(out_dir / f"{case.case_id}.ome.zarr", Volume(hu, image.affine), prediction.organs,
                         prediction.tumours, classes, attrs)
        if settings.export_nifti:
            for name, labels in (("organs", prediction.organs), ("tumours", prediction.tumours)):
                export_nifti(labels, source_affine, out_dir / f"{case.case_id}_{name}.nii.gz")
        print(f"[infer] {number}/{len(cases)} {case.case_id}: {time.perf_counter() - start:.1f} s",
              file=sys.stderr, flush=True)
    with (out_dir / "failed.tsv").open("w") as handle:
        handle.write("case_id\terror\n")
        handle.writelines(f"{case_id}\t{error}\n" for case_id, error in failed)
    return [case_id for case_id, _ in failed]
