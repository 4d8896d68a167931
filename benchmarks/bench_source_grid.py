"""Mapping predicted classes from the model grid back onto a CT's own grid: ours against the plain routes.

Run: .venv/bin/python benchmarks/bench_source_grid.py [--repeats 3]

A CT of 512 x 512 x 160 voxels of 0.78 x 0.78 x 2.5 mm predicted on the 1.5 mm grid (266 x 266 x 267 voxels),
with 11 predicted organ channels: ellipsoidal probability blobs of 20 to 600 mL, a few of them overlapping.
Every route starts from the same probabilities (K, X, Y, Z) float32 and masks (probability > 0.5) on the model grid
and returns one exclusive uint8 label map (X, Y, Z) on the CT's grid (the most probable class where several
qualify). The grids share their axes and the centre of voxel 0. Routes:

- ``ours``: ``universal.infer.source_grid.label_map_on_source_grid``: each class's probability interpolated linearly
  onto the CT's grid within the bounding box of its mask, thresholded there;
- ``loop``: the plain per-class loop a user writes with our resampler: each class's probability resampled linearly
  (``universal.core.volume.resample``) over the whole CT grid, thresholded, the most probable class kept;
- ``sitk-linear``: the same loop with SimpleITK: ``sitk.Resample`` of each class's probability image onto the CT's
  grid (``sitkLinear``), thresholded, the most probable class kept;
- ``sitk-nearest``: the exclusive label map on the model grid (argmax of the probabilities where the largest exceeds
  0.5), resampled once onto the CT's grid by SimpleITK's ``ResampleImageFilter`` with ``sitkNearestNeighbor``.

SimpleITK reads a numpy array with its axes reversed (z, y, x); the routes hand it the arrays as they are with the
spacings reversed, so no array is transposed and its output comes back in our (X, Y, Z) order.

The probabilities are made once (not timed) and saved as .npy; each route runs in its own process (for its peak
resident memory, which includes the ~0.9 GB of probabilities every route starts from), one process per route and
round, the routes interleaved within each round. The table gives seconds per round (median, best, and the median
and range of the per-round ratio to ours), and each route's label map
against ours: voxels that differ (of the voxels either labels) and the Dice per class (worst and mean).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SOURCE_SHAPE = (512, 512, 160)
SOURCE_SPACING = (0.78, 0.78, 2.5)
GRID_SPACING = (1.5, 1.5, 1.5)
CLASSES = 11
THRESHOLD = 0.5
THREADS = 2
ROUTES = {"ours": "ours: probabilities, linear, per class in its bounding box (`label_map_on_source_grid`)",
          "loop": "per-class loop over the whole grid, linear (`universal.core.volume.resample`)",
          "sitk-linear": "SimpleITK per class, `sitk.Resample` linear over the whole grid",
          "sitk-nearest": "SimpleITK label map, one `ResampleImageFilter` nearest neighbour"}


def make_prediction(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (K, X, Y, Z) float32 of ellipsoidal blobs on the model grid, and their masks (> 0.5)."""
    from universal.core.volume import resampled_shape

    rng = np.random.default_rng(seed)
    shape = resampled_shape(SOURCE_SHAPE, SOURCE_SPACING, GRID_SPACING)
    axes = [np.arange(n, dtype=np.float32) * s for n, s in zip(shape, GRID_SPACING, strict=True)]
    probabilities = np.zeros((CLASSES, *shape), dtype=np.float32)
    for k in range(CLASSES):
        volume_ml = rng.uniform(20, 600)
        radii = (volume_ml * 1000 * 3 / (4 * np.pi)) ** (1 / 3) * rng.uniform(0.7, 1.3, 3)
        centre = [rng.uniform(0.3, 0.7) * a[-1] for a in axes]
        distance = sum(((a - c) / r)[tuple(slice(None) if i == j else None for j in range(3))] ** 2
                       for i, (a, c, r) in enumerate(zip(axes, centre, radii, strict=True)))
        probabilities[k] = 1.0 / (1.0 + np.exp(4.0 * (np.sqrt(distance) - 1.0)))
    return probabilities, probabilities > THRESHOLD


def _keep_most_probable(best: np.ndarray, labels: np.ndarray, probability: np.ndarray, value: int) -> None:
    """Where ``probability`` (X, Y, Z) exceeds the threshold and the best so far, write ``value`` into ``labels``
    and the probability into ``best`` (both (X, Y, Z), in place); the earlier class wins a tie."""
    wins = (probability > THRESHOLD) & (probability > best)
    best[wins] = probability[wins]
    labels[wins] = value


def per_class_loop(probabilities: np.ndarray, values: list[int]) -> np.ndarray:
    """Each class's probability resampled linearly over the whole CT grid with our resampler, thresholded."""
    from universal.core.volume import Volume, resample

    affine = np.diag([*GRID_SPACING, 1.0])
    best = np.full(SOURCE_SHAPE, -1.0, dtype=np.float32)
    labels = np.zeros(SOURCE_SHAPE, dtype=np.uint8)
    for k, value in enumerate(values):
        probability = resample(Volume(probabilities[k], affine), SOURCE_SPACING, order=1, shape=SOURCE_SHAPE).array
        _keep_most_probable(best, labels, probability, value)
    return labels


def _sitk_image(array: np.ndarray, spacing: tuple[float, ...]):
    """A SimpleITK image of ``array`` (X, Y, Z), which SimpleITK reads as (z, y, x): spacing given reversed."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing)))
    return image


def _sitk_reference():
    """The CT's grid as a SimpleITK image: origin 0, identity direction, ``SOURCE_SPACING`` mm (reversed axes)."""
    import SimpleITK as sitk

    reference = sitk.Image([int(n) for n in reversed(SOURCE_SHAPE)], sitk.sitkUInt8)
    reference.SetSpacing(tuple(float(s) for s in reversed(SOURCE_SPACING)))
    return reference


def sitk_linear(probabilities: np.ndarray, values: list[int]) -> np.ndarray:
    """Each class's probability resampled by ``sitk.Resample`` (linear) onto the CT's grid, thresholded."""
    import SimpleITK as sitk

    reference = _sitk_reference()
    best = np.full(SOURCE_SHAPE, -1.0, dtype=np.float32)
    labels = np.zeros(SOURCE_SHAPE, dtype=np.uint8)
    for k, value in enumerate(values):
        moved = sitk.Resample(_sitk_image(probabilities[k], GRID_SPACING), reference, sitk.Transform(),
                              sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        _keep_most_probable(best, labels, sitk.GetArrayViewFromImage(moved), value)
    return labels


def sitk_nearest(probabilities: np.ndarray, values: list[int]) -> np.ndarray:
    """The exclusive label map on the model grid, resampled onto the CT's grid by nearest neighbour (SimpleITK)."""
    import SimpleITK as sitk

    grid_map = np.where(probabilities.max(axis=0) > THRESHOLD,
                        np.asarray(values, dtype=np.uint8)[probabilities.argmax(axis=0)], 0).astype(np.uint8)
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(_sitk_reference())
    resampler.SetInterpolator(sitk.sitkNearestNeighbor)
    resampler.SetDefaultPixelValue(0)
    return sitk.GetArrayFromImage(resampler.Execute(_sitk_image(grid_map, GRID_SPACING)))


def run_route(route: str, folder: Path, save: bool) -> dict:
    """Load the probabilities from ``folder``, time one route, optionally save its label map there."""
    import SimpleITK as sitk
    import torch

    from universal.infer.source_grid import label_map_on_source_grid

    torch.set_num_threads(THREADS)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(THREADS)
    probabilities = np.load(folder / "probabilities.npy")
    masks = probabilities > THRESHOLD
    values = list(range(1, CLASSES + 1))
    began = time.perf_counter()
    if route == "ours":
        labels = label_map_on_source_grid(masks, probabilities, list(range(CLASSES)), values, GRID_SPACING,
                                          SOURCE_SHAPE, SOURCE_SPACING, [THRESHOLD] * CLASSES)
    elif route == "loop":
        labels = per_class_loop(probabilities, values)
    elif route == "sitk-linear":
        labels = sitk_linear(probabilities, values)
    else:
        labels = sitk_nearest(probabilities, values)
    seconds = time.perf_counter() - began
    if save:
        np.save(folder / f"labels_{route}.npy", labels)
    return {"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "labelled_voxels": int((labels > 0).sum()), "shape": list(labels.shape)}


def agreement(labels: np.ndarray, reference: np.ndarray) -> dict:
    """``labels`` against ``reference`` (both (X, Y, Z) uint8): differing voxels, their share of the voxels either
    labels, and the Dice of each class 1..CLASSES (worst, mean)."""
    differ = int((labels != reference).sum())
    union = int(((labels > 0) | (reference > 0)).sum())
    dice = []
    for value in range(1, CLASSES + 1):
        a, b = labels == value, reference == value
        total = int(a.sum()) + int(b.sum())
        dice.append(2 * int((a & b).sum()) / total if total else 1.0)
    return {"differ": differ, "differ_share": differ / max(union, 1), "dice_min": min(dice),
            "dice_mean": float(np.mean(dice))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each runs every route once")
    parser.add_argument("--route", choices=tuple(ROUTES), help=argparse.SUPPRESS)  # one child process
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--save", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.route:
        print(json.dumps(run_route(args.route, args.folder, args.save)))
        return
    folder = Path(tempfile.mkdtemp(prefix="bench_source_grid_"))
    try:
        np.save(folder / "probabilities.npy", make_prediction()[0])
        runs: dict[str, list[dict]] = {route: [] for route in ROUTES}
        for round_ in range(args.repeats):
            for route in ROUTES:
                command = [sys.executable, __file__, "--route", route, "--folder", str(folder)]
                if round_ == 0:
                    command.append("--save")
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                runs[route].append(json.loads(output.strip().splitlines()[-1]))
        reference = np.load(folder / "labels_ours.npy")
        agreements = {route: agreement(np.load(folder / f"labels_{route}.npy"), reference) for route in ROUTES}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report(runs, agreements, args.repeats)


def report(runs: dict[str, list[dict]], agreements: dict[str, dict], repeats: int) -> None:
    """Print the per-round seconds, the median and spread, peak RSS and the agreement with ours as Markdown."""
    print(f"CT {SOURCE_SHAPE} at {SOURCE_SPACING} mm, model grid {GRID_SPACING} mm, {CLASSES} classes; "
          f"{repeats} interleaved rounds, {THREADS} threads\n")
    print("| route | s per round | median s | best s | median / ours (rounds) | peak RSS MiB (max) | labelled voxels | "
          "differing voxels (of either's labelled) | Dice vs ours, worst / mean |")
    print("|---|---|---|---|---|---|---|---|---|")
    ours = [run["seconds"] for run in runs["ours"]]
    for route, name in ROUTES.items():
        seconds = [run["seconds"] for run in runs[route]]
        ratios = [s / o for s, o in zip(seconds, ours, strict=True)]
        match = agreements[route]
        print(f"| {name} | {' / '.join(f'{s:.2f}' for s in seconds)} | {np.median(seconds):.2f} | {min(seconds):.2f} | "
              f"{np.median(ratios):.1f}× ({min(ratios):.1f}–{max(ratios):.1f}) | "
              f"{max(run['peak_rss_mib'] for run in runs[route]):,.0f} | {runs[route][0]['labelled_voxels']:,} | "
              f"{match['differ']:,} ({100 * match['differ_share']:.2f} %) | "
              f"{match['dice_min']:.4f} / {match['dice_mean']:.4f} |")


if __name__ == "__main__":
    main()
