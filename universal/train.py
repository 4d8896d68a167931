"""Training loop of the universal model: one readable loop, one config dataclass (after nanoGPT).

AdamW, linear warm-up then cosine decay per step, optional bf16 autocast, gradient clipping, the partial-label
loss (:mod:`universal.losses`) on multi-hot targets derived at load time (:mod:`universal.targets`), patches from
the zarr stores (:mod:`universal.patches`).

Outputs in ``out_dir``: ``checkpoints/step_<n>.pt`` (model, optimizer, RNG and sampler state; the newest is resumed
automatically), ``final.pt`` (model and metadata only), ``train_log.csv`` (step, loss, bce, dice, lr, seconds,
grad_norm) and ``tensorboard/``. A resumed run continues exactly: patches are a function of (seed, sample index)
and the learning rate a function of the step, so on CPU it repeats the losses of an uninterrupted run.
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

import numpy as np
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from universal.classes import ClassTable, load_class_table
from universal.losses import DEFAULT_DICE_SMOOTH, masked_bce_dice_loss
from universal.model import ModelConfig, UniversalModel, build_model, load_checkpoint, load_embeddings, save_checkpoint
from universal.patches import PatchConfig, PatchDataset, patch_loader
from universal.targets import multi_hot_targets

CSV_COLUMNS = ("step", "loss", "bce", "dice", "lr", "seconds", "grad_norm")
AMP_MODES = ("auto", "bf16", "off")


@dataclass
class TrainConfig:
    """Everything a training run depends on.

    ``stores``: zarr training stores (one per dataset); ``weights``: per-store sampling weights (default equal).
    ``embeddings``: class text embeddings file (:mod:`universal.embed`); ``class_table``/``include_classes``: the
    class table (default ``config/classes.yaml``) and disabled rows to switch on. ``steps``: optimizer steps of
    ``batch_size`` patches. ``lr`` peaks after ``warmup_steps`` (linear from lr/warmup_steps), then decays by a
    cosine to ``min_lr`` at ``steps``. ``amp``: ``"auto"`` (bf16 autocast on CUDA, and on CPU when
    ``bf16_on_cpu``), ``"bf16"`` (always) or ``"off"``. ``device``: ``"auto"`` (CUDA if available), ``"cpu"``,
    ``"cuda"``. ``checkpoint_every``: steps between resumable checkpoints, of which ``keep_checkpoints`` are kept.
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
    grad_clip: float = 1.0
    dice_smooth: float = DEFAULT_DICE_SMOOTH
    checkpoint_every: int = 1_000
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    num_workers: int = 4
    amp: str = "auto"
    bf16_on_cpu: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        self.stores = [str(s) for s in self.stores]
        self.embeddings, self.out_dir = str(self.embeddings), str(self.out_dir)
        if self.class_table is not None:
            self.class_table = str(self.class_table)
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("steps, batch_size, checkpoint_every and keep_checkpoints must be >= 1")

    def to_dict(self) -> dict:
        """JSON-able dict with nested ``model`` and ``patches`` dicts."""
        out = asdict(self)
        out["model"], out["patches"] = self.model.to_dict(), self.patches.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Inverse of :meth:`to_dict`; raises ValueError naming unknown keys."""
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown training config keys {sorted(unknown)}")
        data = dict(data)
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


def distributed_env() -> tuple[int, int]:
    """(rank, world size) of this process from the torchrun environment; DDP is not wired in yet."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        raise NotImplementedError("multi-process (torchrun/DDP) training is not implemented yet: run one process")
    return int(os.environ.get("RANK", "0")), world_size


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


def train_step(model: UniversalModel, batch: dict, classes: ClassTable, optimizer: torch.optim.Optimizer,
               config: TrainConfig, device: torch.device, amp: torch.dtype | None) -> dict[str, float]:
    """One optimizer step on a collated batch; only heads of classes annotated in the batch are computed.

    Returns the loss, its BCE and Dice parts and the gradient norm before clipping.
    """
    image = batch["image"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    targets = multi_hot_targets(label, classes, batch["x_mm"].to(device), batch["midline_x_mm"].to(device))
    mask = batch["mask"].to(device)
    active = mask.any(dim=0).nonzero().flatten()
    with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        logits = model(image, classes=active.tolist())
    loss, parts = masked_bce_dice_loss(logits.float(), targets[:, active], mask[:, active], config.dice_smooth)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    return {"loss": loss.item(), "bce": parts["bce"].item(), "dice": parts["dice"].item(),
            "grad_norm": float(grad_norm)}


def _prepare_model(config: TrainConfig, classes: ClassTable, device: torch.device,
                   resume: Path | None) -> tuple[UniversalModel, torch.optim.Optimizer, dict]:
    """Model and AdamW, fresh or from the resumable checkpoint ``resume``; returns its ``extra`` dict ({} if fresh)."""
    extra: dict = {}
    if resume is None:
        torch.manual_seed(config.seed)
        model = build_model(config.model, load_embeddings(config.embeddings, classes.names))
    else:
        model, meta = load_checkpoint(resume, expected_class_names=classes.names)
        if meta["model_config"] != config.model.to_dict():
            raise ValueError(f"{resume} was trained with model config {meta['model_config']}, not "
                             f"{config.model.to_dict()}: use another out_dir")
        extra = meta["extra"]
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if extra:
        optimizer.load_state_dict(extra["optimizer"])
        set_rng_state(extra["rng"])
    return model, optimizer, extra


def _save_resumable(out_dir: Path, step: int, model: UniversalModel, optimizer: torch.optim.Optimizer,
                    config: TrainConfig, classes: ClassTable) -> None:
    """Write ``checkpoints/step_<step>.pt`` and delete all but the newest ``keep_checkpoints``."""
    extra = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(),
             "sampler": {"next_step": step, "batch_size": config.batch_size, "seed": config.seed},
             "train_config": config.to_dict(), "class_table_digest": classes.digest()}
    save_checkpoint(checkpoint_path(out_dir, step), model, config.model, classes.names, extra)
    for old in sorted((out_dir / "checkpoints").glob("step_*.pt"))[:-config.keep_checkpoints]:
        old.unlink()


def train(config: TrainConfig) -> Path:
    """Train (or resume from the newest checkpoint in ``config.out_dir``) up to ``config.steps``; returns the path
    of ``final.pt`` (model weights, model config, class names, and ``extra`` with step and train config)."""
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world_size = distributed_env()
    device = resolve_device(config.device)
    amp = autocast_dtype(config, device)
    classes = load_class_table(config.class_table, include=config.include_classes)
    resume = latest_checkpoint(out_dir)
    model, optimizer, extra = _prepare_model(config, classes, device, resume)
    start = int(extra.get("step", 0))
    if resume is not None:
        print(f"[train] resuming from {resume} at step {start}", file=sys.stderr)
    dataset = PatchDataset(config.stores, classes, config.patches, config.weights, config.seed)
    batches = iter(patch_loader(dataset, config.batch_size, start, config.num_workers, rank, world_size))
    log = TrainLog(out_dir, start, config.steps, config.log_every)
    model.train()
    try:
        for step in range(start, config.steps):
            began = time.perf_counter()
            lr = lr_at_step(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            row = train_step(model, next(batches), classes, optimizer, config, device, amp)
            log.write({"step": step + 1, "lr": lr, "seconds": time.perf_counter() - began, **row})
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                _save_resumable(out_dir, step + 1, model, optimizer, config, classes)
    finally:
        log.close()
        del batches
    final = out_dir / "final.pt"
    save_checkpoint(final, model, config.model, classes.names,
                    {"step": max(start, config.steps), "train_config": config.to_dict(),
                     "class_table_digest": classes.digest()})
    return final
