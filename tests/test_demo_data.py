"""The demo datasets: layouts the catalog finds, raw label conventions, KiTS19 axis order, MSD dataset.json."""

from __future__ import annotations

import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest

from universal.core.classes import load_class_table
from universal.core.volume import Volume, load_nifti, resample
from universal.data.catalog import find_cases, load_catalog
from universal.synthetic.demo_data import DEMO_DATASETS, case_id, case_seed, raw_label, to_kits_axes, write_demo_data
from universal.synthetic.phantom import make_phantom

CASES = 2
EXTERNAL_CASES = 1
SEED = 0
STORE_SPACING = (4.0, 4.0, 4.0)  # the demo config's store grid
CLASSES = load_class_table()
CATALOG = load_catalog(None, CLASSES)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, write_demo_data(out, cases_per_dataset=CASES, external_cases=EXTERNAL_CASES, seed=SEED)


def phantom_of(key: str, position: int):
    spec = DEMO_DATASETS[key]
    return make_phantom(case_seed(SEED, key, position), spec.shape, spec.spacing)


def raw_values(cases) -> set[int]:
    values: set[int] = set()
    for case in cases:
        values |= set(np.unique(np.asarray(nib.load(case.label).dataobj)).tolist())
    return values


def test_every_demo_dataset_is_found_by_its_catalog_layout(demo):
    out, roots = demo
    assert set(roots) == {"demo_msd_liver", "demo_msd_spleen", "demo_btcv", "demo_kits", "demo_external"}
    expected_ids = {
        "demo_msd_liver": ["liver_0", "liver_1"],
        "demo_msd_spleen": ["spleen_2", "spleen_3"],
        "demo_btcv": ["0061", "0062"],
        "demo_kits": ["00000", "00001"],
        "demo_external": ["ext_000"],
    }
    for key, root in roots.items():
        assert root == out / key
        cases = find_cases(CATALOG[key], root)
        assert [c.case_id for c in cases] == expected_ids[key]
        assert [c.case_id for c in cases] == [case_id(key, i) for i in range(len(cases))]
    assert not list(out.glob("*.partial"))


def test_images_are_int16_hu_and_labels_uint8(demo):
    _, roots = demo
    for key, root in roots.items():
        for case in find_cases(CATALOG[key], root):
            image, label = nib.load(case.image), nib.load(case.label)
            assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
            assert image.shape == label.shape
            assert all(64 <= n <= 128 for n in image.shape)


def test_raw_label_values_follow_each_dataset_convention(demo):
    _, roots = demo
    assert raw_values(find_cases(CATALOG["demo_msd_liver"], roots["demo_msd_liver"])) == {0, 1, 2}
    assert raw_values(find_cases(CATALOG["demo_kits"], roots["demo_kits"])) == {0, 1, 2}
    assert raw_values(find_cases(CATALOG["demo_msd_spleen"], roots["demo_msd_spleen"])) == {0, 1}
    btcv = raw_values(find_cases(CATALOG["demo_btcv"], roots["demo_btcv"]))
    assert {0, 1, 3, 6, 11} <= btcv <= {0, 1, 3, 4, 5, 6, 7, 11, 14}
    external = raw_values(find_cases(CATALOG["demo_external"], roots["demo_external"]))
    assert {c.index for c in CLASSES.organs()} <= external <= {0} | {c.index for c in CLASSES}


def test_btcv_labels_only_its_eight_organs_and_counts_tumours_as_organ(demo):
    _, roots = demo
    case = find_cases(CATALOG["demo_btcv"], roots["demo_btcv"])[0]
    assert CATALOG["demo_btcv"].annotated_for(case.case_id) == (
        "Spleen", "Left Kidney", "Gall Bladder", "Esophagus", "Liver", "Stomach", "Pancreas", "Duodenum")
    phantom = phantom_of("demo_btcv", 0)
    label = load_nifti(case.label).array
    liver = phantom.organ_label == CLASSES["Liver"].index
    assert np.array_equal(label == 6, liver)
    assert not label[phantom.label == CLASSES["Right Kidney"].index].any()
    assert not label[phantom.label == CLASSES["Aorta"].index].any()


def test_msd_labels_liver_and_tumour_only(demo):
    _, roots = demo
    case = find_cases(CATALOG["demo_msd_liver"], roots["demo_msd_liver"])[1]
    phantom = phantom_of("demo_msd_liver", 1)
    label = load_nifti(case.label).array
    assert np.array_equal(label == 2, phantom.label == CLASSES["Liver Tumor"].index)
    assert np.array_equal(label == 1, np.isin(phantom.label, [CLASSES["Liver"].index,
                                                              CLASSES["Hepatic Vessel Tumor"].index]))


def test_msd_spleen_labels_the_spleen_only_on_5mm_slices(demo):
    _, roots = demo
    case = find_cases(CATALOG["demo_msd_spleen"], roots["demo_msd_spleen"])[0]
    label = load_nifti(case.label)
    assert label.spacing == pytest.approx((4.0, 4.0, 5.0))
    assert np.array_equal(label.array == 1, phantom_of("demo_msd_spleen", 0).label == CLASSES["Spleen"].index)
    meta = json.loads((roots["demo_msd_spleen"] / "Task09_Spleen" / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "spleen"}


def test_msd_dataset_json_lists_every_case(demo):
    _, roots = demo
    task = roots["demo_msd_liver"] / "Task03_Liver"
    meta = json.loads((task / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "liver", "2": "cancer"}
    assert meta["modality"] == {"0": "CT"} and meta["tensorImageSize"] == "3D"
    assert meta["numTraining"] == len(meta["training"]) == CASES and meta["numTest"] == 0 and meta["test"] == []
    listed = {(task / item["image"]).resolve() for item in meta["training"]}
    listed |= {(task / item["label"]).resolve() for item in meta["training"]}
    on_disk = {p.resolve() for p in task.glob("*Tr/*.nii.gz")}
    assert listed == on_disk and len(on_disk) == 2 * CASES


def test_kits_files_use_kits_axis_order_and_hold_the_phantom(demo):
    _, roots = demo
    for position, case in enumerate(find_cases(CATALOG["demo_kits"], roots["demo_kits"])):
        phantom = phantom_of("demo_kits", position)
        for path in (case.image, case.label):
            stored = nib.load(path)
            assert nib.aff2axcodes(stored.affine) == ("I", "P", "L")
            assert stored.shape == tuple(reversed(phantom.image.shape))
        image, label = load_nifti(case.image), load_nifti(case.label)
        assert np.array_equal(image.array, phantom.image)
        assert np.allclose(image.affine, phantom.affine, atol=1e-4)
        kidney = np.isin(phantom.label, [CLASSES["Right Kidney"].index, CLASSES["Left Kidney"].index])
        assert np.array_equal(label.array == 1, kidney)
        assert np.array_equal(label.array == 2, phantom.label == CLASSES["Kidney Tumor"].index)


def test_to_kits_axes_keeps_world_positions():
    array = np.arange(4 * 3 * 5, dtype=np.int16).reshape(4, 3, 5)
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [-3.0, -3.0, -8.0]
    ras = Volume(array, affine)
    kits = to_kits_axes(ras)
    assert kits.shape == (5, 3, 4)
    assert nib.aff2axcodes(kits.affine) == ("I", "P", "L")
    for index in ([0, 0, 0], [3, 2, 4], [1, 2, 3]):
        i, j, k = index
        kits_index = np.array([4 - k, 2 - j, 3 - i])
        assert kits.array[tuple(kits_index)] == array[i, j, k]
        assert np.allclose(kits.world(kits_index), ras.world(np.array(index)))


def test_external_labels_are_the_universal_phantom_labels(demo):
    _, roots = demo
    case = find_cases(CATALOG["demo_external"], roots["demo_external"])[0]
    phantom = phantom_of("demo_external", 0)
    assert np.array_equal(load_nifti(case.label).array, phantom.label)
    assert np.array_equal(load_nifti(case.image).array, phantom.image)


def test_no_two_cases_are_identical(demo):
    _, roots = demo
    digests = set()
    count = 0
    for key, root in roots.items():
        for case in find_cases(CATALOG[key], root):
            image = load_nifti(case.image).array
            digests.add(image[::4, ::4, ::4].tobytes())
            count += 1
    assert len(digests) == count == 4 * CASES + EXTERNAL_CASES


def test_datasets_use_different_voxel_grids():
    spacings = {spec.spacing for spec in DEMO_DATASETS.values()}
    assert len(spacings) == len(DEMO_DATASETS)
    for spec in DEMO_DATASETS.values():
        assert all(2.0 <= s <= 5.0 for s in spec.spacing) and all(64 <= n <= 128 for n in spec.shape)


@pytest.mark.parametrize("key", [key for key, spec in DEMO_DATASETS.items()
                                 if spec.spacing != STORE_SPACING and CATALOG[key].role == "train"])
def test_the_organs_a_dataset_teaches_keep_their_volume_on_the_store_grid(key):
    """Nearest-neighbour resampling (what harmonization does to labels) keeps each annotated organ's volume on
    average over cases: a grid that meets the store grid at the same phase in every case biases it the same way."""
    spec = DEMO_DATASETS[key]
    ratios = {}
    for position in range(3):
        phantom = phantom_of(key, position)
        stored = resample(Volume(phantom.label, phantom.affine), STORE_SPACING, order=0).array
        for name in CATALOG[key].annotated_for(case_id(key, position)):
            cls = CLASSES[name]
            if not cls.is_tumour:
                source_ml = (phantom.label == cls.index).sum() * np.prod(spec.spacing) / 1000
                stored_ml = (stored == cls.index).sum() * np.prod(STORE_SPACING) / 1000
                ratios.setdefault(name, []).append(stored_ml / source_ml)
    biased = {name: round(float(np.mean(r)), 3) for name, r in ratios.items() if abs(np.mean(r) - 1) > 0.03}
    assert ratios and not biased, biased


def test_readme_names_the_seed_and_licence(demo):
    out, _ = demo
    text = (out / "README.txt").read_text()
    assert "synthetic" in text.lower() and "CC0" in text and f"seed {SEED}" in text
    assert "universal demo-data" in text


def test_rewriting_with_fewer_cases_leaves_no_stale_case(tmp_path, monkeypatch):
    for key, spec in DEMO_DATASETS.items():  # a coarse grid keeps this test quick
        monkeypatch.setitem(DEMO_DATASETS, key, replace(spec, shape=(64, 64, 64), spacing=(6.0, 6.0, 6.0)))
    write_demo_data(tmp_path, cases_per_dataset=2, external_cases=1, seed=3)
    roots = write_demo_data(tmp_path, cases_per_dataset=1, external_cases=1, seed=3)
    for key, root in roots.items():
        assert len(find_cases(CATALOG[key], root)) == 1


def test_raw_label_maps_only_annotated_classes():
    phantom = make_phantom(5)
    label = raw_label(phantom, CATALOG["demo_kits"], case_id("demo_kits", 0), CLASSES)
    assert set(np.unique(label).tolist()) <= {0, 1, 2}
    assert not label[phantom.label == CLASSES["Liver Tumor"].index].any()


@pytest.mark.parametrize("kwargs", [{"cases_per_dataset": 0}, {"external_cases": 101}])
def test_case_counts_are_checked(tmp_path, kwargs):
    with pytest.raises(ValueError, match="between 1 and"):
        write_demo_data(tmp_path, **kwargs)
