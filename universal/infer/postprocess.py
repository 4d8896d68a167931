"""Post-processing of predicted class masks by the class table's rule.

Rules (column ``postprocess`` of the class table):

- ``largest_component``: keep the largest 26-connected component;
- ``lung_pair``: the union of the right and left lung is split into components, and each component goes to the
  side of the body midline it lies on (the original instead kept two components and emptied both lungs when
  it found fewer);
- ``largest_component_per_side`` (kidneys, adrenal glands, femoral heads): each of the pair's masks is cut to
  its own side of the body midline, voxel by voxel, then keeps its largest component. A head that also fires
  on the other side's organ (early in training, a right kidney head finds both kidneys) then no longer keeps
  the wrong organ as its largest component; cutting voxels rather than moving components (as ``lung_pair``
  does) keeps a false-positive bridge across the midline from handing both organs to one side. Without a
  midline only the largest component is kept;
- ``within_parent``: keep tumour voxels that lie within 2 voxels of the (post-processed) parent organ(s);
- ``none``: unchanged.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from universal.core.classes import ClassTable
from universal.core.sides import CONNECTIVITY_26, right_of_midline, split_by_side

PARENT_MARGIN_VOXELS = 2


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a binary mask (x, y, z); an empty mask stays empty."""
    components, count = ndimage.label(mask, structure=CONNECTIVITY_26)
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(sizes.argmax())


def postprocess_masks(masks: np.ndarray, classes: ClassTable, affine: np.ndarray,
                      midline_x_mm: float | None) -> np.ndarray:
    """Apply every class's rule to binary masks (K, X, Y, Z) in class-table channel order; returns a new array."""
    out = masks.copy()
    for channel, cls in enumerate(classes):
        if cls.postprocess == "largest_component":
            out[channel] = largest_component(out[channel])
    for right_name, left_name in classes.side_pairs("lung_pair"):
        right, left = classes.channel(right_name), classes.channel(left_name)
        out[right], out[left] = split_by_side(out[right] | out[left], affine, midline_x_mm)
    pairs = classes.side_pairs("largest_component_per_side")
    on_right = None if midline_x_mm is None or not pairs else right_of_midline(masks.shape[1:], affine, midline_x_mm)
    for right_name, left_name in pairs:
        right, left = classes.channel(right_name), classes.channel(left_name)
        if on_right is not None:
            out[right] &= on_right
            out[left] &= ~on_right
        out[right], out[left] = largest_component(out[right]), largest_component(out[left])
    for channel, cls in enumerate(classes):
        if cls.postprocess == "within_parent":
            parents = np.zeros(masks.shape[1:], dtype=bool)
            for name in cls.parents:
                parents |= out[classes.channel(name)]
            near = ndimage.binary_dilation(parents, structure=CONNECTIVITY_26, iterations=PARENT_MARGIN_VOXELS)
            out[channel] &= near
    return out

