"""The original's U-Net backbone: the Models Genesis 3D U-Net (Zhou et al.) as used by the CLIP-Driven Universal
Model (``model/Unet.py``), layer for layer and with its state-dict names, so its released weights load one to one.

Four encoder stages ``down_tr64 … down_tr512`` (two 3×3×3 convolutions with bias, batch norm, ReLU; 2×2×2 max
pooling after the first three) take 1 → 32 → 64, 64 → 64 → 128, 128 → 128 → 256 and 256 → 256 → 512 channels.
Three decoder stages ``up_tr256/128/64`` each upsample with a 2×2×2 stride-2 transposed convolution that keeps the
channel count, concatenate the encoder's pre-pooling output (upsampled first, then skip) and apply two convolution
units: 512+256 → 256, 256+128 → 128, 128+64 → 64. There is no output block: the backbone returns the 512-channel
features at 1/8 resolution and the 64-channel ones at full resolution.

Batch norm: the original's ``ContBatchNorm3d`` normalises with the statistics of the batch at hand in training
*and* in evaluation, so a sample's output depends on what else is in its batch, and the weights were trained and
evaluated that way (one 96³ window per forward pass at inference). :class:`BatchStatisticsNorm3d` does the same;
``batch_statistics=False`` swaps in standard batch norm (running statistics in evaluation) for fine-tuning
experiments, which is another function of the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (middle, output) channels of the encoder stages, by state-dict name; each takes the previous stage's output.
ENCODER_STAGES = (("down_tr64", 32, 64), ("down_tr128", 64, 128), ("down_tr256", 128, 256), ("down_tr512", 256, 512))
# (upsampled input, skip, output) channels of the decoder stages, by state-dict name.
DECODER_STAGES = (("up_tr256", 512, 256, 256), ("up_tr128", 256, 128, 128), ("up_tr64", 128, 64, 64))


class BatchStatisticsNorm3d(nn.modules.batchnorm._BatchNorm):
    """Batch norm over (B, C, X, Y, Z) that always normalises with the current batch's per-channel mean and
    (biased) variance, also in ``eval()``: the original's ``ContBatchNorm3d``.

    The running statistics are kept, with the usual keys, so that checkpoints load strictly; they are updated in
    training mode only (the original also updates them in eval) and never enter the output.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected a 5D input (B, C, X, Y, Z), got {input.dim()}D")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        track = self.training and self.track_running_stats
        return F.batch_norm(input, self.running_mean if track else None, self.running_var if track else None,
                            self.weight, self.bias, True, self.momentum, self.eps)


class ConvUnit(nn.Module):
    """3×3×3 convolution (with bias, padding 1) → batch norm → ReLU; keys ``conv1.*`` and ``bn1.*``."""

    def __init__(self, in_channels: int, out_channels: int, batch_statistics: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = BatchStatisticsNorm3d(out_channels) if batch_statistics else nn.BatchNorm3d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))


def _two_units(in_channels: int, middle: int, out_channels: int, batch_statistics: bool) -> nn.Sequential:
    """Two convolution units in a row; keys ``0.*`` and ``1.*`` (the original's ``ops``)."""
    return nn.Sequential(ConvUnit(in_channels, middle, batch_statistics),
                         ConvUnit(middle, out_channels, batch_statistics))


class EncoderStage(nn.Module):
    """Two convolution units (``ops``); ``pool`` adds a 2×2×2 max pooling after them."""

    def __init__(self, in_channels: int, middle: int, out_channels: int, pool: bool, batch_statistics: bool) -> None:
        super().__init__()
        self.ops = _two_units(in_channels, middle, out_channels, batch_statistics)
        self.pool = pool

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C_in, X, Y, Z) → (output, pre-pooling output for the skip connection); they coincide without
        pooling."""
        features = self.ops(x)
        return (F.max_pool3d(features, 2) if self.pool else features), features


class DecoderStage(nn.Module):
    """Transposed convolution (``up_conv``, C → C, ×2), concatenation with the skip, two convolution units."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, batch_statistics: bool) -> None:
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(in_channels, in_channels, kernel_size=2, stride=2)
        self.ops = _two_units(in_channels + skip_channels, out_channels, out_channels, batch_statistics)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.ops(torch.cat([self.up_conv(x), skip], dim=1))


class ModelsGenesisUNet3D(nn.Module):
    """The original's U-Net backbone; returns (deep (B, 512, X/8, Y/8, Z/8), full (B, 64, X, Y, Z)).

    Input sizes must be divisible by 8. ``batch_statistics``: the original's batch norm (see the module docstring).
    """

    deep_channels = ENCODER_STAGES[-1][2]
    full_channels = DECODER_STAGES[-1][3]

    def __init__(self, in_channels: int = 1, batch_statistics: bool = True) -> None:
        super().__init__()
        channels = in_channels
        for number, (name, middle, out) in enumerate(ENCODER_STAGES):
            pool = number < len(ENCODER_STAGES) - 1
            self.add_module(name, EncoderStage(channels, middle, out, pool, batch_statistics))
            channels = out
        for name, upsampled, skip, out in DECODER_STAGES:
            self.add_module(name, DecoderStage(upsampled, skip, out, batch_statistics))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C_in, X, Y, Z) → (deep, full) features; X, Y, Z divisible by 8."""
        if any(size % 8 for size in x.shape[2:]):
            raise ValueError(f"the original U-Net needs spatial sizes divisible by 8, got {tuple(x.shape[2:])}")
        skips = []
        for name, _, _ in ENCODER_STAGES:
            x, skip = getattr(self, name)(x)
            skips.append(skip)
        deep = x
        for (name, _, _, _), skip in zip(DECODER_STAGES, reversed(skips[:-1]), strict=True):
            x = getattr(self, name)(x, skip)
        return deep, x
