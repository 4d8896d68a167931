"""The source series of a DICOM-SEG: its files read and checked (one series, UIDs, type 2 attributes), and each source
slice placed on the label maps' voxel grid through the affines (DICOM positions are LPS, the affine RAS; mm).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from universal.infer.seg_codes import DicomSegError

if TYPE_CHECKING:
    from pydicom import Dataset

DEFAULT_TOLERANCE_MM = 0.1  # largest distance between a source pixel centre and the voxel centre it takes
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_REQUIRED_HEADER = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
                    "FrameOfReferenceUID")
_SOP_UIDS = (("SOPClassUID", "MediaStorageSOPClassUID"), ("SOPInstanceUID", "MediaStorageSOPInstanceUID"))
_SERIES_UIDS = ("StudyInstanceUID", "SeriesInstanceUID")
UTF8 = "ISO_IR 192"  # set where a source leaves Specific Character Set empty (its default, ASCII, is a subset)
_TYPE2_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName")

log = logging.getLogger(__name__)


@dataclass
class SourceImage:
    """One file of the source series: its header (no pixel data), with empty UIDs filled as the module says."""

    path: Path
    header: Dataset


def read_source_series(source_files: Sequence[str | Path], *, fill_missing_uids: bool = False) -> list[SourceImage]:
    """The headers of a series of single-frame DICOM images, sorted by position along the slice normal.

    Raises :class:`DicomSegError` naming the file for an unreadable file, a multi-frame image, a missing geometry
    attribute or frame of reference, files of different series, orientations or sizes, two files at one position,
    and empty UIDs as the module docstring says.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not source_files:
        raise DicomSegError("no source files given: a DICOM-SEG references the series it segments")
    images = []
    filled: dict[str, int] = {}  # attribute -> number of files in which it was filled
    for name in source_files:
        path = Path(name)
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError) as err:
            raise DicomSegError(f"{path}: cannot read as DICOM: {err}") from err
        if int(header.get("NumberOfFrames", 1) or 1) != 1:
            raise DicomSegError(f"{path}: a multi-frame image ({header.NumberOfFrames} frames); only series of "
                                "single-frame images are supported")
        for keyword in _REQUIRED_HEADER:
            if header.get(keyword) in (None, ""):
                raise DicomSegError(f"{path}: lacks {keyword}, which the segmentation needs to place its frames")
        for keyword in [*_fill_sop_uids(path, header), *_fill_type2(header)]:
            filled[keyword] = filled.get(keyword, 0) + 1
        images.append(SourceImage(path, header))
    folder = images[0].path.parent
    for keyword, meta_keyword in _SOP_UIDS:
        if keyword in filled:
            log.warning("%s: %s is empty in %d of %d files; taken from %s of their file meta", folder, keyword,
                        filled[keyword], len(images), meta_keyword)
    missing = [f"{k} ({filled[k]} files)" for k in _TYPE2_COPIED if k in filled]
    if missing:
        log.warning("%s: the files lack %s; the segmentation copies them empty", folder, ", ".join(missing))
    _check_same_series(images)
    _fill_series_uids(images, fill_missing_uids)
    orientation = np.asarray(images[0].header.ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    depth = np.array([np.asarray(i.header.ImagePositionPatient, dtype=np.float64) @ normal for i in images])
    order = np.argsort(depth, kind="stable")
    images = [images[i] for i in order]
    depth = depth[order]
    for k in range(1, len(images)):
        if depth[k] - depth[k - 1] < 1e-3:
            raise DicomSegError(f"{images[k].path}: lies at the position of {images[k - 1].path} "
                                f"({depth[k]:.3f} mm along the slice normal)")
    return images


def _fill_sop_uids(path: Path, header: Dataset) -> list[str]:
    """Take an empty SOP Class or Instance UID from the file meta information, which holds the same UID; returns
    the keywords filled."""
    meta = getattr(header, "file_meta", None)
    filled = []
    for keyword, meta_keyword in _SOP_UIDS:
        if str(header.get(keyword, "") or ""):
            continue
        value = str(meta.get(meta_keyword, "") or "") if meta is not None else ""
        if not value:
            raise DicomSegError(f"{path}: {keyword} is empty and the file meta has no {meta_keyword}: "
                                "the segmentation cannot reference this image")
        setattr(header, keyword, value)
        filled.append(keyword)
    return filled


def _fill_type2(header: Dataset) -> list[str]:
    """Add the Type 2 patient and study attributes the header lacks, empty (what a source without the information
    should carry); returns their keywords. An empty Specific Character Set (the default repertoire, which highdicom
    does not accept as a value) becomes UTF-8, which reads every default-repertoire text alike."""
    if "SpecificCharacterSet" in header and not header.SpecificCharacterSet:
        header.SpecificCharacterSet = UTF8
    missing = [keyword for keyword in _TYPE2_COPIED if keyword not in header]
    for keyword in missing:
        setattr(header, keyword, "")
    return missing


def _check_same_series(images: list[SourceImage]) -> None:
    """All files share study, series, frame of reference, orientation and size, and no two share an instance UID."""
    first = images[0]
    keywords = (*_SERIES_UIDS, "FrameOfReferenceUID", "Rows", "Columns")
    orientation = np.asarray(first.header.ImageOrientationPatient, dtype=np.float64)
    seen: dict[str, Path] = {}
    for image in images:
        for keyword in keywords:
            if image.header.get(keyword) != first.header.get(keyword):
                raise DicomSegError(f"{image.path}: its {keyword} {image.header.get(keyword)!r} differs from "
                                    f"{first.header.get(keyword)!r} of {first.path}: the files are not one series")
        if not np.allclose(np.asarray(image.header.ImageOrientationPatient, dtype=np.float64), orientation,
                           atol=1e-4):
            raise DicomSegError(f"{image.path}: its ImageOrientationPatient differs from that of {first.path}")
        uid = str(image.header.SOPInstanceUID)
        if uid in seen:
            raise DicomSegError(f"{image.path}: has the SOPInstanceUID {uid} of {seen[uid]}")
        seen[uid] = image.path


def _fill_series_uids(images: list[SourceImage], fill: bool) -> None:
    """Refuse an empty Study or Series Instance UID, or (``fill``) generate one from the instance UIDs."""
    from pydicom.uid import generate_uid

    for keyword in _SERIES_UIDS:
        if str(images[0].header.get(keyword, "") or ""):
            continue
        if not fill:
            raise DicomSegError(f"{images[0].path}: {keyword} is empty (in all {len(images)} files of the series): "
                                "the segmentation could not reference the series; pass fill_missing_uids=True to "
                                "generate one in memory")
        instances = sorted(str(i.header.SOPInstanceUID) for i in images)
        value = generate_uid(entropy_srcs=[keyword, *instances])
        for image in images:
            setattr(image.header, keyword, value)
        log.warning("%s: %s is empty; the segmentation references the generated %s, which no archive knows",
                    images[0].path.parent, keyword, value)


@dataclass(frozen=True)
class FramePlacement:
    """Where a source frame lies in the label maps: the voxel index (x, y, z) of pixel (row 0, column 0) and the
    index step from one row to the next and from one column to the next (each a signed unit step along one axis)."""

    origin: np.ndarray
    row_step: np.ndarray
    column_step: np.ndarray

    def take(self, array: np.ndarray, rows: int, columns: int) -> np.ndarray:
        """The (rows, columns) frame of a 3D array indexed (x, y, z)."""
        r = np.arange(rows)[:, None]
        c = np.arange(columns)[None, :]
        index = tuple(self.origin[a] + self.row_step[a] * r + self.column_step[a] * c for a in range(3))
        return array[index]


def place_series(images: list[SourceImage], affine: np.ndarray, shape: tuple[int, int, int],
                 tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> list[FramePlacement]:
    """Place every source frame on the label maps' grid (4x4 voxel -> RAS+ mm ``affine``, ``shape`` voxels).

    Each frame's pixels must lie within ``tolerance_mm`` of voxel centres, its rows and columns must run along two
    voxel axes one voxel per pixel, and the frames must cover the grid exactly (one frame per plane of the third
    axis); otherwise :class:`DicomSegError` names the file or the series and the mismatch.
    """
    placements = [_place_frame(i, affine, tolerance_mm) for i in images]
    first = placements[0]
    for image, placement in zip(images, placements, strict=True):
        if not (np.array_equal(placement.row_step, first.row_step)
                and np.array_equal(placement.column_step, first.column_step)):
            raise DicomSegError(f"{image.path}: its pixel spacing or orientation differs from that of "
                                f"{images[0].path}")
    rows, columns = int(images[0].header.Rows), int(images[0].header.Columns)
    row_axis, column_axis = int(np.flatnonzero(first.row_step)[0]), int(np.flatnonzero(first.column_step)[0])
    slice_axis = 3 - row_axis - column_axis
    folder = images[0].path.parent
    if shape[row_axis] != rows or shape[column_axis] != columns or shape[slice_axis] != len(images):
        raise DicomSegError(f"{folder}: the label maps have {shape[column_axis]} × {shape[row_axis]} × "
                            f"{shape[slice_axis]} voxels along the series' columns, rows and slices (shape {shape}), "
                            f"the series {columns} columns × {rows} rows × {len(images)} slices")
    for image, placement in zip(images, placements, strict=True):
        for r, c in _corners(rows, columns):
            voxel = placement.origin + r * placement.row_step + c * placement.column_step
            if np.any(voxel < 0) or np.any(voxel >= np.asarray(shape)):
                raise DicomSegError(f"{image.path}: its pixel (row {r}, column {c}) falls on voxel "
                                    f"{voxel.tolist()}, outside the label maps (shape {shape})")
    unfilled = sorted(set(range(shape[slice_axis])) - {int(p.origin[slice_axis]) for p in placements})
    if unfilled:
        raise DicomSegError(f"{folder}: no slice falls on planes {unfilled[:10]} of the label maps' axis "
                            f"{slice_axis} (two slices share a plane)")
    return placements


def _place_frame(image: SourceImage, affine: np.ndarray, tolerance_mm: float) -> FramePlacement:
    """The placement of one frame: its rows and columns along voxel axes, its pixels on voxel centres."""
    header = image.header
    inverse = np.linalg.inv(affine)
    orientation = np.asarray(header.ImageOrientationPatient, dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in header.PixelSpacing)  # mm between rows, between columns
    rows, columns = int(header.Rows), int(header.Columns)
    position = _LPS_TO_RAS @ np.asarray(header.ImagePositionPatient, dtype=np.float64)
    exact_origin = inverse[:3, :3] @ position + inverse[:3, 3]
    # ImageOrientationPatient: the direction along a row (column index grows), then down a column (row index grows)
    exact_column = inverse[:3, :3] @ (_LPS_TO_RAS @ orientation[:3]) * column_spacing
    exact_row = inverse[:3, :3] @ (_LPS_TO_RAS @ orientation[3:]) * row_spacing
    column_step, row_step = np.rint(exact_column).astype(np.int64), np.rint(exact_row).astype(np.int64)
    if not (_is_unit_step(column_step) and _is_unit_step(row_step)
            and np.flatnonzero(column_step)[0] != np.flatnonzero(row_step)[0]):
        raise DicomSegError(f"{image.path}: its rows and columns do not run along the label maps' voxel axes one "
                            f"voxel per pixel (a column step is {np.round(exact_column, 3).tolist()} voxels, a row "
                            f"step {np.round(exact_row, 3).tolist()}): the label maps are not on this series' grid")
    origin = np.rint(exact_origin).astype(np.int64)
    worst = 0.0
    for r, c in _corners(rows, columns):  # the offset is affine in (r, c), so its largest size is at a corner
        offset = exact_origin + r * exact_row + c * exact_column - (origin + r * row_step + c * column_step)
        worst = max(worst, float(np.linalg.norm(affine[:3, :3] @ offset)))
    if worst > tolerance_mm:
        raise DicomSegError(f"{image.path}: its pixels lie up to {worst:.3f} mm from the label maps' voxel centres "
                            f"(tolerance {tolerance_mm} mm): the label maps are not on this series' grid")
    return FramePlacement(origin, row_step, column_step)


def _corners(rows: int, columns: int) -> list[tuple[int, int]]:
    """(row, column) of a frame's four corner pixels."""
    return [(r, c) for r in (0, rows - 1) for c in (0, columns - 1)]


def _is_unit_step(step: np.ndarray) -> bool:
    return int(np.abs(step).sum()) == 1
