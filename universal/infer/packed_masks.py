"""Binary masks of many classes kept one bit per voxel, one class unpacked at a time.

After post-processing, inference reads each class's mask on its own (its bounding box, its dilation) while it maps
the classes back onto the CT's grid. Kept as bool arrays, the masks of 31 classes on a 266×266×667 model grid take
1.4 GiB; packed eight voxels to a byte (:func:`numpy.packbits`) they take 176 MiB.
"""

from __future__ import annotations

import math

import numpy as np


class PackedMasks:
    """Masks (K, X, Y, Z) bool stored packed; ``masks[k]`` gives class k's mask (X, Y, Z) bool, a new array."""

    def __init__(self, masks: np.ndarray) -> None:
        if masks.dtype != np.bool_ or masks.ndim != 4:
            raise ValueError(f"expected bool masks (K, X, Y, Z), got {masks.dtype} {masks.shape}")
        self.shape = tuple(int(n) for n in masks.shape)
        self._voxels = math.prod(self.shape[1:])
        self._bits = np.empty((self.shape[0], (self._voxels + 7) // 8), dtype=np.uint8)
        for k, mask in enumerate(masks):
            self._bits[k] = np.packbits(mask.reshape(-1))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, k: int) -> np.ndarray:
        return np.unpackbits(self._bits[k], count=self._voxels).view(np.bool_).reshape(self.shape[1:])
