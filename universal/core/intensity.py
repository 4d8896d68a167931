"""CT intensity normalisation shared by training and inference."""

from __future__ import annotations

import numpy as np
import torch

DEFAULT_WINDOW_HU = (-175.0, 250.0)


def window(image_hu: np.ndarray | torch.Tensor, low: float = DEFAULT_WINDOW_HU[0],
           high: float = DEFAULT_WINDOW_HU[1]) -> torch.Tensor:
    """Clip HU to [low, high] and scale linearly to [0, 1] as float32 (the original's ScaleIntensityRanged)."""
    if high <= low:
        raise ValueError(f"window high {high} must exceed low {low}")
    tensor = torch.as_tensor(image_hu).to(torch.float32)
    return tensor.clamp(low, high).sub_(low).div_(high - low)
