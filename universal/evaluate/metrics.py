"""Per-case evaluation: Dice, normalised surface distance (NSD) and 95th-percentile Hausdorff distance (HD95) of
every class of the class table, against a harmonized ground truth.

Class regions follow the one-vs-all design: an organ's region includes the tumours that lie in it (a bilateral
tumour belongs to the organ on its side of the body midline), a tumour's region is its own label value. The
predicted organ region is the organ label image (organ channels already cover their tumours). So each case is two
pairs of exclusive label maps, organs and tumours, and every metric of a pair comes from one pass over it.

Dice = 2|P∩G| / (|P| + |G|), with no smoothing term. When both P and G are empty the Dice is undefined and
reported as NaN (excluded from means); a non-empty prediction of an absent class scores 0. That is nnU-Net's
rule; MONAI's ``ignore_empty`` instead gives NaN whenever G is empty. ``gt_ml`` tells the two cases apart, so a
comparison of models can average over the same cases (those whose G is not empty).

NSD (tolerance: the class table's ``nsd_tolerance_mm``, 1 mm by default) and HD95 (mm) use MONAI's voxel-boundary
definitions, spacing honoured; both empty gives NaN, one empty gives NSD 0 and HD95 inf
(:mod:`universal.evaluate.surface`). A class the case's dataset does not annotate has NaN metrics and ground-truth
volume: its absence from the label says nothing.

Tumour detection as the paper's Table 4 counts it needs no column of its own: a case is positive for a tumour
class when ``gt_ml > 0`` and called positive when ``pred_ml > 0`` (a tumour remains after post-processing).
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
from universal.evaluate.surface import surface_metrics
from universal.infer.ome import read_prediction

METRIC_COLUMNS = ("dataset", "case_id", "class", "kind", "predicted", "annotated", "dice", "nsd", "nsd_tolerance_mm",
                  "hd95_mm", "gt_ml", "pred_ml")
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
    return dice_from_counts(int(np.logical_and(prediction, truth).sum()), int(prediction.sum()), int(truth.sum()))


def dice_from_counts(intersection: int, predicted: int, true: int) -> float:
    """Dice from voxel counts |P∩G|, |P| and |G|; NaN when |P| + |G| = 0."""
    total = predicted + true
    return float("nan") if total == 0 else 2.0 * intersection / total


def truth_maps(label: np.ndarray, classes: ClassTable, affine: np.ndarray, midline_x_mm: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """The ground truth as two exclusive maps (x, y, z): organ regions and tumours.

    In the organ map every tumour voxel carries its organ's value; a tumour with two parents (one per side, e.g.
    Kidney Tumor) gives each voxel to the parent on its side of the midline (RAS x in mm, ``affine`` voxel -> mm).
    Agrees with :func:`class_region` class by class; values outside the class table become background.
    """
    size = max(int(label.max(initial=0)), classes.max_index) + 1
    organ_of, tumour_of = np.zeros(size, label.dtype), np.zeros(size, label.dtype)
    sided = []
    for cls in classes:
        if not cls.is_tumour:
            organ_of[cls.index] = cls.index
            continue
        tumour_of[cls.index] = cls.index
        if len(cls.parents) == 1:
            organ_of[cls.index] = classes[cls.parents[0]].index
            continue
        by_side = {classes[name].side: classes[name].index for name in cls.parents}
        if len(cls.parents) != 2 or set(by_side) != {"right", "left"}:
            raise ValueError(f"class {cls.name!r}: a tumour with several parents needs one right and one left "
                             f"parent to be evaluated, got {list(cls.parents)}")
        sided.append((cls.index, by_side))
    organs, tumours = organ_of[label], tumour_of[label]
    right_side = None
    for value, by_side in sided:
        inside = label == value
        if not inside.any():
            continue
        if right_side is None:
            right_side = right_of_midline(label.shape, affine, midline_x_mm)
        organs[inside & right_side] = by_side["right"]
        organs[inside & ~right_side] = by_side["left"]
    return organs, tumours


def overlap_counts(prediction: np.ndarray, truth: np.ndarray, size: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel counts per label value 0..n-1 (n >= ``size``) of two label maps: (|P∩G|, |P|, |G|).

    One confusion matrix over the voxels where either map is non-zero (the background count, value 0, stays 0).
    """
    either = np.flatnonzero(prediction.reshape(-1) | truth.reshape(-1))
    predicted, true = prediction.reshape(-1)[either].astype(np.intp), truth.reshape(-1)[either].astype(np.intp)
    size = max(size, int(predicted.max(initial=0)) + 1, int(true.max(initial=0)) + 1)
    joint = np.bincount(predicted * size + true, minlength=size * size).reshape(size, size)
    return np.diagonal(joint).copy(), joint.sum(axis=1), joint.sum(axis=0)


def evaluate_case(organs: np.ndarray, tumours: np.ndarray, truth: Volume, classes: ClassTable, midline_x_mm: float,
                  dataset: str, case_id: str, predicted: list[str] | None = None,
                  annotated: list[str] | None = None) -> pd.DataFrame:
    """Dice, NSD, HD95 (mm) and volumes (mL) per class for one case; prediction maps (x, y, z) must be on the
    ground truth's grid.

    ``predicted`` names the classes the model predicts (default: all); the column ``predicted`` marks them, so
    that classes no training case annotated are told apart from classes the model gets wrong. ``annotated`` names
    the classes the case's dataset labels (default: all); the others get NaN metrics and ``gt_ml``.
    """
    if organs.shape != truth.shape or tumours.shape != truth.shape:
        raise ValueError(f"{dataset}/{case_id}: prediction shape {organs.shape} != ground truth {truth.shape}")
    voxel_ml = float(np.prod(truth.spacing)) / 1000.0
    predicted_names = set(classes.names if predicted is None else predicted)
    annotated_names = set(classes.names if annotated is None else annotated)
    truth_organs, truth_tumours = truth_maps(truth.array, classes, truth.affine, midline_x_mm)
    rows = {}
    for prediction_map, truth_map, members in ((organs, truth_organs, classes.organs()),
                                               (tumours, truth_tumours, classes.tumours())):
        both, in_prediction, in_truth = overlap_counts(prediction_map, truth_map, classes.max_index + 1)
        scored = [c for c in members if c.name in annotated_names]
        surface = surface_metrics(prediction_map, truth_map, truth.spacing,
                                  {c.index: c.nsd_tolerance_mm for c in scored})
        for c in members:
            row = {"dataset": dataset, "case_id": case_id, "class": c.name, "kind": c.kind,
                   "predicted": c.name in predicted_names, "annotated": c.index in surface,
                   "nsd_tolerance_mm": c.nsd_tolerance_mm, "pred_ml": int(in_prediction[c.index]) * voxel_ml}
            if row["annotated"]:
                row["nsd"], row["hd95_mm"] = surface[c.index]
                row["dice"] = dice_from_counts(int(both[c.index]), int(in_prediction[c.index]),
                                               int(in_truth[c.index]))
                row["gt_ml"] = int(in_truth[c.index]) * voxel_ml
            rows[c.name] = row
    return pd.DataFrame([rows[name] for name in classes.names], columns=list(METRIC_COLUMNS))


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
                         case.case_id, meta.get("predicted_classes"), truth.attrs["annotated"])
