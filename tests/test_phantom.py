"""The synthetic phantom: determinism, geometry, anatomy (sides, levels, volumes), intensities and tumours."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from universal.core.classes import load_class_table
from universal.synthetic.phantom import DEFAULT_SHAPE, DEFAULT_SPACING, Phantom, make_phantom

SEEDS = (0, 1, 2, 3, 4, 5)
CLASSES = load_class_table()


@pytest.fixture(scope="module")
def phantoms() -> dict[int, Phantom]:
    return {seed: make_phantom(seed) for seed in SEEDS}


def value(name: str) -> int:
    return CLASSES[name].index


def volume_ml(mask: np.ndarray, phantom: Phantom) -> float:
    return float(mask.sum() * np.prod(phantom.spacing) / 1000.0)


def organ_region(phantom: Phantom, name: str) -> np.ndarray:
    """An organ with the tumours growing in it (the organ label map counts a tumour as its parent)."""
    return phantom.organ_label == value(name)


def centroid_mm(phantom: Phantom, mask: np.ndarray) -> np.ndarray:
    """RAS+ world coordinates (mm) of a mask's centroid."""
    index = np.argwhere(mask).mean(axis=0)
    return phantom.affine[:3, :3] @ index + phantom.affine[:3, 3]


def median_hu(phantom: Phantom, name: str) -> float:
    return float(np.median(phantom.image[phantom.label == value(name)]))


def test_same_seed_gives_identical_phantoms_and_another_seed_does_not():
    a, b, c = make_phantom(11), make_phantom(11), make_phantom(12)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert np.array_equal(a.affine, b.affine)
    assert not np.array_equal(a.label, c.label)
    assert not np.array_equal(a.image, c.image)


def test_arrays_and_affine_describe_a_centred_ras_grid(phantoms):
    for p in phantoms.values():
        assert p.image.shape == p.label.shape == p.organ_label.shape == DEFAULT_SHAPE
        assert p.image.dtype == np.int16 and p.label.dtype == np.uint8 and p.organ_label.dtype == np.uint8
        assert np.allclose(p.affine[:3, :3], np.diag(DEFAULT_SPACING))
        assert p.spacing == DEFAULT_SPACING
        centre = p.affine[:3, :3] @ ((np.array(DEFAULT_SHAPE) - 1) / 2) + p.affine[:3, 3]
        assert np.allclose(centre, 0.0)
        body = centroid_mm(p, p.image > -500)
        assert np.all(np.abs(body[:2]) < 25.0), body


def test_custom_grid_keeps_the_anatomy_in_millimetres():
    p = make_phantom(0, shape=(72, 64, 80), spacing=(5.0, 5.0, 5.0))
    assert p.image.shape == (72, 64, 80) and p.spacing == (5.0, 5.0, 5.0)
    reference = make_phantom(0)
    for name in ("Liver", "Spleen", "Right Kidney"):
        ratio = volume_ml(organ_region(p, name), p) / volume_ml(organ_region(reference, name), reference)
        assert 0.8 < ratio < 1.2, (name, ratio)


@pytest.mark.parametrize("shape, spacing", [((96, 80), (4.0, 4.0, 4.0)), ((96, 80, 96), (4.0, 0.0, 4.0))])
def test_invalid_grid_is_refused(shape, spacing):
    with pytest.raises(ValueError, match="shape"):
        make_phantom(0, shape=shape, spacing=spacing)


def test_label_values_come_from_the_class_table_and_every_organ_is_present(phantoms):
    known = {0} | {c.index for c in CLASSES}
    for p in phantoms.values():
        assert set(np.unique(p.label).tolist()) <= known
        present = set(np.unique(p.label).tolist())
        assert {c.index for c in CLASSES.organs()} <= present


def test_every_tumour_type_occurs_and_liver_and_kidney_tumours_are_common(phantoms):
    counts = {c.name: sum(bool((p.label == c.index).any()) for p in phantoms.values()) for c in CLASSES.tumours()}
    assert all(count > 0 for count in counts.values()), counts
    assert min(counts["Liver Tumor"], counts["Kidney Tumor"]) >= len(phantoms) - 2, counts


def test_organ_label_is_the_label_with_tumours_replaced_by_their_parent(phantoms):
    for p in phantoms.values():
        tumour = np.isin(p.label, [c.index for c in CLASSES.tumours()])
        assert np.array_equal(p.organ_label[~tumour], p.label[~tumour])
        assert not np.isin(p.organ_label, [c.index for c in CLASSES.tumours()]).any()


def test_organ_volumes_are_in_the_adult_range(phantoms):
    for p in phantoms.values():
        liver = organ_region(p, "Liver") | (p.label == value("Hepatic Vessel"))
        assert 1200 <= volume_ml(liver, p) <= 2000
        for kidney in ("Right Kidney", "Left Kidney"):
            assert 120 <= volume_ml(organ_region(p, kidney), p) <= 200, kidney
        assert 150 <= volume_ml(organ_region(p, "Spleen"), p) <= 250
        assert 50 <= volume_ml(organ_region(p, "Pancreas"), p) <= 120
        assert 15 <= volume_ml(organ_region(p, "Gall Bladder"), p) <= 60
        for adrenal in ("Right Adrenal Gland", "Left Adrenal Gland"):
            assert 1 <= volume_ml(organ_region(p, adrenal), p) < 10, adrenal
        assert volume_ml(organ_region(p, "Celiac Trunk"), p) < 3
        for femur in ("Right Head of Femur", "Left Head of Femur"):
            assert 30 <= volume_ml(organ_region(p, femur), p) <= 80


def test_tumour_volumes_are_learnable_but_not_huge(phantoms):
    for p in phantoms.values():
        for c in CLASSES.tumours():
            mask = p.label == c.index
            if mask.any():
                assert 2 <= volume_ml(mask, p) <= 90, c.name


def test_organs_lie_on_their_anatomical_side(phantoms):
    for p in phantoms.values():
        x = {name: centroid_mm(p, organ_region(p, name))[0] for name in
             ("Spleen", "Liver", "Right Kidney", "Left Kidney", "Right Lung", "Left Lung", "Stomach",
              "Gall Bladder", "Postcava", "Aorta", "Right Head of Femur", "Left Head of Femur",
              "Right Adrenal Gland", "Left Adrenal Gland")}
        assert x["Spleen"] < 0 < x["Liver"]
        assert x["Stomach"] < 0 < x["Gall Bladder"]
        assert x["Aorta"] < x["Postcava"]
        for pair in ("Kidney", "Lung", "Adrenal Gland"):
            assert x[f"Right {pair}"] > 0 > x[f"Left {pair}"], pair
        assert x["Right Head of Femur"] > 0 > x["Left Head of Femur"]


def test_organs_lie_at_their_anatomical_level(phantoms):
    for p in phantoms.values():
        z = {c.name: centroid_mm(p, organ_region(p, c.name))[2] for c in CLASSES.organs()}
        assert z["Right Lung"] > z["Liver"] > z["Right Kidney"] > z["Bladder"] > z["Prostate"]
        assert z["Right Kidney"] < z["Left Kidney"]
        assert z["Right Adrenal Gland"] > z["Right Kidney"] and z["Left Adrenal Gland"] > z["Left Kidney"]
        assert z["Liver"] > z["Gall Bladder"]
        assert min(z["Right Head of Femur"], z["Left Head of Femur"]) < z["Bladder"]
        y = {name: centroid_mm(p, organ_region(p, name))[1] for name in ("Aorta", "Bladder", "Rectum")}
        assert y["Rectum"] < y["Bladder"]


def test_intensities_are_those_of_a_portal_venous_ct(phantoms):
    for p in phantoms.values():
        assert 80 <= median_hu(p, "Liver") <= 120
        assert 90 <= median_hu(p, "Spleen") <= 130
        assert 140 <= median_hu(p, "Left Kidney") <= 200
        assert 120 <= median_hu(p, "Aorta") <= 200
        assert median_hu(p, "Gall Bladder") < 40 and median_hu(p, "Bladder") < 40
        assert median_hu(p, "Right Lung") < -700 and median_hu(p, "Left Lung") < -700
        assert median_hu(p, "Right Head of Femur") > 250
        assert np.median(p.image[:3, :3, :]) < -900


def test_tumours_are_hypodense_to_their_organ(phantoms):
    for p in phantoms.values():
        if (p.label == value("Liver Tumor")).any():
            assert median_hu(p, "Liver Tumor") < median_hu(p, "Liver") - 25
        if (p.label == value("Kidney Tumor")).any():
            assert median_hu(p, "Kidney Tumor") < median_hu(p, "Right Kidney") - 40


def test_image_has_noise_and_partial_volume_at_edges(phantoms):
    for p in phantoms.values():
        kidney = p.label == value("Left Kidney")
        interior = ndimage.binary_erosion(kidney, iterations=2)
        boundary = kidney & ~ndimage.binary_erosion(kidney)
        assert 8 <= np.std(p.image[interior]) <= 25
        # the kidney is wrapped in fat: its outer voxels are pulled toward fat by the partial-volume blur
        assert np.median(p.image[boundary]) < np.median(p.image[interior]) - 25


def test_every_tumour_lies_inside_its_parent_organ(phantoms):
    for p in phantoms.values():
        for c in CLASSES.tumours():
            mask = p.label == c.index
            if not mask.any():
                continue
            parents = [value(name) for name in c.parents]
            assert np.isin(p.organ_label[mask], parents).all(), c.name
            shell = ndimage.binary_dilation(mask) & ~mask
            assert np.isin(p.organ_label[shell], parents).mean() >= 0.6, c.name
