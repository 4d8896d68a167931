"""Cost of the start-up check of bf16 training on the CPU (:mod:`universal.cpu_bf16`), and what it finds.

Run: .venv/bin/python benchmarks/bench_cpu_bf16_check.py
For each configuration: the distinct convolutions of one training batch, the wall time of
:func:`universal.cpu_bf16.check_bf16_training_on_cpu` (one float32 forward pass to find them, then a bf16 and a
float32 forward and backward of each), and the layers it refuses. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import platform
import time

import torch

from universal.cpu_bf16 import check_bf16_training_on_cpu, convolution_cases
from universal.model import ModelConfig, build_model

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
        cases = len(convolution_cases(model, shape))
        began = time.perf_counter()
        try:
            check_bf16_training_on_cpu(model, shape)
            refused = "none"
        except ValueError as error:
            refused = str(error).split(": ", 1)[1].split(". Choose")[0]
        print(f"| {name} | {cases} | {time.perf_counter() - began:.1f} | {refused} |")


if __name__ == "__main__":
    main()
