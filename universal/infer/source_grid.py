"""Predicted classes from the model grid onto the CT's own grid, through their probabilities.

The model predicts on a resampled grid (1.5 mm for real data, 4 mm in the demo). Mapping the final label map back
with nearest neighbours copies each model voxel's decision onto the source voxels nearest to it, so a boundary
lands up to half a model voxel from where the prediction puts it. Here each class's probability map is resampled
linearly onto the source grid and thresholded there (as nnU-Net maps its softmax back to the original spacing
before taking the argmax), so a boundary lies where the interpolated probability crosses the threshold.

Post-processing stays on the model grid, where its component, side and parent rules are cheap: a source voxel can
take class k only where the post-processed mask of k, dilated by one model voxel, maps onto it (nearest
neighbour), so a component the rules removed does not come back, and a boundary moves by at most one model voxel.
The work for one class is confined to the bounding box of its mask (plus two voxels), mapped in slabs along x of
at most :data:`SLAB_VOXELS` source voxels, so memory is one float32 and one uint8 array of the source grid and a
few float32 slabs; each slab is resampled in the axis order of its whole box, so it gives the box's values bit for
bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from scipy import ndimage

from universal.core.sides import CONNECTIVITY_26
from universal.core.volume import resample_tensor, shrink_first_order
from universal.infer.packed_masks import PackedMasks

BOX_MARGIN = 2  # model voxels around a mask: one for its dilation, one for the linear interpolation's support
SLAB_VOXELS = 1 << 24  # source voxels mapped at a time (64 MiB per float32 temporary)


def label_map_on_source_grid(masks: np.ndarray | PackedMasks, probabilities: np.ndarray, channels: Sequence[int],
                             values: Sequence[int], grid_spacing: Sequence[float], source_shape: Sequence[int],
                             source_spacing: Sequence[float], thresholds: Sequence[float]) -> np.ndarray:
    """One exclusive uint8 label map on the source grid from post-processed masks on the model grid.

    ``masks`` (K, X, Y, Z) bool, or :class:`~universal.infer.packed_masks.PackedMasks`, and ``probabilities``
    (K, X, Y, Z) float (16 or 32 bits) are on the model grid (spacing ``grid_spacing``, mm per array axis);
    ``channels`` are the channels to map, ``values`` the label values written for them and ``thresholds`` their
    probability thresholds. The source grid (``source_shape`` voxels of ``source_spacing`` mm) shares the model
    grid's axes and the centre of voxel 0, as :func:`universal.core.volume.resample` lays grids out: source voxel
    i lies at model-grid position i · source_spacing / grid_spacing. A source voxel takes channel k's value when
    the interpolated probability of k exceeds its threshold and the nearest model voxel lies in k's mask dilated
    by one voxel (26-connected); where several channels qualify the most probable wins (the earlier on a tie).
    """
    source_shape = tuple(int(n) for n in source_shape)
    zoom = tuple(g / s for g, s in zip(grid_spacing, source_spacing, strict=True))  # input / output spacing
    best = np.full(source_shape, -1.0, dtype=np.float32)
    labels = np.zeros(source_shape, dtype=np.uint8)
    for channel, value, threshold in zip(channels, values, thresholds, strict=True):
        mask = masks[channel]
        box = _bounding_box(mask, BOX_MARGIN)
        if box is None:
            continue
        crop = tuple(slice(lo, hi) for lo, hi in box)
        out = _source_box(box, zoom, masks.shape[1:], source_shape)
        region = ndimage.binary_dilation(mask[crop], structure=CONNECTIVITY_26)
        axis_order = shrink_first_order([hi - lo for lo, hi in box], [hi - lo for lo, hi in out])
        for out_x, in_x in _slabs(out, box, zoom[0]):
            slab_out = [out_x, *out[1:]]
            slab_in = [in_x, *box[1:]]
            starts = dict(out_start=tuple(lo for lo, _ in slab_out), in_start=tuple(lo for lo, _ in slab_in),
                          axis_order=axis_order)
            out_shape = tuple(hi - lo for lo, hi in slab_out)
            inside = slice(in_x[0] - box[0][0], in_x[1] - box[0][0])
            near = resample_tensor(torch.from_numpy(region[inside]), zoom, out_shape, 0, **starts).numpy()
            source = probabilities[channel][(slice(*in_x), *crop[1:])]
            probability = resample_tensor(torch.from_numpy(np.ascontiguousarray(source, dtype=np.float32)), zoom,
                                          out_shape, 1, **starts).numpy()
            target = tuple(slice(lo, hi) for lo, hi in slab_out)
            wins = near & (probability > threshold) & (probability > best[target])
            best[target][wins] = probability[wins]
            labels[target][wins] = value
    return labels


def _slabs(out: list[tuple[int, int]], box: list[tuple[int, int]],
           zoom_x: float) -> Iterator[tuple[tuple[int, int], tuple[int, int]]]:
    """Slabs along x of a class's source box ``out``, each of at most :data:`SLAB_VOXELS` source voxels: per slab
    its source x range and the model-grid x range within ``box`` that its samples read (with a voxel to spare on
    either side, so only the box's own edges clamp, as for the whole box)."""
    plane = (out[1][1] - out[1][0]) * (out[2][1] - out[2][0])
    step = max(SLAB_VOXELS // max(plane, 1), 1)
    for first in range(out[0][0], out[0][1], step):
        last = min(first + step, out[0][1])
        low = max(math.floor(first / zoom_x) - 1, box[0][0])
        high = min(math.floor((last - 1) / zoom_x) + 3, box[0][1])
        yield (first, last), (low, high)


def _bounding_box(mask: np.ndarray, margin: int) -> list[tuple[int, int]] | None:
    """Per axis the half-open index range [lo, hi) of the mask's voxels widened by ``margin``, within the array;
    None for an empty mask."""
    found = ndimage.find_objects(mask.view(np.uint8), max_label=1)[0]  # the slices of label 1, or None
    if found is None:
        return None
    return [(max(box.start - margin, 0), min(box.stop + margin, n)) for box, n in zip(found, mask.shape, strict=True)]


def _source_box(box: list[tuple[int, int]], zoom: Sequence[float], grid_shape: Sequence[int],
                source_shape: Sequence[int]) -> list[tuple[int, int]]:
    """The source voxels whose model-grid positions (i / zoom) fall within the model-grid ``box``, rounded
    outwards: a voxel beyond the box reads the box's edge, where the dilated mask is empty (or the grid's own
    edge, where the full grid clamps too), so a wider range changes nothing."""
    out = []
    for (lo, hi), z, n_grid, n_source in zip(box, zoom, grid_shape, source_shape, strict=True):
        first = 0 if lo == 0 else max(math.floor(lo * z), 0)
        last = n_source if hi == n_grid else min(math.ceil((hi - 1) * z) + 1, n_source)
        out.append((first, last))
    return out
