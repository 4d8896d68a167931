"""Where a tumour class is lost: its Dice per case, grouped by the tumour's distance to a neighbouring organ.

Run on the work folders of ``bench_universal_vs_dataset.py`` (their external phantoms and predictions):

    .venv/bin/python benchmarks/tumour_dice_by_neighbour.py --work X0 X10 X11 \
        --tumour "Liver Tumor" --neighbour Stomach --models universal demo_msd_liver --edges 10 30

For every external case that holds the tumour, the distance (mm) from the tumour to the neighbour is the smallest
Euclidean distance from a tumour voxel to a neighbour voxel of the ground truth, on the case's own grid. Cases are
grouped by the ``--edges`` (mm); per group and model it prints the mean Dice, and the tumour volume missed (false
negative) and falsely marked (false positive), in mL summed over the group's cases. Ground truth and predictions
are read as the evaluation reads them (``universal.evaluate.metrics``), so the Dice per case is the benchmark's.
"""

from __future__ import annotations

import argparse
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from universal.core.classes import ClassTable, load_class_table
from universal.core.sides import right_of_midline
from universal.data.catalog import DatasetEntry, find_cases, load_catalog
from universal.data.harmonize import harmonize_case
from universal.evaluate.metrics import class_region, dice
from universal.infer.ome import predicted_mask, read_prediction

EXTERNAL = "demo_external"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, nargs="+", required=True, help="bench_universal_vs_dataset work folders")
    parser.add_argument("--tumour", default="Liver Tumor", help="the tumour class")
    parser.add_argument("--neighbour", default="Stomach", help="the organ whose distance groups the cases")
    parser.add_argument("--models", nargs="+", default=["universal", "demo_msd_liver"])
    parser.add_argument("--edges", type=float, nargs="+", default=[10.0, 30.0], help="group edges (mm)")
    return parser.parse_args()


def case_rows(work: Path, tumour: str, neighbour: str, models: list[str], classes: ClassTable,
              entry: DatasetEntry) -> list[dict]:
    """One row per (case holding the tumour, model): distance to the neighbour (mm), Dice, FN and FP (mL)."""
    rows = []
    for case in find_cases(entry, work / "data" / EXTERNAL):
        truth = harmonize_case(case, entry, classes, target_spacing=None)
        label = truth.label
        right = right_of_midline(label.shape, label.affine, truth.attrs["midline_x_mm"])
        region = class_region(label.array, classes[tumour], classes, right)
        if not region.any():
            continue
        beside = class_region(label.array, classes[neighbour], classes, right)
        distance = (float(ndimage.distance_transform_edt(~beside, sampling=label.spacing)[region].min())
                    if beside.any() else float("inf"))
        voxel_ml = float(np.prod(label.spacing)) / 1000.0
        for model in models:
            _, organs, tumours, _ = read_prediction(work / "predictions" / model / f"{case.case_id}.ome.zarr")
            predicted = predicted_mask(organs, tumours, classes[tumour])
            rows.append({"work": work.name, "case_id": case.case_id, "model": model, "distance_mm": distance,
                         "dice": dice(predicted, region),
                         "missed_ml": int((region & ~predicted).sum()) * voxel_ml,
                         "false_ml": int((predicted & ~region).sum()) * voxel_ml})
    return rows


def main() -> None:
    args = parse_args()
    classes = load_class_table()
    entry = load_catalog(None, classes)[EXTERNAL]
    table = pd.DataFrame([row for work in args.work
                          for row in case_rows(work, args.tumour, args.neighbour, args.models, classes, entry)])
    edges = [0.0, *sorted(args.edges), float("inf")]
    table["group"] = pd.cut(table["distance_mm"], edges, right=False,
                            labels=[f"{lo:g}–{hi:g} mm" for lo, hi in pairwise(edges)])
    summary = table.groupby(["group", "model"], observed=True).agg(
        cases=("dice", "size"), dice=("dice", "mean"), missed_ml=("missed_ml", "sum"), false_ml=("false_ml", "sum"))
    print(f"{args.tumour} by distance to {args.neighbour}, {len(table) // len(args.models)} cases "
          f"({', '.join(str(w) for w in args.work)})\n")
    print("| distance | model | cases | mean Dice | missed mL | false mL |\n|---|---|---|---|---|---|")
    for (group, model), row in summary.iterrows():
        print(f"| {group} | {model} | {int(row['cases'])} | {row['dice']:.3f} | {row['missed_ml']:.0f} | "
              f"{row['false_ml']:.0f} |")
    overall = table.groupby("model")["dice"].mean()
    print("\nall cases: " + ", ".join(f"{model} {overall[model]:.3f}" for model in args.models))
    closest = table[table["distance_mm"] < edges[1]].sort_values(["distance_mm", "model"])
    if len(closest):
        listing = closest.drop(columns="group").to_string(index=False, float_format="{:.3f}".format)
        print(f"\nunder {edges[1]:g} mm:\n{listing}")


if __name__ == "__main__":
    main()
