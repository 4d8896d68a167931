"""Mapping predicted classes from the model grid back onto a CT's own grid: probabilities against label maps.

Run: .venv/bin/python benchmarks/bench_source_grid.py [--repeats 3]

A CT of 512 x 512 x 160 voxels of 0.78 x 0.78 x 2.5 mm predicted on the 1.5 mm grid (266 x 266 x 267 voxels),
with 11 predicted organ channels: ellipsoidal probability blobs of 20 to 600 mL, a few of them overlapping.
Two routes, each in its own process (for its peak resident memory), best of ``--repeats``:

- ``label map, nearest``: the route before ``universal.infer.source_grid``: one exclusive label map on the model grid
  (the most probable class where masks overlap), resampled to the CT's grid by nearest neighbour;
- ``probabilities, linear``: ``universal.infer.source_grid.label_map_on_source_grid``: each class's probability
  interpolated linearly onto the CT's grid within the bounding box of its mask, thresholded there.

Both start from the same probabilities and masks (made outside the timing); the table gives seconds and the
process's peak RSS (which includes the ~0.9 GB of probabilities both routes start from).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

from universal.core.volume import Volume, resample, resampled_shape
from universal.infer.source_grid import label_map_on_source_grid

SOURCE_SHAPE = (512, 512, 160)
SOURCE_SPACING = (0.78, 0.78, 2.5)
GRID_SPACING = (1.5, 1.5, 1.5)
CLASSES = 11
THRESHOLD = 0.5


def make_prediction(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (K, X, Y, Z) float32 of ellipsoidal blobs on the model grid, and their masks (> 0.5)."""
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


def label_map_nearest(masks: np.ndarray, probabilities: np.ndarray, values: list[int]) -> np.ndarray:
    """The route before: the exclusive label map on the model grid, resampled by nearest neighbour."""
    scores = np.where(masks, probabilities, -1.0)
    best = scores.argmax(axis=0)
    grid_map = np.where(scores.max(axis=0) >= 0, np.asarray(values, dtype=np.uint8)[best], 0).astype(np.uint8)
    affine = np.diag([*GRID_SPACING, 1.0])
    return resample(Volume(grid_map, affine), SOURCE_SPACING, order=0, shape=SOURCE_SHAPE).array


def run_route(route: str) -> dict:
    probabilities, masks = make_prediction()
    values = list(range(1, CLASSES + 1))
    began = time.perf_counter()
    if route == "nearest":
        labels = label_map_nearest(masks, probabilities, values)
    else:
        labels = label_map_on_source_grid(masks, probabilities, list(range(CLASSES)), values, GRID_SPACING,
                                          SOURCE_SHAPE, SOURCE_SPACING, THRESHOLD)
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "labelled_voxels": int((labels > 0).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--route", choices=("nearest", "linear"), help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args()
    if args.route:
        print(json.dumps(run_route(args.route)))
        return
    rows = {}
    for route, name in (("nearest", "label map, nearest"), ("linear", "probabilities, linear")):
        runs = [json.loads(subprocess.run([sys.executable, __file__, "--route", route], check=True,
                                          capture_output=True, text=True).stdout) for _ in range(args.repeats)]
        rows[name] = min(runs, key=lambda r: r["seconds"])
    print(f"CT {SOURCE_SHAPE} at {SOURCE_SPACING} mm, model grid {GRID_SPACING} mm, {CLASSES} classes; "
          f"best of {args.repeats}\n")
    print("| route | s | peak RSS MiB | labelled voxels |\n|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['seconds']:.2f} | {row['peak_rss_mib']:.0f} | {row['labelled_voxels']:,} |")


if __name__ == "__main__":
    main()
