"""The patch merging of the original's Swin UNETR, for running its released weights.

The CLIP-Driven Universal Model ships its own copy of MONAI 0.9's SwinUNETR (``model/SwinUNETR.py``). Between
Swin stages it halves the grid by concatenating, along channels, eight strided sub-grids ``x[:, i::2, j::2, k::2]``
of the channels-last feature map, then applies LayerNorm and a bias-free linear map 8C → 2C. Its sub-grid offsets
(i, j, k) over the (x, y, z) axes are, in order, :data:`ORIGINAL_MERGE_OFFSETS`: the sixth and seventh repeat the
third and fourth, and the offsets (1, 1, 0) and (0, 1, 1) are never read. MONAI ≥ 1.0 reads all eight offsets in
another order, so the original's ``reduction`` matrices (whose columns follow the concatenation) compute the
original's function only with this order. Everything else of the original's Swin UNETR is MONAI's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# (x, y, z) offsets of the concatenated sub-grids, in the original's order (repeats included).
ORIGINAL_MERGE_OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))


class OriginalPatchMerging(nn.Module):
    """Patch merging with the original's sub-grid order; a drop-in ``downsample`` for MONAI's SwinUNETR.

    Keys ``reduction.weight`` (2C, 8C) and ``norm.{weight,bias}`` (8C), as in the original and in MONAI.
    """

    def __init__(self, dim: int, norm_layer: type[nn.LayerNorm] = nn.LayerNorm, spatial_dims: int = 3) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"the original's patch merging is 3D only, got spatial_dims={spatial_dims}")
        self.dim = dim
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(8 * dim)

    def forward(self, x: Tensor) -> Tensor:
        """Channels-last features (B, X, Y, Z, C) with even X, Y, Z → (B, X/2, Y/2, Z/2, 2C)."""
        if x.ndim != 5:
            raise ValueError(f"patch merging expects (B, X, Y, Z, C), got shape {tuple(x.shape)}")
        if any(size % 2 for size in x.shape[1:4]):
            raise ValueError(f"patch merging needs even spatial sizes, got {tuple(x.shape[1:4])}")
        merged = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in ORIGINAL_MERGE_OFFSETS], dim=-1)
        return self.reduction(self.norm(merged))
