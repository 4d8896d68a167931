"""The training store: one zarr v3 group per case with the image (int16 HU) and the universal label map.

Layout of a store (one per dataset, ``<dataset>.zarr``)::

    <dataset>.zarr/zarr.json            group attrs: dataset, class table digest and names, spacing
    <dataset>.zarr/<case_id>/zarr.json  group attrs: see :class:`StoredCase`
    <dataset>.zarr/<case_id>/image      int16 HU, (x, y, z) in RAS+, chunked for random patch reads
    <dataset>.zarr/<case_id>/label      uint8 universal label values, exclusive (a tumour over its organ)

A case group is written under a temporary name (:mod:`universal.core.atomic`) and renamed when complete, so a
killed job never leaves a case that looks done. A store's label values mean the classes of the class table it was
harmonized with: :func:`check_class_table` refuses any other table (by its digest).
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from universal.core.atomic import atomic_output, is_partial
from universal.core.classes import ClassTable
from universal.core.paths import file_name_problem
from universal.core.volume import Volume

CHUNKS = (64, 64, 64)


class StoreError(ValueError):
    """A training store that cannot be used as asked; the message names the store, the problem and the fix."""


def _compressor() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle)


@dataclass
class StoredCase:
    """A case opened from a store: lazy zarr arrays plus its attributes.

    ``attrs`` holds: ``dataset``, ``case_id``, ``spacing`` (mm, x y z), ``affine`` (4x4 voxel -> RAS+ mm of the
    stored grid), ``original_shape`` and ``original_affine`` (the source file's grid after RAS reorientation),
    ``annotated`` (class names this case labels), ``midline_x_mm`` (RAS x of the body's sagittal midline).
    """

    case_id: str
    image: zarr.Array
    label: zarr.Array | None
    attrs: dict

    @property
    def annotated(self) -> list[str]:
        return list(self.attrs.get("annotated", []))

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.attrs["affine"], dtype=np.float64)

    def image_volume(self) -> Volume:
        return Volume(self.image[...], self.affine)

    def label_volume(self) -> Volume | None:
        return None if self.label is None else Volume(self.label[...], self.affine)


def open_store(path: str | Path, mode: str = "r") -> zarr.Group:
    return zarr.open_group(str(path), mode=mode, zarr_format=3)


def write_case(store_path: str | Path, case_id: str, image: Volume, label: Volume | None, attrs: dict) -> None:
    """Write one case group (image int16, optional label uint8, attrs) atomically into a store."""
    store_path = Path(store_path)
    if problem := file_name_problem(case_id) or ("a temporary output's name" if is_partial(case_id) else None):
        raise ValueError(f"{store_path}: case id {case_id!r} cannot name a case group: it is {problem}; rename the "
                         "case in the manifest")
    if label is not None and label.shape != image.shape:
        raise ValueError(f"case {case_id}: label shape {label.shape} != image shape {image.shape}")
    zarr.open_group(str(store_path), mode="a", zarr_format=3)
    with atomic_output(store_path / case_id) as tmp:
        _write_case_group(zarr.open_group(str(tmp), mode="w", zarr_format=3), case_id, image, label, attrs)


def _write_case_group(group: zarr.Group, case_id: str, image: Volume, label: Volume | None, attrs: dict) -> None:
    with ThreadPoolExecutor(max_workers=1) as pool:  # the label is written while the image is (~10 % faster)
        label_job = None if label is None else pool.submit(
            _write_array, group, "label", label.array.astype(np.uint8, copy=False))
        _write_array(group, "image", image.array.astype(np.int16, copy=False))
        if label_job is not None:
            label_job.result()
    group.attrs.update({"case_id": case_id, "affine": image.affine.tolist(),
                        "spacing": list(image.spacing), **attrs})


def _write_array(group: zarr.Group, name: str, data: np.ndarray) -> None:
    chunks = tuple(min(c, n) for c, n in zip(CHUNKS, data.shape, strict=True))
    array = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks,
                               compressors=[_compressor()], fill_value=0)
    array[...] = data


def list_cases(store_path: str | Path) -> list[str]:
    """Case ids of the complete case groups in a store (partial groups are skipped)."""
    root = open_store(store_path)
    with warnings.catch_warnings():  # Snakemake leaves a .snakemake_timestamp file in directory outputs
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
        return sorted(name for name in root.group_keys() if not is_partial(name))


def open_case(store_path: str | Path, case_id: str) -> StoredCase:
    group = open_store(store_path)[case_id]
    label = group["label"] if "label" in group else None
    return StoredCase(case_id=case_id, image=group["image"], label=label, attrs=dict(group.attrs))


def check_class_table(store_path: str | Path, classes: ClassTable) -> None:
    """Raise :class:`StoreError` unless the store at ``store_path`` was harmonized with ``classes`` (the same
    :meth:`~universal.core.classes.ClassTable.digest`): its label values are class indices of that table, and
    under another table they would train other classes (an edited table swapping two indices trains each organ
    as the other)."""
    path = Path(store_path)
    try:
        built = open_store(path).attrs.get("class_table_digest")
    except (OSError, ValueError, KeyError) as err:  # zarr: no group there, or not a zarr v3 group
        raise StoreError(f"{path}: not a training store ({type(err).__name__}: {err}); build it with universal "
                         "harmonize") from err
    if built == classes.digest():
        return
    if built is None:
        raise StoreError(f"{path}: the store records no class_table_digest, so the classes of its label values are "
                         f"unknown; re-run harmonize with the class table {classes.source}")
    differ = _class_name_changes(open_store(path).attrs.get("class_names"), classes.names)
    raise StoreError(f"{path}: harmonized with the class table of digest {built}, but training uses {classes.source} "
                     f"of digest {classes.digest()}{differ}; its label values would train the wrong classes. Re-run "
                     "harmonize with the current class table (delete the store first), or train with the table it "
                     "was built with")


def _class_name_changes(built: list[str] | None, now: list[str]) -> str:
    """How the class names of a store's table and the current one differ, in class order, for a message."""
    if built is None:
        return ""
    if built == now:
        return " (the same classes in the same order: label values or prompts differ)"
    changes = [f"{old} -> {new}" for old, new in zip(built, now, strict=False) if old != new]
    changes += [f"{old} -> (none)" for old in built[len(now):]] + [f"(none) -> {new}" for new in now[len(built):]]
    shown = ", ".join(changes[:6]) + (f", and {len(changes) - 6} more" if len(changes) > 6 else "")
    return f" (class by class, built with -> now: {shown})"
