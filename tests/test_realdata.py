"""Catalog entries on real files of ../shared/data: TotalSegmentator's example and two KiTS19 label maps.

- TotalSegmentator v2 (``example_ct_sm`` and its ``total`` multi-label map, 3 mm RAS): every raw value maps as
  the catalog says, the per-structure layout of the TotalSegmentator dataset reads the same map back from one
  mask file per structure, and resampling to 1.5 mm keeps each organ's volume within 3 %.
- KiTS19 (label maps stored (z, y, x) with axis codes I, P, L): ``harmonize_case`` with the kits19 entry and a
  synthetic image of the label's geometry puts each kidney on its anatomical side, also after resampling.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from universal.core.volume import Volume, load_nifti, save_nifti
from universal.data.catalog import Case, find_cases
from universal.data.harmonize import harmonize_case
from universal.data.layouts import read_raw_label

pytestmark = pytest.mark.realdata

VOXEL_MM3_SOURCE = 27.0  # example_ct_sm: 3 mm isotropic
VOLUME_CLASSES = ("Liver", "Spleen", "Right Kidney", "Left Kidney", "Pancreas", "Aorta")


@pytest.fixture(scope="module")
def totalseg(shared_data):
    folder = shared_data / "totalsegmentator"
    return (Case("totalsegmentator_ml", "example", folder / "example_ct_sm.nii.gz", folder / "example_seg.nii.gz"),
            json.loads((folder / "labelmap_total_v2.json").read_text()))


def source_volumes_mm3(raw: np.ndarray, entry, classes) -> dict[str, float]:
    """Each class's volume in the source label map, its raw values mapped by the catalog entry (no side
    splits occur in TotalSegmentator's map: its structures are lateralised already)."""
    volumes: dict[str, float] = {}
    values, counts = np.unique(raw, return_counts=True)
    for value, count in zip(values.tolist(), counts.tolist(), strict=True):
        rule = next((r for r in entry.labels if r.raw == value), None)
        if rule is not None and len(rule.classes) == 1:
            volumes[rule.classes[0]] = volumes.get(rule.classes[0], 0.0) + count * VOXEL_MM3_SOURCE
    return volumes


def test_totalsegmentator_values_map_as_the_catalog_says(catalog, classes, totalseg):
    case, names = totalseg
    entry = catalog["totalsegmentator_ml"]
    raw = load_nifti(case.label).array
    result = harmonize_case(case, entry, classes, None)
    out = result.label.array
    table = {r.raw: r.classes for r in entry.labels}
    for value in np.unique(raw).tolist():
        if value == 0:
            continue
        assert len(table[value]) <= 1, names[str(value)]
        expected = classes[table[value][0]].index if table[value] else 0
        got = np.unique(out[raw == value]).tolist()
        assert got == [expected], f"{value} {names[str(value)]}: {got}, expected {expected}"
    assert not out[raw == 0].any()
    by_name = {names[str(r.raw)]: r.classes for r in entry.labels}
    assert by_name["inferior_vena_cava"] == ("Postcava",) and by_name["small_bowel"] == ("Intestine",)
    assert by_name["urinary_bladder"] == ("Bladder",) and by_name["lung_middle_lobe_right"] == ("Right Lung",)
    assert by_name["femur_left"] == () and by_name["femur_right"] == () and by_name["trachea"] == ()
    assert by_name["kidney_cyst_left"] == ("Left Kidney",)
    assert result.attrs["annotated"] == list(entry.annotated)


def test_totalsegmentator_per_structure_layout_reads_the_same_map(catalog, totalseg, tmp_path):
    """The dataset's layout (s0000/ct.nii.gz + s0000/segmentations/<name>.nii.gz) rebuilt from the real map."""
    case, names = totalseg
    entry = catalog["totalsegmentator"]
    image, seg = nib.load(case.image), nib.load(case.label)
    raw = np.asarray(seg.dataobj)
    folder = tmp_path / "s0000"
    (folder / "segmentations").mkdir(parents=True)
    nib.save(image, folder / "ct.nii.gz")
    for value, name in names.items():
        mask = (raw == int(value)).astype(np.uint8)
        nib.save(nib.Nifti1Image(mask, seg.affine, seg.header), folder / "segmentations" / f"{name}.nii.gz")
    (found,) = find_cases(entry, tmp_path)
    assert found.case_id == "s0000"
    rebuilt = read_raw_label(found, entry)
    reference = load_nifti(case.label)
    assert np.array_equal(rebuilt.array, reference.array)
    np.testing.assert_allclose(rebuilt.affine, reference.affine, atol=1e-5)


def test_totalsegmentator_volumes_survive_resampling(catalog, classes, totalseg):
    case, _ = totalseg
    entry = catalog["totalsegmentator_ml"]
    source = source_volumes_mm3(load_nifti(case.label).array, entry, classes)
    result = harmonize_case(case, entry, classes, (1.5, 1.5, 1.5))
    label = result.label
    np.testing.assert_allclose(label.spacing, (1.5, 1.5, 1.5))
    assert label.shape == (244, 202, 60) and result.image.shape == label.shape
    voxel_mm3 = float(np.prod(label.spacing))
    for name in VOLUME_CLASSES:
        resampled = float((label.array == classes[name].index).sum()) * voxel_mm3
        assert source[name] > 0
        assert abs(resampled - source[name]) <= 0.03 * source[name], f"{name}: {resampled} vs {source[name]} mm3"


def _kits_case_with_image(shared_data, tmp_path, name: str) -> Case:
    """A KiTS19 case: the real label map and a synthetic CT on its grid (body ellipse at the FOV centre)."""
    label = nib.load(shared_data / "kits19" / f"{name}_segmentation.nii.gz")
    nz, ny, nx = label.shape  # stored (z, y, x), axis codes I, P, L
    yy, xx = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    body = ((yy - (ny - 1) / 2) / (0.4 * ny)) ** 2 + ((xx - (nx - 1) / 2) / (0.45 * nx)) ** 2 <= 1
    image = np.where(body, 40, -1000).astype(np.int16)[None].repeat(nz, axis=0)
    folder = tmp_path / f"case_{name.split('_')[1]}"
    folder.mkdir()
    nib.save(nib.Nifti1Image(image, label.affine), folder / "imaging.nii.gz")
    nib.save(label, folder / "segmentation.nii.gz")
    return Case("kits19", name.split("_")[1], folder / "imaging.nii.gz", folder / "segmentation.nii.gz")


@pytest.mark.parametrize("name", ["case_00061", "case_00148"])
def test_kits_harmonize_case_puts_kidneys_on_their_side(catalog, classes, shared_data, tmp_path, name):
    case = _kits_case_with_image(shared_data, tmp_path, name)
    assert [c.case_id for c in find_cases(catalog["kits19"], tmp_path)] == [case.case_id]
    raw = load_nifti(case.label).array
    right_index, left_index = classes["Right Kidney"].index, classes["Left Kidney"].index
    for spacing in (None, (2.0, 2.0, 5.0)):
        result = harmonize_case(case, catalog["kits19"], classes, spacing)
        label = result.label
        assert result.attrs["annotated"] == ["Right Kidney", "Left Kidney", "Kidney Tumor"]
        assert set(np.unique(label.array).tolist()) == {0, right_index, left_index, classes["Kidney Tumor"].index}
        midline = result.attrs["midline_x_mm"]
        right = label.world(np.argwhere(label.array == right_index).mean(axis=0))[0]
        left = label.world(np.argwhere(label.array == left_index).mean(axis=0))[0]
        assert right > midline > left  # RAS: +x is the patient's right
        if spacing is None:
            assert int(np.isin(label.array, [right_index, left_index]).sum()) == int((raw == 1).sum())
            assert int((label.array == classes["Kidney Tumor"].index).sum()) == int((raw == 2).sum())


def test_kits_cyst_value_counts_as_the_kidney_of_its_side(catalog, classes, shared_data, tmp_path):
    """KiTS21+ label 3 (cyst): the real case_00061 map with part of each kidney relabelled as cyst."""
    case = _kits_case_with_image(shared_data, tmp_path, "case_00061")
    raw = load_nifti(case.label)
    before = harmonize_case(case, catalog["kits19"], classes, None).label.array
    cyst_map = raw.array.copy()
    kidney = np.argwhere(cyst_map == 1)
    top = kidney[:, 2] >= np.quantile(kidney[:, 2], 0.8)  # the upper fifth of both kidneys
    cyst_map[tuple(kidney[top].T)] = 3
    save_nifti(Volume(cyst_map, raw.affine), case.label)
    after = harmonize_case(case, catalog["kits19"], classes, None).label.array
    assert np.array_equal(before, after)
