"""Throughput and memory of one training step of the universal model on a GPU (bf16 autocast vs float32).

Run on a GPU node: .venv/bin/python benchmarks/bench_gpu_train_step.py [--json out.json]
(defaults: SwinUNETR feature size 48, 96³ patches, batch 2, all 31 classes annotated, as the original trains;
~2 min on one recent GPU). ``--device cpu --feature-size 12 --patch 64 --steps 2 --warmup 1`` checks the script
itself on a laptop.

Each configuration builds a fresh model, runs ``--warmup`` untimed steps (cuDNN autotuning, allocator warm-up),
then ``--steps`` timed steps of :func:`universal.train.loop.train_step` (forward with the batched class heads, masked
BCE + Dice loss, backward, gradient clipping, AdamW) on a fixed random batch, synchronising the device before
reading the clock. Peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps (the process RSS on
CPU is not reported). Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from universal.core.classes import load_class_table
from universal.model.network import ModelConfig, build_model
from universal.train.config import TrainConfig
from universal.train.loop import train_step

CONFIGURATIONS = {
    "bf16 autocast": {"amp": torch.bfloat16, "checkpointing": False},
    "float32": {"amp": None, "checkpointing": False},
    "bf16 autocast + gradient checkpointing": {"amp": torch.bfloat16, "checkpointing": True},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--feature-size", type=int, default=48)
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args()


def random_batch(classes, batch: int, patch: int, device: torch.device) -> dict:
    """A batch as the patch loader collates it: every class annotated, labels drawn from all class values."""
    generator = torch.Generator().manual_seed(0)
    shape = (batch, patch, patch, patch)
    values = torch.tensor([c.index for c in classes] + [0] * len(classes))
    label = values[torch.randint(len(values), shape, generator=generator)]
    x_mm = (torch.arange(patch, dtype=torch.float32) - patch / 2) * 1.5  # RAS x of each column, 1.5 mm voxels
    return {"image": torch.rand((batch, 1, *shape[1:]), generator=generator).to(device),
            "label": label.to(device),
            "x_mm": x_mm[None, :, None].expand(batch, patch, patch).contiguous().to(device),
            "midline_x_mm": torch.zeros(batch, device=device),
            "mask": torch.ones((batch, len(classes)), dtype=torch.bool, device=device)}


def measure(name: str, options: dict, args: argparse.Namespace, device: torch.device, classes) -> dict:
    torch.manual_seed(0)
    config = ModelConfig(backbone="swinunetr", feature_size=args.feature_size,
                         gradient_checkpointing=options["checkpointing"])
    model = build_model(config, torch.randn(len(classes), config.embedding_dim)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    train_config = TrainConfig(stores=["unused"], embeddings="unused", out_dir="unused", batch_size=args.batch)
    batch = random_batch(classes, args.batch, args.patch, device)
    cuda = device.type == "cuda"
    for _ in range(args.warmup):
        train_step(model, batch, classes, optimizer, train_config, device, options["amp"])
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    losses = [train_step(model, batch, classes, optimizer, train_config, device, options["amp"])["loss"]
              for _ in range(args.steps)]
    if cuda:
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - began) / args.steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    del model, optimizer
    if cuda:
        torch.cuda.empty_cache()
    return {"configuration": name, "seconds_per_step": seconds, "patches_per_second": args.batch / seconds,
            "peak_memory_gib": peak, "final_loss": losses[-1]}


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    classes = load_class_table()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = platform.processor() or platform.machine()
    rows = [measure(name, options, args, device, classes) for name, options in CONFIGURATIONS.items()]
    print(f"\n{hardware}, torch {torch.__version__}; SwinUNETR feature size {args.feature_size}, "
          f"{args.batch} x {args.patch}³ patches, {len(classes)} classes; mean of {args.steps} steps after "
          f"{args.warmup} warm-up steps\n")
    print("| configuration | s / step | patches / s | peak memory GiB | loss after the timed steps |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['configuration']} | {r['seconds_per_step']:.3f} | {r['patches_per_second']:.1f} | "
              f"{r['peak_memory_gib']:.2f} | {r['final_loss']:.4f} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"hardware": hardware, "torch": torch.__version__, "args": vars(args) | {
            "json": str(args.json)}, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
