"""Harmonize a dataset's own label convention into the universal label space, and resample to the store grid.

Semantics (compatible with the original's label transfer, ``reference/original_model.md`` §3.4):

- each raw value maps to one universal class, to a (right, left) pair of a bilateral organ, or is dropped;
- the stored label map is exclusive: a tumour voxel keeps the tumour's value; that it also counts as its organ
  is derived at training time from the class table's parent relation;
- a bilateral organ is split by anatomical side. The connected components (26-connectivity) of the organ
  together with the tumours that lie in it are taken one by one, and each goes to the side of the body's
  sagittal midline its centroid lies on (RAS: +x is the patient's right). The midline is the centroid x of the
  body (voxels above -500 HU) when the image is known; without an image it is the midpoint between the two
  largest components, or, for a single component, the centre of the volume. This treats one component
  (a single kidney) and more than two (a fragment) by anatomy rather than by rank, unlike the original, which
  always called a single kidney "right".
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from universal.core.atomic import DiskFullError, atomic_output
from universal.core.classes import ClassTable
from universal.core.sides import BODY_THRESHOLD_HU, body_midline_x_mm, split_by_side
from universal.core.tsv import one_line, write_tsv
from universal.core.volume import Volume, VolumeError, resample, same_grid
from universal.data.catalog import Case, DatasetEntry
from universal.data.layouts import annotated_classes, read_image, read_raw_label
from universal.data.store import open_store, write_case

UNMAPPED = 255  # lookup sentinel for raw values outside a dataset's map (class indices stop at 254)
REPORT_COLUMNS = ("case_id", "status", "error", "warning")

log = logging.getLogger(__name__)


class HarmonizeError(ValueError):
    """A case cannot be harmonized; the message names the case and the problem."""


@dataclass
class HarmonizedCase:
    """A case on the store grid: image (int16 HU), label (uint8 universal values), store attributes, and a warning
    about a suspicious but usable case ("" when none)."""

    image: Volume
    label: Volume | None
    attrs: dict
    warning: str = ""


def harmonize_labels(raw: Volume, entry: DatasetEntry, classes: ClassTable, midline_x_mm: float | None,
                     case_name: str = "") -> np.ndarray:
    """Map a raw label volume (RAS) to universal label values (uint8), splitting bilateral organs by side.

    One uint8 lookup maps every voxel; values outside the dataset's map are found through a sentinel entry
    (255, which no class index may take) and raise :class:`HarmonizeError` naming them.
    """
    known = entry.raw_values()
    array = raw.array
    narrow = array.dtype.itemsize <= 2  # a table over the whole value range: one lookup, no min/max passes
    lut = np.full(max(max(known) + 1, 1 << (8 * array.dtype.itemsize) if narrow else 0), UNMAPPED, dtype=np.uint8)
    lut[0] = 0
    for rule in entry.labels:
        lut[rule.raw] = classes[rule.classes[0]].index if len(rule.classes) == 1 else 0
    if narrow:
        out = lut[array.view(f"u{array.dtype.itemsize}")]  # negative values land on UNMAPPED entries
        outside = False
    else:
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        outside = low < 0 or high >= lut.size
        out = lut[np.clip(array, 0, lut.size - 1)] if outside else lut[array]
    if outside or (out == UNMAPPED).any():
        unexpected = sorted(set(np.unique(array).tolist()) - known)
        raise HarmonizeError(f"{case_name}: label values {unexpected} are not in the map of dataset "
                             f"{entry.key!r} (known: {sorted(known)})")
    for rule in entry.labels:
        if rule.split:
            _split_by_side(out, array == rule.raw, rule.classes, classes, raw, midline_x_mm)
    return out


def _split_by_side(out: np.ndarray, organ: np.ndarray, pair: tuple[str, ...], classes: ClassTable,
                   geometry: Volume, midline_x_mm: float | None) -> None:
    """Write the right/left class of ``pair`` into ``out`` where ``organ`` is set, component by component.

    The components are those of the organ together with the tumours that lie in it (tumour voxels keep their
    own value; they only decide which side an organ fragment joined to them belongs to).
    """
    right, left = classes[pair[0]], classes[pair[1]]
    tumour_values = [c.index for c in classes.tumours() if set(c.parents) == {right.name, left.name}]
    region = organ | np.isin(out, tumour_values)
    right_mask, left_mask = split_by_side(region, geometry.affine, midline_x_mm)
    out[organ & right_mask] = right.index
    out[organ & left_mask] = left.index


def harmonize_case(case: Case, entry: DatasetEntry, classes: ClassTable,
                   target_spacing: tuple[float, float, float] | None) -> HarmonizedCase:
    """Load, check, harmonize and (if ``target_spacing`` is given) resample one case.

    The image and the label go through two threads (file inflation, the label lookup and resampling release
    the GIL): the label is read while the image is read, and the image is resampled while its midline is found
    and the label is mapped and resampled. Raises :class:`HarmonizeError` naming the case for unreadable files,
    image/label grid mismatches and label values outside the dataset's map.
    """
    name = f"{entry.key}/{case.case_id}"
    with ThreadPoolExecutor(max_workers=1) as pool:
        label_job = pool.submit(_read_label, case, entry, name)
        image = _read_image_hu(case, entry, name)
        warning = blank_image_warning(image.array, name)
        label_raw = label_job.result()
        if label_raw is not None and not same_grid(image, label_raw):
            raise HarmonizeError(f"{name}: image {case.image} (shape {image.shape}) and label {case.label} "
                                 f"(shape {label_raw.shape}) do not share a grid (shape and affine)")
        image_job = None if target_spacing is None else pool.submit(resample, image, target_spacing, order=1)
        midline = body_midline_x_mm(image)
        attrs = {"dataset": entry.key, "source_image": str(case.image),
                 "source_label": None if case.label is None else str(case.label),
                 "original_shape": list(image.shape), "original_affine": image.affine.tolist(),
                 "original_spacing": list(image.spacing), "annotated": list(annotated_classes(case, entry)),
                 "midline_x_mm": midline, "class_table_digest": classes.digest()}
        label = None
        if label_raw is not None:
            label = Volume(harmonize_labels(label_raw, entry, classes, midline, name), label_raw.affine)
            if target_spacing is not None:
                label = resample(label, target_spacing, order=0)
        if image_job is not None:
            image = image_job.result()
    return HarmonizedCase(image, label, attrs, warning)


def blank_image_warning(array: np.ndarray, name: str) -> str:
    """A warning naming the case when its CT (HU) holds one value only or no voxel above -500 HU (no body: an
    empty or wrongly scaled image, or a mask given as the image); "" for an ordinary CT."""
    if not array.size:
        return ""
    low, high = int(array.min()), int(array.max())
    if low == high:
        return f"{name}: the CT is blank (every voxel is {low} HU); check the image file"
    if high <= BODY_THRESHOLD_HU:
        return (f"{name}: the CT has no voxel above {BODY_THRESHOLD_HU:.0f} HU (range {low}..{high}), so no body; "
                "check the image file and its rescale slope and intercept")
    return ""


def _read_image_hu(case: Case, entry: DatasetEntry, name: str) -> Volume:
    """The case's image in RAS+ as int16 HU."""
    try:
        image = read_image(case, entry)
    except VolumeError as err:
        raise HarmonizeError(f"{name}: {err}") from err
    return Volume(_to_int16_hu(image.array, case.image), image.affine)


def _read_label(case: Case, entry: DatasetEntry, name: str) -> Volume | None:
    """The case's raw label map in RAS+ with integer values (integral floats are converted), or None."""
    try:
        label_raw = read_raw_label(case, entry)
    except VolumeError as err:
        raise HarmonizeError(f"{name}: {err}") from err
    if label_raw is not None and not np.issubdtype(label_raw.array.dtype, np.integer):
        rounded = np.rint(label_raw.array)
        if not np.array_equal(rounded, label_raw.array):
            raise HarmonizeError(f"{name}: label {case.label} holds non-integer values")
        label_raw = Volume(rounded.astype(np.int32), label_raw.affine)
    return label_raw


def _to_int16_hu(array: np.ndarray, path: object) -> np.ndarray:
    """HU as int16; float input is rounded; values outside the int16 range are an error."""
    if array.dtype == np.int16:
        return array
    if array.size and (array.min() < -32768 or array.max() > 32767):
        raise HarmonizeError(f"{path}: intensities {array.min()}..{array.max()} do not fit int16 HU")
    return np.rint(array).astype(np.int16) if np.issubdtype(array.dtype, np.floating) else array.astype(np.int16)


def harmonize_dataset(cases: list[Case], entry: DatasetEntry, classes: ClassTable, store_path: str | Path,
                      target_spacing: tuple[float, float, float], report_path: str | Path) -> list[str]:
    """Harmonize and resample every case of a dataset into one zarr store, going on past failed cases.

    The store is built under a temporary name and renamed when all cases are done. Any error of one case (an
    unreadable or inconsistent file, whatever raised it) fails that case only; a full disk stops the dataset.
    ``report_path`` (TSV: case_id, status, error, warning; one line per case) lists every case, a blank CT with a
    warning (:func:`blank_image_warning`). Returns the failed case ids; raises :class:`HarmonizeError` when no case
    succeeds.
    """
    store_path, report_path = Path(store_path), Path(report_path)
    with atomic_output(store_path) as tmp:
        failed = _harmonize_into(tmp, cases, entry, classes, target_spacing, report_path)
    return failed


def _harmonize_into(tmp: Path, cases: list[Case], entry: DatasetEntry, classes: ClassTable,
                    target_spacing: tuple[float, float, float], report_path: Path) -> list[str]:
    """Write the store at ``tmp``; raise :class:`HarmonizeError` when every case failed."""
    root = open_store(tmp, mode="w")
    root.attrs.update({"dataset": entry.key, "name": entry.name, "licence": entry.licence,
                       "spacing": list(target_spacing), "class_table_digest": classes.digest(),
                       "class_names": classes.names})
    rows: list[tuple[str, str, str, str]] = []
    for number, case in enumerate(cases, start=1):
        progress = f"{entry.key} {number}/{len(cases)} {case.case_id}"
        try:
            result = harmonize_case(case, entry, classes, target_spacing)
            write_case(tmp, case.case_id, result.image, result.label, result.attrs)
        except DiskFullError:
            raise  # every later case would fail too: stop with the disk named
        except Exception as err:  # any error of one case is reported and the others go on
            error = str(err) if isinstance(err, HarmonizeError) else (
                f"{entry.key}/{case.case_id}: {type(err).__name__}: {err}")
            rows.append((case.case_id, "failed", one_line(error), ""))
            log.error("%s: FAILED: %s", progress, error)
            continue
        if result.warning:
            log.warning("%s", result.warning)
        rows.append((case.case_id, "ok", "", one_line(result.warning)))
        log.info("%s: %s", progress, result.image.shape)
    write_tsv(report_path, REPORT_COLUMNS, rows)
    failed = [row[0] for row in rows if row[1] == "failed"]
    if len(failed) == len(cases):
        raise HarmonizeError(f"dataset {entry.key!r}: every case failed; see {report_path}")
    return failed
