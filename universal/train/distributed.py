"""Several training processes: the torchrun environment, the process group and the values ranks share.

Outputs in ``out_dir``: ``checkpoints/step_<n>.pt`` (model, optimizer, RNG and sampler state; the newest is resumed
automatically), ``final.pt`` (model and metadata only), ``training_manifest.tsv`` (every training case with its
dataset, the dataset's sampling weight and the probability that a patch comes from the case), ``train_log.csv``
(step, loss, bce, dice, lr, seconds, grad_norm), ``val_log.csv`` (step, dataset, case_id, class, dice; when
``val_every`` > 0) and ``tensorboard/``. A resumed run continues exactly: patches are a function of (seed, sample
index) and the learning rate a function of the step, so on CPU it repeats the losses of an uninterrupted run.
"""

from __future__ import annotations

import os
from typing import NamedTuple, TypeVar

import torch
import torch.distributed as dist

from universal.train.config import TrainConfig

T = TypeVar("T")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class DistributedEnv(NamedTuple):
    rank: int
    world_size: int
    local_rank: int


def distributed_env() -> DistributedEnv:
    """(rank, world size, local rank) of this process from the torchrun environment; (0, 1, 0) without it."""
    env = DistributedEnv(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                         int(os.environ.get("LOCAL_RANK", "0")))
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise ValueError(f"inconsistent torchrun environment: RANK={env.rank}, WORLD_SIZE={env.world_size}")
    return env


def setup_distributed(config: TrainConfig, env: DistributedEnv) -> tuple[torch.device, bool]:
    """The device of this process, and whether this call initialised the process group (then train() destroys it).

    One process: :func:`resolve_device` as before. Several: CUDA device ``LOCAL_RANK`` (unless ``config.device``
    names an index) with NCCL, or CPU with gloo; an already initialised process group is used as it is.
    """
    device = resolve_device(config.device)
    if env.world_size == 1:
        return device, False
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", env.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device, False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                            rank=env.rank, world_size=env.world_size,
                            device_id=device if device.type == "cuda" else None)
    return device, True


def from_rank0(value: T, world_size: int) -> T:
    """Rank 0's ``value`` (any picklable object) on every rank, e.g. the checkpoint all ranks resume from."""
    if world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(row: dict[str, float], keys: tuple[str, ...], device: torch.device,
                     world_size: int) -> dict[str, float]:
    """``row`` with ``keys`` averaged over all ranks (the global loss of a step)."""
    if world_size == 1:
        return row
    values = torch.tensor([row[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return {**row, **{k: float(v) / world_size for k, v in zip(keys, values.tolist(), strict=True)}}
