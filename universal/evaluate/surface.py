"""Surface metrics of every label of two exclusive label maps: normalised surface distance and 95th-percentile
Hausdorff distance, in one boundary pass per map.

Definitions: MONAI's voxel boundaries (``monai.metrics.compute_surface_dice`` with ``use_subvoxels=False`` and
``compute_hausdorff_distance`` with ``percentile=95``), not DeepMind's surfel-area-weighted surface distance.

* The boundary of a label is the set of its voxels with at least one of their 6 face neighbours outside the label;
  outside the array counts as outside, so a label that touches the array's edge has boundary voxels there. (MONAI:
  the mask XOR its binary erosion by the 6-connected cross.)
* A boundary voxel is a point at its voxel centre: array index times spacing (mm) along each array axis, so
  anisotropic voxels are honoured. The axes are the arrays' (x, y, z) and assumed orthogonal.
* d(p, G) is the Euclidean distance (mm) from a boundary voxel p of the prediction to the nearest boundary voxel of
  the ground truth; d(g, P) the other way.
* NSD(tau) = (#{p: d(p, G) <= tau} + #{g: d(g, P) <= tau}) / (#boundary(P) + #boundary(G)): every boundary voxel
  counts one (voxel counts, not surfel areas).
* HD95 = max(q95 of d(p, G), q95 of d(g, P)) in mm, q95 the 95th percentile interpolated linearly between order
  statistics (numpy's and ``torch.quantile``'s default).

Empty sets: when prediction and ground truth are both empty, NSD and HD95 are NaN (like Dice), as in MONAI. When
exactly one is empty, NSD is 0, as in MONAI, and HD95 is inf: a missed class or a false positive of an absent one
is an error (its Dice is 0), never left out of a summary. MONAI's HD95 is NaN there (its percentile interpolates
between infinite distances; its plain Hausdorff distance is inf).

How: each map's boundary voxels of all labels come from one pass over the map. A boundary voxel's distance is found
by looking at the other map's boundary labels at the voxel offsets of a small neighbourhood (radius
``NEIGHBOURHOOD_VOXELS`` voxels of the coarsest axis), nearest offset first, all labels at once; offset 0 catches
the voxels both boundaries share. The few voxels with no match there (scattered false positives, large errors)
are looked up in a k-d tree of the other boundary's points of their label. Both steps give exact distances;
nothing costs a distance transform over the box that a scattered false positive spans.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import KDTree

NEIGHBOURHOOD_VOXELS = 2  # radius of the neighbourhood searched voxel by voxel, in voxels of the coarsest axis


@dataclass(frozen=True)
class Boundaries:
    """The boundary voxels of every label of one map, grouped by label value.

    The map is padded with background (``label_boundaries``'s ``pad``). ``points`` (n, 3) are voxel
    centres in mm along the array axes, ``voxels`` (n,) their flat indices in the padded grid (ascending within a
    label), ``values`` (n,) their labels; label ``v``'s are rows ``starts[v]:starts[v + 1]``. ``labels`` is the
    padded grid, flat, holding each boundary voxel's label and 0 elsewhere.
    """

    points: np.ndarray
    voxels: np.ndarray
    values: np.ndarray
    starts: np.ndarray
    labels: np.ndarray

    def rows(self, value: int) -> slice:
        """The rows of label ``value`` (empty when the map lacks it)."""
        if value + 1 >= len(self.starts):
            return slice(0, 0)
        return slice(self.starts[value], self.starts[value + 1])


def label_boundaries(label: np.ndarray, spacing: tuple[float, float, float], pad: tuple[int, int, int] = (1, 1, 1)
                     ) -> Boundaries:
    """The boundaries of all non-zero labels of an exclusive label map (x, y, z), spacing in mm per axis, in the
    grid padded by ``pad`` (>= 1) voxels per axis."""
    padded = np.pad(label, [(n, n) for n in pad])  # background around: outside the array is outside every label
    flat = padded.reshape(-1)
    inside = np.flatnonzero(flat)
    values = flat[inside]
    on_edge = np.zeros(inside.size, dtype=bool)
    for stride in np.asarray(padded.strides) // padded.itemsize:
        on_edge |= flat[inside + stride] != values
        on_edge |= flat[inside - stride] != values
    values = values[on_edge]
    order = np.argsort(values, kind="stable")  # by label; a stable sort keeps each label's voxels ascending
    voxels, values = inside[on_edge][order], values[order]
    index = np.unravel_index(voxels, padded.shape)
    points = np.column_stack([(i - n) * float(s) for i, n, s in zip(index, pad, spacing, strict=True)])
    labels = np.zeros_like(flat)
    labels[voxels] = values
    counts = np.bincount(values, minlength=1)
    return Boundaries(points, voxels, values, np.concatenate([[0], np.cumsum(counts)]), labels)


def neighbourhood(spacing: tuple[float, float, float], radius_mm: float, pad: tuple[int, int, int],
                  shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Every voxel offset no longer than ``radius_mm``, as flat offsets in a C-ordered grid of ``shape``, with its
    length in mm, nearest first. ``pad`` (voxels per axis) must be at least ``radius_mm / spacing`` per axis."""
    steps = np.meshgrid(*[np.arange(-n, n + 1) for n in pad], indexing="ij")
    length = np.sqrt(sum((d * s) ** 2 for d, s in zip(steps, spacing, strict=True))).ravel()
    strides = np.cumprod((1, *shape[:0:-1]))[::-1]
    flat = sum(d.ravel() * int(stride) for d, stride in zip(steps, strides, strict=True))
    keep = length <= radius_mm
    order = np.argsort(length[keep], kind="stable")
    return flat[keep][order], length[keep][order]


def nearby_distances(source: Boundaries, target: Boundaries, offsets: np.ndarray, lengths: np.ndarray
                     ) -> np.ndarray:
    """For each boundary voxel of ``source``, the distance (mm) to the nearest boundary voxel of ``target`` with
    the same label when one is within the :func:`neighbourhood` (offsets nearest first: the first hit is the
    nearest), inf otherwise. Both on the same padded grid."""
    distances = np.full(len(source.voxels), np.inf)
    todo = np.arange(len(source.voxels))
    for offset, length in zip(offsets, lengths, strict=True):
        hit = target.labels[source.voxels[todo] + offset] == source.values[todo]
        distances[todo[hit]] = length
        todo = todo[~hit]
        if todo.size == 0:
            break
    return distances


def completed(near: np.ndarray, points: np.ndarray, others: np.ndarray) -> np.ndarray:
    """``near`` distances (mm) of ``points`` (n, 3) with the inf ones (none within the neighbourhood) replaced by
    the distance to the nearest of ``others`` (m >= 1, 3), from a k-d tree."""
    far = np.isinf(near)
    if not far.any():
        return near
    distances = near.copy()
    distances[far] = KDTree(others).query(points[far])[0]
    return distances


def normalised_surface_distance(to_truth: np.ndarray, to_prediction: np.ndarray, tolerance_mm: float) -> float:
    """NSD from the boundary distances both ways (mm; see the module docstring): the fraction within tolerance."""
    within = np.count_nonzero(to_truth <= tolerance_mm) + np.count_nonzero(to_prediction <= tolerance_mm)
    return within / (to_truth.size + to_prediction.size)


def hausdorff_95(to_truth: np.ndarray, to_prediction: np.ndarray) -> float:
    """HD95 (mm) from the boundary distances both ways, each non-empty."""
    return float(max(np.percentile(to_truth, 95), np.percentile(to_prediction, 95)))


def surface_metrics(prediction: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float],
                    tolerances_mm: dict[int, float]) -> dict[int, tuple[float, float]]:
    """(NSD, HD95 in mm) of each label value in ``tolerances_mm`` (value -> NSD tolerance in mm).

    ``prediction`` and ``truth`` are exclusive label maps on one grid (x, y, z) with voxel size ``spacing`` (mm).
    """
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} != ground truth shape {truth.shape}")
    radius_mm = NEIGHBOURHOOD_VOXELS * max(spacing)
    pad = tuple(int(radius_mm / s) + 1 for s in spacing)  # covers the neighbourhood, whatever the rounding
    predicted, true = label_boundaries(prediction, spacing, pad), label_boundaries(truth, spacing, pad)
    padded_shape = tuple(n + 2 * p for n, p in zip(truth.shape, pad, strict=True))
    offsets, lengths = neighbourhood(spacing, radius_mm, pad, padded_shape)
    near_truth = nearby_distances(predicted, true, offsets, lengths)
    near_prediction = nearby_distances(true, predicted, offsets, lengths)
    scores = {}
    for value, tolerance in tolerances_mm.items():
        p, g = predicted.rows(value), true.rows(value)
        if p.start == p.stop and g.start == g.stop:
            scores[value] = (float("nan"), float("nan"))
        elif p.start == p.stop or g.start == g.stop:
            scores[value] = (0.0, float("inf"))
        else:
            to_truth = completed(near_truth[p], predicted.points[p], true.points[g])
            to_prediction = completed(near_prediction[g], true.points[g], predicted.points[p])
            scores[value] = (normalised_surface_distance(to_truth, to_prediction, tolerance),
                             hausdorff_95(to_truth, to_prediction))
    return scores
