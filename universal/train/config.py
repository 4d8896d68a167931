"""The training run's settings: one dataclass, its dict round trip, and the schedule it implies."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from universal.core.settings import known_keys
from universal.model.network import (
    ModelConfig,
)
from universal.train.losses import (
    DEFAULT_DICE_SMOOTH,
    LOSS_AVERAGES,
    MISSED_PROBABILITY,
    check_missed_options,
)
from universal.train.patches import PatchConfig

AMP_MODES = ("auto", "bf16", "off")
TRAINABLE = ("all", "heads")
MISSED_CLASSES = ("all", "tumours")  # the classes whose missed positives missed_weight weighs
EXCLUSION_NEGATIVES = ("none", "all", "tumours")  # which labelled voxels are known negatives of unannotated classes
BACKBONE_STRIDES = {"unet": 16, "swinunetr": 32}  # how much smaller than the patch each backbone's deepest level is


@dataclass
class TrainConfig:
    """Everything a training run depends on.

    ``stores``: zarr training stores (one per dataset); ``weights``: per-store sampling weights (default equal).
    ``embeddings``: class text embeddings file (:mod:`universal.embed.prompts`); ``class_table``/``include_classes``:
    the class table (default ``config/classes.yaml``) and disabled rows to switch on. ``steps``: optimizer steps of
    ``batch_size`` patches. ``lr`` peaks after ``warmup_steps`` (linear from lr/warmup_steps), then decays by a
    cosine to ``min_lr`` at ``steps``; the head generator (``text_to_vision``, ``controller``) trains at
    ``generator_lr_scale`` times that rate. ``amp``: ``"auto"`` (bf16 autocast on CUDA, and on CPU when
    ``bf16_on_cpu``), ``"bf16"`` (always) or ``"off"``; bf16 on the CPU first checks that the CPU's bfloat16
    convolutions get this model's weight gradients right on a training batch (:mod:`universal.train.cpu_bf16`).
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
    ``"sample"`` (each sample alike; :func:`universal.train.losses.masked_bce_dice_loss`). ``missed_weight``: the
    BCE weight of positive voxels predicted below ``missed_below`` (a probability, 1 % by default; 1: the
    original's loss; see that function), for the classes of ``missed_classes``: ``"all"`` or ``"tumours"`` (organ
    positives then keep the original's weight). ``exclusion_negatives``: ``"none"`` (the original's rule:
    unannotated means unknown), ``"all"`` (a trained class a sample's dataset does not annotate learns 0 on the
    voxels labelled with a class that excludes it; :func:`universal.train.targets.known_negatives`) or ``"tumours"``
    (on the voxels labelled with such a tumour only); a step also runs the heads of the classes with known
    negatives in its batch, and those negatives train the features only (the generated head parameters of a
    (sample, class) pair the sample does not annotate are detached; :class:`universal.model.network.UniversalModel`).
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
        check_patch_size(self.patches.patch_size, self.model.backbone)

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


def check_patch_size(patch_size: tuple[int, int, int], backbone: str) -> None:
    """Raise ValueError unless the backbone can train on patches of ``patch_size`` (voxels, x y z).

    The deepest level is the patch divided by :data:`BACKBONE_STRIDES` (16 for the U-Net, 32 for SwinUNETR): each
    axis must reach it with at least one voxel, and all of them with at least two (instance normalisation there
    needs more than one voxel in training); SwinUNETR also needs every size divisible by 32.
    """
    stride = BACKBONE_STRIDES[backbone]
    deep = [size // stride for size in patch_size]
    divisible = backbone != "swinunetr" or all(size % stride == 0 for size in patch_size)
    if min(deep) < 1 or math.prod(deep) < 2 or not divisible:
        need = "multiples of 32" if backbone == "swinunetr" else "at least 16"
        raise ValueError(f"patch_size {list(patch_size)} is too small for the {backbone} backbone: its deepest level "
                         f"is 1/{stride} of the patch and needs at least 2 voxels; use sizes that are {need} with at "
                         f"least one of {2 * stride} or more, e.g. the default [96, 96, 96]")


def lr_at_step(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up to ``lr``, then cosine to ``min_lr``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 when autocast applies on ``device`` under ``config.amp``, else None."""
    if config.amp == "bf16" or (config.amp == "auto" and (device.type == "cuda" or config.bf16_on_cpu)):
        return torch.bfloat16
    return None
