"""The training targets of one batch: every class-table channel, then the batch's annotated ones, against the
annotated channels alone (``multi_hot_targets(..., channels=...)``, what ``universal.train.loop.train_step`` does).

Run: .venv/bin/python benchmarks/bench_train_targets.py [--rounds 3]

A batch as the demo trains on: 2 label patches of 64³ voxels holding the 11 classes the four demo datasets
annotate (random boxes of each class's value over background), with RAS x per column and a midline. Both ways give
the same tensor (checked); the table gives milliseconds per batch, mean of 20 batches, in interleaved rounds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from universal.core.classes import load_class_table
from universal.train.targets import multi_hot_targets

DEMO_CLASSES = ("Spleen", "Right Kidney", "Left Kidney", "Gall Bladder", "Esophagus", "Liver", "Stomach", "Pancreas",
                "Duodenum", "Liver Tumor", "Kidney Tumor")
PATCH = 64
BATCHES = 20


def make_batches(classes, seed: int = 0) -> list[dict]:
    """Label patches (2, 64, 64, 64) uint8 with boxes of the demo classes, x_mm (2, 64) and midline (2,)."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(BATCHES):
        label = np.zeros((2, PATCH, PATCH, PATCH), dtype=np.uint8)
        for sample in range(2):
            for name in DEMO_CLASSES:
                lo = rng.integers(0, PATCH - 16, 3)
                size = rng.integers(4, 16, 3)
                label[sample, lo[0]:lo[0] + size[0], lo[1]:lo[1] + size[1], lo[2]:lo[2] + size[2]] = classes[name].index
        batches.append({"label": torch.from_numpy(label),
                        "x_mm": torch.arange(PATCH, dtype=torch.float64).mul(4.0).expand(2, PATCH).clone(),
                        "midline_x_mm": torch.tensor([128.0, 120.0], dtype=torch.float64)})
    return batches


def all_then_select(batch: dict, classes, channels: torch.Tensor) -> torch.Tensor:
    return multi_hot_targets(batch["label"], classes, batch["x_mm"], batch["midline_x_mm"])[:, channels]


def annotated_only(batch: dict, classes, channels: torch.Tensor) -> torch.Tensor:
    return multi_hot_targets(batch["label"], classes, batch["x_mm"], batch["midline_x_mm"], channels=channels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    classes = load_class_table()
    channels = torch.tensor(classes.channels(list(DEMO_CLASSES)))
    batches = make_batches(classes)
    for batch in batches:
        assert torch.equal(all_then_select(batch, classes, channels), annotated_only(batch, classes, channels))
    times: dict[str, list[float]] = {"all 31 channels, then select": [], "annotated channels only": []}
    for _ in range(args.rounds):
        for runs, way in zip(times.values(), (all_then_select, annotated_only), strict=True):
            began = time.perf_counter()
            for batch in batches:
                way(batch, classes, channels)
            runs.append((time.perf_counter() - began) / len(batches) * 1000)
    print(f"{len(classes)} class-table channels, {len(channels)} annotated; 2 x {PATCH}³ labels; "
          f"torch threads {torch.get_num_threads()}\n")
    print("| targets | ms per batch, per round |\n|---|---|")
    for name, runs in times.items():
        print(f"| {name} | {' / '.join(f'{t:.1f}' for t in runs)} |")


if __name__ == "__main__":
    main()
