import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from universal.core.volume import (
    Volume,
    VolumeError,
    load_nifti,
    resample,
    resample_tensor,
    save_nifti,
    shrink_first_order,
)


def _sitk_resample(array: np.ndarray, spacing, origin, out_shape, out_spacing, interpolator) -> np.ndarray:
    image = sitk.GetImageFromArray(array.transpose(2, 1, 0).astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    result = sitk.Resample(image, out_shape, sitk.Transform(), interpolator, origin, out_spacing,
                           (1, 0, 0, 0, 1, 0, 0, 0, 1), 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(result).transpose(2, 1, 0)


def test_resample_matches_simpleitk_geometry():
    rng = np.random.default_rng(0)
    array = rng.normal(0, 200, (60, 50, 40)).astype(np.int16)
    spacing, origin = (0.8, 0.9, 2.5), (10.0, -20.0, 30.0)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    target = (1.5, 1.5, 1.5)
    linear = resample(Volume(array, affine), target, order=1)
    nearest = resample(Volume(array, affine), target, order=0)
    assert linear.shape == (32, 30, 67)
    assert linear.array.dtype == np.int16
    np.testing.assert_allclose(linear.spacing, target)
    np.testing.assert_allclose(linear.origin, origin)
    inside = tuple(slice(0, int((n - 1) * s / 1.5)) for n, s in zip(array.shape, spacing, strict=True))
    ref_linear = _sitk_resample(array, spacing, origin, linear.shape, target, sitk.sitkLinear)
    ref_nearest = _sitk_resample(array, spacing, origin, linear.shape, target, sitk.sitkNearestNeighbor)
    assert np.abs(ref_linear[inside] - linear.array[inside]).max() <= 0.5  # int16 rounding only
    assert np.array_equal(ref_nearest[inside], nearest.array[inside])


def test_nearest_resampling_invents_no_label():
    label = np.zeros((40, 40, 20), np.uint8)
    label[5:25, 5:25, 5:15] = 3
    label[30:33, 30:33, 16:18] = 27
    out = resample(Volume(label, np.diag([1.0, 1.0, 3.0, 1.0])), (1.5, 1.5, 1.5), order=0)
    assert set(np.unique(out.array)) == {0, 3, 27}
    volume_mm3 = (out.array == 3).sum() * 1.5 ** 3
    # a 20 mm edge is 13.3 voxels of 1.5 mm: nearest sampling gives 14 (21 mm), hence 21 x 21 x 30 mm
    assert volume_mm3 == pytest.approx(21 * 21 * 30)


def test_kits_permuted_axes_are_reoriented_to_ras(shared_data):
    path = shared_data / "kits19" / "case_00061_segmentation.nii.gz"
    raw = nib.load(str(path))
    assert nib.aff2axcodes(raw.affine) == ("I", "P", "L")
    volume = load_nifti(path)
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    assert volume.shape == (raw.shape[2], raw.shape[1], raw.shape[0])
    np.testing.assert_allclose(volume.spacing, (0.976562, 0.976562, 5.0), atol=1e-5)
    # the same voxel in both index orders maps to the same world point
    corner = np.array([3, 7, 11])
    original_world = raw.affine @ np.array([*corner, 1.0])
    flipped = np.array([raw.shape[2] - 1 - corner[2], raw.shape[1] - 1 - corner[1], raw.shape[0] - 1 - corner[0]])
    np.testing.assert_allclose(volume.world(flipped.astype(float)), original_world[:3], atol=1e-4)
    assert volume.array[tuple(flipped)] == np.asarray(raw.dataobj)[tuple(corner)]


def test_save_and_load_round_trip(tmp_path):
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [1, 2, 3]
    save_nifti(Volume(array, affine), tmp_path / "a.nii.gz")
    back = load_nifti(tmp_path / "a.nii.gz")
    assert np.array_equal(back.array, array) and np.allclose(back.affine, affine)
    assert not list(tmp_path.glob("*.partial*"))


def test_corrupt_gzip_names_the_file(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(gzip.compress(b"\x00" * 1000)[:40])
    with pytest.raises(VolumeError, match=r"broken\.nii\.gz"):
        load_nifti(path)


def test_4d_image_is_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.int16), np.eye(4)), str(tmp_path / "four.nii.gz"))
    with pytest.raises(VolumeError, match="expected a 3D volume"):
        load_nifti(tmp_path / "four.nii.gz")


def test_nan_voxels_are_refused(tmp_path):
    data = np.zeros((4, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(VolumeError, match="1 NaN"):
        load_nifti(tmp_path / "nan.nii.gz")


def test_singular_affine_is_named(tmp_path):
    image = nib.Nifti1Image(np.zeros((5, 5, 5), np.int16), np.eye(4))
    header = image.header
    header.set_qform(None, code=0)
    header["srow_x"], header["srow_y"], header["srow_z"] = [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]
    header["sform_code"] = 1
    path = tmp_path / "singular.nii"
    path.write_bytes(header.binaryblock + bytes(4) + np.zeros((5, 5, 5), np.int16).tobytes())
    with pytest.raises(VolumeError, match=r"singular\.nii: the header's affine .* is singular.*fix the header"):
        load_nifti(path)


def test_slabs_resampled_in_the_whole_grid_s_axis_order_give_its_values_bit_for_bit():
    rng = np.random.default_rng(0)
    data = torch.from_numpy(rng.random((9, 11, 7), dtype=np.float32))
    zoom, shape = (5.0, 5.3333335, 1.6), (45, 58, 11)
    whole = resample_tensor(data, zoom, shape, 1)
    order = shrink_first_order(data.shape, shape)
    for first in range(0, 45, 4):  # output x planes first..first+3 read input x planes low..high-1
        low, high = max(first // 5 - 1, 0), min((first + 3) // 5 + 3, 9)
        slab = resample_tensor(data[low:high], zoom, (min(4, 45 - first), *shape[1:]), 1, out_start=(first, 0, 0),
                               in_start=(low, 0, 0), axis_order=order)
        assert torch.equal(slab, whole[first:first + 4])
