"""Per-case evaluation: Dice of every class of the class table, against a harmonized ground truth.

Class regions follow the one-vs-all design: an organ's region includes the tumours that lie in it (a bilateral
tumour belongs to the organ on its side of the body midline), a tumour's region is its own label value. The
predicted organ region is the organ label image (organ channels already cover their tumours).

Dice = 2|P∩G| / (|P| + |G|), with no smoothing term. When both P and G are empty the Dice is undefined and
reported as NaN (excluded from means); a non-empty prediction of an absent class scores 0. That is nnU-Net's
rule; MONAI's ``ignore_empty`` instead gives NaN whenever G is empty. ``gt_ml`` tells the two cases apart, so a
comparison of models can average over the same cases (those whose G is not empty).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from universal.core.atomic import atomic_output
from universal.core.classes import ClassTable, UniversalClass
from universal.core.sides import right_of_midline
from universal.core.tsv import one_line, read_tsv_rows, write_tsv
from universal.core.volume import Volume
from universal.data.catalog import Case, DatasetEntry
from universal.data.harmonize import harmonize_case
from universal.infer.ome import predicted_mask, read_prediction

METRIC_COLUMNS = ("dataset", "case_id", "class", "kind", "predicted", "dice", "gt_ml", "pred_ml")
FAILURE_COLUMNS = ("dataset", "case_id", "stage", "error")

log = logging.getLogger(__name__)


def class_region(label: np.ndarray, cls: UniversalClass, classes: ClassTable, right_side: np.ndarray | None
                 ) -> np.ndarray:
    """The region of ``cls`` in an exclusive universal label map, tumours counted in their organ."""
    region = label == cls.index
    if cls.kind != "organ":
        return region
    for tumour in classes.tumours():
        if cls.name not in tumour.parents:
            continue
        inside = label == tumour.index
        if len(tumour.parents) > 1 and cls.side is not None and right_side is not None:
            inside &= right_side if cls.side == "right" else ~right_side
        region |= inside
    return region


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean arrays; NaN when both are empty."""
    total = int(prediction.sum()) + int(truth.sum())
    if total == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def evaluate_case(organs: np.ndarray, tumours: np.ndarray, truth: Volume, classes: ClassTable, midline_x_mm: float,
                  dataset: str, case_id: str, predicted: list[str] | None = None) -> pd.DataFrame:
    """Dice and volumes (mL) per class for one case; prediction maps must be on the ground truth's grid.

    ``predicted`` names the classes the model predicts (default: all); the column ``predicted`` marks them, so
    that classes no training case annotated are told apart from classes the model gets wrong.
    """
    if organs.shape != truth.shape or tumours.shape != truth.shape:
        raise ValueError(f"{dataset}/{case_id}: prediction shape {organs.shape} != ground truth {truth.shape}")
    voxel_ml = float(np.prod(truth.spacing)) / 1000.0
    right_side = right_of_midline(truth.shape, truth.affine, midline_x_mm)
    rows = []
    predicted_names = None if predicted is None else set(predicted)
    for cls in classes:
        mask = predicted_mask(organs, tumours, cls)
        region = class_region(truth.array, cls, classes, right_side)
        rows.append({"dataset": dataset, "case_id": case_id, "class": cls.name, "kind": cls.kind,
                     "predicted": predicted_names is None or cls.name in predicted_names,
                     "dice": dice(mask, region), "gt_ml": int(region.sum()) * voxel_ml,
                     "pred_ml": int(mask.sum()) * voxel_ml})
    return pd.DataFrame(rows, columns=list(METRIC_COLUMNS))


def write_metrics(table: pd.DataFrame, path: str | Path) -> None:
    """Write a metrics table as TSV under a temporary name, then rename."""
    with atomic_output(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.6g")


def evaluate_predictions(cases: list[Case], entry: DatasetEntry, classes: ClassTable, predictions: str | Path,
                         batch_report: str | Path, out_dir: str | Path, failures: str | Path) -> list[Path]:
    """Evaluate the cases of one inference batch: one metrics TSV per case in ``out_dir``; returns their paths.

    The ground truth is the case's label harmonized on its own grid (no resampling), so it shares the
    prediction's grid. A case that inference reported as failed, that has no prediction, or whose evaluation
    fails (any error) is listed with its reason in ``failures`` (TSV: dataset, case_id, stage, error) and the
    others go on: nothing is silently dropped.
    """
    predictions, out_dir = Path(predictions), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inferred = {row["case_id"]: row for row in read_tsv_rows(batch_report)}
    written, failed = [], []
    for case in cases:
        row = inferred.get(case.case_id)
        if row is None or row["status"] == "failed":
            reason = row["error"] if row else f"not in the batch report {batch_report}"
            failed.append((entry.key, case.case_id, "infer", reason))
            continue
        try:
            table = _evaluate_one(case, entry, classes, predictions / f"{case.case_id}.ome.zarr")
        except Exception as err:  # one case never stops the batch: every error is recorded on its line
            failed.append((entry.key, case.case_id, "evaluate", one_line(err)))
            log.error("%s/%s: evaluation failed: %s", entry.key, case.case_id, one_line(err))
            continue
        target = out_dir / f"{case.case_id}.tsv"
        write_metrics(table, target)
        written.append(target)
    write_tsv(failures, FAILURE_COLUMNS, failed)
    return written


def _evaluate_one(case: Case, entry: DatasetEntry, classes: ClassTable, prediction: Path) -> pd.DataFrame:
    """The metrics table of one case against its harmonized ground truth."""
    if not prediction.exists():
        raise ValueError(f"no prediction at {prediction}")
    _, organs, tumours, meta = read_prediction(prediction)
    truth = harmonize_case(case, entry, classes, target_spacing=None)
    if truth.label is None:
        raise ValueError(f"{case.image}: the case has no ground-truth label to evaluate against")
    return evaluate_case(organs, tumours, truth.label, classes, truth.attrs["midline_x_mm"], entry.key,
                         case.case_id, meta.get("predicted_classes"))
