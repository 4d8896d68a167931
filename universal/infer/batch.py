"""A batch of inference: load the model once, predict every case into its own files, report each case on one line.

Outputs in ``out_dir`` per case: ``<case_id>.ome.zarr`` (:mod:`universal.infer.ome`; with ``export_probabilities``
also the per-class probabilities on the model grid), ``<case_id>.statistics.tsv``
(per class: volume in mL, mean and median HU), with ``export_nifti`` ``<case_id>_organs.nii.gz`` and
``<case_id>_tumours.nii.gz`` in the input file's own geometry, and with ``export_dicom_seg`` for a DICOM series
input ``<case_id>.seg.dcm`` referencing that series (:mod:`universal.infer.dicom_seg`). Each is written under a
temporary name and renamed when complete, so an output that exists is complete.

Cases are independent: a case that fails for any reason (unreadable image, malformed geometry, an error inside
the model) is recorded with its error on one line and the batch goes on; its outputs from an earlier run are
removed, so no stale prediction sits beside a new failure. A case whose complete outputs exist from a run with the
same checkpoint, class table and settings is skipped, so a batch that was killed (``scancel``, a node failure) and
started again computes only the cases it had not finished.

The batch report (TSV: case_id, status ``ok``/``skipped``/``failed``, seconds, error) is the batch's own output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from universal.core.atomic import atomic_output, remove
from universal.core.classes import ClassTable
from universal.core.digests import file_digests
from universal.core.paths import file_name_problem
from universal.core.progress import progress
from universal.core.sides import BODY_THRESHOLD_HU
from universal.core.tsv import one_line, write_tsv
from universal.core.volume import Volume
from universal.data.catalog import Case
from universal.data.images import is_nifti, read_ct
from universal.data.layouts import read_dicom_series
from universal.infer.dicom_seg import write_dicom_seg
from universal.infer.ome import predicted_mask, prediction_attrs, write_prediction
from universal.infer.predict import predict_volume
from universal.infer.settings import InferenceSettings, settings_from_checkpoint, windows_per_pass
from universal.model.network import load_checkpoint

log = logging.getLogger(__name__)

REPORT_COLUMNS = ("case_id", "status", "seconds", "error")
STATISTICS_COLUMNS = ("class", "kind", "volume_ml", "mean_hu", "median_hu")
LABEL_GROUPS = ("organs", "tumours")


@dataclass(frozen=True)
class CaseOutcome:
    """One row of the batch report."""

    case_id: str
    status: str
    seconds: float
    error: str = ""


@dataclass(frozen=True)
class BatchRun:
    """What a batch ran with: the model, its metadata and the effective settings, and a key identifying the
    combination (a prediction made with another key is not reused)."""

    checkpoint: Path
    model: torch.nn.Module
    predicted: list[str]
    settings: InferenceSettings
    run_key: str


def load_run(checkpoint: str | Path, classes: ClassTable, base: InferenceSettings, *,
             spacing: tuple[float, float, float] | None = None, window_hu: tuple[float, float] | None = None,
             roi: tuple[int, int, int] | None = None) -> BatchRun:
    """Load a checkpoint once for a batch: the model in eval mode on ``base.device``, the classes it predicts (those
    some training case annotated) and the settings, with the checkpoint's preprocessing unless overridden."""
    checkpoint = Path(checkpoint)
    model, meta = load_checkpoint(checkpoint, expected_class_names=classes.names, map_location=base.device)
    model.eval()
    predicted = list(meta.get("extra", {}).get("trained_classes", classes.names))
    untrained = [n for n in classes.names if n not in predicted]
    if untrained:
        log.warning("no training case annotated %s: their heads never learned, so they are not predicted",
                    untrained)
    settings = settings_from_checkpoint(checkpoint, meta, base, spacing=spacing, window_hu=window_hu, roi=roi)
    settings = windows_per_pass(checkpoint, meta, settings)
    return BatchRun(checkpoint, model, predicted, settings, run_key(checkpoint_sha256(checkpoint), classes, settings))


def run_key(checkpoint_sha256: str, classes: ClassTable, settings: InferenceSettings) -> str:
    """A short hash of the checkpoint's content, the class table and the settings that shape a prediction."""
    shaping = {k: v for k, v in asdict(settings).items() if k not in ("device", "sw_batch_size")}
    payload = json.dumps([checkpoint_sha256, classes.digest(), shaping], sort_keys=True, default=list)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def case_outputs(out_dir: Path, case: Case, settings: InferenceSettings) -> list[Path]:
    """The files a case's prediction consists of: the OME-Zarr, the per-class statistics and the exports asked for
    (NIfTI label maps; a DICOM-SEG for a DICOM series input)."""
    outputs = [out_dir / f"{case.case_id}.ome.zarr", out_dir / f"{case.case_id}.statistics.tsv"]
    if settings.export_nifti:
        outputs += [out_dir / f"{case.case_id}_{group}.nii.gz" for group in LABEL_GROUPS]
    if settings.export_dicom_seg and case.image.is_dir():
        outputs.append(out_dir / f"{case.case_id}.seg.dcm")
    return outputs


def infer_cases(cases: list[Case], run: BatchRun, classes: ClassTable, out_dir: str | Path,
                report: str | Path) -> list[CaseOutcome]:
    """Predict every case of a batch into ``out_dir`` and write the batch report; returns the report's rows."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for case in progress(cases, desc="infer"):
        began = time.perf_counter()
        try:
            status = _infer_case(case, run, classes, out_dir)
        except Exception as err:  # one case never stops the batch: every error is recorded on its line
            if not file_name_problem(case.case_id):
                for path in case_outputs(out_dir, case, run.settings):
                    remove(path)
            outcomes.append(CaseOutcome(case.case_id, "failed", time.perf_counter() - began, one_line(err)))
            log.error("case %s failed: %s", case.case_id, one_line(err))
            continue
        outcomes.append(CaseOutcome(case.case_id, status, time.perf_counter() - began))
        log.info("%d/%d %s: %s in %.1f s", len(outcomes), len(cases), case.case_id, status, outcomes[-1].seconds)
    write_tsv(report, REPORT_COLUMNS, ((o.case_id, o.status, f"{o.seconds:.1f}", o.error) for o in outcomes))
    return outcomes


def _infer_case(case: Case, run: BatchRun, classes: ClassTable, out_dir: Path) -> str:
    """Predict one case unless its complete outputs of the same run exist; returns ``ok`` or ``skipped``."""
    if problem := file_name_problem(case.case_id):
        raise ValueError(f"case id {case.case_id!r} cannot name an output file: {problem}")
    outputs = case_outputs(out_dir, case, run.settings)
    if all(path.exists() for path in outputs) and _recorded_run_key(outputs[0]) == run.run_key:
        return "skipped"
    image = read_ct(case.image)
    _warn_if_blank(case, image)
    prediction = predict_volume(run.model, image, classes, run.settings, run.predicted)
    # NIfTI exports keep a NIfTI input's own axis order and affine; other inputs get the RAS+ grid they were read on
    source_affine = nib.load(str(case.image)).affine if is_nifti(case.image) else image.affine
    attrs = prediction_attrs(case, run.checkpoint, run.run_key, run.settings, classes, run.predicted,
                             prediction.midline_x_mm, source_affine)
    write_prediction(outputs[0], Volume(int16_hu(image.array), image.affine), prediction.organs, prediction.tumours,
                     classes, attrs, prediction.probabilities)
    write_tsv(outputs[1], STATISTICS_COLUMNS, class_statistics(image, prediction.organs, prediction.tumours, classes))
    if run.settings.export_nifti:
        for group, labels in zip(LABEL_GROUPS, (prediction.organs, prediction.tumours), strict=True):
            export_nifti(labels, source_affine, out_dir / f"{case.case_id}_{group}.nii.gz")
    if run.settings.export_dicom_seg and case.image.is_dir():
        files = read_dicom_series(case.image, with_pixels=False).files
        write_dicom_seg(Volume(prediction.organs, image.affine), Volume(prediction.tumours, image.affine), classes,
                        files, out_dir / f"{case.case_id}.seg.dcm", predicted=run.predicted,
                        algorithm_parameters={"checkpoint": run.checkpoint.name, "run_key": run.run_key})
    return "ok"


def int16_hu(array: np.ndarray) -> np.ndarray:
    """HU as int16 (rounded and clipped to its range); an int16 array is returned as it is, without the float32
    temporaries of rounding (2 GiB for a 512×512×1000 CT)."""
    if array.dtype == np.int16:
        return array
    return np.clip(np.rint(array), -32768, 32767).astype(np.int16)


def class_statistics(image: Volume, organs: np.ndarray, tumours: np.ndarray, classes: ClassTable) -> list[tuple]:
    """Per predicted class, as TotalSegmentator's statistics give them: volume (mL) and the mean and median HU of
    the CT inside the class (an organ includes its tumours); classes not found are left out."""
    voxel_ml = float(np.prod(image.spacing)) / 1000.0
    rows = []
    for cls in classes:
        inside = image.array[predicted_mask(organs, tumours, cls)]
        if inside.size:
            rows.append((cls.name, cls.kind, f"{inside.size * voxel_ml:.3f}", f"{float(np.mean(inside)):.1f}",
                         f"{float(np.median(inside)):.1f}"))
    return rows


def _recorded_run_key(prediction: Path) -> str | None:
    """The run key stored in a prediction's attributes, or None when it cannot be read."""
    try:
        return json.loads((prediction / "zarr.json").read_text())["attributes"]["universal"].get("run_key")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _warn_if_blank(case: Case, image: Volume) -> None:
    """Log a warning for a CT with no body in it (every voxel at or below -500 HU, or one value everywhere)."""
    low, high = float(np.min(image.array)), float(np.max(image.array))
    if high <= BODY_THRESHOLD_HU or low == high:
        log.warning("case %s: %s looks blank (HU from %g to %g): nothing to segment is expected", case.case_id,
                    case.image, low, high)


def export_nifti(prediction: np.ndarray, source_affine: np.ndarray, path: Path) -> None:
    """Write a RAS label map as NIfTI in the source file's own orientation and affine (4x4, voxel -> RAS mm)."""
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")),
                                                nib.orientations.io_orientation(source_affine))
    data = nib.orientations.apply_orientation(prediction, transform).astype(np.uint8)
    image = nib.Nifti1Image(data, source_affine)
    image.set_qform(source_affine, code=1)
    image.set_sform(source_affine, code=1)
    with atomic_output(path) as tmp:
        nib.save(image, str(tmp))


def checkpoint_sha256(path: str | Path) -> str:
    """The sha256 of a checkpoint file (part of every prediction's run key)."""
    return file_digests(Path(path))["sha256"]
