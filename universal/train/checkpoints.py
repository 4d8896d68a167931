"""Resumable training checkpoints (model, optimizer, RNG and sampler state), and fine-tuning from a trained model.

Several processes (``torchrun --nproc_per_node=N -m universal.cli train ...``, which sets RANK, WORLD_SIZE and
LOCAL_RANK) train one model with DistributedDataParallel: NCCL on CUDA (each process on GPU ``LOCAL_RANK``), gloo
on CPU. Rank r draws the patches of sample indices (s·N + r)·B ... (s·N + r + 1)·B − 1 at step s
(:class:`~universal.train.patches.PatchSampler`), so ranks never share a patch; DDP averages the gradients, so a step
is one step on N·B patches. The logged loss, BCE and Dice are averaged over the ranks (the global loss). Only rank 0
writes the log, TensorBoard and checkpoints (same format as one process: the bare model's state dict, no
``module.`` prefix); every rank resumes from the checkpoint rank 0 found, so ``out_dir`` must be on a file system
all ranks see. ``batch_size`` is per rank.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from universal.core.classes import ClassTable
from universal.core.torch_files import load_torch_file
from universal.data.store import list_cases, open_case
from universal.model.network import (
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
from universal.model.preprocessing import Preprocessing
from universal.train.config import TrainConfig

log = logging.getLogger("universal.train")


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


def prepare_model(config: TrainConfig, classes: ClassTable, device: torch.device,
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
        if ModelConfig.from_dict(meta["model_config"]) != config.model:  # fields added since default alike
            raise ValueError(f"{resume} was trained with model config {meta['model_config']}, not "
                             f"{config.model.to_dict()}: use another out_dir")
        extra = meta["extra"]
    model.to(device)
    if config.trainable == "heads":
        model.backbone.requires_grad_(False)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.generator_lr_scale), lr=config.lr,
                                  weight_decay=config.weight_decay)
    if "optimizer" in extra:
        optimizer.load_state_dict(extra["optimizer"])
        set_rng_state(extra["rng"])
    return model, optimizer, extra


def parameter_groups(model: UniversalModel, generator_lr_scale: float) -> list[dict]:
    """The trainable parameters as AdamW groups, each with its ``lr_scale`` (the factor on the scheduled lr):
    the head generator (:data:`~universal.model.network.HEAD_GENERATOR`) at ``generator_lr_scale``, the rest at 1; one
    group when the scale is 1."""
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
    checkpoint path, its classes, the novel classes and the model entries not copied. ``verbose``: log
    warnings (a known class whose embedding changed, head tensors left freshly initialised) to stderr.
    """
    record = load_torch_file(path, "init_checkpoint")
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
            log.warning("the new embedding of %r differs from the one %s was trained with", name, path)
    heads_reset = [n for n in not_copied if n.split(".")[0] in HEAD_MODULES]
    if heads_reset and verbose:
        log.warning("init_checkpoint %s: freshly initialised (no matching tensor): %s", path, heads_reset)
    trained = list(record.get("extra", {}).get("trained_classes", old_names))
    return {"checkpoint": str(path), "class_names": old_names, "novel_classes": novel, "not_copied": not_copied,
            "trained_classes": trained}


def save_resumable(out_dir: Path, step: int, model: UniversalModel, optimizer: torch.optim.Optimizer,
                    config: TrainConfig, classes: ClassTable, world_size: int, init: dict | None,
                    preprocessing: dict) -> None:
    """Write ``checkpoints/step_<step>.pt`` and delete all but the newest ``keep_checkpoints``."""
    extra = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(),
             "sampler": {"next_step": step, "batch_size": config.batch_size, "seed": config.seed,
                         "world_size": world_size},
             "train_config": config.to_dict(), "class_table_digest": classes.digest()}
    if init is not None:
        extra["init"] = init
    save_checkpoint(checkpoint_path(out_dir, step), model, config.model, classes.names, extra,
                    preprocessing)
    for old in sorted((out_dir / "checkpoints").glob("step_*.pt"))[:-config.keep_checkpoints]:
        old.unlink()


def save_final(path: Path, model: UniversalModel, config: TrainConfig, classes: ClassTable, step: int,
               trained: list[str], init: dict | None, preprocessing: dict) -> None:
    """Write ``final.pt``: the model and its metadata, no optimizer state (``extra``: step, train config, class
    table digest, trained classes and, when fine-tuned, the init checkpoint's provenance)."""
    extra = {"step": step, "train_config": config.to_dict(), "class_table_digest": classes.digest(),
             "trained_classes": trained}
    if init is not None:
        extra["init"] = init
    save_checkpoint(path, model, config.model, classes.names, extra, preprocessing)


def log_start(config: TrainConfig, resume: Path | None, extra: dict, world_size: int) -> None:
    """Log where a run starts: resumed (and whether the process count changed), fine-tuned, or fresh."""
    init = extra.get("init")
    if resume is not None:
        log.info("resuming from %s at step %d", resume, int(extra.get("step", 0)))
        saved_world = extra.get("sampler", {}).get("world_size", 1)
        if saved_world != world_size:
            log.warning("%s was written by %d processes, now %d: the patch stream differs from an uninterrupted run",
                        resume, saved_world, world_size)
    elif init is not None:
        log.info("fine-tuning from %s (%s trainable); novel classes: %s", init["checkpoint"], config.trainable,
                 init["novel_classes"])


def training_preprocessing(config: TrainConfig) -> dict:
    """The preprocessing a checkpoint of this run records for inference: the stores' grid spacing (mm, x y z; every
    store must share it), the training window (HU) and the patch size as sliding-window ROI (voxels)."""
    spacings = {}
    for store in config.stores:
        first = list_cases(store)[0]
        spacings[store] = tuple(round(float(v), 4) for v in open_case(store, first).attrs["spacing"])
    if len(set(spacings.values())) > 1:
        raise ValueError(f"the training stores are on different grids: {spacings}; harmonize them with one spacing")
    spacing = next(iter(spacings.values()))
    return Preprocessing(spacing, config.patches.window_hu, config.patches.patch_size).to_dict()
