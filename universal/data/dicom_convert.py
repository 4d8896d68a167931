"""Convert downloaded DICOM series (e.g. an NCI Imaging Data Commons collection) into NIfTI images.

idc-index downloads a collection as one folder per series (by default
``<collection>/<PatientID>/<StudyInstanceUID>/<Modality>_<SeriesInstanceUID>/``); the catalog's layouts read one
NIfTI file per case. :func:`convert_series` finds every series of the wanted modality below a folder, reads it
with :func:`universal.data.layouts.read_dicom_series` (geometry from ImagePositionPatient/ImageOrientationPatient,
HU from the rescale tags) and writes it as ``<out_root>/<image template>``, where the template names DICOM
attributes, e.g. ``img/{PatientID}.nii.gz``. Each file is written under a temporary name and renamed; files that
exist are kept (a rerun converts only what is missing). A series that cannot be read (whatever the error), lacks
an attribute of the template, has an attribute that is not one file name (a header value such as ``../x`` or
``/tmp/x`` must never place a file outside ``out_root``), or whose output name another series also claims is
reported, not written; the others go on. The report (``conversion.tsv`` in ``out_root``) lists every series with
its status, each error on one line. A folder without any series of the wanted modality is an error naming the
modalities it holds.
"""

from __future__ import annotations

import logging
import string
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from universal.core.atomic import DiskFullError
from universal.core.paths import PathEscapeError, file_name_problem, join_inside, relative_path_problem
from universal.core.tsv import one_line, write_tsv
from universal.core.volume import Volume, save_nifti
from universal.data.layouts import LayoutError, read_dicom_series

log = logging.getLogger(__name__)

REPORT_NAME = "conversion.tsv"
REPORT_COLUMNS = ("series_uid", "folder", "output", "status", "error")


class ConversionError(ValueError):
    """A DICOM folder or an image template that cannot be converted as asked."""


@dataclass(frozen=True)
class SeriesFolder:
    """A folder holding the DICOM files of one series, with the header attributes the template may name."""

    folder: Path
    series_uid: str
    modality: str
    attributes: dict[str, str]


@dataclass(frozen=True)
class ConversionResult:
    """What became of one series: ``status`` is ``written``, ``exists`` or ``failed`` (then ``error`` says why)."""

    series_uid: str
    folder: Path
    output: Path | None
    status: str
    error: str = ""


def template_fields(template: str) -> list[str]:
    """The DICOM attribute names a template such as ``img/{PatientID}.nii.gz`` uses."""
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    if not names or any(not name.isidentifier() for name in names):
        raise ConversionError(f"image template {template!r} must name DICOM attributes, "
                              "e.g. 'img/{PatientID}.nii.gz'")
    if not template.endswith((".nii.gz", ".nii")):
        raise ConversionError(f"image template {template!r} must end in .nii.gz or .nii")
    if problem := relative_path_problem(template):
        raise ConversionError(f"image template {template!r} must be a path inside the output folder; it is {problem}")
    return names


def find_series(root: Path, fields: list[str]) -> tuple[list[SeriesFolder], list[ConversionResult]]:
    """Every folder below ``root`` that holds DICOM files, read header-only; a folder mixing several series is
    returned as a failure naming it."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    by_folder: dict[Path, dict[str, pydicom.Dataset]] = defaultdict(dict)
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "Modality",
                                                                                *fields])
        except (InvalidDicomError, OSError):
            continue
        except Exception:  # a broken DICOM file: reading its series names it
            log.debug("%s: unreadable DICOM header", path)
            continue
        if "Modality" in ds:  # an image or other DICOM object; an empty SeriesInstanceUID counts as one series
            by_folder[path.parent].setdefault(str(ds.get("SeriesInstanceUID", "") or ""), ds)
    found, failed = [], []
    for folder, series in sorted(by_folder.items()):
        if len(series) > 1:
            failed.append(ConversionResult(",".join(sorted(series)), folder, None, "failed",
                                           f"{len(series)} series in one folder; expected one series per folder"))
            continue
        uid, ds = next(iter(series.items()))
        attributes = {name: str(ds.get(name, "") or "").strip() for name in fields}
        found.append(SeriesFolder(folder, uid, str(ds.get("Modality", "")), attributes))
    return found, failed


def convert_series(root: str | Path, out_root: str | Path, image_template: str,
                   modality: str = "CT") -> list[ConversionResult]:
    """Convert every ``modality`` series below ``root`` to ``out_root/<image_template>``; see the module
    docstring. Returns one result per series (other modalities are left out) and writes the report."""
    root, out_root = Path(root), Path(out_root)
    if not root.is_dir():
        raise ConversionError(f"{root}: no such folder of DICOM series to convert")
    fields = template_fields(image_template)
    series, results = find_series(root, fields)
    wanted = [item for item in series if item.modality == modality]
    if not wanted and not results:
        found = Counter(item.modality or "no Modality" for item in series)
        held = ", ".join(f"{name}: {count} series" for name, count in sorted(found.items())) or "no DICOM series"
        raise ConversionError(f"{root}: no {modality} series below it; found {held}. Point --input at the "
                              f"{modality} download, or convert another modality with --modality")
    claims: dict[Path, list[SeriesFolder]] = defaultdict(list)
    for item in wanted:
        try:
            claims[output_path(out_root, image_template, item)].append(item)
        except ConversionError as err:
            results.append(ConversionResult(item.series_uid, item.folder, None, "failed", str(err)))
    for output, items in sorted(claims.items()):
        if len(items) > 1:
            others = ", ".join(str(i.folder) for i in items)
            results.extend(ConversionResult(i.series_uid, i.folder, output, "failed",
                                            f"{len(items)} series map to {output.name}: {others}") for i in items)
        else:
            results.append(_convert_one(items[0], output))
    _write_report(results, out_root / REPORT_NAME)
    log.info("DICOM to NIfTI in %s: %s (report %s)", out_root, status_counts(results), out_root / REPORT_NAME)
    return results


def output_path(out_root: Path, image_template: str, item: SeriesFolder) -> Path:
    """Where ``item`` is written: the template filled with the series' header values, inside ``out_root``.

    Raises :class:`ConversionError` for a missing value or one that is not a single file name (a header value of
    ``../x`` or ``/tmp/x`` could otherwise write anywhere)."""
    fields = template_fields(image_template)
    missing = [name for name in fields if not item.attributes[name]]
    if missing:
        raise ConversionError(f"the series has no value for {missing} of {image_template!r}")
    for name in fields:
        if problem := file_name_problem(item.attributes[name]):
            raise ConversionError(f"the header's {name} {item.attributes[name]!r} cannot be part of a file name: it "
                                  f"is {problem}; fix the header, or name the files by other attributes "
                                  "(e.g. {SeriesInstanceUID})")
    try:
        return join_inside(out_root, image_template.format(**item.attributes), f"image template {image_template!r}"
                           " filled as")
    except PathEscapeError as err:
        raise ConversionError(str(err)) from err


def status_counts(results: list[ConversionResult]) -> dict[str, int]:
    """How many series were written, already existed and failed."""
    return {status: sum(r.status == status for r in results) for status in ("written", "exists", "failed")}


def _convert_one(item: SeriesFolder, output: Path) -> ConversionResult:
    if output.exists():
        return ConversionResult(item.series_uid, item.folder, output, "exists")
    try:
        series = read_dicom_series(item.folder, with_pixels=True)
        save_nifti(Volume(series.array, series.affine), output)
    except DiskFullError:
        raise  # every later series would fail too: stop with the disk named
    except Exception as err:  # any error of one series is reported and the others go on
        error = str(err) if isinstance(err, LayoutError) else f"{type(err).__name__}: {err}"
        log.error("series %s in %s failed: %s", item.series_uid, item.folder, error)
        return ConversionResult(item.series_uid, item.folder, output, "failed", error)
    return ConversionResult(item.series_uid, item.folder, output, "written")


def _write_report(results: list[ConversionResult], path: Path) -> None:
    write_tsv(path, REPORT_COLUMNS, ([r.series_uid, r.folder, r.output, r.status, one_line(r.error)]
                                     for r in results))
