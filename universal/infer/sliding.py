"""Sliding-window prediction on the model grid with memory that grows with the classes computed, in float16.

The windows tile the body's bounding box (voxels above -500 HU, plus a margin; the rest of the grid is air and
predicted empty), ``overlap`` apart, the last one flush with the box's end (MONAI's layout). Each window's logits
are weighted by a Gaussian importance map (MONAI's ``compute_importance_map``, sigma 0.125 of the window) and
summed into a float16 accumulator of the computed classes only, beside one float32 map of the summed weights; a
window that holds only air (every voxel below -900 HU) is not run. The result is the weighted mean logit per
voxel, as MONAI's ``sliding_window_inference(mode="gaussian")`` gives it, turned into float16 probabilities in
place: peak memory is 2 bytes per voxel and class plus 4 per voxel, where MONAI's float32 accumulator and count
map take 8 per voxel and class.

With ``mirror`` (test-time augmentation) every window also runs mirrored left-right (along x); the mirrored
logits are flipped back and each lateral class takes its partner's (the right kidney's head marks, on a mirrored
image, the patient's left kidney), and both passes are averaged.

Arrays are (x, y, z) in RAS+ voxel order; the logits and probabilities (K, X, Y, Z) follow ``channels``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.data.utils import compute_importance_map
from scipy.special import expit

from universal.core.sides import BODY_THRESHOLD_HU

AIR_HU = -900.0  # a window whose voxels all lie below this holds only air (and is not run)
BODY_MARGIN_VOXELS = 4


def body_box(hu: np.ndarray, margin: int = BODY_MARGIN_VOXELS) -> tuple[slice, ...] | None:
    """The bounding box of the voxels above -500 HU widened by ``margin`` voxels, or None when there are none."""
    inside = hu > BODY_THRESHOLD_HU
    box = []
    for axis in range(3):
        hit = np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, hu.shape[axis])))
    return tuple(box)


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis of ``size`` voxels (``size >= roi``)."""
    step = max(int(roi * (1.0 - overlap)), 1)
    count = math.ceil(max(size - roi, 0) / step) + 1
    return sorted({min(i * step, size - roi) for i in range(count)})


def predict_logits(model: torch.nn.Module, hu: np.ndarray, inputs: np.ndarray, channels: Sequence[int],
                   roi: Sequence[int], overlap: float, batch_size: int, device: str,
                   mirror_channels: Sequence[int] | None = None) -> np.ndarray:
    """Gaussian-weighted sliding-window probabilities (K, X, Y, Z) float16 of the classes ``channels``.

    ``hu`` is the CT on the model grid (HU, for the body box and the air test) and ``inputs`` the model's input
    (windowed, same shape). ``mirror_channels``: for mirror test-time augmentation, the position in ``channels``
    of each computed class's left-right partner (its own position for a class without a side). The weighted
    logits are summed in the output array itself (in the body's box), so the output is the only array of all
    classes that this holds.
    """
    shape = hu.shape
    probabilities = np.zeros((len(channels), *shape), dtype=np.float16)
    box = body_box(hu)
    if box is None:
        return probabilities
    roi = tuple(int(r) for r in roi)
    padded = _padded_crop(inputs, box, roi)
    in_place = padded.shape == tuple(b.stop - b.start for b in box)  # no padding: sum into the output's box
    sums = probabilities[(slice(None), *box)] if in_place else np.zeros((len(channels), *padded.shape), np.float16)
    weights = _accumulate(model, padded, _padded_crop((hu > AIR_HU).astype(np.uint8), box, roi), sums, channels,
                          roi, overlap, batch_size, device, mirror_channels)
    covered = weights > 0
    inside = tuple(slice(0, b.stop - b.start) for b in box)
    for k in range(len(channels)):
        mean = np.divide(sums[k], weights, out=np.full(padded.shape, -np.inf, dtype=np.float32), where=covered)
        probability = expit(mean).astype(np.float16)
        if in_place:
            sums[k] = probability
        else:
            probabilities[(k, *box)] = probability[inside]
    return probabilities


def _accumulate(model: torch.nn.Module, padded: np.ndarray, body: np.ndarray, sums: np.ndarray,
                channels: Sequence[int], roi: tuple[int, ...], overlap: float, batch_size: int, device: str,
                mirror_channels: Sequence[int] | None) -> np.ndarray:
    """Run the windows of ``padded`` that hold more than air (``body``: voxels above -900 HU) and add their
    Gaussian-weighted logits to ``sums`` (K, ...); returns the summed weights (float32, ``padded``'s shape)."""
    weight = compute_importance_map(roi, mode="gaussian", sigma_scale=0.125, device="cpu").numpy()
    weights = np.zeros(padded.shape, dtype=np.float32)
    regions = [tuple(slice(a, a + r) for a, r in zip(start, roi, strict=True))
               for start in itertools.product(*(window_starts(n, r, overlap)
                                                for n, r in zip(padded.shape, roi, strict=True)))]
    regions = [region for region in regions if body[region].any()]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    for first in range(0, len(regions), batch_size):
        batch = regions[first:first + batch_size]
        tensor = torch.from_numpy(np.stack([padded[region] for region in batch])[:, None]).to(device)
        with torch.inference_mode(), autocast:
            logits = model(tensor, classes=list(channels)).float()
            if mirror_channels is not None:
                mirrored = model(tensor.flip(2), classes=list(channels)).float().flip(2)
                logits = 0.5 * (logits + mirrored[:, list(mirror_channels)])
        logits = logits.cpu().numpy()
        for index, region in enumerate(batch):
            sums[(slice(None), *region)] += (logits[index] * weight).astype(np.float16)
            weights[region] += weight
    return weights


def _padded_crop(array: np.ndarray, box: tuple[slice, ...], roi: Sequence[int]) -> np.ndarray:
    """``array[box]`` padded (with its minimum) at the end of each axis shorter than the window."""
    crop = array[box]
    pad = [(0, max(r - n, 0)) for n, r in zip(crop.shape, roi, strict=True)]
    if any(after for _, after in pad):
        crop = np.pad(crop, pad, constant_values=crop.min() if crop.size else 0)
    return np.ascontiguousarray(crop)
