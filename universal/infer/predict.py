"""Prediction of one CT: resample to the model grid, sliding-window predict, post-process, and map back to the
input grid through the probabilities (:mod:`universal.infer.source_grid`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from universal.core.classes import ClassTable
from universal.core.intensity import window
from universal.core.sides import body_midline_x_mm
from universal.core.volume import Volume, resample
from universal.infer.postprocess import postprocess_masks
from universal.infer.settings import InferenceSettings
from universal.infer.source_grid import label_map_on_source_grid

log = logging.getLogger(__name__)


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
