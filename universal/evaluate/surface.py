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

A boundary voxel shared by both maps is at distance 0; the others' distances come from a k-d tree over the other
set's boundary points, so a few scattered false-positive voxels cost a few queries, never a distance transform over
the box they span.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import KDTree


@dataclass(frozen=True)
class Boundaries:
    """The boundary voxels of every label of one map, grouped by label value.

    ``points`` (n, 3) are voxel centres in mm along the array axes and ``voxels`` (n,) their flat indices in the
    grid padded by one voxel on every side (ascending within a label); label ``v``'s are rows
    ``starts[v]:starts[v + 1]``.
    """

    points: np.ndarray
    voxels: np.ndarray
    starts: np.ndarray

    def of(self, value: int) -> tuple[np.ndarray, np.ndarray]:
        """The (k, 3) boundary points (mm) of label ``value`` and their (k,) flat indices; k = 0 when absent."""
        if value + 1 >= len(self.starts):
            return self.points[:0], self.voxels[:0]
        rows = slice(self.starts[value], self.starts[value + 1])
        return self.points[rows], self.voxels[rows]


def label_boundaries(label: np.ndarray, spacing: tuple[float, float, float]) -> Boundaries:
    """The boundaries of all non-zero labels of an exclusive label map (x, y, z), spacing in mm per axis."""
    padded = np.pad(label, 1)  # a rim of background: outside the array counts as outside every label
    flat = padded.reshape(-1)
    inside = np.flatnonzero(flat)
    values = flat[inside]
    on_edge = np.zeros(inside.size, dtype=bool)
    for stride in np.asarray(padded.strides) // padded.itemsize:
        on_edge |= flat[inside + stride] != values
        on_edge |= flat[inside - stride] != values
    values = values[on_edge]
    order = np.argsort(values, kind="stable")  # by label; a stable sort keeps each label's voxels ascending
    voxels = inside[on_edge][order]
    index = np.unravel_index(voxels, padded.shape)
    points = np.column_stack([(i - 1) * float(s) for i, s in zip(index, spacing, strict=True)])
    counts = np.bincount(values, minlength=1)
    return Boundaries(points, voxels, np.concatenate([[0], np.cumsum(counts)]))


def distances_to(points: np.ndarray, voxels: np.ndarray, others: np.ndarray, other_voxels: np.ndarray
                 ) -> np.ndarray:
    """For each of ``points`` (n, 3), the Euclidean distance (their unit) to the nearest of ``others`` (m >= 1, 3).

    A point whose voxel (``voxels``, ascending flat indices) is among ``other_voxels`` (ascending) is at 0; the
    others are looked up in a k-d tree over ``others``.
    """
    at = np.searchsorted(other_voxels, voxels).clip(max=len(other_voxels) - 1)
    apart = other_voxels[at] != voxels
    distances = np.zeros(len(points))
    if apart.any():
        distances[apart] = KDTree(others).query(points[apart])[0]
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
    predicted, true = label_boundaries(prediction, spacing), label_boundaries(truth, spacing)
    scores = {}
    for value, tolerance in tolerances_mm.items():
        (p, p_voxels), (g, g_voxels) = predicted.of(value), true.of(value)
        if len(p) == 0 and len(g) == 0:
            scores[value] = (float("nan"), float("nan"))
        elif len(p) == 0 or len(g) == 0:
            scores[value] = (0.0, float("inf"))
        else:
            to_truth, to_prediction = distances_to(p, p_voxels, g, g_voxels), distances_to(g, g_voxels, p, p_voxels)
            scores[value] = (normalised_surface_distance(to_truth, to_prediction, tolerance),
                             hausdorff_95(to_truth, to_prediction))
    return scores
