"""Tests of universal.data.images: every input format the pipeline reads gives the same RAS+ volume, and bad
inputs are refused naming the file and the problem."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from universal.core.volume import VolumeError, load_nifti
from universal.data.images import LPS_TO_RAS, is_readable_image, read_ct


def _sitk_ras(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """An independent reading of a SimpleITK image: its array (x, y, z) and voxel -> RAS affine, not reoriented."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0), LPS_TO_RAS @ lps


def _same_world(volume, array: np.ndarray, affine: np.ndarray) -> None:
    """``volume`` holds the same voxels at the same RAS positions as (array, affine), whatever the axis order."""
    reference = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-4)
    np.testing.assert_array_equal(volume.array, np.asarray(reference.dataobj))


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_nrrd_and_metaimage_read_as_the_same_ras_volume_as_nifti(shared_data, tmp_path, suffix) -> None:
    source = shared_data / "totalsegmentator" / "example_ct_sm.nii.gz"
    converted = tmp_path / f"ct{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(source)), str(converted))
    volume, reference = read_ct(converted), load_nifti(source)
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-4)


def test_an_lps_nrrd_label_map_keeps_its_geometry(shared_data) -> None:
    path = shared_data / "dcmqi" / "liver_seg.nrrd"
    _same_world(read_ct(path), *_sitk_ras(sitk.ReadImage(str(path))))


def test_a_jpeg2000_dicom_series_reads_as_simpleitk_reads_it(shared_data) -> None:
    folder = shared_data / "totalsegmentator" / "example_ct_dicom"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    volume = read_ct(folder)
    assert volume.shape == (512, 512, 20) and volume.array.dtype == np.int16
    _same_world(volume, *_sitk_ras(reader.Execute()))


def _copy_series(source: Path, target: Path) -> list[Path]:
    shutil.copytree(source, target)
    return sorted(target.iterdir())


def _edit(path: Path, **values) -> None:
    ds = pydicom.dcmread(path)
    for key, value in values.items():
        setattr(ds, key, value)
    ds.save_as(path)


def test_a_series_with_a_missing_slice_is_refused_where_simpleitk_averages(shared_data, tmp_path) -> None:
    files = _copy_series(shared_data / "totalsegmentator" / "example_ct_dicom", tmp_path / "series")
    positions = sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    positions[10].unlink()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "series")))
    assert reader.Execute().GetSize()[2] == 19  # SimpleITK returns 19 slices on one averaged spacing
    with pytest.raises(VolumeError, match="not evenly spaced"):
        read_ct(tmp_path / "series")


@pytest.mark.parametrize(("change", "message"), [
    ("modality", "has modality MR, not CT"),
    ("two series", "holds 2 DICOM series"),
    ("empty", "no DICOM files in the folder"),
])
def test_bad_dicom_folders_are_refused(shared_data, tmp_path, change, message) -> None:
    files = _copy_series(shared_data / "dcmqi" / "ct-3slice", tmp_path / "series")
    if change == "modality":
        for path in files:
            _edit(path, Modality="MR")
    elif change == "two series":
        _edit(files[0], SeriesInstanceUID=pydicom.uid.generate_uid())
    else:
        for path in files:
            path.write_bytes(b"not dicom")
    with pytest.raises(VolumeError, match=message) as raised:
        read_ct(tmp_path / "series")
    assert str(tmp_path / "series") in str(raised.value)


def test_images_that_are_not_3d_or_not_finite_are_refused(tmp_path) -> None:
    flat = tmp_path / "flat.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), dtype=np.int16)), str(flat))
    with pytest.raises(VolumeError, match="expected a 3D image, got 2 dimensions"):
        read_ct(flat)
    nan = tmp_path / "nan.nrrd"
    values = np.zeros((4, 4, 4), dtype=np.float32)
    values[1, 2, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(values), str(nan))
    with pytest.raises(VolumeError, match="1 NaN or infinite voxels"):
        read_ct(nan)
    series = tmp_path / "time.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), dtype=np.int16), np.eye(4)), series)
    with pytest.raises(VolumeError, match="expected a 3D volume"):
        read_ct(series)
    junk = tmp_path / "junk.nrrd"
    junk.write_bytes(b"no image here")
    with pytest.raises(VolumeError, match=r"junk\.nrrd: cannot read the image"):
        read_ct(junk)
    with pytest.raises(VolumeError, match="not a readable image"):
        read_ct(tmp_path / "ct.png")
    assert is_readable_image(tmp_path) and is_readable_image("a.NRRD") and not is_readable_image("a.png")
