"""Cost of the start-up check of bf16 training on the CPU (:mod:`universal.train.cpu_bf16`), and what it finds.

Run: .venv/bin/python benchmarks/bench_cpu_bf16_check.py
For each configuration: the distinct convolutions of one training batch, the wall time of the check's work,
:func:`universal.train.cpu_bf16.convolution_errors` (one float32 forward pass to find them, then a bf16 and a float32
forward and backward of each), and the layers the check refuses. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import platform
import time

import torch

from universal.model.network import ModelConfig, build_model
from universal.train.cpu_bf16 import TOLERANCE, convolution_errors

# name -> (model config, input shape (B, C, X, Y, Z))
CONFIGURATIONS = {
    "demo U-Net, 64³, batch 2": (ModelConfig(backbone="unet", features=(16, 16, 32, 64, 128, 16)), (2, 1, 64, 64, 64)),
    "demo U-Net, 32³, batch 2": (ModelConfig(backbone="unet", features=(16, 16, 32, 64, 128, 16)), (2, 1, 32, 32, 32)),
    "SwinUNETR-12, 96³, batch 1": (ModelConfig(backbone="swinunetr", feature_size=12), (1, 1, 96, 96, 96)),
    "SwinUNETR-12, 64³, batch 1": (ModelConfig(backbone="swinunetr", feature_size=12), (1, 1, 64, 64, 64)),
}


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("| configuration | convolutions | check (s) | refused layers |")
    print("|---|---|---|---|")
    for name, (model_config, shape) in CONFIGURATIONS.items():
        model = build_model(model_config, torch.zeros(31, model_config.embedding_dim))
        began = time.perf_counter()
        errors = convolution_errors(model, shape)
        seconds = time.perf_counter() - began
        refused = "; ".join(f"{case.name} on {list(case.input_shape)} ({error:.3g})"
                            for case, error in errors if not error < TOLERANCE) or "none"
        print(f"| {name} | {len(errors)} | {seconds:.1f} | {refused} |")


if __name__ == "__main__":
    main()
