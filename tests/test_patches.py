"""Tests of universal.train.patches on a tiny synthetic zarr training store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from universal.core.classes import load_class_table
from universal.core.volume import Volume
from universal.data.store import write_case
from universal.train.patches import (
    CaseIndex,
    PatchCollate,
    PatchConfig,
    PatchDataset,
    PatchSampler,
    choose_centre,
    patch_loader,
    read_patch,
)
from universal.train.targets import multi_hot_targets

SHAPE = (48, 48, 48)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = -47.0  # x_mm = 2 i - 47: columns 0..23 on the patient's left, 24..47 on the right
NO_AUGMENTATION = {"rotate90_prob": 0.0, "shift_intensity_prob": 0.0}


def _sphere(centre: tuple[int, int, int], radius: float) -> np.ndarray:
    grid = np.indices(SHAPE)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


def write_store(root: Path, classes, seed: int = 0) -> list[Path]:
    """Two stores: kidneys (organs + a tumour in the left kidney) and spleen + liver (organs only)."""
    rng = np.random.default_rng(seed)
    layouts = {"kidney": [("Right Kidney", (34, 24, 24), 6), ("Left Kidney", (13, 24, 24), 6),
                          ("Kidney Tumor", (13, 24, 24), 2.5)],
               "abdomen": [("Liver", (32, 20, 24), 8), ("Spleen", (12, 30, 20), 5)]}
    stores = []
    for name, spheres in layouts.items():
        store = root / f"{name}.zarr"
        for case in range(2):
            image = rng.normal(-900, 20, SHAPE).astype(np.int16)
            label = np.zeros(SHAPE, dtype=np.uint8)
            for cls, centre, radius in spheres:
                shifted = tuple(c + case for c in centre)
                label[_sphere(shifted, radius)] = classes[cls].index
                image[_sphere(shifted, radius)] = 60 + 20 * case
            attrs = {"dataset": name, "annotated": [s[0] for s in spheres], "midline_x_mm": 0.0}
            write_case(store, f"{name}_{case}", Volume(image, AFFINE), Volume(label, AFFINE), attrs)
        stores.append(store)
    return stores


@pytest.fixture(scope="module")
def classes():
    return load_class_table()


@pytest.fixture(scope="module")
def stores(tmp_path_factory, classes) -> list[Path]:
    return write_store(tmp_path_factory.mktemp("stores"), classes)


def _dataset(stores, classes, seed: int = 0, **options) -> PatchDataset:
    return PatchDataset(stores, classes, PatchConfig(patch_size=(32, 32, 32), **options), seed=seed)


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_samples_are_deterministic_by_seed(stores, classes) -> None:
    first = [_dataset(stores, classes)[i] for i in range(4)]
    again = [_dataset(stores, classes)[i] for i in reversed(range(4))][::-1]
    other = [_dataset(stores, classes, seed=1)[i] for i in range(4)]
    assert all(_same(a, b) for a, b in zip(first, again, strict=True))
    assert not all(_same(a, b) for a, b in zip(first, other, strict=True))
    sample = first[0]
    assert sample["image"].shape == (1, 32, 32, 32) and sample["image"].dtype == torch.float32
    assert sample["label"].shape == (32, 32, 32) and sample["label"].dtype == torch.int64
    assert sample["x_mm"].shape == (32, 32)
    assert -0.1 <= sample["image"].min() and sample["image"].max() <= 1.1  # window, then shift by <= 0.1


def test_loader_batches_do_not_depend_on_workers(stores, classes) -> None:
    dataset = _dataset(stores, classes)
    batches = {}
    for workers in (0, 2):
        loader = iter(patch_loader(dataset, batch_size=2, start_step=1, num_workers=workers))
        batches[workers] = [next(loader) for _ in range(2)]
    for a, b in zip(batches[0], batches[2], strict=True):
        assert _same(a, b)
    batch = batches[0][0]
    assert batch["image"].shape == (2, 1, 32, 32, 32) and batch["mask"].shape == (2, len(classes))
    for row, names in zip(batch["mask"], batch["annotated"], strict=True):
        assert sorted(row.nonzero().flatten().tolist()) == sorted(classes.channels(names))


def test_sampler_continues_the_stream() -> None:
    def take(sampler, n):
        return [i for i, _ in zip(sampler, range(n), strict=False)]
    assert take(PatchSampler(3), 9)[6:] == take(PatchSampler(3, start_step=2), 3) == [6, 7, 8]
    assert take(PatchSampler(2, rank=1, world_size=2), 4) == [2, 3, 6, 7]


def test_dataset_weights_set_the_sampling_frequency(stores, classes) -> None:
    dataset = PatchDataset(stores, classes, PatchConfig(patch_size=(32, 32, 32), **NO_AUGMENTATION), [3.0, 1.0])
    table = dataset.sampling_table()
    assert [(r["dataset"], r["case_id"], r["case_probability"]) for r in table] == [
        ("kidney", "kidney_0", 0.375), ("kidney", "kidney_1", 0.375),
        ("abdomen", "abdomen_0", 0.125), ("abdomen", "abdomen_1", 0.125)]
    assert table[0]["annotated"] == "Right Kidney,Left Kidney,Kidney Tumor"
    drawn = [dataset[i]["case_id"] for i in range(400)]
    frequency = {r["case_id"]: drawn.count(r["case_id"]) / len(drawn) for r in table}
    for row in table:  # binomial standard deviation at n = 400 is <= 0.025
        assert abs(frequency[row["case_id"]] - row["case_probability"]) < 0.075


@pytest.mark.parametrize("choice, small_share", [("class", 0.5), ("voxel", 0.01)])
def test_foreground_choice_sets_how_often_a_small_class_is_centred(choice: str, small_share: float) -> None:
    shape = (100, 100, 10)
    big, small = np.arange(0, 9900), np.arange(9900, 10000)  # flat indices: 99 % and 1 % of the foreground
    index = CaseIndex(shape=shape, affine=AFFINE, midline_x_mm=0.0, annotated=["Liver", "Esophagus"],
                      counts={6: big.size, 5: small.size}, positions={6: big, 5: small}, organ_values=[6, 5],
                      tumour_values=[])
    config = PatchConfig(patch_size=(32, 32, 8), pos=1.0, neg=0.0, foreground_choice=choice)
    rng = np.random.default_rng(0)
    centres = [np.ravel_multi_index(choose_centre(rng, index, config), shape) for _ in range(2000)]
    share = np.mean(np.asarray(centres) >= 9900)
    assert share == pytest.approx(small_share, abs=0.04)


def test_positive_crops_contain_annotated_foreground(stores, classes) -> None:
    dataset = _dataset(stores[1:], classes, pos=1.0, neg=0.0, **NO_AUGMENTATION)
    for i in range(6):
        assert dataset[i]["label"].gt(0).any()


def test_tumour_weighted_crops_contain_tumour(stores, classes) -> None:
    dataset = _dataset(stores[:1], classes, tumour_ratios=(0.0, 0.0, 1.0), **NO_AUGMENTATION)
    tumour = classes["Kidney Tumor"].index
    for i in range(6):
        assert dataset[i]["label"].eq(tumour).any()


def test_small_volumes_are_padded(stores, classes) -> None:
    dataset = PatchDataset(stores, classes, PatchConfig(patch_size=(64, 64, 64), **NO_AUGMENTATION))
    sample = dataset[0]
    assert sample["image"].shape == (1, 64, 64, 64)
    assert sample["image"][0, :8].max() == 0.0 and sample["image"][0, -8:].max() == 0.0  # -1024 HU, windowed
    assert sample["label"][:8].max() == 0 and sample["label"][8:56].max() > 0
    assert sample["x_mm"][8, 0] == pytest.approx(-47.0)  # voxel 0 of the volume sits at patch index 8


def test_x_coordinates_follow_rotations(stores, classes) -> None:
    dataset = _dataset(stores[:1], classes, rotate90_prob=1.0, shift_intensity_prob=0.0)
    right, left = classes["Right Kidney"].index, classes["Left Kidney"].index
    for i in range(6):
        sample = dataset[i]
        x_mm = sample["x_mm"][:, :, None].expand(32, 32, 32)
        assert (x_mm[sample["label"] == right] > 0).all()
        assert (x_mm[sample["label"] == left] < 0).all()


def test_mirror_flips_the_patch_after_the_other_augmentations(stores, classes) -> None:
    plain = _dataset(stores[:1], classes, rotate90_prob=1.0)
    mirror = _dataset(stores[:1], classes, rotate90_prob=1.0, mirror_prob=1.0)
    right, left = classes["Right Kidney"].index, classes["Left Kidney"].index
    for i in range(4):
        a, b = plain[i], mirror[i]
        assert not a["mirrored"] and b["mirrored"]
        assert torch.equal(b["image"], a["image"].flip(1))
        assert torch.equal(b["label"], a["label"].flip(0))
        assert torch.equal(b["x_mm"], a["x_mm"].flip(0))
        x_mm = b["x_mm"][:, :, None].expand(32, 32, 32)  # labels keep the patient's side
        assert (x_mm[b["label"] == right] > 0).all() and (x_mm[b["label"] == left] < 0).all()


def test_a_mirrored_patch_supervises_its_classes_without_a_side(stores, classes) -> None:
    plain = _dataset(stores[:1], classes, **NO_AUGMENTATION)[1]
    mirrored = _dataset(stores[:1], classes, mirror_prob=1.0, **NO_AUGMENTATION)[1]
    batch = PatchCollate(classes)([plain, mirrored])
    kidneys = classes.channels(["Right Kidney", "Left Kidney", "Kidney Tumor"])
    assert batch["mask"][:, kidneys].tolist() == [[True, True, True], [False, False, True]]
    assert batch["mask"].sum(1).tolist() == [3, 1]
    targets = multi_hot_targets(batch["label"], classes, batch["x_mm"], batch["midline_x_mm"], kidneys)
    assert targets[0, 2].any() and torch.equal(targets[1], targets[0].flip(1))


def test_mirror_prob_sets_how_often_a_patch_is_mirrored(stores, classes) -> None:
    dataset = _dataset(stores, classes, mirror_prob=0.3, **NO_AUGMENTATION)
    share = np.mean([dataset[i]["mirrored"] for i in range(200)])
    assert 0.2 < share < 0.4  # binomial(200, 0.3): 4 standard deviations either side


def test_read_patch_pads_outside_the_volume() -> None:
    array = np.arange(27, dtype=np.int16).reshape(3, 3, 3)
    patch = read_patch(array, (-1, 0, 1), (3, 3, 3), fill=-5)
    assert (patch[0] == -5).all()
    assert (patch[1:, :, :2] == array[:2, :, 1:]).all() and (patch[:, :, 2] == -5).all()


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="x == y"):
        PatchConfig(patch_size=(32, 16, 32))
    with pytest.raises(ValueError, match="mirror_prob must be a probability"):
        PatchConfig(mirror_prob=1.5)
    with pytest.raises(ValueError, match="foreground_choice must be one of"):
        PatchConfig(foreground_choice="organ")
    assert PatchConfig.from_dict(PatchConfig().to_dict()) == PatchConfig()
