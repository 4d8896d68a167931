import numpy as np
import pytest
from scipy import ndimage

from universal.core.volume import Volume, resample, resampled_shape
from universal.infer import source_grid
from universal.infer.packed_masks import PackedMasks
from universal.infer.source_grid import label_map_on_source_grid

GRID_SPACING = (4.0, 4.0, 4.0)


def _whole_grid_reference(masks, probabilities, values, source_shape, source_spacing, threshold):
    """The same rule computed on whole volumes with universal.core.volume.resample: no boxes."""
    affine = np.diag([*GRID_SPACING, 1.0])
    best = np.full(source_shape, -1.0, np.float32)
    labels = np.zeros(source_shape, np.uint8)
    for channel, value in enumerate(values):
        if not masks[channel].any():
            continue
        near = resample(Volume(ndimage.binary_dilation(masks[channel], np.ones((3, 3, 3), bool)), affine),
                        source_spacing, order=0, shape=source_shape).array
        prob = resample(Volume(probabilities[channel], affine), source_spacing, order=1, shape=source_shape).array
        wins = near & (prob > threshold) & (prob > best)
        best[wins], labels[wins] = prob[wins], value
    return labels


def _blobs(seed: int, shape=(20, 18, 16)) -> tuple[np.ndarray, np.ndarray]:
    """Three overlapping smooth probability blobs (one touching the grid's edge) and their thresholded masks."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    centres = [rng.uniform(4, np.array(shape) - 4) for _ in range(2)] + [np.array([0.0, 9.0, 8.0])]
    probabilities = np.stack([np.exp(-((grid - c[:, None, None, None]) ** 2).sum(0) / rng.uniform(8, 30))
                              for c in centres]).astype(np.float32)
    return probabilities > 0.5, probabilities


@pytest.mark.parametrize("source_spacing", [(0.8, 0.75, 2.5), (3.9, 3.9, 4.0), (5.0, 4.5, 6.0)])
def test_boxes_give_what_whole_volumes_give(source_spacing) -> None:
    masks, probabilities = _blobs(seed=int(source_spacing[0] * 10))
    source_shape = resampled_shape(masks.shape[1:], GRID_SPACING, source_spacing)
    out = label_map_on_source_grid(masks, probabilities, [0, 1, 2], [7, 3, 9], GRID_SPACING, source_shape,
                                   source_spacing, [0.5] * 3)
    expected = _whole_grid_reference(masks, probabilities, [7, 3, 9], source_shape, source_spacing, 0.5)
    assert out.dtype == np.uint8 and out.shape == source_shape
    assert set(np.unique(out)) == {0, 3, 7, 9}
    assert np.array_equal(out, expected)


@pytest.mark.parametrize("slab_voxels", [1, 150, 2000])
def test_slabs_and_packed_masks_give_what_whole_boxes_give(monkeypatch, slab_voxels) -> None:
    # slabs of one source plane (a few voxels), of several planes, and of more than one class's box
    source_spacing = (0.8, 0.75, 2.5)
    masks, probabilities = _blobs(seed=3)
    source_shape = resampled_shape(masks.shape[1:], GRID_SPACING, source_spacing)
    args = (masks, probabilities.astype(np.float16), [0, 1, 2], [7, 3, 9], GRID_SPACING, source_shape,
            source_spacing, [0.5] * 3)
    whole = label_map_on_source_grid(*args)
    monkeypatch.setattr(source_grid, "SLAB_VOXELS", slab_voxels)
    assert np.array_equal(label_map_on_source_grid(*args), whole)
    assert np.array_equal(label_map_on_source_grid(PackedMasks(masks), *args[1:]), whole)
    assert set(np.unique(whole)) == {0, 3, 7, 9}


def test_boundary_falls_where_the_interpolated_probability_crosses_the_threshold() -> None:
    # along x the probability rises by 0.2 per 4 mm voxel and crosses 0.5 at grid position 2.7 (10.8 mm)
    probabilities = np.clip(0.5 + 0.2 * (np.arange(8, dtype=np.float32) - 2.7), 0, 1)[None, :, None, None]
    probabilities = np.ascontiguousarray(np.broadcast_to(probabilities, (1, 8, 2, 2)))
    masks = probabilities > 0.5  # grid voxels 3..7
    out = label_map_on_source_grid(masks, probabilities, [0], [5], GRID_SPACING, (32, 8, 8), (1.0, 1.0, 1.0), [0.5])
    # 1 mm voxel i lies at grid position i / 4: the first above 2.7 is i = 11 (nearest neighbour gives i = 10)
    assert np.flatnonzero(out[:, 0, 0]).tolist() == list(range(11, 32))
    assert (out == out[:, :1, :1]).all()


def test_a_component_removed_by_post_processing_stays_removed() -> None:
    probabilities = np.zeros((1, 16, 8, 8), np.float32)
    probabilities[0, 2:6, 2:6, 2:6] = 0.9
    probabilities[0, 10:14, 2:6, 2:6] = 0.8
    masks = np.zeros(probabilities.shape, bool)
    masks[0, 2:6, 2:6, 2:6] = True  # post-processing kept the first component only
    out = label_map_on_source_grid(masks, probabilities, [0], [1], GRID_SPACING, (32, 16, 16), (2.0, 2.0, 2.0),
                                   [0.5])
    assert out[:16].any() and not out[16:].any()  # 2 mm voxel 16 lies at grid position 8


def test_empty_masks_give_an_empty_map() -> None:
    masks = np.zeros((2, 6, 6, 6), bool)
    probabilities = np.full((2, 6, 6, 6), 0.9, np.float32)  # probable, but post-processing emptied the masks
    out = label_map_on_source_grid(masks, probabilities, [0, 1], [1, 2], GRID_SPACING, (12, 12, 12),
                                   (2.0, 2.0, 2.0), [0.5, 0.5])
    assert out.shape == (12, 12, 12) and not out.any()
