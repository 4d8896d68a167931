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

from collections.abc import Sequence

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


def postprocess_masks(masks: np.ndarray, classes: ClassTable, affine: np.ndarray, midline_x_mm: float | None,
                      channels: Sequence[int] | None = None, in_place: bool = False) -> np.ndarray:
    """Apply every class's rule to binary masks (K, X, Y, Z); returns a new array (``masks`` itself, changed,
    with ``in_place``).

    ``channels``: the class-table channel of each of the K masks (default: all classes in table order). A rule
    that needs a class without a mask (a partner side, a parent organ) reads it as empty.
    """
    channels = list(range(len(classes))) if channels is None else list(channels)
    position = {channel: k for k, channel in enumerate(channels)}
    name_at = {classes.channel(c.name): c for c in classes}

    def at(name: str) -> int | None:
        return position.get(classes.channel(name))

    out = masks if in_place else masks.copy()
    for k, channel in enumerate(channels):
        if name_at[channel].postprocess == "largest_component":
            out[k] = largest_component(out[k])
    empty = np.zeros(masks.shape[1:], dtype=bool)
    for right_name, left_name in classes.side_pairs("lung_pair"):
        right, left = at(right_name), at(left_name)
        if right is None and left is None:
            continue
        both = (out[right] if right is not None else empty) | (out[left] if left is not None else empty)
        sides = split_by_side(both, affine, midline_x_mm)
        for k, side in zip((right, left), sides, strict=True):
            if k is not None:
                out[k] = side
    pairs = [(at(r), at(left)) for r, left in classes.side_pairs("largest_component_per_side")]
    pairs = [pair for pair in pairs if pair != (None, None)]
    on_right = None if midline_x_mm is None or not pairs else right_of_midline(masks.shape[1:], affine, midline_x_mm)
    for right, left in pairs:
        for k, keep in ((right, on_right), (left, None if on_right is None else ~on_right)):
            if k is None:
                continue
            if keep is not None:
                out[k] &= keep
            out[k] = largest_component(out[k])
    for k, channel in enumerate(channels):
        cls = name_at[channel]
        if cls.postprocess == "within_parent":
            parents = np.zeros(masks.shape[1:], dtype=bool)
            for name in cls.parents:
                if (parent := at(name)) is not None:
                    parents |= out[parent]
            near = ndimage.binary_dilation(parents, structure=CONNECTIVITY_26, iterations=PARENT_MARGIN_VOXELS)
            out[k] &= near
    return out
