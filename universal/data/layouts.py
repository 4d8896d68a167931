"""Read a case's image and raw label map whatever its on-disk layout (see :mod:`universal.data.catalog`).

- ``msd`` and ``pattern`` layouts hold one NIfTI image and one NIfTI label map per case;
- ``per_structure`` layouts hold one mask per structure (TotalSegmentator's ``segmentations/<name>.nii.gz``,
  3D-IRCADb's ``MASKS_DICOM/<organ>/`` DICOM series, CHAOS's ``Ground/`` PNG slices), assembled here into
  one raw label map in the dataset's own numbering (``layout.structures``), so that
  :func:`universal.data.harmonize.harmonize_labels` maps it like any other label map.

Images may be NIfTI files or folders holding one DICOM series. Everything is returned reoriented to RAS+
(axis permutation and flips only, as :func:`universal.core.volume.load_nifti` does), with the affine in mm.

DICOM geometry: ImageOrientationPatient gives the row and column directions (LPS), ImagePositionPatient the
position of each slice; slices are ordered by their position along the slice normal and must be evenly
spaced (within 1 %). Every file of a series folder must be a readable slice, except files named as something
else (hidden files, DICOMDIR, known non-DICOM suffixes such as .txt or .json) and complete DICOM objects of
another kind (another SOP class, e.g. a dose report): a broken first or last slice cannot be told from the end
of the CT by the geometry, so an unreadable file fails the series instead of shortening it.

CHAOS stores its masks as one PNG per slice: the i-th PNG (sorted by file name) belongs to the i-th DICOM file of
the image folder (sorted by file name), PNG rows and columns being the DICOM pixel rows and columns; nonzero
pixels are inside.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from universal.core.volume import Volume, VolumeError, canonical, load_nifti
from universal.data.catalog import Case, DatasetEntry
from universal.data.images import read_ct

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SPACING_TOLERANCE = 0.01  # relative deviation of slice gaps accepted in a DICOM series
PNG_SUFFIX = ".png"
# Files of a DICOM series folder that are not slices by their name: skipped without being read.
NOT_DICOM_SUFFIXES = (".txt", ".json", ".xml", ".csv", ".tsv", ".md", ".html", ".htm", ".pdf", ".png", ".jpg",
                      ".jpeg", ".nii", ".nii.gz", ".zip", ".gz")
NOT_DICOM_NAMES = ("DICOMDIR",)
SLICE_TAGS = ("ImagePositionPatient", "ImageOrientationPatient")
PLANE_TAGS = ("Rows", "Columns", "PixelSpacing")


class LayoutError(VolumeError):
    """A case's files do not fit its layout; the message names the case, the file and the problem."""


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def read_image(case: Case, entry: DatasetEntry) -> Volume:
    """The case's image in RAS+ (:func:`universal.data.images.read_ct`: NIfTI, NRRD, MetaImage or a folder holding
    one DICOM series, HU from the rescale tags)."""
    return read_ct(case.image)


def read_raw_label(case: Case, entry: DatasetEntry) -> Volume | None:
    """The case's label map in the dataset's own numbering, RAS+; None when the case has no label.

    For ``per_structure`` layouts the masks named in ``layout.structures`` are painted in that order (later
    ones win where masks overlap) with their raw values; masks must share the image's grid.
    """
    if case.label is None:
        return None
    if entry.layout_kind != "per_structure":
        return load_nifti(case.label)
    reference = _reference_grid(case)
    raw = np.zeros(reference.shape, dtype=np.uint16)
    for name, value in entry.layout["structures"].items():
        for path in structure_paths(case, entry, name):
            raw[_read_mask(path, reference, case)] = value
    return canonical(raw, reference.affine)


def structure_paths(case: Case, entry: DatasetEntry, name: str) -> list[Path]:
    """The mask files (or folders) of structure ``name`` of a ``per_structure`` case (several for a pattern).

    Names match case-insensitively. Raises :class:`LayoutError` when none matches, unless the layout says
    ``allow_missing: true``.
    """
    folder, suffix = Path(case.label), entry.layout.get("suffix", "")
    wanted = (name + suffix).lower()
    try:
        found = sorted(p for p in folder.iterdir() if fnmatch.fnmatchcase(p.name.lower(), wanted))
    except OSError as err:
        raise LayoutError(f"{entry.key}/{case.case_id}: cannot list the structure folder {folder}: {err}") from err
    if not found and not entry.layout.get("allow_missing", False):
        raise LayoutError(f"{entry.key}/{case.case_id}: no mask {name + suffix!r} in {folder}")
    return found


def annotated_classes(case: Case, entry: DatasetEntry) -> tuple[str, ...]:
    """The classes a case annotates: ``entry.annotated_for``, less (for ``per_structure`` layouts with
    ``allow_missing``) the classes none of whose masks exist for this case."""
    chosen = entry.annotated_for(case.case_id)
    if entry.layout_kind != "per_structure" or not entry.layout.get("allow_missing", False) or case.label is None:
        return chosen
    present = {value for name, value in entry.layout["structures"].items() if structure_paths(case, entry, name)}
    missing = set()
    for rule in entry.labels:
        if rule.raw not in present:
            missing.update(rule.classes)
    for rule in entry.labels:  # a class also named by a present value stays annotated
        if rule.raw in present:
            missing.difference_update(rule.classes)
    return tuple(name for name in chosen if name not in missing)


# ---------------------------------------------------------------------------------------------------------
# DICOM series
# ---------------------------------------------------------------------------------------------------------


@dataclass
class DicomSeries:
    """One DICOM series on its native grid: ``array`` (columns, rows, slices; None when only the headers were
    read), ``affine`` voxel -> RAS+ mm, ``files`` in file-name order, ``slice_of_file`` (the slice index of
    each of those files) and ``plane`` (rows, columns) of a slice."""

    array: np.ndarray | None
    affine: np.ndarray
    files: list[Path]
    slice_of_file: list[int]
    plane: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        rows, cols = self.plane
        return cols, rows, len(self.files)


def read_dicom_series(folder: Path, with_pixels: bool) -> DicomSeries:
    """Read the DICOM files of ``folder`` (any file name) as one series; see the module docstring for the files
    that are skipped. Raises :class:`LayoutError` naming the file for an unreadable or incomplete slice."""
    folder = Path(folder)
    headers = _slice_headers(folder, with_pixels)
    first = headers[0][1]
    orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    if np.linalg.norm(normal) < 0.5:
        raise LayoutError(f"{headers[0][0]}: ImageOrientationPatient {orientation.tolist()} has parallel or zero row "
                          "and column directions; the header is corrupt: download the series again")
    plane = (int(first.Rows), int(first.Columns))
    spacing = np.asarray(first.PixelSpacing, dtype=np.float64)
    for path, ds in headers:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=np.float64), orientation, atol=1e-4):
            raise LayoutError(f"{path}: its orientation differs from the rest of the series in {folder}")
        if (int(ds.Rows), int(ds.Columns)) != plane:
            raise LayoutError(f"{path}: its size differs from the rest of the series in {folder}")
        if not np.allclose(np.asarray(ds.PixelSpacing, dtype=np.float64), spacing, rtol=SPACING_TOLERANCE):
            raise LayoutError(f"{path}: its PixelSpacing differs from the rest of the series in {folder}")
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for _, ds in headers])
    depth = positions @ normal
    order = np.argsort(depth, kind="stable")
    gaps = np.diff(depth[order])
    if len(gaps) and (gaps.min() <= 0 or (gaps.max() - gaps.min()) > SPACING_TOLERANCE * gaps.mean()):
        raise LayoutError(f"{folder}: slices are not evenly spaced (gaps {gaps.min():.3f}..{gaps.max():.3f} mm) "
                          "or two slices share a position")
    dz = float(gaps.mean()) if len(gaps) else float(getattr(first, "SliceThickness", 1.0) or 1.0)
    row_spacing, col_spacing = (float(v) for v in spacing)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # array axis 0 runs along a row (across columns)
    lps[:3, 1] = col_dir * row_spacing  # array axis 1 runs down a column (across rows)
    lps[:3, 2] = normal * dz
    lps[:3, 3] = positions[order[0]]
    slice_of_file = np.empty(len(headers), dtype=np.int64)
    slice_of_file[order] = np.arange(len(headers))
    array = _slice_pixels(headers, slice_of_file, plane) if with_pixels else None
    return DicomSeries(array, LPS_TO_RAS @ lps, [p for p, _ in headers], slice_of_file.tolist(), plane)


def _not_dicom_by_name(path: Path) -> bool:
    """Whether a file of a series folder is something other than a slice by its name (never read)."""
    name = path.name
    return name.startswith(".") or name.upper() in NOT_DICOM_NAMES or name.lower().endswith(NOT_DICOM_SUFFIXES)


def _slice_headers(folder: Path, with_pixels: bool) -> list[tuple[Path, object]]:
    """(path, dataset) of every slice of ``folder`` in file-name order; raises naming the files that are neither
    slices nor named or typed as something else."""
    import pydicom

    slices, others, unreadable = [], [], []
    files = sorted(p for p in folder.iterdir() if p.is_file() and not _not_dicom_by_name(p))
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=not with_pixels)
        except Exception as err:  # pydicom raises many types (InvalidDicomError, EOFError, struct.error, ...)
            unreadable.append(f"{path.name} ({type(err).__name__}: {err})")
            continue
        (slices if all(tag in ds for tag in SLICE_TAGS) else others).append((path, ds))
    image_classes = {str(ds.get("SOPClassUID", "")) for _, ds in slices}
    for path, ds in others:
        sop_class = str(ds.get("SOPClassUID", "") or "")
        if not sop_class or sop_class in image_classes:  # a slice of the series without its geometry: truncated
            unreadable.append(f"{path.name} (no ImagePositionPatient or ImageOrientationPatient: truncated?)")
    if unreadable:
        shown = "; ".join(unreadable[:3]) + (f"; and {len(unreadable) - 3} more" if len(unreadable) > 3 else "")
        raise LayoutError(f"{folder}: {len(unreadable)} of its {len(files)} files cannot be read as slices of the "
                          f"series: {shown}. A missing slice would shorten the CT: download the series again, or "
                          "move files that do not belong to it out of the folder")
    if not slices:
        raise LayoutError(f"{folder}: no DICOM images with position and orientation tags")
    for path, ds in slices:
        missing = [tag for tag in PLANE_TAGS if tag not in ds]
        if missing:
            raise LayoutError(f"{path}: the slice header has no {', '.join(missing)}; the in-plane size and voxel "
                              "spacing cannot be known: download the series again or fix the header")
    return slices


def _slice_pixels(headers: list[tuple[Path, object]], slice_of_file: np.ndarray,
                  plane: tuple[int, int]) -> np.ndarray:
    """The series' voxels (columns, rows, slices) in HU (rescale tags applied), int16 when they fit exactly."""
    array = np.empty((plane[1], plane[0], len(headers)), dtype=np.float32)
    for index, (path, ds) in enumerate(headers):
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as err:  # pydicom raises several types for undecodable pixel data
            raise LayoutError(f"{path}: cannot decode the pixel data: {err}") from err
        if pixels.shape != plane:
            raise LayoutError(f"{path}: pixel data of shape {pixels.shape}, the header says {plane} (rows, columns)")
        slope, intercept = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0))
        array[:, :, slice_of_file[index]] = (pixels * slope + intercept).T
    if np.array_equal(array, np.rint(array)) and array.min() >= -32768 and array.max() <= 32767:
        array = array.astype(np.int16)
    return array


# ---------------------------------------------------------------------------------------------------------
# Masks of per-structure layouts
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Reference:
    """The native grid of a case's image, with its DICOM file order when the image is a DICOM folder."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    series: DicomSeries | None


def _reference_grid(case: Case) -> _Reference:
    if case.image.is_dir():
        series = read_dicom_series(case.image, with_pixels=False)
        return _Reference(series.shape, series.affine, series)
    try:
        header = nib.load(str(case.image))
    except Exception as err:  # nibabel raises several types for unreadable files
        raise LayoutError(f"{case.image}: cannot read as NIfTI: {err}") from err
    shape = tuple(int(n) for n in header.shape[:3])
    return _Reference(shape, np.asarray(header.affine, dtype=np.float64), None)  # type: ignore[arg-type]


def _read_mask(path: Path, reference: _Reference, case: Case) -> np.ndarray:
    """A structure mask (bool) on the image's native grid; raises when it does not share the image's grid."""
    if path.is_dir() and any(p.suffix.lower() == PNG_SUFFIX for p in path.iterdir()):
        return _read_png_stack(path, reference, case)
    if path.is_dir():
        series = read_dicom_series(path, with_pixels=True)
        mask, affine = series.array != 0, series.affine
    else:
        try:
            image = nib.load(str(path))
            mask, affine = np.asarray(image.dataobj) != 0, np.asarray(image.affine, dtype=np.float64)
        except Exception as err:  # nibabel raises several types for unreadable files
            raise LayoutError(f"{path}: cannot read as NIfTI: {err}") from err
        if mask.ndim == 4 and mask.shape[3] == 1:
            mask = mask[..., 0]
    if mask.shape != reference.shape or not np.allclose(affine, reference.affine, atol=1e-3):
        raise LayoutError(f"{path}: the mask (shape {mask.shape}) does not share the grid of the image "
                          f"{case.image} (shape {reference.shape})")
    return mask


def _read_png_stack(folder: Path, reference: _Reference, case: Case) -> np.ndarray:
    from PIL import Image

    if reference.series is None:
        raise LayoutError(f"{folder}: PNG slice masks need a DICOM image folder, got {case.image}")
    pngs = sorted(p for p in folder.iterdir() if p.suffix.lower() == PNG_SUFFIX)
    if len(pngs) != len(reference.series.files):
        raise LayoutError(f"{folder}: {len(pngs)} PNG masks for {len(reference.series.files)} DICOM slices "
                          f"in {case.image}")
    mask = np.zeros(reference.shape, dtype=bool)
    cols, rows, _ = reference.shape
    for png, index in zip(pngs, reference.series.slice_of_file, strict=True):
        pixels = np.asarray(Image.open(png))
        if pixels.ndim == 3:
            pixels = pixels[..., 0]
        if pixels.shape != (rows, cols):
            raise LayoutError(f"{png}: {pixels.shape[0]} x {pixels.shape[1]} pixels, the DICOM slices have "
                              f"{rows} x {cols}")
        mask[:, :, index] = pixels.T != 0
    return mask
