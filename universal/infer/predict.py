"""Prediction of one CT: resample to the model grid, sliding-window predict, post-process, and map back to the
input grid through the probabilities (:mod:`universal.infer.source_grid`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from universal.core.classes import ClassTable
from universal.core.intensity import window
from universal.core.sides import body_midline_x_mm
from universal.core.volume import Volume, resample
from universal.infer.ome import GridProbabilities
from universal.infer.packed_masks import PackedMasks
from universal.infer.postprocess import postprocess_masks
from universal.infer.settings import InferenceSettings
from universal.infer.sliding import predict_logits
from universal.infer.source_grid import label_map_on_source_grid

log = logging.getLogger(__name__)


@dataclass
class CasePrediction:
    """Organ and tumour label maps (uint8, universal values) on the input's RAS grid, the probability maps'
    mid-line used for side decisions, and the computed classes' probabilities on the model grid when
    ``export_probabilities`` asked for them."""

    image: Volume
    organs: np.ndarray
    tumours: np.ndarray
    midline_x_mm: float
    probabilities: GridProbabilities | None = None


@dataclass
class GridPrediction:
    """What the model says on its own grid for the classes it computed: their class-table ``channels``, their
    probabilities (K, X, Y, Z) float16 and post-processed masks (K, X, Y, Z) bool (packed after
    :meth:`pack_masks`) in that order, and the body midline (RAS x, mm) that the side rules used."""

    channels: list[int]
    probabilities: np.ndarray
    masks: np.ndarray | PackedMasks
    midline_x_mm: float

    def pack_masks(self) -> None:
        """Keep the masks one bit per voxel from here on (as bool, 31 classes take 1.4 GiB at 266×266×667)."""
        if isinstance(self.masks, np.ndarray):
            self.masks = PackedMasks(self.masks)

    def position(self, channel: int) -> int | None:
        """Where a class-table channel sits among the computed ones (None: not computed)."""
        return self.channels.index(channel) if channel in self.channels else None


def class_thresholds(classes: ClassTable, channels: list[int], settings: InferenceSettings) -> np.ndarray:
    """Each computed class's probability threshold: its class-table ``threshold``, else the settings' one."""
    return np.array([classes.classes[c].threshold or settings.threshold for c in channels], dtype=np.float32)


def predict_on_grid(model: torch.nn.Module, grid: Volume, classes: ClassTable, settings: InferenceSettings,
                    predicted: list[str] | None = None) -> GridPrediction:
    """Run the model on a CT already on its grid (RAS+, HU; ``settings.spacing`` is not applied here): window,
    Gaussian-weighted sliding window over the body (:mod:`universal.infer.sliding`), sigmoid, per-class
    threshold and post-processing by the class table's rules.

    ``predicted`` names the classes whose heads run (default: all). Training's validation calls this too, so
    validation Dice is the Dice of what inference outputs on the model grid.
    """
    channels = classes.channels(predicted if predicted is not None else classes.names)
    mirror = None
    if settings.mirror:
        partners = classes.mirror_channels()
        mirror = [channels.index(partners[c]) if partners[c] in channels else k for k, c in enumerate(channels)]
    inputs = window(grid.array, *settings.window_hu).numpy()
    probabilities = predict_logits(model, grid.array, inputs, channels, settings.roi, settings.overlap,
                                   settings.sw_batch_size, settings.device, mirror)
    del inputs
    thresholds = class_thresholds(classes, channels, settings)
    masks = probabilities > thresholds.astype(np.float16)[:, None, None, None]
    midline = body_midline_x_mm(grid)
    masks = postprocess_masks(masks, classes, grid.affine, midline, channels, in_place=True)
    return GridPrediction(channels, probabilities, masks, midline)


def predict_volume(model: torch.nn.Module, image: Volume, classes: ClassTable, settings: InferenceSettings,
                   predicted: list[str] | None = None) -> CasePrediction:
    """Predict one CT (RAS+ volume in HU) and return label maps on its own grid.

    ``predicted`` names the classes whose heads run (default: all); the others stay empty.
    """
    # one memory layout whatever the reader gave, so that one scan read from any format is predicted alike
    grid = resample(Volume(np.ascontiguousarray(image.array, dtype=np.float32), image.affine), settings.spacing, 1)
    grid_spacing, grid_affine = grid.spacing, grid.affine
    on_grid = predict_on_grid(model, grid, classes, settings, predicted)
    del grid  # the CT on the model grid (180 MiB at 266×266×667): what follows needs its spacing and affine only
    on_grid.pack_masks()
    thresholds = class_thresholds(classes, on_grid.channels, settings)
    maps = []
    for group in (classes.organs(), classes.tumours()):
        computed = [(k, c) for c in group if (k := on_grid.position(classes.channel(c.name))) is not None]
        maps.append(label_map_on_source_grid(on_grid.masks, on_grid.probabilities, [k for k, _ in computed],
                                             [c.index for _, c in computed], grid_spacing, image.shape,
                                             image.spacing, [float(thresholds[k]) for k, _ in computed]))
    probabilities = GridProbabilities([classes.names[c] for c in on_grid.channels], on_grid.probabilities,
                                      grid_affine) if settings.export_probabilities else None
    return CasePrediction(image, maps[0], maps[1], on_grid.midline_x_mm, probabilities)
