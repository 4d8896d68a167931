"""The prediction of a DICOM input as a DICOM Segmentation (DICOM-SEG) that references its source series.

:func:`write_dicom_seg` takes the two universal label maps of a case (``organs`` and ``tumours``, uint8 label
values, arrays indexed (x, y, z) with a voxel -> RAS+ mm affine, on the grid of the CT read from the series) and the
files of that series, and writes one BINARY segmentation through highdicom:

* one segment per class that has at least one voxel, in class-table order (segment numbers 1, 2, ... count the
  written segments; they are not the universal label values, which each segment's Segment Description states).
  A segment's mask is :func:`universal.infer.ome.predicted_mask`: an organ's value in the organ map (the
  organ map already covers the organ's tumours) or a tumour's value in the tumour map. A tumour therefore overlaps
  its organ, which a LABELMAP segmentation could not hold; empty segments are left out (a class the model predicts
  but did not find has no segment).
* segment label = class name; recommended display colour = the class colour converted from sRGB to CIELab;
  segmented property category, type, laterality modifier and anatomic region from ``config/snomed.yaml`` (SNOMED CT
  where DICOM's code tables have a concept, else the private scheme 99UNIVERSAL); algorithm type AUTOMATIC with
  the algorithm identification "universal" and the package version.
* one frame per source image and segment (empty frames omitted), each referencing its source image; the SEG's
  Referenced Series Sequence lists every file of the series and the SEG joins the series' study and frame of
  reference, in a new series (new UIDs). An empty Specific Character Set of the source (the default repertoire)
  is set to UTF-8 in memory, which highdicom accepts and which reads every default-repertoire text alike.

The label maps may be in any axis order: each source slice is placed through the affines (DICOM positions are LPS,
the affine RAS) and must coincide with a plane of voxels to ``tolerance_mm``; a grid that does not is refused.

Source series whose files leave SOP Class UID or SOP Instance UID empty get them from their file meta information
(Media Storage SOP Class/Instance UID, the same values by the DICOM file format), with a warning. An empty Study or
Series Instance UID is refused unless ``fill_missing_uids`` is set: the UIDs are then generated in memory
(deterministically from the series' SOP Instance UIDs, so every SEG of the series agrees), with a warning that the
SEG references a study and series no archive knows. Type 2 patient and study attributes (Patient Name, Study Date,
...) that a file lacks are copied empty, with a warning. The source files are never changed.

Memory: the segment masks are handed to highdicom as one boolean array of slices × rows × columns × segments bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from universal import __version__
from universal.core.atomic import atomic_output
from universal.core.classes import ClassTable, UniversalClass
from universal.core.project import CONFIG_DIR
from universal.core.volume import Volume, same_grid
from universal.infer.ome import predicted_mask

if TYPE_CHECKING:
    from highdicom.seg import Segmentation
    from highdicom.sr import CodedConcept
    from pydicom import Dataset

log = logging.getLogger(__name__)

LOCAL = "local"  # the type of a class without a SNOMED CT concept in config/snomed.yaml
LOCAL_SCHEME = "99UNIVERSAL"  # private coding scheme designator (DICOM PS3.3 8.2: private schemes begin with 99)
DEFAULT_TOLERANCE_MM = 0.1  # largest distance between a source pixel centre and the voxel centre it takes
SERIES_NUMBER = 901
SERIES_DESCRIPTION = "universal segmentation"
UTF8 = "ISO_IR 192"  # set where a source leaves Specific Character Set empty (its default, ASCII, is a subset)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_CODE_KEYS = {"scheme", "value", "meaning", "pydicom", "note"}
_ROW_KEYS = {"category", "type", "modifier", "region"}
_REQUIRED_HEADER = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
                    "FrameOfReferenceUID")
_SOP_UIDS = (("SOPClassUID", "MediaStorageSOPClassUID"), ("SOPInstanceUID", "MediaStorageSOPInstanceUID"))
_SERIES_UIDS = ("StudyInstanceUID", "SeriesInstanceUID")
# Type 2 patient and study attributes (present, possibly empty) that the SEG copies from its source
_TYPE2_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName")


class DicomSegError(ValueError):
    """A DICOM-SEG cannot be written as asked; the message names the file and what is wrong."""


# ---------------------------------------------------------------------------------------------------------
# Codes
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Code:
    """A coded concept: ``value`` in the coding scheme ``scheme`` (SCT is SNOMED CT) and its ``meaning``."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class SegmentCodes:
    """The codes of one segment: property category and type, laterality modifier and anatomic region (optional)."""

    category: Code
    type: Code
    modifier: Code | None = None
    region: Code | None = None


@dataclass(frozen=True)
class CodeTable:
    """The coded concepts of the classes (``config/snomed.yaml``): named codes, a row per class name, a default
    row per class kind."""

    codes: dict[str, Code]
    rows: dict[str, dict[str, str]]
    defaults: dict[str, dict[str, str]]
    source: str = "<memory>"

    def for_class(self, cls: UniversalClass) -> SegmentCodes:
        """The codes of ``cls``; a class without a row takes its kind's default row (with a warning)."""
        row = self.rows.get(cls.name)
        if row is None:
            log.warning("%s has no row for class %r; it is coded with the default row of a %s", self.source,
                        cls.name, cls.kind)
            row = self.defaults[cls.kind]
        return SegmentCodes(
            category=self.codes[row["category"]],
            type=local_code(cls) if row["type"] == LOCAL else self.codes[row["type"]],
            modifier=self.codes[row["modifier"]] if "modifier" in row else None,
            region=self.codes[row["region"]] if "region" in row else None,
        )


def local_code(cls: UniversalClass) -> Code:
    """The private code of a class: scheme 99UNIVERSAL, value UNIV<label value, 4 digits>, meaning its name."""
    return Code(f"UNIV{cls.index:04d}", LOCAL_SCHEME, cls.name)


def default_code_table_path() -> Path:
    """The code table shipped with the project (``config/snomed.yaml``)."""
    return CONFIG_DIR / "snomed.yaml"


def load_code_table(path: str | Path | None = None) -> CodeTable:
    """Read and check a code table; raises :class:`DicomSegError` naming the file and the entry for any problem."""
    path = Path(path) if path is not None else default_code_table_path()
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise DicomSegError(f"{path}: cannot read the code table: {err}") from err
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), dict) for k in ("codes", "classes", "defaults")):
        raise DicomSegError(f"{path}: expected mappings 'codes', 'classes' and 'defaults'")
    codes = {name: _parse_code(path, name, entry) for name, entry in doc["codes"].items()}
    rows = {str(name): _parse_row(path, f"classes.{name}", row, codes) for name, row in doc["classes"].items()}
    defaults = {kind: _parse_row(path, f"defaults.{kind}", doc["defaults"].get(kind), codes)
                for kind in ("organ", "tumour")}
    return CodeTable(codes, rows, defaults, str(path))


def _parse_code(path: Path, name: str, entry: object) -> Code:
    where = f"{path}: codes.{name}"
    if not isinstance(entry, dict):
        raise DicomSegError(f"{where}: expected a mapping, got {entry!r}")
    unknown = set(entry) - _CODE_KEYS
    if unknown:
        raise DicomSegError(f"{where}: unknown keys {sorted(unknown)}")
    values = {}
    for key, limit in (("scheme", 16), ("value", 16), ("meaning", 64)):  # DICOM SH, SH and LO lengths
        value = entry.get(key)
        if not isinstance(value, str) or not value.strip() or len(value) > limit:
            raise DicomSegError(f"{where}: {key} must be a text of 1..{limit} characters, got {value!r}")
        values[key] = value
    return Code(values["value"], values["scheme"], values["meaning"])


def _parse_row(path: Path, where: str, row: object, codes: dict[str, Code]) -> dict[str, str]:
    where = f"{path}: {where}"
    if not isinstance(row, dict):
        raise DicomSegError(f"{where}: expected a mapping, got {row!r}")
    unknown = set(row) - _ROW_KEYS
    if unknown:
        raise DicomSegError(f"{where}: unknown keys {sorted(unknown)}")
    for key in ("category", "type"):
        if key not in row:
            raise DicomSegError(f"{where}: missing required key {key!r}")
    for key, name in row.items():
        if name not in codes and not (key == "type" and name == LOCAL):
            raise DicomSegError(f"{where}: {key} names {name!r}, which is not in 'codes'")
    return {key: str(name) for key, name in row.items()}


# ---------------------------------------------------------------------------------------------------------
# Colours
# ---------------------------------------------------------------------------------------------------------

_SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                         [0.2126729, 0.7151522, 0.0721750],
                         [0.0193339, 0.1191920, 0.9503041]])
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])


def rgb_to_cielab(rgb: Sequence[int]) -> tuple[float, float, float]:
    """CIE L*a*b* of an sRGB colour (three values 0-255) relative to the D65 white: L* in 0..100, a* and b* about
    -128..127."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    t = _SRGB_TO_XYZ @ linear / _D65_WHITE
    delta = 6.0 / 29.0
    f = np.where(t > delta**3, np.cbrt(t), t / (3.0 * delta**2) + 4.0 / 29.0)
    return float(116.0 * f[1] - 16.0), float(500.0 * (f[0] - f[1])), float(200.0 * (f[1] - f[2]))


def dicom_cielab(rgb: Sequence[int]) -> tuple[int, int, int]:
    """The Recommended Display CIELab Value of an sRGB colour: L* 0..100 and a*, b* -128..127 scaled linearly
    to 0..65535 (DICOM PS3.3 C.10.7.1.1)."""
    lightness, a, b = rgb_to_cielab(rgb)
    scaled = (lightness / 100.0 * 65535.0, (a + 128.0) / 255.0 * 65535.0, (b + 128.0) / 255.0 * 65535.0)
    return tuple(int(np.clip(round(v), 0, 65535)) for v in scaled)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------
# The source series
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# Geometry: the label maps' voxels under each source frame
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------


def write_dicom_seg(organs: Volume, tumours: Volume, classes: ClassTable, source_files: Sequence[str | Path],
                    path: str | Path, *, predicted: Sequence[str] | None = None, codes: CodeTable | None = None,
                    fill_missing_uids: bool = False, tolerance_mm: float = DEFAULT_TOLERANCE_MM,
                    algorithm_parameters: Mapping[str, str] | None = None, series_number: int = SERIES_NUMBER,
                    series_description: str = SERIES_DESCRIPTION) -> list[str]:
    """Write the organ and tumour label maps of one case as a BINARY DICOM-SEG of its source series at ``path``.

    ``organs`` and ``tumours`` are universal label maps (integer values; arrays indexed (x, y, z) with a voxel ->
    RAS+ mm affine) on the grid of the CT read from ``source_files``, in any axis order. ``predicted`` names the
    classes the model predicts (default: every class of ``classes``); a class outside it that has voxels is an
    error. ``codes`` defaults to ``config/snomed.yaml``. ``algorithm_parameters`` (e.g. the checkpoint) go into
    the algorithm identification. Returns the segment labels (class names) in segment-number order.

    Raises :class:`DicomSegError` when the maps and the series do not share a grid, a map holds a value that is no
    class of its kind, no predicted class has a voxel (a SEG needs a segment), or the series cannot be referenced.
    The file is written under a temporary name and renamed.
    """
    path = Path(path)
    _check_maps(organs, tumours, path)
    wanted = _predicted_classes(classes, predicted)
    codes = codes if codes is not None else load_code_table()
    images = read_source_series(source_files, fill_missing_uids=fill_missing_uids)
    placements = place_series(images, organs.affine, organs.shape, tolerance_mm)
    rows, columns = int(images[0].header.Rows), int(images[0].header.Columns)
    organ_frames = np.stack([p.take(organs.array, rows, columns) for p in placements])  # (slices, rows, columns)
    tumour_frames = np.stack([p.take(tumours.array, rows, columns) for p in placements])
    present = _present_classes(organ_frames, tumour_frames, classes, wanted, path)
    if not present:
        raise DicomSegError(f"{path}: no predicted class has a voxel; a DICOM-SEG needs at least one segment")
    pixels = np.zeros((*organ_frames.shape, len(present)), dtype=bool)
    for s, cls in enumerate(present):
        pixels[..., s] = predicted_mask(organ_frames, tumour_frames, cls)
    segmentation = _segmentation(images, pixels, present, codes, len(wanted), algorithm_parameters, series_number,
                                 series_description)
    with atomic_output(path) as tmp:
        segmentation.save_as(tmp, enforce_file_format=True)
    log.info("%s: DICOM-SEG of %d segments over %d slices of series %s", path, len(present), len(images),
             segmentation.ReferencedSeriesSequence[0].SeriesInstanceUID)
    return [cls.name for cls in present]


def _check_maps(organs: Volume, tumours: Volume, path: Path) -> None:
    for name, volume in (("organs", organs), ("tumours", tumours)):
        if volume.array.ndim != 3 or not np.issubdtype(volume.array.dtype, np.integer):
            raise DicomSegError(f"{path}: the {name} map must be a 3D integer label map, got shape "
                                f"{volume.array.shape} of {volume.array.dtype}")
    if not same_grid(organs, tumours):
        raise DicomSegError(f"{path}: the organ and tumour maps are not on one grid (shapes {organs.shape}, "
                            f"{tumours.shape})")


def _predicted_classes(classes: ClassTable, predicted: Sequence[str] | None) -> list[UniversalClass]:
    if predicted is None:
        return list(classes)
    unknown = [name for name in predicted if name not in classes]
    if unknown:
        raise DicomSegError(f"predicted classes {unknown} are not in the class table {classes.source}")
    names = set(predicted)
    return [cls for cls in classes if cls.name in names]


def _present_classes(organ_frames: np.ndarray, tumour_frames: np.ndarray, classes: ClassTable,
                     wanted: list[UniversalClass], path: Path) -> list[UniversalClass]:
    """The wanted classes with voxels, in class-table order; a value that is no class of the map's kind, or a
    class that is not wanted, is an error."""
    wanted_names = {cls.name for cls in wanted}
    by_index = {cls.index: cls for cls in classes}
    present = []
    for kind, frames in (("organ", organ_frames), ("tumour", tumour_frames)):
        if frames.size and int(frames.min()) < 0:
            raise DicomSegError(f"{path}: the {kind} map holds negative values")
        counts = np.bincount(frames.ravel(), minlength=1) if frames.size else np.zeros(1, np.int64)
        for value in np.flatnonzero(counts[1:]) + 1:
            cls = by_index.get(int(value))
            if cls is None or cls.kind != kind:
                what = f"{cls.name}, a {cls.kind}" if cls else f"no class of {classes.source}"
                raise DicomSegError(f"{path}: the {kind} map holds label value {value} ({what})")
            if cls.name not in wanted_names:
                raise DicomSegError(f"{path}: the {kind} map marks {cls.name!r}, which is not a predicted class")
            present.append(cls)
    return sorted(present, key=lambda cls: cls.index)


def _segmentation(images: list[SourceImage], pixels: np.ndarray, present: list[UniversalClass], codes: CodeTable,
                  n_predicted: int, algorithm_parameters: Mapping[str, str] | None, series_number: int,
                  series_description: str) -> Segmentation:
    """The highdicom Segmentation of boolean ``pixels`` (slices, rows, columns, segments), frames in the order of
    ``images``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes as dicom_codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name="universal", family=dicom_codes.cid7162.ArtificialIntelligence, version=__version__,
        parameters=dict(algorithm_parameters) if algorithm_parameters else None)
    descriptions = []
    uses_local = False
    for number, cls in enumerate(present, start=1):
        segment = codes.for_class(cls)
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=cls.name,
            segmented_property_category=_concept(segment.category),
            segmented_property_type=_concept(segment.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            anatomic_regions=[_concept(segment.region)] if segment.region else None)
        if segment.modifier is not None:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                _concept(segment.modifier)]
        description.SegmentDescription = f"universal label value {cls.index} ({cls.kind})"
        description.RecommendedDisplayCIELabValue = list(dicom_cielab(cls.colour))
        descriptions.append(description)
        uses_local |= LOCAL_SCHEME in {c.scheme for c in (segment.category, segment.type, segment.modifier,
                                                          segment.region) if c is not None}
    coding_schemes = [hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=LOCAL_SCHEME, name="universal local codes",
        responsible_organization="universal project (config/snomed.yaml)")] if uses_local else None
    return hd.seg.Segmentation(
        source_images=[image.header for image in images], pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="universal", manufacturer_model_name="CLIP-driven universal model",
        software_versions=__version__, device_serial_number="0", content_label="UNIVERSAL",
        content_description=f"universal model: {len(present)} of {n_predicted} predicted classes found",
        series_description=series_description, coding_schemes=coding_schemes)


def _concept(code: Code) -> CodedConcept:
    """A highdicom coded concept of ``code``."""
    from highdicom.sr import CodedConcept

    return CodedConcept(code.value, code.scheme, code.meaning)
