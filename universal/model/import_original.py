"""Import the original's released checkpoints (CLIP-Driven Universal Model, Liu et al. 2023) into our format.

The original saves ``{"net": state_dict, "optimizer": ..., "scheduler": ..., "epoch": int}`` from a
DistributedDataParallel model, so every key of ``net`` starts with ``module.``. Three key layouts exist:

- ``swinunetr-released``: the released Swin UNETR file (``clip_driven_universal_swin_unetr.pth``), written before
  the backbone moved under ``backbone.``: ``module.swinViT.*``, ``module.encoder1.*``, ``module.decoder5.*``;
- ``swinunetr``: checkpoints of the original's current training script, ``module.backbone.swinViT.*``;
- ``unet``: the released U-Net file (``clip_driven_universal_unet.pth``), ``module.backbone.down_tr64.*``.

The head keys (``organ_embedding``, ``text_to_vision``, ``GAP``, ``precls_conv``, ``controller``) are the same in
all three and in our :class:`~universal.model.network.UniversalModel`. The converted model uses the original's
backbone layers (``backbone_variant: original``), its raw text embeddings and ReLU heads, so it computes the
original's logits; the original's preprocessing goes into the checkpoint (:data:`ORIGINAL_PREPROCESSING`).

The 32 rows of ``organ_embedding`` follow the original's class order; they are mapped onto the class table by
name (the original's "Celiac Truck" is our "Celiac Trunk"; Kidney Cyst, row 32, is taken when the table enables
it). ``embeddings`` replaces them with another table by name, e.g. the original's ``txt_encoding.pth``.

Files are read with ``torch.load(weights_only=True)`` only: a pickle that needs code to load is refused.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from universal.core.classes import ClassTable
from universal.data.download.fetch import file_digests
from universal.embed.prompts import ORIGINAL_ALIASES, ORIGINAL_CLASS_ORDER, import_embeddings
from universal.model.network import ModelConfig, UniversalModel, build_model, save_checkpoint
from universal.model.preprocessing import ORIGINAL_PREPROCESSING

log = logging.getLogger(__name__)

DDP_PREFIX = "module."
# First key components of the backbone in the released Swin UNETR layout, which lacks the "backbone." level.
RELEASED_SWIN_MODULES = ("swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10", "decoder5",
                         "decoder4", "decoder3", "decoder2", "decoder1")
LAYOUTS = ("swinunetr-released", "swinunetr", "unet")
ORIGINAL_EMBEDDING_DIM = 512
# How many key names an error message lists before "and N more".
LISTED_KEYS = 12


class CheckpointImportError(ValueError):
    """A file is not a checkpoint of the original that we can convert; the message names the file and the keys."""


@dataclass(frozen=True)
class ImportedCheckpoint:
    """What :func:`import_original_checkpoint` wrote: the backbone, the source's key layout and the classes."""

    backbone: str
    layout: str
    class_names: list[str]
    epoch: int | None


def original_model_config(backbone: str) -> ModelConfig:
    """The model config that computes the original's function for ``backbone`` ("unet" or "swinunetr")."""
    return ModelConfig(backbone=backbone, backbone_variant="original", norm_statistics="batch",
                       feature_size=48, window_size=7, in_channels=1, embedding_dim=ORIGINAL_EMBEDDING_DIM,
                       embedding_norm="none", head_negative_slope=0.0)


def read_original(path: str | Path) -> tuple[dict[str, Tensor], int | None]:
    """The ``net`` state dict of an original checkpoint file and its epoch (None when absent).

    A bare state dict (all values tensors) is accepted too. Raises :class:`CheckpointImportError` for a missing
    file, a file torch cannot read, a pickle that needs code to load, or a dict without ``net``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointImportError(f"{path}: no such file")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        needs = sorted(set(re.findall(r"Unsupported global: GLOBAL (\S+)", str(err))))
        if not needs:
            raise CheckpointImportError(f"{path}: not a torch checkpoint (unpickling failed)") from err
        raise CheckpointImportError(
            f"{path}: refused: the file pickles objects that need code to load ({', '.join(needs)}); checkpoints "
            "are read with torch.load(weights_only=True) only, which runs no code. The original's checkpoints hold "
            "tensors and plain containers only.") from err
    except Exception as err:  # torch raises KeyError, RuntimeError, EOFError... for files that are not its own
        raise CheckpointImportError(f"{path}: not a torch checkpoint ({type(err).__name__}: {err})") from err
    if isinstance(record, Mapping) and "net" in record:
        state, epoch = record["net"], record.get("epoch")
    elif isinstance(record, Mapping) and record and all(isinstance(v, Tensor) for v in record.values()):
        state, epoch = record, None
    else:
        keys = f"keys {_listed(list(record))}" if isinstance(record, Mapping) else f"a {type(record).__name__}"
        raise CheckpointImportError(f"{path}: not a checkpoint of the original model: expected a dict with 'net' "
                                    f"(its state dict), found {keys}")
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointImportError(f"{path}: 'net' is not a state dict of tensors")
    return dict(state), epoch if isinstance(epoch, int) else None


def detect_layout(state: Mapping[str, Tensor], source: str | Path) -> tuple[str, dict[str, Tensor]]:
    """The key layout of an original state dict (see the module docstring) and the state dict renamed to ours
    (``module.`` removed, ``backbone.`` added for the released Swin layout). Raises naming the keys that fit none.
    """
    keys = list(state)
    prefixed = [k for k in keys if k.startswith(DDP_PREFIX)]
    if prefixed and len(prefixed) != len(keys):
        bare = [k for k in keys if not k.startswith(DDP_PREFIX)]
        raise CheckpointImportError(f"{source}: some keys carry the DistributedDataParallel prefix 'module.' and "
                                    f"some do not: {_listed(bare)}")
    names = {k.removeprefix(DDP_PREFIX): v for k, v in state.items()}
    released = [k for k in names if k.split(".")[0] in RELEASED_SWIN_MODULES]
    current_swin = [k for k in names if k.startswith("backbone.swinViT.")]
    unet = [k for k in names if k.startswith("backbone.down_tr64.")]
    found = [layout for layout, hits in zip(LAYOUTS, (released, current_swin, unet), strict=True) if hits]
    if len(found) != 1:
        what = f"keys of several layouts {found}" if found else "no swinViT or down_tr64 keys"
        raise CheckpointImportError(f"{source}: not a CLIP-Driven Universal Model checkpoint ({what}); "
                                    f"its keys: {_listed(keys)}")
    layout = found[0]
    if layout == "swinunetr-released":
        names = {(f"backbone.{k}" if k.split(".")[0] in RELEASED_SWIN_MODULES else k): v for k, v in names.items()}
    return layout, names


def map_embedding_rows(table: Tensor, classes: ClassTable, source: str | Path) -> Tensor:
    """The rows of the original's 32-row ``organ_embedding`` for the classes of ``classes``, in their order."""
    expected = (len(ORIGINAL_CLASS_ORDER), ORIGINAL_EMBEDDING_DIM)
    if tuple(table.shape) != expected:
        raise CheckpointImportError(f"{source}: organ_embedding has shape {tuple(table.shape)}, expected {expected} "
                                    "(one CLIP ViT-B/32 text embedding per class, in the original's class order)")
    row_of = {ORIGINAL_ALIASES.get(name, name): i for i, name in enumerate(ORIGINAL_CLASS_ORDER)}
    missing = [name for name in classes.names if name not in row_of]
    if missing:
        raise CheckpointImportError(f"{source}: the original model has no class {missing}; it has "
                                    f"{list(row_of)} (class table {classes.source})")
    return table[[row_of[name] for name in classes.names]].to(torch.float32)


def build_original_model(state: Mapping[str, Tensor], backbone: str, classes: ClassTable, source: str | Path,
                         embeddings: Tensor | None = None) -> UniversalModel:
    """Our model with the original's weights, loaded strictly: every key of ours present with its shape, no other
    key, and no NaN or infinite value. ``embeddings`` (classes × D, in the order of ``classes``) replaces the
    checkpoint's own rows.
    """
    rows = map_embedding_rows(_required(state, "organ_embedding", source), classes, source)
    if embeddings is not None:
        if embeddings.shape != rows.shape:
            raise CheckpointImportError(f"{source}: the replacement embeddings have shape "
                                        f"{tuple(embeddings.shape)}, the checkpoint's rows {tuple(rows.shape)}")
        rows = embeddings.to(torch.float32)
    model = build_model(original_model_config(backbone), rows)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in state and k != "organ_embedding" and state[k].shape != v.shape]
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if missing or unexpected or wrong or broken:
        problems = [f"{label}: {_listed(keys)}" for label, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong),
                     ("non-finite values", broken)) if keys]
        raise CheckpointImportError(f"{source}: does not fit the original {backbone} model; " + "; ".join(problems))
    converted = {k: (v.to(expected[k].dtype) if v.is_floating_point() else v) for k, v in state.items()}
    converted["organ_embedding"] = rows
    model.load_state_dict(converted, strict=True)
    return model


def import_original_checkpoint(source: str | Path, out: str | Path, classes: ClassTable,
                               embeddings_path: str | Path | None = None) -> ImportedCheckpoint:
    """Convert the original checkpoint ``source`` into our checkpoint ``out`` (written atomically).

    ``embeddings_path``: a text-embedding table (the original's ``txt_encoding.pth`` or a file of
    ``universal embed``) whose rows, matched by class name, replace the checkpoint's ``organ_embedding``.
    """
    state, epoch = read_original(source)
    layout, names = detect_layout(state, source)
    backbone = "unet" if layout == "unet" else "swinunetr"
    replacement = None
    if embeddings_path is not None:
        replacement = import_embeddings(embeddings_path, classes)["embeddings"]
    model = build_original_model(names, backbone, classes, source, replacement)
    provenance = {"source": str(source), "sha256": file_digests(Path(source))["sha256"], "layout": layout,
                  "epoch": epoch, "embeddings": str(embeddings_path) if embeddings_path is not None else "checkpoint"}
    save_checkpoint(out, model, original_model_config(backbone), classes.names,
                    extra={"trained_classes": classes.names, "imported_from": provenance},
                    preprocessing=ORIGINAL_PREPROCESSING.to_dict())
    log.info("converted %s (%s layout, epoch %s) into %s: original %s backbone, %d classes", source, layout, epoch,
             out, backbone, len(classes))
    return ImportedCheckpoint(backbone, layout, classes.names, epoch)


def _required(state: Mapping[str, Tensor], key: str, source: str | Path) -> Tensor:
    if key not in state:
        raise CheckpointImportError(f"{source}: missing key {key!r}")
    return state[key]


def _listed(keys: list) -> str:
    """The first :data:`LISTED_KEYS` of ``keys`` and how many more there are."""
    shown = ", ".join(str(k) for k in keys[:LISTED_KEYS])
    more = len(keys) - LISTED_KEYS
    return f"[{shown}{f', and {more} more' if more > 0 else ''}]"

