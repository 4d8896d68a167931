"""Training loop of the universal model: one readable loop, one config dataclass (after nanoGPT).

AdamW, linear warm-up then cosine decay per step, optional bf16 autocast, gradient clipping, the partial-label
loss (:mod:`universal.losses`) on multi-hot targets derived at load time (:mod:`universal.targets`), patches from
the zarr stores (:mod:`universal.patches`).

Outputs in ``out_dir``: ``checkpoints/step_<n>.pt`` (model, optimizer, RNG and sampler state; the newest is resumed
automatically), ``final.pt`` (model and metadata only), ``training_manifest.tsv`` (every training case with its
dataset, the dataset's sampling weight and the probability that a patch comes from the case), ``train_log.csv``
(step, loss, bce, dice, lr, seconds, grad_norm), ``val_log.csv`` (step, dataset, case_id, class, dice; when
``val_every`` > 0) and ``tensorboard/``. A resumed run continues exactly: patches are a function of (seed, sample
index) and the learning rate a function of the step, so on CPU it repeats the losses of an uninterrupted run.

Several processes (``torchrun --nproc_per_node=N -m universal.cli train ...``, which sets RANK, WORLD_SIZE and
LOCAL_RANK) train one model with DistributedDataParallel: NCCL on CUDA (each process on GPU ``LOCAL_RANK``), gloo
on CPU. Rank r draws the patches of sample indices (s·N + r)·B ... (s·N + r + 1)·B − 1 at step s
(:class:`~universal.patches.PatchSampler`), so ranks never share a patch; DDP averages the gradients, so a step
is one step on N·B patches. The logged loss, BCE and Dice are averaged over the ranks (the global loss). Only rank 0
writes the log, TensorBoard and checkpoints (same format as one process: the bare model's state dict, no
``module.`` prefix); every rank resumes from the checkpoint rank 0 found, so ``out_dir`` must be on a file system
all ranks see. ``batch_size`` is per rank.

Transfer (fine-tuning on a novel class or task): ``init_checkpoint`` starts a new run (step 0, fresh optimizer
and schedule) from a trained model's weights, with a class table that may add classes. Each class is only a row
of the text-embedding buffer ``organ_embedding`` (the heads are generated from it), so a new class needs a new
prompt embedding and no new weights: every checkpoint tensor whose name and shape match the new model is copied
(backbone, ``GAP``, ``precls_conv``, ``controller``, ``text_to_vision``), ``organ_embedding`` comes from the new
``embeddings`` file (all classes, the new ones included), and with ``embedding_norm: centered`` the checkpoint's
``embedding_center`` is kept: the centre is part of the mapping ``text_to_vision`` learned, and recomputing it over
the new class set would shift every known class's input. ``trainable: heads`` freezes the backbone
(``requires_grad`` off, out of the optimizer, in eval mode) and trains the original's non-backbone modules
(:data:`~universal.model.HEAD_MODULES`: ``text_to_vision``, ``controller``, ``GAP``, ``precls_conv``). ``GAP`` and
``precls_conv`` count as heads as in the original (its ``load_params`` loads a backbone only); since they feed
every class's head, training them may move the known classes too. Every class of the init checkpoint must be in
the new class table: dropping a class is refused with an error naming it (it would go unseen, never unlearned).
"""

from __future__ import annotations

import csv
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from universal.classes import ClassTable, load_class_table
from universal.cpu_bf16 import check_bf16_training_on_cpu
from universal.intensity import window
from universal.losses import (
    DEFAULT_DICE_SMOOTH,
    LOSS_AVERAGES,
    MISSED_PROBABILITY,
    check_missed_options,
    masked_bce_dice_loss,
)
from universal.model import (
    CHECKPOINT_FORMAT,
    HEAD_GENERATOR,
    HEAD_MODULES,
    ModelConfig,
    UniversalModel,
    build_model,
    copy_matching_weights,
    load_checkpoint,
    load_embeddings,
    save_checkpoint,
)
from universal.patches import PatchConfig, PatchDataset, patch_loader
from universal.settings import known_keys
from universal.store import list_cases, open_case
from universal.targets import known_negatives, multi_hot_targets
from universal.tsv import write_tsv

CSV_COLUMNS = ("step", "loss", "bce", "dice", "lr", "seconds", "grad_norm")
VAL_COLUMNS = ("step", "dataset", "case_id", "class", "dice")
MANIFEST_NAME = "training_manifest.tsv"
AMP_MODES = ("auto", "bf16", "off")
TRAINABLE = ("all", "heads")
MISSED_CLASSES = ("all", "tumours")  # the classes whose missed positives missed_weight weighs
EXCLUSION_NEGATIVES = ("none", "all", "tumours")  # which labelled voxels are known negatives of unannotated classes


@dataclass
class TrainConfig:
    """Everything a training run depends on.

    ``stores``: zarr training stores (one per dataset); ``weights``: per-store sampling weights (default equal).
    ``embeddings``: class text embeddings file (:mod:`universal.embed`); ``class_table``/``include_classes``: the
    class table (default ``config/classes.yaml``) and disabled rows to switch on. ``steps``: optimizer steps of
    ``batch_size`` patches. ``lr`` peaks after ``warmup_steps`` (linear from lr/warmup_steps), then decays by a
    cosine to ``min_lr`` at ``steps``; the head generator (``text_to_vision``, ``controller``) trains at
    ``generator_lr_scale`` times that rate. ``amp``: ``"auto"`` (bf16 autocast on CUDA, and on CPU when
    ``bf16_on_cpu``), ``"bf16"`` (always) or ``"off"``; bf16 on the CPU first checks that the CPU's bfloat16
    convolutions get this model's weight gradients right on a training batch (:mod:`universal.cpu_bf16`).
    ``max_nonfinite_steps``: steps in a row whose gradient norm is inf or NaN (each skipped, weights and optimizer
    state unchanged) before training stops with an error.
    ``device``: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"`` (under torchrun: GPU ``LOCAL_RANK``).
    ``checkpoint_every``: steps between resumable checkpoints, of which ``keep_checkpoints`` are kept.
    ``init_checkpoint``: a trained model (``final.pt`` or a step checkpoint) to fine-tune from, at step 0 with a
    fresh optimizer (see the module docstring); a run that already has checkpoints in ``out_dir`` resumes from them
    instead. ``trainable``: ``"all"`` or ``"heads"`` (backbone frozen; needs
    ``init_checkpoint``). ``val_stores``: zarr stores of held-out cases, of which at most ``val_cases`` per store
    are evaluated every ``val_every`` steps and at the end (0: never) by sliding-window inference with
    ``val_overlap`` (rank 0 only; Dice per annotated class in ``val_log.csv``). ``loss_average``: how the loss
    weighs the annotated (sample, class) pairs of a batch, ``"pair"`` (each alike, as the original) or
    ``"sample"`` (each sample alike; :func:`universal.losses.masked_bce_dice_loss`). ``missed_weight``: the
    BCE weight of positive voxels predicted below ``missed_below`` (a probability, 1 % by default; 1: the
    original's loss; see that function), for the classes of ``missed_classes``: ``"all"`` or ``"tumours"`` (organ
    positives then keep the original's weight). ``exclusion_negatives``: ``"none"`` (the original's rule:
    unannotated means unknown), ``"all"`` (a trained class a sample's dataset does not annotate learns 0 on the
    voxels labelled with a class that excludes it; :func:`universal.targets.known_negatives`) or ``"tumours"``
    (on the voxels labelled with such a tumour only); a step also runs the heads of the classes with known
    negatives in its batch, and those negatives train the features only (the generated head parameters of a
    (sample, class) pair the sample does not annotate are detached; :class:`universal.model.UniversalModel`).
    """

    stores: list[str]
    embeddings: str
    out_dir: str
    weights: list[float] | None = None
    class_table: str | None = None
    include_classes: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    patches: PatchConfig = field(default_factory=PatchConfig)
    batch_size: int = 2
    steps: int = 50_000
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 2_500
    weight_decay: float = 1e-5
    generator_lr_scale: float = 1.0
    grad_clip: float = 1.0
    max_nonfinite_steps: int = 10
    dice_smooth: float = DEFAULT_DICE_SMOOTH
    loss_average: str = "pair"
    missed_weight: float = 1.0
    missed_classes: str = "all"
    missed_below: float = MISSED_PROBABILITY
    exclusion_negatives: str = "none"
    checkpoint_every: int = 1_000
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    num_workers: int = 4
    amp: str = "auto"
    bf16_on_cpu: bool = False
    device: str = "auto"
    init_checkpoint: str | None = None
    trainable: str = "all"
    val_stores: list[str] = field(default_factory=list)
    val_every: int = 0
    val_cases: int = 4
    val_overlap: float = 0.25

    def __post_init__(self) -> None:
        self.stores = [str(s) for s in self.stores]
        self.val_stores = [str(s) for s in self.val_stores]
        if self.generator_lr_scale <= 0:
            raise ValueError(f"generator_lr_scale must be > 0, got {self.generator_lr_scale}")
        if self.loss_average not in LOSS_AVERAGES:
            raise ValueError(f"loss_average must be one of {LOSS_AVERAGES}, got {self.loss_average!r}")
        check_missed_options(self.missed_weight, self.missed_below)
        if self.missed_classes not in MISSED_CLASSES:
            raise ValueError(f"missed_classes must be one of {MISSED_CLASSES}, got {self.missed_classes!r}")
        if self.exclusion_negatives not in EXCLUSION_NEGATIVES:
            raise ValueError(f"exclusion_negatives must be one of {EXCLUSION_NEGATIVES}, "
                             f"got {self.exclusion_negatives!r}")
        if self.val_every < 0 or self.val_cases < 0 or not 0.0 <= self.val_overlap < 1.0:
            raise ValueError("val_every and val_cases must be >= 0 and val_overlap in [0, 1)")
        self.embeddings, self.out_dir = str(self.embeddings), str(self.out_dir)
        if self.class_table is not None:
            self.class_table = str(self.class_table)
        if self.init_checkpoint is not None:
            self.init_checkpoint = str(self.init_checkpoint)
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if self.trainable == "heads" and self.init_checkpoint is None:
            raise ValueError("trainable 'heads' freezes the backbone: it needs an init_checkpoint to take it from")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("steps, batch_size, checkpoint_every and keep_checkpoints must be >= 1")
        if self.max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0, got {self.max_nonfinite_steps}")

    def to_dict(self) -> dict:
        """JSON-able dict with nested ``model`` and ``patches`` dicts."""
        out = asdict(self)
        out["model"], out["patches"] = self.model.to_dict(), self.patches.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Inverse of :meth:`to_dict`; raises ValueError naming unknown keys."""
        data = known_keys(cls, data, "training config")
        data["model"] = ModelConfig.from_dict(data.get("model", {}))
        data["patches"] = PatchConfig.from_dict(data.get("patches", {}))
        return cls(**data)


def train_config_from_options(options: dict, *, stores: list, weights: list[float] | None, embeddings: str | Path,
                              classes: str | Path | None, include_classes: list[str],
                              out_dir: str | Path) -> TrainConfig:
    """A :class:`TrainConfig` from a flat options dict (the workflow config's ``train`` section).

    Keys of :class:`ModelConfig` and :class:`PatchConfig` go to those; the rest are :class:`TrainConfig` fields.
    Raises ValueError naming unknown keys.
    """
    model_keys = {f.name for f in fields(ModelConfig)}
    patch_keys = {f.name for f in fields(PatchConfig)}
    nested = {"model", "patches", "stores", "weights", "embeddings", "class_table", "include_classes", "out_dir"}
    train_keys = {f.name for f in fields(TrainConfig)} - nested
    unknown = set(options) - model_keys - patch_keys - train_keys
    if unknown:
        raise ValueError(f"unknown training options {sorted(unknown)}")
    return TrainConfig(
        stores=[str(s) for s in stores], weights=weights, embeddings=str(embeddings),
        class_table=None if classes is None else str(classes), include_classes=list(include_classes),
        out_dir=str(out_dir),
        model=ModelConfig(**{k: v for k, v in options.items() if k in model_keys}),
        patches=PatchConfig(**{k: v for k, v in options.items() if k in patch_keys}),
        **{k: v for k, v in options.items() if k in train_keys})


def trained_classes(manifest: list[dict], classes: ClassTable, init: dict | None) -> list[str]:
    """The classes some training case annotates (the ``annotated`` column of the training manifest,
    :meth:`PatchDataset.sampling_table`; plus, when fine-tuning, those the initial model was trained on), in
    class-table order: the heads of all other classes never received a gradient."""
    seen: set[str] = set(init.get("trained_classes", [])) if init else set()
    for row in manifest:
        seen.update(name for name in row["annotated"].split(",") if name)
    return [name for name in classes.names if name in seen]


def lr_at_step(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up to ``lr``, then cosine to ``min_lr``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 when autocast applies on ``device`` under ``config.amp``, else None."""
    if config.amp == "bf16" or (config.amp == "auto" and (device.type == "cuda" or config.bf16_on_cpu)):
        return torch.bfloat16
    return None


def rng_state() -> dict:
    """The torch, CUDA, numpy and Python RNG states as tensors and plain lists (``weights_only``-loadable)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step_{step:08d}.pt"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The resumable checkpoint with the highest step in ``out_dir/checkpoints``, or None."""
    found = sorted((Path(out_dir) / "checkpoints").glob("step_*.pt"))
    return found[-1] if found else None


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


def _setup_distributed(config: TrainConfig, env: DistributedEnv) -> tuple[torch.device, bool]:
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


def _rank0_choice(value: Path | None, world_size: int) -> Path | None:
    """Rank 0's ``value`` on every rank (so that all ranks resume from the same checkpoint)."""
    if world_size == 1:
        return value
    box = [None if value is None else str(value)]
    dist.broadcast_object_list(box, src=0)
    return None if box[0] is None else Path(box[0])


def _mean_over_ranks(row: dict[str, float], keys: tuple[str, ...], device: torch.device,
                     world_size: int) -> dict[str, float]:
    """``row`` with ``keys`` averaged over all ranks (the global loss of a step)."""
    if world_size == 1:
        return row
    values = torch.tensor([row[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return {**row, **{k: float(v) / world_size for k, v in zip(keys, values.tolist(), strict=True)}}


class TrainLog:
    """The CSV log (rewritten up to ``start_step`` on resume), TensorBoard scalars and a progress line on stderr."""

    def __init__(self, out_dir: Path, start_step: int, total_steps: int, print_every: int) -> None:
        self.csv_path = out_dir / "train_log.csv"
        kept = _read_rows(self.csv_path, start_step)
        self._file = self.csv_path.open("w", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=CSV_COLUMNS)
        self._csv.writeheader()
        self._csv.writerows(kept)
        self._file.flush()
        self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=start_step + 1)
        self.total_steps = total_steps
        self.print_every = print_every

    def write(self, row: dict) -> None:
        self._csv.writerow({k: row[k] for k in CSV_COLUMNS})
        self._file.flush()
        step = row["step"]
        for key in ("loss", "bce", "dice", "lr", "grad_norm"):
            self._tb.add_scalar(f"train/{key}", row[key], step)
        if step % self.print_every == 0 or step in (1, self.total_steps):
            print(f"[train] step {step}/{self.total_steps} loss {row['loss']:.4f} (bce {row['bce']:.4f} "
                  f"dice {row['dice']:.4f}) lr {row['lr']:.2e} {row['seconds']:.2f} s/step", file=sys.stderr)

    def close(self) -> None:
        self._file.close()
        self._tb.close()


def _read_rows(path: Path, up_to_step: int) -> list[dict]:
    """Rows of an existing CSV log with step <= ``up_to_step`` (the rest are redone after a resume)."""
    if up_to_step == 0 or not path.exists():
        return []
    with path.open(newline="") as f:
        return [row for row in csv.DictReader(f) if int(row["step"]) <= up_to_step]


def train_step(model: nn.Module, batch: dict, classes: ClassTable, optimizer: torch.optim.Optimizer,
               config: TrainConfig, device: torch.device, amp: torch.dtype | None,
               exclusion_channels: list[int] | None = None) -> dict[str, float]:
    """One optimizer step on a collated batch; only heads of classes annotated in the batch are computed, and with
    ``exclusion_channels`` (class-table channels; ``config.exclusion_negatives``) those of them with known negatives
    in the batch too, supervised by those negatives where the batch does not annotate them.

    ``model`` is a :class:`UniversalModel` or its DistributedDataParallel wrapper. Returns the loss, its BCE and Dice
    parts (of this process's batch) and the gradient norm before clipping (of the trainable parameters). A step
    whose gradient norm is not finite leaves the weights and the optimizer state as they were: clipping by an inf
    or NaN norm would turn every weight into NaN. Under DDP the norm is of the averaged gradients, so every process
    skips the same steps.
    """
    image = batch["image"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    mask = batch["mask"].to(device)
    active = mask.any(dim=0)
    x_mm, midline_x_mm = batch["x_mm"].to(device), batch["midline_x_mm"].to(device)
    negatives = None
    if exclusion_channels is not None:  # of the annotated and the exclusion channels, those with a target or a negative
        active[exclusion_channels] = True
        active = active.nonzero().flatten()
        known = known_negatives(label, classes, x_mm, midline_x_mm, mask, active.cpu(),
                                tumour_voxels_only=config.exclusion_negatives == "tumours")
        kept = mask[:, active].any(dim=0) | known.flatten(2).any(dim=2).any(dim=0)
        active, negatives = active[kept], known[:, kept]
    else:
        active = active.nonzero().flatten()
    targets = multi_hot_targets(label, classes, x_mm, midline_x_mm, channels=active.cpu())
    active_mask = mask[:, active]  # (B, K): which of the computed channels each sample annotates
    # a class's known negatives are its head's only signal on a batch that does not annotate it: they train the
    # features, not the head generator, which would meet them by lowering the class's bias everywhere
    frozen_heads = ~active_mask.bool() if negatives is not None else None
    with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        logits = model(image, classes=active.tolist(), frozen_heads=frozen_heads)
    missed_channels = None
    if config.missed_classes == "tumours":
        missed_channels = torch.tensor([classes.classes[c].is_tumour for c in active.tolist()], device=device)
    loss, parts = masked_bce_dice_loss(logits.float(), targets, active_mask, config.dice_smooth,
                                       config.loss_average, config.missed_weight, missed_channels,
                                       config.missed_below, negatives)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = float(nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip))
    if math.isfinite(grad_norm):
        optimizer.step()
    return {"loss": loss.item(), "bce": parts["bce"].item(), "dice": parts["dice"].item(), "grad_norm": grad_norm}


def _skipped_step(step: int, in_a_row: int, row: dict[str, float], limit: int, verbose: bool) -> None:
    """Report optimizer step ``step`` (1-based), skipped for a non-finite gradient norm, the ``in_a_row``-th in a
    row; raise RuntimeError once more than ``limit`` steps in a row were skipped."""
    if verbose:
        print(f"[train] step {step}: gradient norm {row['grad_norm']} (loss {row['loss']}); step skipped, weights "
              f"unchanged ({in_a_row} in a row)", file=sys.stderr)
    if in_a_row > limit:
        raise RuntimeError(
            f"training stopped at step {step}: {in_a_row} steps in a row (from step {step - in_a_row + 1}) had a "
            f"non-finite gradient norm (the last: loss {row['loss']}), more than max_nonfinite_steps = {limit}; the "
            "weights are those from before them. Lower the learning rate, check the training data, or train with "
            "amp: off")


def dice_score(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """2|P∩G| / (|P| + |G|) of two bool masks; NaN when both are empty."""
    total = int(pred.sum()) + int(truth.sum())
    return float("nan") if total == 0 else 2.0 * int((pred & truth).sum()) / total


def validate(model: UniversalModel, config: TrainConfig, classes: ClassTable, device: torch.device,
             amp: torch.dtype | None, step: int, trained: list[str]) -> list[dict]:
    """Dice per class of the held-out cases (at most ``val_cases`` per store of ``val_stores``) by
    sliding-window inference, over the classes a case annotates and training sees (``trained``: the heads of
    the other classes get no gradient, their Dice would say nothing); rows (step, dataset, case_id, class, dice).
    The model is put in eval mode and back (a frozen backbone stays in eval); the RNG states are restored
    afterwards, so training is unaffected."""
    from monai.inferers import sliding_window_inference

    saved_rng = rng_state()
    was_training = model.training
    model.eval()
    rows: list[dict] = []
    try:
        with torch.no_grad():
            for store in config.val_stores:
                for case_id in list_cases(store)[:config.val_cases]:
                    case = open_case(store, case_id)
                    names = [n for n in case.annotated if n in trained]
                    if case.label is None or not names:
                        continue
                    channels = [classes.channel(n) for n in names]
                    image = window(case.image[...], *config.patches.window_hu)[None, None].to(device)
                    with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                        logits = sliding_window_inference(
                            image, config.patches.patch_size, 2, lambda x, c=channels: model(x, classes=c),
                            overlap=config.val_overlap, mode="gaussian")
                    pred = torch.sigmoid(logits.float())[0] > 0.5
                    label = torch.as_tensor(np.asarray(case.label[...]).astype(np.int64))[None]
                    affine = case.affine
                    x_mm = torch.as_tensor(affine[0, 0] * np.arange(label.shape[1]) + affine[0, 3])[None]
                    midline = torch.tensor([float(case.attrs["midline_x_mm"])])
                    truth = multi_hot_targets(label, classes, x_mm, midline, channels)[0].to(pred.device)
                    dataset = case.attrs.get("dataset", Path(store).stem)
                    for i, name in enumerate(names):
                        rows.append({"step": step, "dataset": dataset, "case_id": case_id, "class": name,
                                     "dice": dice_score(pred[i], truth[i])})
    finally:
        model.train(was_training)
        if was_training and config.trainable == "heads":
            model.backbone.eval()
        set_rng_state(saved_rng)
    return rows


def _write_val_rows(path: Path, rows: list[dict], step: int) -> None:
    """Append validation rows to ``val_log.csv`` and print the mean Dice (over non-NaN values) to stderr."""
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=VAL_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    values = [r["dice"] for r in rows if not math.isnan(r["dice"])]
    mean = sum(values) / len(values) if values else float("nan")
    print(f"[train] step {step} validation: mean Dice {mean:.4f} over {len(values)} (case, class) pairs",
          file=sys.stderr)


def _prepare_model(config: TrainConfig, classes: ClassTable, device: torch.device,
                   resume: Path | None, verbose: bool = True) -> tuple[UniversalModel, torch.optim.Optimizer, dict]:
    """Model and AdamW, fresh (from ``init_checkpoint`` when set) or from the resumable checkpoint ``resume``;
    returns its ``extra`` dict ({} if fresh, ``{"init": ...}`` when initialised from ``init_checkpoint``).
    With ``trainable == "heads"`` the backbone is frozen and not given to the optimizer."""
    extra: dict = {}
    if resume is None:
        torch.manual_seed(config.seed)
        model = build_model(config.model, load_embeddings(config.embeddings, classes.names))
        if config.init_checkpoint is not None:
            extra = {"init": init_from_checkpoint(model, config.init_checkpoint, config.model, classes,
                                                      verbose)}
    else:
        model, meta = load_checkpoint(resume, expected_class_names=classes.names)
        if meta["model_config"] != config.model.to_dict():
            raise ValueError(f"{resume} was trained with model config {meta['model_config']}, not "
                             f"{config.model.to_dict()}: use another out_dir")
        extra = meta["extra"]
    model.to(device)
    if config.trainable == "heads":
        model.backbone.requires_grad_(False)
    optimizer = torch.optim.AdamW(_parameter_groups(model, config.generator_lr_scale), lr=config.lr,
                                  weight_decay=config.weight_decay)
    if "optimizer" in extra:
        optimizer.load_state_dict(extra["optimizer"])
        set_rng_state(extra["rng"])
    return model, optimizer, extra


def _parameter_groups(model: UniversalModel, generator_lr_scale: float) -> list[dict]:
    """The trainable parameters as AdamW groups, each with its ``lr_scale`` (the factor on the scheduled lr):
    the head generator (:data:`~universal.model.HEAD_GENERATOR`) at ``generator_lr_scale``, the rest at 1; one
    group when the scale is 1 (the layout of checkpoints written before the scale existed, which then resume)."""
    if generator_lr_scale == 1.0:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr_scale": 1.0}]
    generator, rest = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (generator if name.split(".")[0] in HEAD_GENERATOR else rest).append(parameter)
    return [group for group in ({"params": rest, "lr_scale": 1.0},
                                {"params": generator, "lr_scale": generator_lr_scale}) if group["params"]]


def init_from_checkpoint(model: UniversalModel, path: str | Path, model_config: ModelConfig,
                         classes: ClassTable, verbose: bool = True) -> dict:
    """Load a trained model's weights into a new ``model`` for fine-tuning (see the module docstring).

    ``model`` was built for ``classes`` with the new embeddings, which stay. Raises ValueError when the checkpoint
    has classes that ``classes`` lacks (naming them), when its ``embedding_norm`` differs, or when a backbone tensor
    cannot be copied (another architecture). Returns provenance for the checkpoints' ``extra["init"]``:
    checkpoint path, its classes, the novel classes and the model entries not copied. ``verbose``: print
    warnings (a known class whose embedding changed, head tensors left freshly initialised) to stderr.
    """
    record = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"init_checkpoint {path}: not a universal model checkpoint")
    old_names = list(record["class_names"])
    dropped = [n for n in old_names if n not in classes]
    if dropped:
        raise ValueError(f"init_checkpoint {path} has classes {dropped} that the class table {classes.source} "
                         "lacks: fine-tuning keeps every class of the init checkpoint; enable them (include_classes) "
                         "or use a class table that has them")
    old_config = record["model_config"]
    new_config = model_config.to_dict()
    if old_config.get("embedding_norm", "none") != model_config.embedding_norm:
        raise ValueError(f"init_checkpoint {path} has embedding_norm {old_config.get('embedding_norm')!r}, the "
                         f"new model {model_config.embedding_norm!r}: text_to_vision only fits the one it was "
                         "trained with")
    state = record["model"]
    not_copied = copy_matching_weights(model, state, skip=("organ_embedding",))
    broken = [n for n in not_copied if n.startswith("backbone.")]
    if broken:
        differ = {k: (old_config.get(k), v) for k, v in new_config.items() if old_config.get(k) != v}
        raise ValueError(f"init_checkpoint {path}: {len(broken)} backbone tensors do not fit the new model "
                         f"(e.g. {broken[:3]}); model config differences (checkpoint, new): {differ}")
    novel = [n for n in classes.names if n not in old_names]
    old_rows = state["organ_embedding"]
    for name, row in zip(old_names, old_rows, strict=True):
        new_row = model.organ_embedding[classes.channel(name)]
        changed = new_row.shape != row.shape or not torch.allclose(new_row, row, rtol=1e-4, atol=1e-5)
        if changed and verbose:
            print(f"[train] warning: the new embedding of {name!r} differs from the one {path} was trained with",
                  file=sys.stderr)
    heads_reset = [n for n in not_copied if n.split(".")[0] in HEAD_MODULES]
    if heads_reset and verbose:
        print(f"[train] init_checkpoint {path}: freshly initialised (no matching tensor): {heads_reset}",
              file=sys.stderr)
    trained = list(record.get("extra", {}).get("trained_classes", old_names))
    return {"checkpoint": str(path), "class_names": old_names, "novel_classes": novel, "not_copied": not_copied,
            "trained_classes": trained}


def _save_resumable(out_dir: Path, step: int, model: UniversalModel, optimizer: torch.optim.Optimizer,
                    config: TrainConfig, classes: ClassTable, world_size: int, init: dict | None) -> None:
    """Write ``checkpoints/step_<step>.pt`` and delete all but the newest ``keep_checkpoints``."""
    extra = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(),
             "sampler": {"next_step": step, "batch_size": config.batch_size, "seed": config.seed,
                         "world_size": world_size},
             "train_config": config.to_dict(), "class_table_digest": classes.digest()}
    if init is not None:
        extra["init"] = init
    save_checkpoint(checkpoint_path(out_dir, step), model, config.model, classes.names, extra)
    for old in sorted((out_dir / "checkpoints").glob("step_*.pt"))[:-config.keep_checkpoints]:
        old.unlink()


def train(config: TrainConfig) -> Path:
    """Train (or resume from the newest checkpoint in ``config.out_dir``) up to ``config.steps``; returns the path
    of ``final.pt`` (model weights, model config, class names, and ``extra`` with step and train config).

    Under torchrun every rank calls this; the process group is created here (and destroyed at the end) unless the
    caller created it."""
    env = distributed_env()
    device, owns_group = _setup_distributed(config, env)
    try:
        return _train(config, env, device)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: TrainConfig, env: DistributedEnv, device: torch.device) -> Path:
    rank, world_size = env.rank, env.world_size
    main = rank == 0
    out_dir = Path(config.out_dir)
    amp = autocast_dtype(config, device)
    classes = load_class_table(config.class_table, include=config.include_classes)
    resume = _rank0_choice(latest_checkpoint(out_dir) if main else None, world_size)
    model, optimizer, extra = _prepare_model(config, classes, device, resume, verbose=main)
    if amp is not None and device.type == "cpu":
        check_bf16_training_on_cpu(model, (config.batch_size, config.model.in_channels, *config.patches.patch_size))
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    init = extra.get("init")
    start = int(extra.get("step", 0))
    if main and resume is not None:
        print(f"[train] resuming from {resume} at step {start}", file=sys.stderr)
        saved_world = extra.get("sampler", {}).get("world_size", 1)
        if saved_world != world_size:
            print(f"[train] note: {resume} was written by {saved_world} processes, now {world_size}: the patch "
                  "stream differs from an uninterrupted run", file=sys.stderr)
    elif main and init is not None:
        print(f"[train] fine-tuning from {init['checkpoint']} ({config.trainable} trainable); novel classes: "
              f"{init['novel_classes']}", file=sys.stderr)
    net: nn.Module = model
    if world_size > 1:
        # Every parameter takes part in every step (all heads are generated by the shared controller), so DDP
        # needs no unused-parameter search; frozen backbone parameters are not registered with it at all.
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    dataset = PatchDataset(config.stores, classes, config.patches, config.weights, config.seed)
    manifest = dataset.sampling_table() if main else []  # one pass over the cases' attributes, rank 0 only
    if main:
        write_tsv(out_dir / MANIFEST_NAME, list(manifest[0]), (row.values() for row in manifest))
    batches = iter(patch_loader(dataset, config.batch_size, start, config.num_workers, rank, world_size))
    log = TrainLog(out_dir, start, config.steps, config.log_every) if main else None
    val_log = out_dir / "val_log.csv"
    validating = main and config.val_every > 0 and bool(config.val_stores)
    trained = trained_classes(manifest, classes, init)
    if world_size > 1:  # the manifest is rank 0's; every rank runs the same heads
        shared = [trained]
        dist.broadcast_object_list(shared, src=0)
        trained = shared[0]
    exclusion_channels = classes.channels(trained) if config.exclusion_negatives != "none" else None
    if validating and val_log.exists():  # drop rows of steps a resumed run redoes
        kept = _read_rows(val_log, start)
        with val_log.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=VAL_COLUMNS)
            writer.writeheader()
            writer.writerows(kept)
    model.train()
    if config.trainable == "heads":
        model.backbone.eval()
    nonfinite = 0  # steps in a row with a non-finite gradient norm, each skipped
    try:
        for step in range(start, config.steps):
            began = time.perf_counter()
            lr = lr_at_step(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # absent in checkpoints of earlier versions
            row = train_step(net, next(batches), classes, optimizer, config, device, amp, exclusion_channels)
            row = _mean_over_ranks(row, ("loss", "bce", "dice"), device, world_size)
            if log is not None:
                log.write({"step": step + 1, "lr": lr, "seconds": time.perf_counter() - began, **row})
            nonfinite = 0 if math.isfinite(row["grad_norm"]) else nonfinite + 1
            if nonfinite:
                _skipped_step(step + 1, nonfinite, row, config.max_nonfinite_steps, verbose=main)
            if validating and ((step + 1) % config.val_every == 0 or step + 1 == config.steps):
                _write_val_rows(val_log, validate(model, config, classes, device, amp, step + 1, trained), step + 1)
            if main and ((step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps):
                _save_resumable(out_dir, step + 1, model, optimizer, config, classes, world_size, init)
    finally:
        if log is not None:
            log.close()
        del batches
    final = out_dir / "final.pt"
    if main:
        final_extra = {"step": max(start, config.steps), "train_config": config.to_dict(),
                       "class_table_digest": classes.digest(),
                       "trained_classes": trained}
        if init is not None:
            final_extra["init"] = init
        save_checkpoint(final, model, config.model, classes.names, final_extra)
    if world_size > 1:
        dist.barrier()  # final.pt exists on every rank's return
    return final
