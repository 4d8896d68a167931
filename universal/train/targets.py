"""Training targets derived at load time from exclusive universal label maps and the class table.

A stored label map is exclusive (a tumour voxel holds the tumour's value, not its organ's). The model's channels
overlap: an organ channel also covers the tumours inside it. A tumour with two lateral parents (Kidney Tumor in the
right or left kidney, Lung Tumor in either lung) counts for the parent on the voxel's side of the body midline:
RAS +x is the patient's right, so a voxel with x_mm > midline_x_mm is on the right.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from universal.core.classes import ClassTable


def membership_tables(classes: ClassTable, num_values: int) -> tuple[Tensor, Tensor]:
    """Lookup tables (K, num_values) bool: entry [k, v] says label value v counts for channel k, for a voxel on
    the patient's right (first table) and left (second table).

    A value counts for its own class, and a tumour value also for its parent organ; when a tumour has several
    parents, only for those whose ``side`` is unset or equals the voxel's side. Values outside the table count
    for no channel.
    """
    right = torch.zeros(len(classes), num_values, dtype=torch.bool)
    left = torch.zeros_like(right)
    for channel, cls in enumerate(classes):
        if cls.index >= num_values:
            continue
        right[channel, cls.index] = left[channel, cls.index] = True
        for parent_name in cls.parents:
            parent_channel = classes.channel(parent_name)
            side = classes[parent_name].side if len(cls.parents) > 1 else None
            right[parent_channel, cls.index] = side != "left"
            left[parent_channel, cls.index] = side != "right"
    return right, left


def exclusion_tables(classes: ClassTable, num_values: int) -> tuple[Tensor, Tensor]:
    """Lookup tables (K, num_values) bool: entry [k, v] says a voxel labelled v is known not to be class k, on the
    patient's right (first table) and left (second table).

    A voxel of class v is not class k when v does not count for k (:func:`membership_tables`) and v is not one of
    k's parents: an organ's voxel may hold a tumour that a dataset labelling the organ alone did not mark, so it
    says nothing about the organ's tumours. Background (0) and values outside the table are known to be nothing.
    A bilateral tumour's voxel on the right counts for the right organ, so it excludes the left one.
    """
    right, left = membership_tables(classes, num_values)
    parent = torch.zeros_like(right)  # [k, v]: class v is a parent of class k
    for channel, cls in enumerate(classes):
        for parent_name in cls.parents:
            if classes[parent_name].index < num_values:
                parent[channel, classes[parent_name].index] = True
    is_class = torch.zeros(num_values, dtype=torch.bool)
    is_class[[cls.index for cls in classes if cls.index < num_values]] = True
    return ~right & ~parent & is_class, ~left & ~parent & is_class


def known_negatives(label: Tensor, classes: ClassTable, x_mm: Tensor, midline_x_mm: Tensor, annotated: Tensor,
                    channels: Sequence[int] | Tensor, tumour_voxels_only: bool = False) -> Tensor:
    """Voxels (B, K, X, Y, Z) bool known not to be the class of each of ``channels`` (K = len(channels)), for the
    classes a sample's dataset does not annotate: the exclusion negatives of a partially labelled sample.

    ``label`` (B, X, Y, Z) exclusive label maps; ``x_mm`` and ``midline_x_mm`` as for :func:`multi_hot_targets`;
    ``annotated`` (B, K_all) bool, the classes each sample annotates (:func:`annotated_mask`). For channel k that
    sample b does not annotate, a voxel is a known negative when its label is a class b annotates that excludes k
    (:func:`exclusion_tables`): in a liver dataset every liver and liver-tumour voxel is known not to be stomach.
    Channels a sample annotates are all False here: their full targets come from :func:`multi_hot_targets`.
    ``tumour_voxels_only``: only voxels labelled a tumour are known negatives (a liver tumour is not stomach): the
    negatives aimed at a tumour that another dataset's organ (the stomach) claims, without the organ voxels'.
    """
    label, num_values = _checked_label(label, classes)
    if annotated.shape != (label.shape[0], len(classes)):
        raise ValueError(f"annotated must be (B, K) = ({label.shape[0]}, {len(classes)}), got {tuple(annotated.shape)}")
    channels = torch.as_tensor(channels, dtype=torch.long)
    excluded = _by_side(exclusion_tables(classes, num_values), channels, label, x_mm, midline_x_mm)
    value_annotated = torch.zeros(label.shape[0], num_values, dtype=torch.bool)
    value_annotated[:, [cls.index for cls in classes]] = annotated.cpu().bool()
    if tumour_voxels_only:
        value_annotated[:, [cls.index for cls in classes if not cls.is_tumour]] = False
    batch = torch.arange(label.shape[0], device=label.device).reshape(-1, 1, 1, 1)
    labelled = value_annotated.to(label.device)[batch, label]  # (B, X, Y, Z): the voxel's class is annotated
    unannotated = ~annotated.to(label.device).bool()[:, channels.to(label.device)]  # (B, K)
    return excluded & labelled.unsqueeze(1) & unannotated[:, :, None, None, None]


def multi_hot_targets(label: Tensor, classes: ClassTable, x_mm: Tensor, midline_x_mm: Tensor,
                      channels: Sequence[int] | Tensor | None = None) -> Tensor:
    """Multi-hot targets (B, K, X, Y, Z) bool for exclusive label maps ``label`` (B, X, Y, Z) (any integer dtype).

    ``x_mm``: RAS x (mm) of each voxel column, (B, X), or of each (x, y) column, (B, X, Y) (after an in-plane
    rotation the x coordinate varies along both axes). ``midline_x_mm``: (B,) RAS x of each body's midline.
    Channel k is true where the label is class k, or a tumour whose parent (on the voxel's side) is class k.
    ``channels`` (class-table channel indices) returns only those channels, in that order (K = len(channels)):
    training needs the annotated classes of a batch only, and each channel costs a pass over the label map.
    """
    label, num_values = _checked_label(label, classes)
    selected = None if channels is None else torch.as_tensor(channels, dtype=torch.long)
    return _by_side(membership_tables(classes, num_values), selected, label, x_mm, midline_x_mm).contiguous()


def _checked_label(label: Tensor, classes: ClassTable) -> tuple[Tensor, int]:
    """``label`` (B, X, Y, Z) as int64, and the size of a lookup table that covers its values and the class table."""
    if label.ndim != 4:
        raise ValueError(f"label must be (B, X, Y, Z), got shape {tuple(label.shape)}")
    label = label.long()
    return label, max(classes.max_index, int(label.max()) if label.numel() else 0) + 1


def _by_side(tables: tuple[Tensor, Tensor], channels: Tensor | None, label: Tensor, x_mm: Tensor,
             midline_x_mm: Tensor) -> Tensor:
    """Look every voxel of ``label`` (B, X, Y, Z) up in the right or left table (K_all, num_values) by the side of
    the midline it lies on; rows ``channels`` only (None: all). Returns (B, K, X, Y, Z) bool."""
    if channels is not None:
        tables = tuple(t[channels] for t in tables)
    right_table, left_table = (t.to(label.device) for t in tables)
    is_right = _right_side(x_mm.to(label.device), midline_x_mm.to(label.device), label.shape)
    return torch.where(is_right.unsqueeze(0), right_table[:, label], left_table[:, label]).transpose(0, 1)


def _right_side(x_mm: Tensor, midline_x_mm: Tensor, shape: torch.Size) -> Tensor:
    """Bool (B, X, 1, 1) or (B, X, Y, 1): voxel columns on the patient's right of the midline."""
    batch, nx, ny = shape[0], shape[1], shape[2]
    if x_mm.shape == (batch, nx):
        x_mm = x_mm[:, :, None, None]
    elif x_mm.shape == (batch, nx, ny):
        x_mm = x_mm[:, :, :, None]
    else:
        raise ValueError(f"x_mm must be (B, X) or (B, X, Y) for labels {tuple(shape)}, got {tuple(x_mm.shape)}")
    return x_mm > midline_x_mm.reshape(batch, 1, 1, 1)


def annotated_mask(annotated: Sequence[Sequence[str]], classes: ClassTable) -> Tensor:
    """(B, K) bool: which classes each sample's dataset annotates.

    Names not in ``classes`` (e.g. a disabled row such as Kidney Cyst) are ignored: the model has no channel
    for them.
    """
    mask = torch.zeros(len(annotated), len(classes), dtype=torch.bool)
    for row, names in enumerate(annotated):
        channels = [classes.channel(name) for name in names if name in classes]
        mask[row, channels] = True
    return mask
