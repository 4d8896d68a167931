"""The partial-label training loss: BCE + soft Dice over the annotated (sample, class) pairs only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_DICE_SMOOTH = 1.0
LOSS_AVERAGES = ("pair", "sample")
MISSED_PROBABILITY = 0.01  # default of missed_below: a positive voxel predicted below it is "missed" (missed_weight)


def masked_bce_dice_loss(logits: Tensor, targets: Tensor, mask: Tensor, smooth: float = DEFAULT_DICE_SMOOTH,
                         average: str = "pair", missed_weight: float = 1.0,
                         missed_channels: Tensor | None = None,
                         missed_below: float = MISSED_PROBABILITY,
                         negatives: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """BCE-with-logits + soft Dice, each averaged over the (sample, class) pairs where ``mask`` is true.

    ``logits`` (B, K, X, Y, Z) (any spatial rank), ``targets`` of the same shape (bool or float in [0, 1]),
    ``mask`` (B, K) bool: the classes each sample's dataset annotates. Returns ``(total, {"bce", "dice"})`` with
    ``total = bce + dice`` (equal weights, as the original) and detached parts.

    Per (sample b, class k), over all voxels: BCE is the voxel mean of binary cross-entropy; soft Dice is
    ``1 − (2·Σ p·t + ε) / (Σ p + Σ t + ε)`` with ``p = sigmoid(logit)`` and ``ε = smooth``. Pairs outside the mask
    are never computed, so unannotated classes get exactly zero gradient (the original's partial-label rule:
    a class a dataset does not label is unknown, not background). With no annotated pair the loss is 0.

    Why this Dice: the original's ``BinaryDiceLoss`` flattened with ``view(shape[0], -1)`` until 2024-05, which
    for one (X, Y, Z) channel is a Dice per first-axis slice (smooth 1 in the denominator only; empty slices add
    a constant 1). Its 2024 change to ``view(-1)`` kept ``sum(dim=1)`` and raises ``IndexError`` at HEAD. We use one
    Dice per (sample, class) volume, with ε in numerator and denominator, averaged over the pairs whose target is
    not empty; pairs with an empty target get BCE only (in the original they add a constant, i.e. no gradient).
    A Dice of ``ε / (Σp + ε)`` on an empty target would push a class that is absent from most patches (a small
    organ, a tumour) towards p = 0 until its sigmoid saturates; there its Dice gradient (∝ p(1 − p)) vanishes on
    the patches that do hold it. In a 1,200-step demo run with that term, the heads of the esophagus and the
    kidney tumour ended at p < 10⁻³ everywhere, on training cases too. With no non-empty pair the Dice part is 0.

    How the pairs are averaged (``average``): ``"pair"``, every annotated pair of the batch alike (the original's
    ``Multi_BCELoss``/``DiceLoss``: the sum over pairs divided by their count); ``"sample"``, each sample's pairs
    first, then the samples alike (samples without an annotated pair, or for Dice without a non-empty one, are
    left out). They differ when the samples of a batch annotate different numbers of classes: averaged by pair,
    a patch of a dataset labelling one class next to a patch labelling eight gets 1/9 of the batch's weight,
    averaged by sample 1/2, as in a batch of its own dataset alone.

    ``missed_weight`` (≥ 1; 1, the original's, changes nothing): the BCE of a positive voxel whose probability is
    below ``missed_below`` (a probability in (0, 0.5]; 1 % by default) is multiplied by it (the weight is a
    constant, not differentiated). Such a voxel gets no Dice gradient (∝ p(1 − p)) and a BCE gradient of 1/N of
    the pair's N voxels: a tumour that a head has learned to call background with logits near −12 (p ≈ 10⁻⁵), as
    the demo's universal model did with every right-kidney tumour, training cases included, stays there for
    hundreds of steps. The weight acts only below ``missed_below`` ≤ 0.5, so where the loss's optimum puts a voxel
    at p ≥ 0.5 it is unchanged, and so are the thresholded masks. ``missed_channels`` (K,) bool restricts the
    weight to those channels (e.g. the tumours); None: every channel.

    ``negatives`` (B, K, X, Y, Z) bool, optional: voxels known not to be the class, for pairs outside ``mask``
    (:func:`universal.train.targets.known_negatives`; the exclusion loss of Shi et al., MedIA 2021, not in the
    original). Each such pair with a known voxel adds the BCE towards 0 of those voxels only, summed and divided
    by the pair's voxel count N, to the BCE sum without counting among its pairs: a known voxel weighs what it
    would in an annotated pair of the batch (averaged by sample: of its sample), and the annotated pairs keep their
    weight however many classes a sample's negatives cover. Unknown voxels still get zero gradient, and the Dice is
    unchanged. With known negatives but no annotated pair (of the batch, or of a sample averaged by sample) their
    sum is the loss.
    """
    if average not in LOSS_AVERAGES:
        raise ValueError(f"average must be one of {LOSS_AVERAGES}, got {average!r}")
    check_missed_options(missed_weight, missed_below)
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
    if mask.shape != logits.shape[:2]:
        raise ValueError(f"mask must be (B, K) = {tuple(logits.shape[:2])}, got {tuple(mask.shape)}")
    if missed_channels is not None and missed_channels.shape != logits.shape[1:2]:
        raise ValueError(f"missed_channels must be (K,) = ({logits.shape[1]},), got {tuple(missed_channels.shape)}")
    if negatives is not None and negatives.shape != logits.shape:
        raise ValueError(f"negatives {tuple(negatives.shape)} and logits {tuple(logits.shape)} differ in shape")
    mask = mask.to(device=logits.device, dtype=torch.bool)
    if negatives is not None:
        negatives = negatives.to(logits.device).bool() & ~mask.reshape(*mask.shape, *[1] * (logits.ndim - 2))
        excluded = negatives.flatten(2).any(dim=2)  # (B, K): unannotated pairs with a known negative voxel
    if not mask.any() and (negatives is None or not excluded.any()):
        zero = logits.sum() * 0.0
        return zero, {"bce": zero.detach(), "dice": zero.detach()}
    selected = logits[mask].flatten(1).float()  # (M, N) for the M annotated pairs
    truth = targets[mask].flatten(1).to(selected.dtype)
    sample, channel = mask.nonzero().unbind(1)  # (M,) each the batch index and the channel of each pair
    weight = None
    if missed_weight != 1:
        missed = (truth > 0) & (torch.sigmoid(selected.detach()) < missed_below)
        if missed_channels is not None:
            missed &= missed_channels.to(device=logits.device, dtype=torch.bool)[channel, None]
        weight = 1.0 + (missed_weight - 1.0) * missed.to(selected.dtype)
    pair_bce = F.binary_cross_entropy_with_logits(selected, truth, weight=weight, reduction="none").mean(dim=1)
    negative_bce = negative_sample = None
    if negatives is not None and excluded.any():
        outside = logits[excluded].flatten(1).float()
        known = negatives[excluded].flatten(1).to(outside.dtype)
        negative_bce = (F.softplus(outside) * known).sum(dim=1) / outside.shape[1]
        negative_sample = excluded.nonzero()[:, 0]
    bce = _average(pair_bce, sample, average, negative_bce, negative_sample)
    present = truth.amax(dim=1) > 0
    dice = (_average(soft_dice_loss(selected[present], truth[present], smooth), sample[present], average)
            if present.any() else bce * 0.0)
    total = bce + dice
    return total, {"bce": bce.detach(), "dice": dice.detach()}


def check_missed_options(missed_weight: float, missed_below: float) -> None:
    """Raise ValueError unless ``missed_weight`` ≥ 1 and ``missed_below`` is a probability in (0, 0.5]."""
    if missed_weight < 1:
        raise ValueError(f"missed_weight must be >= 1, got {missed_weight}")
    if not 0.0 < missed_below <= 0.5:
        raise ValueError(f"missed_below must be in (0, 0.5], got {missed_below}")


def soft_dice_loss(logits: Tensor, targets: Tensor, smooth: float = DEFAULT_DICE_SMOOTH) -> Tensor:
    """Per-row soft Dice loss (M,) for logits and targets (M, N): ``1 − (2Σpt + ε)/(Σp + Σt + ε)``."""
    probs = torch.sigmoid(logits)
    intersection = (probs * targets).sum(dim=1)
    denominator = probs.sum(dim=1) + targets.sum(dim=1)
    return 1.0 - (2.0 * intersection + smooth) / (denominator + smooth)


def _average(values: Tensor, sample: Tensor, average: str, extra: Tensor | None = None,
             extra_sample: Tensor | None = None) -> Tensor:
    """Mean of per-pair ``values`` (M,): over all pairs, or per sample (``sample`` (M,) batch indices) then over
    the samples present. ``extra`` (E,), of samples ``extra_sample`` (E,), add to the sum of their average (the
    batch's, or their sample's) without counting among its pairs; a sum without pairs is divided by 1."""
    if extra is None:
        extra, extra_sample = values[:0], sample[:0]
    if average == "pair":
        return (values.sum() + extra.sum()) / max(len(values), 1)
    _, group = torch.unique(torch.cat([sample, extra_sample]), return_inverse=True)
    samples = int(group.max()) + 1
    sums = torch.zeros(samples, dtype=values.dtype, device=values.device).index_add_(0, group,
                                                                                     torch.cat([values, extra]))
    counts = torch.zeros(samples, dtype=values.dtype, device=values.device).index_add_(
        0, group[:len(values)], torch.ones_like(values))
    return (sums / counts.clamp(min=1)).mean()
