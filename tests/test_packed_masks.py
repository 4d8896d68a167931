import numpy as np
import pytest

from universal.infer.packed_masks import PackedMasks


@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (1, 8, 8, 8), (2, 1, 1, 1), (0, 4, 4, 4)])
def test_each_class_unpacks_to_its_mask_bit_for_bit(shape) -> None:
    masks = np.random.default_rng(len(shape)).random(shape) > 0.6
    packed = PackedMasks(masks)
    assert packed.shape == shape and len(packed) == shape[0]
    for k in range(shape[0]):
        mask = packed[k]
        assert mask.dtype == np.bool_ and np.array_equal(mask, masks[k])


def test_an_unpacked_mask_is_a_new_array() -> None:
    masks = np.zeros((2, 4, 4, 4), bool)
    packed = PackedMasks(masks)
    packed[0][:] = True
    assert not packed[0].any()


@pytest.mark.parametrize("masks", [np.zeros((2, 4, 4, 4), np.uint8), np.zeros((4, 4, 4), bool)])
def test_only_bool_masks_of_k_classes_are_packed(masks) -> None:
    with pytest.raises(ValueError, match="bool masks"):
        PackedMasks(masks)
