"""DDP through torchrun: two CPU processes (gloo) train a tiny model through the CLI, as on a multi-GPU node."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from synthetic import write_sphere_case

from universal.core.classes import load_class_table
from universal.model.network import build_model, load_checkpoint, load_embeddings
from universal.train.config import TrainConfig, train_config_from_options
from universal.train.loop import train, train_step
from universal.train.patches import PatchCollate, PatchDataset

SHAPE = (40, 40, 40)
REPO = Path(__file__).resolve().parent.parent
OPTIONS = {"backbone": "unet", "features": [8, 8, 16, 16, 32, 8], "patch_size": [32, 32, 32], "batch_size": 1,
           "steps": 4, "warmup_steps": 2, "lr": 1e-3, "checkpoint_every": 2, "num_workers": 0, "amp": "off",
           "device": "cpu", "log_every": 1}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """A one-case store (liver and spleen) and an embeddings file for the default class table."""
    root = tmp_path_factory.mktemp("ddp_inputs")
    classes = load_class_table()
    write_sphere_case(root / "abdomen.zarr", "abdomen_0", classes,
                      [("Liver", (12, 20, 20), 6, 80), ("Spleen", (28, 20, 20), 6, 80)],
                      np.random.default_rng(1), "abdomen")
    embeddings = root / "prompts.pt"
    # Seeded: with random rows the two ranks' first losses can fall within 1e-3 of each other (one CI run: 8e-4),
    # and the test below could not tell their mean from rank 0's loss (seed 0: 2.5e-3 apart).
    rows = torch.randn(len(classes), 512, generator=torch.Generator().manual_seed(0))
    torch.save({"embeddings": rows, "class_names": classes.names,
                "prompts": classes.prompts, "encoder": {"model": "random"}}, embeddings)
    return {"stores": [str(root / "abdomen.zarr")], "embeddings": str(embeddings)}


def _config(inputs: dict, out_dir: Path, **changes) -> TrainConfig:
    return train_config_from_options({**OPTIONS, **changes}, stores=inputs["stores"], weights=None,
                                     embeddings=inputs["embeddings"], classes=None, include_classes=[],
                                     out_dir=out_dir)


def _rows(out_dir: Path) -> list[dict]:
    with (out_dir / "train_log.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _first_step_losses(config: TrainConfig, world_size: int) -> list[float]:
    """Each rank's step-1 loss, recomputed in this process: the loss of rank r's batch (sample index r for batch
    size 1) under the initial model."""
    classes = load_class_table()
    dataset = PatchDataset(config.stores, classes, config.patches, config.weights, config.seed)
    torch.manual_seed(config.seed)
    model = build_model(config.model, load_embeddings(config.embeddings, classes.names))
    model.train()
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)
    return [train_step(model, PatchCollate(classes)([dataset[r]]), classes, frozen, config, torch.device("cpu"),
                       None)["loss"] for r in range(world_size)]


def test_torchrun_two_cpu_processes(inputs: dict, tmp_path: Path) -> None:
    out_dir = tmp_path / "ddp"
    settings = tmp_path / "train_settings.yaml"
    settings.write_text(yaml.safe_dump(OPTIONS))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "universal.cli", "train", "--stores", *inputs["stores"], "--embeddings", inputs["embeddings"],
               "--out-dir", str(out_dir), "--settings", str(settings)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    child = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # meanwhile, the references: each rank's first loss, and a one-process run
        config = _config(inputs, out_dir)
        rank_losses = _first_step_losses(config, 2)
        single = train(_config(inputs, tmp_path / "single", steps=1))
        _, stderr = child.communicate(timeout=150)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, stderr[-4000:]

    rows = _rows(out_dir)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("loss", "bce", "dice", "grad_norm"))
    # The logged loss is the mean over both ranks' batches, not rank 0's alone.
    assert rank_losses[0] != pytest.approx(rank_losses[1], rel=1e-3)
    assert float(rows[0]["loss"]) == pytest.approx(sum(rank_losses) / 2, rel=1e-4)

    final = out_dir / "final.pt"
    record = torch.load(final, weights_only=True)
    assert record["extra"]["step"] == 4
    assert sorted(p.name for p in (out_dir / "checkpoints").iterdir()) == ["step_00000002.pt", "step_00000004.pt"]
    resumable = torch.load(out_dir / "checkpoints" / "step_00000004.pt", weights_only=True)
    assert resumable["extra"]["sampler"]["world_size"] == 2
    model, _ = load_checkpoint(final, expected_class_names=load_class_table().names)
    single_keys = list(torch.load(single, weights_only=True)["model"])
    assert list(record["model"]) == single_keys == list(model.state_dict())
    assert not any(k.startswith("module.") for k in record["model"])
    # rank 0 alone wrote outputs: one CSV, one TensorBoard event file.
    assert len(list((out_dir / "tensorboard").glob("events.*"))) == 1
