"""Read a CT image in any of the formats the pipeline takes, as a RAS+ volume in HU.

- NIfTI (``.nii``, ``.nii.gz``), in any orientation: nibabel (:func:`universal.core.volume.load_nifti`);
- NRRD (``.nrrd``, ``.nhdr``) and MetaImage (``.mha``, ``.mhd``): SimpleITK, whose LPS geometry is turned into
  RAS+;
- a folder holding one DICOM CT series: :func:`universal.data.layouts.read_dicom_series` (HU from the rescale
  tags; JPEG 2000 and JPEG through pylibjpeg). The folder must hold exactly one series (one SeriesInstanceUID) of
  modality CT; missing slices, uneven spacing and gantry tilt are refused. That reader is ours rather than
  SimpleITK's ImageSeriesReader because the ImageSeriesReader accepts uneven slice gaps with a warning and
  returns a volume on an averaged spacing (``tests/test_images.py`` shows it), which would put every slice after
  a missing one at the wrong position.

Every reader returns arrays indexed (x, y, z) in RAS+ voxel order (axis permutation and flips only, no
interpolation) with the voxel → RAS (mm) affine, and refuses, naming the file: an unreadable file, an image that
is not 3D, a multi-component image, non-finite voxels and a singular geometry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from universal.core.volume import Volume, VolumeError, canonical, load_nifti

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
READABLE_IMAGE_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES
READABLE_FORMATS = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM series folder"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_readable_image(path: str | Path) -> bool:
    """Whether ``path`` is a folder (a DICOM series) or a file of a format the pipeline reads (by extension)."""
    path = Path(path)
    return path.is_dir() or path.name.lower().endswith(READABLE_IMAGE_SUFFIXES)


def is_nifti(path: str | Path) -> bool:
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def read_ct(path: str | Path) -> Volume:
    """The CT at ``path`` as a RAS+ volume; raises :class:`VolumeError` naming the file and the problem."""
    path = Path(path)
    if path.is_dir():
        return read_dicom_ct(path)
    if is_nifti(path):
        return load_nifti(path)
    if path.name.lower().endswith(SITK_SUFFIXES):
        return read_sitk(path)
    raise VolumeError(f"{path}: not a readable image; expected {READABLE_FORMATS}")


def read_sitk(path: Path) -> Volume:
    """An NRRD or MetaImage file through SimpleITK, reoriented to RAS+."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise VolumeError(f"{path}: cannot read the image: {str(err).strip().splitlines()[-1]}") from err
    if image.GetDimension() != 3:
        raise VolumeError(f"{path}: expected a 3D image, got {image.GetDimension()} dimensions {image.GetSize()}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(f"{path}: expected one value per voxel, got {image.GetNumberOfComponentsPerPixel()}")
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # SimpleITK gives (z, y, x)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise VolumeError(f"{path}: contains {int((~np.isfinite(array)).sum())} NaN or infinite voxels")
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    affine = LPS_TO_RAS @ lps
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError(f"{path}: the geometry is singular or not finite: {affine.tolist()}")
    return canonical(array, affine)


def read_dicom_ct(folder: Path) -> Volume:
    """A folder's one DICOM CT series, reoriented to RAS+ (see the module docstring for what is refused)."""
    from universal.data.layouts import LayoutError, read_dicom_series

    _check_one_ct_series(folder)
    try:
        series = read_dicom_series(folder, with_pixels=True)
    except LayoutError as err:
        raise VolumeError(str(err)) from err
    return canonical(series.array, series.affine)


def _check_one_ct_series(folder: Path) -> None:
    """Refuse a folder without DICOM files, with several series, or with a series that is not CT."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    series: dict[str, str] = {}
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "Modality"])
        except (InvalidDicomError, OSError):
            continue
        series.setdefault(str(header.get("SeriesInstanceUID", "")), str(header.get("Modality", "")))
    if not series:
        raise VolumeError(f"{folder}: no DICOM files in the folder ({len(files)} other files)")
    if len(series) > 1:
        raise VolumeError(f"{folder}: holds {len(series)} DICOM series ({', '.join(sorted(series))}); give one "
                          "series per folder")
    modality = next(iter(series.values()))
    if modality != "CT":
        raise VolumeError(f"{folder}: the series has modality {modality or '(none)'}, not CT; the model segments CT")
