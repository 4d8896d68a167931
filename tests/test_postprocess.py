import numpy as np

from universal.infer.postprocess import largest_component, postprocess_masks

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def test_largest_component_keeps_the_biggest():
    mask = np.zeros((20, 20, 20), bool)
    mask[1:5, 1:5, 1:5] = True
    mask[10:18, 10:18, 10:18] = True
    kept = largest_component(mask)
    assert kept.sum() == 512 and kept[12, 12, 12] and not kept[2, 2, 2]


def test_rules_of_the_class_table(classes):
    shape = (40, 20, 20)
    masks = np.zeros((len(classes), *shape), bool)
    liver, tumour = classes.channel("Liver"), classes.channel("Liver Tumor")
    right_lung, left_lung = classes.channel("Right Lung"), classes.channel("Left Lung")
    masks[liver, 22:36, 2:18, 2:18] = True
    masks[liver, 2:4, 2:4, 2:4] = True                 # a speck: removed (largest_component)
    masks[tumour, 25:28, 5:8, 5:8] = True              # inside the liver: kept
    masks[tumour, 2:4, 15:18, 15:18] = True            # far from the liver: removed (within_parent)
    masks[right_lung, 2:10, 5:15, 5:15] = True         # predicted "right" but lies on the left: moved
    masks[left_lung, 30:38, 5:15, 5:15] = True
    out = postprocess_masks(masks, classes, AFFINE, midline_x_mm=40.0)
    assert out[liver].sum() == 14 * 16 * 16
    assert out[tumour].sum() == 27
    assert out[right_lung, 30:38, 5:15, 5:15].all() and not out[right_lung, 2:10].any()
    assert out[left_lung, 2:10, 5:15, 5:15].all() and not out[left_lung, 30:38].any()


def test_kidneys_are_cut_to_their_side_then_keep_their_largest_component(classes):
    masks = np.zeros((len(classes), 40, 20, 20), bool)
    right, left = classes.channel("Right Kidney"), classes.channel("Left Kidney")
    masks[right, 24:36, 4:16, 4:16] = True              # the right kidney (x > midline 40 mm, index > 20)
    masks[right, 4:10, 4:10, 4:10] = True               # the right head firing on the left kidney: cut
    masks[right, 30:32, 18:20, 18:20] = True            # a right-side speck: dropped
    masks[left, 2:12, 3:12, 3:12] = True                # the left kidney
    masks[left, 12:24, 8:10, 8:10] = True               # a bridge across the midline: its right part is cut
    out = postprocess_masks(masks, classes, AFFINE, midline_x_mm=40.0)
    assert out[right].sum() == 12 * 12 * 12 and out[right, 24:36, 4:16, 4:16].all()
    expected_left = masks[left].copy()
    expected_left[21:] = False                           # x = 2 mm * index > 40 mm from index 21
    assert np.array_equal(out[left], expected_left)
    no_midline = postprocess_masks(masks, classes, AFFINE, midline_x_mm=None)
    assert no_midline[right].sum() == 12 * 12 * 12 and np.array_equal(no_midline[left], masks[left])

