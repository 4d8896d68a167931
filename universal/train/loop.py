"""Training loop of the universal model: one readable loop, one config dataclass (after nanoGPT).

AdamW, linear warm-up then cosine decay per step, optional bf16 autocast, gradient clipping, the partial-label
loss (:mod:`universal.train.losses`) on multi-hot targets derived at load time (:mod:`universal.train.targets`),
patches from the zarr stores (:mod:`universal.train.patches`). Beside it: the settings (:mod:`.config`), resumable
checkpoints and fine-tuning (:mod:`.checkpoints`), several processes (:mod:`.distributed`), the logs (:mod:`.logs`)
and validation (:mod:`.validation`).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from universal.core.atomic import disk_full_error
from universal.core.classes import ClassTable, load_class_table
from universal.core.tsv import write_tsv
from universal.data.store import check_class_table
from universal.train.checkpoints import (
    latest_checkpoint,
    log_start,
    prepare_model,
    save_final,
    save_resumable,
    training_preprocessing,
)
from universal.train.config import TrainConfig, autocast_dtype, lr_at_step
from universal.train.cpu_bf16 import check_bf16_training_on_cpu
from universal.train.distributed import (
    DistributedEnv,
    distributed_env,
    from_rank0,
    mean_over_ranks,
    setup_distributed,
)
from universal.train.logs import TRAIN_LOG_NAME, VAL_COLUMNS, VAL_LOG_NAME, TrainLog, truncate_log, write_val_rows
from universal.train.losses import (
    masked_bce_dice_loss,
)
from universal.train.patches import PatchDataset, patch_loader
from universal.train.targets import known_negatives, multi_hot_targets
from universal.train.validation import validate

MANIFEST_NAME = "training_manifest.tsv"

log = logging.getLogger("universal.train")


def trained_classes(manifest: list[dict], classes: ClassTable, init: dict | None) -> list[str]:
    """The classes some training case annotates (the ``annotated`` column of the training manifest,
    :meth:`PatchDataset.sampling_table`; plus, when fine-tuning, those the initial model was trained on), in
    class-table order: the heads of all other classes never received a gradient."""
    seen: set[str] = set(init.get("trained_classes", [])) if init else set()
    for row in manifest:
        seen.update(name for name in row["annotated"].split(",") if name)
    return [name for name in classes.names if name in seen]


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
        log.warning("step %d: gradient norm %s (loss %s); step skipped, weights unchanged (%d in a row)", step,
                    row["grad_norm"], row["loss"], in_a_row)
    if in_a_row > limit:
        raise RuntimeError(
            f"training stopped at step {step}: {in_a_row} steps in a row (from step {step - in_a_row + 1}) had a "
            f"non-finite gradient norm (the last: loss {row['loss']}), more than max_nonfinite_steps = {limit}; the "
            "weights are those from before them. Lower the learning rate, check the training data, or train with "
            "amp: off")


def train(config: TrainConfig) -> Path:
    """Train (or resume from the newest checkpoint in ``config.out_dir``) up to ``config.steps``; returns the path
    of ``final.pt`` (model weights, model config, class names, and ``extra`` with step and train config).

    Under torchrun every rank calls this; the process group is created here (and destroyed at the end) unless the
    caller created it."""
    env = distributed_env()
    device, owns_group = setup_distributed(config, env)
    try:
        return _train(config, env, device)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: TrainConfig, env: DistributedEnv, device: torch.device) -> Path:
    main, world_size = env.rank == 0, env.world_size
    out_dir = Path(config.out_dir)
    amp = autocast_dtype(config, device)
    classes = load_class_table(config.class_table, include=config.include_classes)
    for store in [*config.stores, *config.val_stores]:
        check_class_table(store, classes)
    resume = from_rank0(latest_checkpoint(out_dir) if main else None, world_size)
    model, optimizer, extra = prepare_model(config, classes, device, resume, verbose=main)
    if amp is not None and device.type == "cpu":
        check_bf16_training_on_cpu(model, (config.batch_size, config.model.in_channels, *config.patches.patch_size))
    init, start = extra.get("init"), int(extra.get("step", 0))
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_start(config, resume, extra, world_size)
    # Every parameter takes part in every step (all heads are generated by the shared controller), so DDP needs no
    # unused-parameter search; frozen backbone parameters are not registered with it at all.
    net = model if world_size == 1 else DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    dataset = PatchDataset(config.stores, classes, config.patches, config.weights, config.seed)
    manifest = dataset.sampling_table() if main else []  # one pass over the cases' attributes, rank 0 only
    preprocessing = training_preprocessing(config) if main else {}  # what every checkpoint records, read once
    if main:
        write_tsv(out_dir / MANIFEST_NAME, list(manifest[0]), (row.values() for row in manifest))
    trained = from_rank0(trained_classes(manifest, classes, init), world_size)  # every rank runs the same heads
    exclusion_channels = classes.channels(trained) if config.exclusion_negatives != "none" else None
    validating = main and config.val_every > 0 and bool(config.val_stores)
    val_log = out_dir / VAL_LOG_NAME
    if validating:
        truncate_log(val_log, VAL_COLUMNS, start)  # drop rows of steps a resumed run redoes
    batches = iter(patch_loader(dataset, config.batch_size, start, config.num_workers, env.rank, world_size))
    log = TrainLog(out_dir, start, config.steps, config.log_every) if main else None
    model.train()
    if config.trainable == "heads":
        model.backbone.eval()
    nonfinite = 0  # steps in a row with a non-finite gradient norm, each skipped
    try:
        for step in range(start, config.steps):
            began = time.perf_counter()
            lr = lr_at_step(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            row = train_step(net, next(batches), classes, optimizer, config, device, amp, exclusion_channels)
            row = mean_over_ranks(row, ("loss", "bce", "dice"), device, world_size)
            if log is not None:
                log.write({"step": step + 1, "lr": lr, "seconds": time.perf_counter() - began, **row})
            nonfinite = 0 if math.isfinite(row["grad_norm"]) else nonfinite + 1
            if nonfinite:
                _skipped_step(step + 1, nonfinite, row, config.max_nonfinite_steps, verbose=main)
            done = step + 1 == config.steps
            if validating and ((step + 1) % config.val_every == 0 or done):
                write_val_rows(val_log, validate(model, config, classes, device, step + 1, trained), step + 1)
            if main and ((step + 1) % config.checkpoint_every == 0 or done):
                save_resumable(out_dir, step + 1, model, optimizer, config, classes, world_size, init, preprocessing)
    except OSError as err:  # a log write on a full disk (checkpoints name their own file)
        if (full := disk_full_error(err, out_dir / TRAIN_LOG_NAME, "the checkpoints written so far are kept and "
                                    "a rerun resumes from the newest")) is None:
            raise
        raise full from err
    finally:
        if log is not None:
            log.close()
        del batches
    final = out_dir / "final.pt"
    if main:
        save_final(final, model, config, classes, max(start, config.steps), trained, init, preprocessing)
    if world_size > 1:
        dist.barrier()  # final.pt exists on every rank's return
    return final
