"""A start-up check for bf16 training on the CPU: does this CPU's bfloat16 convolution get the model's weight
gradients right?

With torch 2.14.1 on CPUs with AVX-512 BF16, the oneDNN kernel behind some bfloat16 3×3×3 convolutions returns a
wrong weight gradient (errors of order 1, often inf or NaN, run to run different) while the forward pass and the
input gradient are right. Seen here: padding 1 on feature maps 2 voxels deep along the first spatial axis, for some
channel counts (16 → 32 wrong, 8 → 8 right), as at the 1/16 level of a U-Net on 32-voxel patches. Which shapes go
wrong depends on the kernel oneDNN picks, so the check does not keep a list: it records every convolution the model
runs on a training batch and runs each once, with random data, in bfloat16 and in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Largest relative error (Frobenius norm) of a bf16 weight gradient against float32 that counts as right; bf16
# rounding gives about 0.003, the kernel fault above 0.9 to inf.
TOLERANCE = 0.05


@dataclass(frozen=True)
class ConvolutionCase:
    """One convolution as the model runs it: ``name`` of its first module, input (B, C, X, Y, Z) and weight shapes,
    and the module's hyperparameters."""

    name: str
    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    transposed: bool
    output_padding: tuple[int, ...]

    def key(self) -> tuple:
        """Everything but the module name: cases with equal keys run the same kernel."""
        return (self.input_shape, self.weight_shape, self.stride, self.padding, self.dilation, self.groups,
                self.transposed, self.output_padding)


def convolution_cases(model: nn.Module, input_shape: Sequence[int]) -> list[ConvolutionCase]:
    """The distinct 3D convolutions (plain and transposed) ``model`` runs on an input of ``input_shape``
    (B, C, X, Y, Z), in the order they run; found with one float32 forward pass without autograd."""
    found: dict[tuple, ConvolutionCase] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            case = ConvolutionCase(name, tuple(args[0].shape), tuple(module.weight.shape), module.stride,
                                   module.padding, module.dilation, module.groups,
                                   isinstance(module, nn.ConvTranspose3d),
                                   getattr(module, "output_padding", (0, 0, 0)))
            found.setdefault(case.key(), case)
        return hook

    handles = [module.register_forward_pre_hook(record(name)) for name, module in model.named_modules()
               if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d))]
    training = model.training
    model.eval()  # no normalization statistics change
    try:
        with torch.no_grad():
            model(torch.zeros(tuple(input_shape)))
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return list(found.values())


def weight_gradient_error(case: ConvolutionCase) -> float:
    """Relative error (Frobenius norm) of the bfloat16 weight gradient of ``case`` against float32, on random
    input, weights and upstream gradient; inf or NaN when the bf16 gradient is not finite."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(case.input_shape, generator=generator)
    weight = torch.randn(case.weight_shape, generator=generator)
    reference = weight.clone().requires_grad_()
    output = _convolve(case, image, reference)
    upstream = torch.randn(output.shape, generator=generator)
    output.backward(upstream)
    bf16 = weight.to(torch.bfloat16).requires_grad_()
    _convolve(case, image.to(torch.bfloat16), bf16).backward(upstream.to(torch.bfloat16))
    difference = bf16.grad.float() - reference.grad
    return float(torch.linalg.vector_norm(difference) / torch.linalg.vector_norm(reference.grad))


def _convolve(case: ConvolutionCase, image: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``case``'s convolution of ``image`` by ``weight``, without bias."""
    if case.transposed:
        return F.conv_transpose3d(image, weight, None, case.stride, case.padding, case.output_padding, case.groups,
                                  case.dilation)
    return F.conv3d(image, weight, None, case.stride, case.padding, case.dilation, case.groups)


def convolution_errors(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[ConvolutionCase, float]]:
    """Every distinct convolution ``model`` runs on batches of ``input_shape`` (B, C, X, Y, Z voxels) with the
    relative error of its bfloat16 weight gradient on this CPU (:func:`weight_gradient_error`)."""
    return [(case, weight_gradient_error(case)) for case in convolution_cases(model, input_shape)]


def check_bf16_training_on_cpu(model: nn.Module, input_shape: Sequence[int]) -> None:
    """Raise ValueError when this CPU's bfloat16 convolutions get a weight gradient of ``model`` wrong on batches
    of ``input_shape`` (B, C, X, Y, Z voxels), naming each such layer, its input shape and the way out."""
    wrong = [(case, error) for case, error in convolution_errors(model, input_shape) if not error < TOLERANCE]
    if wrong:
        layers = "; ".join(f"{case.name} on {list(case.input_shape)} (relative error {error:.3g})"
                           for case, error in wrong)
        raise ValueError(
            f"bf16 autocast on this CPU gets convolution weight gradients wrong (oneDNN, torch {torch.__version__}) "
            f"for batches of {list(input_shape)}: {layers}. Choose another patch_size, or train with amp: off "
            f"(bf16_on_cpu: false)")
