"""The CLIP-driven universal model: a 3D backbone plus one text-generated dynamic head per class.

Layout follows the original (Liu et al., ICCV 2023, ``model/Universal_model.py``) so its released weights can map
onto this module: ``organ_embedding`` (a buffer, the fixed class text embeddings, C × D), ``text_to_vision``
(D → 256), ``GAP`` (GroupNorm → ReLU → global average pool → 1×1×1 conv to 256), ``precls_conv`` (GroupNorm → ReLU →
1×1×1 conv to 8 channels), ``controller`` (1×1×1 conv 512 → 153) and ``backbone``.

For every class k and batch element b the controller turns ``[GAP(deep)_b, ReLU(text_to_vision(e_k))]`` into the
153 parameters of a tiny per-voxel MLP 8 → 8 → 8 → 1 (ReLU between layers, optionally leaky; no output activation),
applied to the 8-channel full-resolution feature. Here all (b, k) heads run as three batched matrix products instead
of the original's per-sample loop with 256-channel repeated tensors.

Backbones: ours of MONAI blocks (``backbone_variant: monai``, the default) or the original's own layers
(``original``: :mod:`universal.model.original_unet`, :mod:`universal.model.original_swin`), which its released
weights need (:mod:`universal.model.import_original`).

Tensors are (B, C, X, Y, Z) with spatial axes in RAS voxel order. Outputs are logits: one independent sigmoid per
class (organ channels overlap their tumours), never a softmax.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from torch import Tensor, nn

from universal.core.atomic import atomic_output
from universal.core.settings import known_keys
from universal.core.torch_files import load_torch_file
from universal.model.original_swin import OriginalPatchMerging
from universal.model.original_unet import ModelsGenesisUNet3D
from universal.model.preprocessing import Preprocessing

BACKBONES = ("unet", "swinunetr")
# "monai": our backbones of MONAI blocks (the defaults for training from scratch); "original": the original's
# layers, which its released weights need (universal.model.original_unet, universal.model.original_swin).
BACKBONE_VARIANTS = ("monai", "original")
NORM_STATISTICS = ("batch", "running")
EMBEDDING_NORMS = ("none", "centered")
HEAD_CHANNELS = 8
TASK_CHANNELS = 256
# Parameters of one class head, in the controller's output order: w1 (8×8), w2 (8×8), w3 (1×8), b1, b2, b3.
HEAD_SPLITS = (64, 64, 8, 8, 8, 1)
CHECKPOINT_FORMAT = "universal-checkpoint"
CHECKPOINT_VERSION = 1
# The non-backbone modules of UniversalModel, as in the original: what heads-only fine-tuning trains.
HEAD_MODULES = ("text_to_vision", "GAP", "precls_conv", "controller")
# The modules that turn a class embedding into its head's parameters.
HEAD_GENERATOR = ("text_to_vision", "controller")


@dataclass
class ModelConfig:
    """Architecture of a :class:`UniversalModel`.

    ``backbone``: ``"unet"`` (MONAI BasicUNet blocks, ``features`` = 6 channel counts: 5 encoder levels and the
    full-resolution decoder output; input sizes divisible by 16) or ``"swinunetr"`` (MONAI SwinUNETR,
    ``feature_size`` a multiple of 12, 48 in the original; input sizes divisible by 32).
    ``backbone_variant``: ``"monai"`` (the above; the default for training from scratch) or ``"original"``, the
    original's layers, which its released weights need (``universal import-checkpoint`` sets it): for ``"unet"``
    the Models Genesis 3D U-Net (fixed widths 64 at full resolution and 512 at 1/8; ``features`` and ``norm`` do
    not apply; input sizes divisible by 8), for ``"swinunetr"`` MONAI's SwinUNETR with the original's patch-merging
    order. ``norm_statistics`` (original U-Net only): ``"batch"`` normalises with the statistics of the batch at
    hand also in eval, as the original's ``ContBatchNorm3d`` (its weights compute its function only so, and a
    window's logits then depend on the other windows of its forward pass); ``"running"`` is standard batch norm.
    ``norm``: ``"instance"`` or ``"group"`` for the U-Net blocks. ``window_size``: Swin attention window (7 in the
    original). ``gradient_checkpointing``: Swin activation checkpointing (less memory, more compute).
    ``embedding_dim``: width D of the class text embeddings (512 for CLIP ViT-B/32).
    ``head_chunk_classes``: without autograd, run the class heads in chunks of this many classes to bound the
    memory of the (B, 8·K, X·Y·Z) intermediates; ``0`` runs all classes at once.
    ``embedding_norm``: ``"none"`` feeds the raw text embeddings to ``text_to_vision`` as the original does;
    ``"centered"`` first subtracts the mean embedding of the model's classes (fixed at creation, stored as the
    buffer ``embedding_center``) and rescales each row to norm √D. CLIP embeddings of prompts built on one
    template share most of their direction (mean pairwise cosine 0.88 in the original's table; right vs left
    kidney 0.99); centring leaves the class-specific part (right vs left kidney 0.86, spleen vs liver 0.10),
    which the heads separate in far fewer steps. Use ``"none"`` for the original's checkpoints.
    ``head_negative_slope``: slope of the class heads' hidden activations below zero; ``0`` is the original's
    ReLU (use it for the original's checkpoints). With ReLU a head can trap a group of its positive voxels where
    every unit that raises its output is off: their logit then sits at the output bias and no gradient reaches
    the units that could turn them on (docs/experiments/universal_vs_dataset.md, "A dead head unit"). A leaky
    slope keeps a gradient there.
    """

    backbone: str = "swinunetr"
    features: tuple[int, ...] = (32, 32, 64, 128, 256, 32)
    feature_size: int = 48
    norm: str = "instance"
    window_size: int = 7
    gradient_checkpointing: bool = False
    in_channels: int = 1
    embedding_dim: int = 512
    head_chunk_classes: int = 8
    embedding_norm: str = "centered"
    head_negative_slope: float = 0.0
    backbone_variant: str = "monai"
    norm_statistics: str = "batch"

    def __post_init__(self) -> None:
        self.features = tuple(int(f) for f in self.features)
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {BACKBONES}")
        if self.backbone_variant not in BACKBONE_VARIANTS:
            raise ValueError(f"backbone_variant must be one of {BACKBONE_VARIANTS}, got {self.backbone_variant!r}")
        if self.norm_statistics not in NORM_STATISTICS:
            raise ValueError(f"norm_statistics must be one of {NORM_STATISTICS}, got {self.norm_statistics!r}")
        if len(self.features) != 6:
            raise ValueError(f"features needs 6 channel counts, got {self.features}")
        if self.norm not in ("instance", "group"):
            raise ValueError(f"norm must be 'instance' or 'group', got {self.norm!r}")
        if self.embedding_norm not in EMBEDDING_NORMS:
            raise ValueError(f"embedding_norm must be one of {EMBEDDING_NORMS}, got {self.embedding_norm!r}")
        if not 0.0 <= self.head_negative_slope < 1.0:
            raise ValueError(f"head_negative_slope must be in [0, 1), got {self.head_negative_slope}")
        if self.feature_size % 12:
            raise ValueError(f"SwinUNETR feature_size must be a multiple of 12, got {self.feature_size}")

    @property
    def batch_dependent(self) -> bool:
        """Whether a sample's logits depend on the other samples of its batch (the original U-Net's batch norm):
        such a model must see one sliding window per forward pass, as in its training and evaluation."""
        return self.backbone == "unet" and self.backbone_variant == "original" and self.norm_statistics == "batch"

    def to_dict(self) -> dict:
        """JSON-able dict (tuples become lists)."""
        out = asdict(self)
        out["features"] = list(self.features)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Inverse of :meth:`to_dict`; raises ValueError naming unknown keys."""
        return cls(**known_keys(cls, data, "model config"))


def _group_norm(channels: int, groups: int = 16) -> nn.GroupNorm:
    """GroupNorm with the original's 16 groups, or the largest divisor of ``channels`` that divides 16."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class UNetBackbone(nn.Module):
    """A 3D U-Net of MONAI BasicUNet blocks (same module names) that returns (deep, full-resolution) features.

    ``features`` = (f0, f1, f2, f3, f4, f_out): f0 at full resolution, f4 at 1/16, f_out the decoder output.
    """

    def __init__(self, in_channels: int, features: Sequence[int], norm: str) -> None:
        super().__init__()
        f = tuple(features)
        act = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})
        if norm == "instance":
            norm_spec: tuple = ("instance", {"affine": True})
        else:
            norm_spec = ("group", {"num_groups": math.gcd(8, *f)})
        self.conv_0 = TwoConv(3, in_channels, f[0], act, norm_spec, True)
        self.down_1 = Down(3, f[0], f[1], act, norm_spec, True)
        self.down_2 = Down(3, f[1], f[2], act, norm_spec, True)
        self.down_3 = Down(3, f[2], f[3], act, norm_spec, True)
        self.down_4 = Down(3, f[3], f[4], act, norm_spec, True)
        self.upcat_4 = UpCat(3, f[4], f[3], f[3], act, norm_spec, True)
        self.upcat_3 = UpCat(3, f[3], f[2], f[2], act, norm_spec, True)
        self.upcat_2 = UpCat(3, f[2], f[1], f[1], act, norm_spec, True)
        self.upcat_1 = UpCat(3, f[1], f[0], f[5], act, norm_spec, True, halves=False)
        self.deep_channels = f[4]
        self.full_channels = f[5]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C_in, X, Y, Z) → (deep (B, f4, X/16, Y/16, Z/16), full (B, f_out, X, Y, Z))."""
        x0 = self.conv_0(x)
        x1 = self.down_1(x0)
        x2 = self.down_2(x1)
        x3 = self.down_3(x2)
        x4 = self.down_4(x3)
        u = self.upcat_4(x4, x3)
        u = self.upcat_3(u, x2)
        u = self.upcat_2(u, x1)
        return x4, self.upcat_1(u, x0)


class SwinUNETRBackbone(SwinUNETR):
    """MONAI SwinUNETR without its ``out`` block, returning (encoder10 output, decoder1 output).

    Its state-dict keys equal the original's ``backbone.*`` keys for feature_size 48 (checked against
    ``original_state_dict_swinunetr.tsv``). ``original_merging``: merge patches in the original's order
    (:class:`~universal.model.original_swin.OriginalPatchMerging`) instead of MONAI's.
    """

    def __init__(self, in_channels: int, feature_size: int, window_size: int, gradient_checkpointing: bool,
                 original_merging: bool = False) -> None:
        super().__init__(in_channels=in_channels, out_channels=1, feature_size=feature_size,
                         window_size=window_size, use_checkpoint=gradient_checkpointing,
                         downsample=OriginalPatchMerging if original_merging else "merging")
        del self.out
        self.deep_channels = 16 * feature_size
        self.full_channels = feature_size

    def forward(self, x_in: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C_in, X, Y, Z) → (deep (B, 16·f, X/32, Y/32, Z/32), full (B, f, X, Y, Z))."""
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            self._check_input_size(x_in.shape[2:])
        hidden = self.swinViT(x_in, self.normalize)
        enc0 = self.encoder1(x_in)
        enc1 = self.encoder2(hidden[0])
        enc2 = self.encoder3(hidden[1])
        enc3 = self.encoder4(hidden[2])
        dec4 = self.encoder10(hidden[4])
        dec3 = self.decoder5(dec4, hidden[3])
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        return dec4, self.decoder1(dec0, enc0)


class UniversalModel(nn.Module):
    """Backbone + text-driven dynamic heads; ``forward`` returns logits (B, K, X, Y, Z).

    ``embeddings`` (C, D) is stored as the buffer ``organ_embedding`` (not trained); C is the number of classes.
    """

    def __init__(self, backbone: nn.Module, deep_channels: int, full_channels: int, embeddings: Tensor,
                 head_chunk_classes: int = 0, embedding_norm: str = "none",
                 head_negative_slope: float = 0.0) -> None:
        super().__init__()
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be (classes, dim), got shape {tuple(embeddings.shape)}")
        self.backbone = backbone
        self.register_buffer("organ_embedding", embeddings.detach().to(torch.float32).clone())
        if embedding_norm == "centered":
            self.register_buffer("embedding_center", self.organ_embedding.mean(dim=0))
        self.text_to_vision = nn.Linear(embeddings.shape[1], TASK_CHANNELS)
        self.GAP = nn.Sequential(_group_norm(deep_channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool3d(1),
                                 nn.Conv3d(deep_channels, TASK_CHANNELS, kernel_size=1))
        self.precls_conv = nn.Sequential(_group_norm(full_channels), nn.ReLU(inplace=True),
                                         nn.Conv3d(full_channels, HEAD_CHANNELS, kernel_size=1))
        self.controller = nn.Conv3d(2 * TASK_CHANNELS, sum(HEAD_SPLITS), kernel_size=1)
        self.head_chunk_classes = head_chunk_classes
        self.head_negative_slope = head_negative_slope

    @property
    def num_classes(self) -> int:
        return self.organ_embedding.shape[0]

    def forward(self, x: Tensor, classes: Sequence[int] | None = None, frozen_heads: Tensor | None = None) -> Tensor:
        """Logits (B, K, X, Y, Z) for input (B, C_in, X, Y, Z); ``classes`` (channel indices) selects the heads,
        in that order (default: all C classes). ``frozen_heads`` (B, K) bool: the (sample, class) pairs whose
        generated head parameters are detached, so that a loss on their logits trains the features (backbone and
        ``precls_conv``) but not the head generator (``text_to_vision``, ``controller``, ``GAP``)."""
        deep, full = self.backbone(x)
        head_params = self.head_parameters(deep, classes)
        if frozen_heads is not None:
            if frozen_heads.shape != head_params.shape[:2]:
                raise ValueError(f"frozen_heads must be (B, K) = {tuple(head_params.shape[:2])}, "
                                 f"got {tuple(frozen_heads.shape)}")
            head_params = torch.where(frozen_heads.to(head_params.device).bool()[..., None], head_params.detach(),
                                      head_params)
        features = self.precls_conv(full)
        chunk = self.head_chunk_classes
        slope = self.head_negative_slope
        if torch.is_grad_enabled() or chunk <= 0 or head_params.shape[1] <= chunk:
            return apply_heads(features, head_params, slope)
        return torch.cat([apply_heads(features, p, slope) for p in head_params.split(chunk, dim=1)], dim=1)

    def head_parameters(self, deep: Tensor, classes: Sequence[int] | None = None) -> Tensor:
        """The 153 head parameters per (sample, class): (B, K, 153), from the deep feature (B, C_deep, ...)."""
        embedding = self.organ_embedding if classes is None else self.organ_embedding[list(classes)]
        if hasattr(self, "embedding_center"):
            centred = embedding - self.embedding_center
            embedding = F.normalize(centred, dim=1) * math.sqrt(embedding.shape[1])
        task = F.relu(self.text_to_vision(embedding))  # (K, 256)
        image = self.GAP(deep).flatten(1)  # (B, 256)
        batch, k = image.shape[0], task.shape[0]
        condition = torch.cat([image[:, None].expand(batch, k, -1), task[None].expand(batch, k, -1)], dim=2)
        return F.linear(condition, self.controller.weight.flatten(1), self.controller.bias)


def apply_heads(features: Tensor, params: Tensor, negative_slope: float = 0.0) -> Tensor:
    """Run every (sample, class) head as batched matrix products.

    ``features``: (B, 8, X, Y, Z) output of ``precls_conv``; ``params``: (B, K, 153) from the controller, split as
    w1 | w2 | w3 | b1 | b2 | b3 with weights in [out, in] row-major order; ``negative_slope``: of the hidden
    activations (0: ReLU). Returns logits (B, K, X, Y, Z).
    """
    batch, k = params.shape[:2]
    spatial = features.shape[2:]
    n = math.prod(spatial)
    c = HEAD_CHANNELS
    w1, w2, w3, b1, b2, b3 = params.split(HEAD_SPLITS, dim=2)
    # In-place activations: baddbmm does not keep its output for backward, so each layer stores one tensor, not two.
    hidden = torch.baddbmm(b1.reshape(batch, k * c, 1), w1.reshape(batch, k * c, c), features.reshape(batch, c, n))
    hidden = _activate_(hidden, negative_slope).reshape(batch * k, c, n)
    hidden = _activate_(torch.baddbmm(b2.reshape(batch * k, c, 1), w2.reshape(batch * k, c, c), hidden),
                        negative_slope)
    out = torch.baddbmm(b3.reshape(batch * k, 1, 1), w3.reshape(batch * k, 1, c), hidden)
    return out.reshape(batch, k, *spatial)


def _activate_(hidden: Tensor, negative_slope: float) -> Tensor:
    """In place: ReLU for slope 0, else leaky ReLU."""
    return hidden.relu_() if negative_slope == 0 else F.leaky_relu_(hidden, negative_slope)


def build_model(config: ModelConfig, embeddings: Tensor) -> UniversalModel:
    """A freshly initialised model for ``embeddings`` (C, D); D must equal ``config.embedding_dim``."""
    if embeddings.ndim != 2 or embeddings.shape[1] != config.embedding_dim:
        raise ValueError(f"embeddings of shape {tuple(embeddings.shape)} do not match embedding_dim "
                         f"{config.embedding_dim}")
    original = config.backbone_variant == "original"
    if config.backbone == "unet" and original:
        backbone: nn.Module = ModelsGenesisUNet3D(config.in_channels, config.norm_statistics == "batch")
    elif config.backbone == "unet":
        backbone = UNetBackbone(config.in_channels, config.features, config.norm)
    else:
        backbone = SwinUNETRBackbone(config.in_channels, config.feature_size, config.window_size,
                                     config.gradient_checkpointing, original_merging=original)
    return UniversalModel(backbone, backbone.deep_channels, backbone.full_channels, embeddings,
                          config.head_chunk_classes, config.embedding_norm, config.head_negative_slope)


def load_embeddings(path: str | Path, class_names: Sequence[str]) -> Tensor:
    """Class text embeddings (len(class_names), D) float32, rows in the order of ``class_names``.

    Reads the file written by :mod:`universal.embed.prompts` (``{"embeddings", "class_names", ...}``); raises ValueError
    naming every requested class the file has no row for.
    """
    record = load_torch_file(path, "embeddings file")
    if not isinstance(record, dict) or "embeddings" not in record or "class_names" not in record:
        raise ValueError(f"{path}: not an embeddings file (expected a dict with 'embeddings' and 'class_names')")
    rows = {name: i for i, name in enumerate(record["class_names"])}
    missing = [name for name in class_names if name not in rows]
    if missing:
        raise ValueError(f"{path}: no embedding for classes {missing}; the file has {list(rows)}")
    table = record["embeddings"].to(torch.float32)
    return table[[rows[name] for name in class_names]].contiguous()


def save_checkpoint(path: str | Path, model: UniversalModel, model_config: ModelConfig, class_names: Sequence[str],
                    extra: dict | None = None, preprocessing: dict | None = None) -> None:
    """Write a checkpoint atomically (temporary name, then rename).

    Layout: ``{"format", "version", "model": state_dict, "model_config": dict, "class_names": list,
    "extra": dict}``, plus ``"preprocessing"`` when given: the input the model must be run on (a record of
    :class:`~universal.model.preprocessing.Preprocessing`, checked here), which inference then takes from the
    checkpoint. ``extra`` must hold only tensors and plain Python values so that the file loads with
    ``torch.load(weights_only=True)``.
    """
    path = Path(path)
    if len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {model.num_classes} classes")
    record = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
              "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
              "model_config": model_config.to_dict(), "class_names": list(class_names), "extra": extra or {}}
    if preprocessing is not None:
        record["preprocessing"] = Preprocessing.from_dict(preprocessing, path).to_dict()
    with atomic_output(path) as tmp:
        torch.save(record, tmp)


def load_checkpoint(path: str | Path, expected_class_names: Sequence[str] | None = None,
                    map_location: str | torch.device = "cpu") -> tuple[UniversalModel, dict]:
    """Rebuild the model of a checkpoint; returns (model, metadata) where metadata is the checkpoint without
    ``"model"`` (format, version, model_config, class_names, extra, and preprocessing when the checkpoint has it).

    Raises ValueError naming the missing and extra classes when ``expected_class_names`` differ from the
    checkpoint's (or the same classes in another order, since each class is one output channel).
    """
    record = load_torch_file(path, "model checkpoint", map_location)
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a universal model checkpoint")
    names = list(record["class_names"])
    if expected_class_names is not None:
        _check_class_names(path, names, list(expected_class_names))
    config = ModelConfig.from_dict(record["model_config"])
    state = record["model"]
    model = build_model(config, torch.zeros_like(state["organ_embedding"]))
    model.load_state_dict(state)
    model.to(map_location)
    return model, {k: v for k, v in record.items() if k != "model"}


def _check_class_names(path: str | Path, found: list[str], expected: list[str]) -> None:
    if found == expected:
        return
    missing = [n for n in expected if n not in found]
    extra = [n for n in found if n not in expected]
    if not missing and not extra:
        raise ValueError(f"{path}: the checkpoint has the expected classes in another order: {found}")
    raise ValueError(f"{path}: the checkpoint's classes differ from the expected ones; "
                     f"missing from the checkpoint: {missing}; not expected: {extra}")


def copy_matching_weights(model: UniversalModel, state: dict[str, Tensor],
                          skip: Sequence[str] = ()) -> list[str]:
    """Copy every tensor of ``state`` into ``model`` whose name and shape match, except the names in ``skip``.

    Used to start fine-tuning from another model's checkpoint (:mod:`universal.train.checkpoints`). Returns the names
    of the model's state-dict entries left as they were (in ``skip``, absent from ``state`` or of another shape),
    sorted.
    """
    own = model.state_dict()
    kept = []
    with torch.no_grad():
        for name, tensor in own.items():
            source = state.get(name)
            if name in skip or source is None or source.shape != tensor.shape:
                kept.append(name)
                continue
            tensor.copy_(source)
    return sorted(kept)
