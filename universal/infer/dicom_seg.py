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
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from universal import __version__
from universal.core.atomic import atomic_output
from universal.core.classes import ClassTable, UniversalClass
from universal.core.volume import Volume, same_grid
from universal.infer.ome import predicted_mask
from universal.infer.seg_codes import (
    LOCAL_SCHEME,
    Code,
    CodeTable,
    DicomSegError,
    dicom_cielab,
    load_code_table,
)
from universal.infer.seg_sources import DEFAULT_TOLERANCE_MM, SourceImage, place_series, read_source_series

if TYPE_CHECKING:
    from highdicom.seg import Segmentation
    from highdicom.sr import CodedConcept

SERIES_NUMBER = 901
SERIES_DESCRIPTION = "universal segmentation"


log = logging.getLogger(__name__)


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
