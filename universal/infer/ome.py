"""Prediction outputs as OME-Zarr 0.5 (zarr v3): the CT image plus ``labels/organs`` and ``labels/tumours``, and on
request ``probabilities``: the model's per-class probabilities on its own grid, quantised to uint8.

Arrays are stored in (z, y, x) order, the transpose of the RAS+ (x, y, z) arrays used in memory, so that
napari and other OME-Zarr viewers show axial slices; ``scale`` and ``translation`` are in millimetres (RAS+).
Organs and tumours are two label images because a tumour overlaps its organ. The full voxel-to-RAS affine and
the source file's own affine are kept under the ``universal`` attribute so predictions map back to the input CT
exactly, including any obliquity that OME-Zarr 0.5's scale/translation cannot express.

``probabilities`` is a multiscale image of its own (axes c, z, y, x; one channel per predicted class, named in its
``omero`` channel labels) on the model's grid: its scale is the model spacing and its translation the CT's origin
(the two grids share the centre of voxel 0), so viewers overlay it on the CT. A value q stands for the probability
q / 255 (rounded to the nearest step, so within 1/510 of the model's); the model grid's affine is kept under its
``universal`` attribute.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from ome_zarr.format import FormatV05
from ome_zarr.writer import write_multiscale, write_multiscale_labels, write_multiscales_metadata

from universal.core.atomic import atomic_output
from universal.core.classes import ClassTable, UniversalClass
from universal.core.volume import Volume
from universal.data.catalog import Case
from universal.infer.settings import InferenceSettings

AXES = [{"name": axis, "type": "space", "unit": "millimeter"} for axis in ("z", "y", "x")]
LABEL_GROUPS = ("organs", "tumours")
CHUNKS = (64, 128, 128)
PROBABILITY_STEPS = 255  # a stored probability q (uint8) stands for q / PROBABILITY_STEPS


@dataclass(frozen=True)
class GridProbabilities:
    """Per-class probabilities on the model's grid: ``names`` of the classes, one per channel; ``array`` (K, X, Y,
    Z) of probabilities in [0, 1] (float) or already quantised (uint8, q / 255); ``grid`` the grid's voxel-to-RAS
    affine (4×4, mm)."""

    names: list[str]
    array: np.ndarray
    grid: np.ndarray


def quantise_probability(probability: np.ndarray) -> np.ndarray:
    """A probability map (any shape, values in [0, 1]) as uint8 steps of 1/255, rounded to the nearest."""
    if probability.dtype == np.uint8:
        return probability
    return np.rint(np.clip(probability.astype(np.float32), 0.0, 1.0) * PROBABILITY_STEPS).astype(np.uint8)


def _transforms(volume: Volume) -> list[list[dict]]:
    spacing = list(volume.spacing)[::-1]
    origin = list(volume.origin)[::-1]
    return [[{"type": "scale", "scale": spacing}, {"type": "translation", "translation": origin}]]


def _storage(shape: tuple[int, ...]) -> dict:
    return {"chunks": tuple(min(c, n) for c, n in zip(CHUNKS, shape, strict=True))}


def _label_metadata(rows: list[UniversalClass]) -> dict:
    return {
        "colors": [{"label-value": c.index, "rgba": [*c.colour, 255]} for c in rows],
        "properties": [{"label-value": c.index, "class": c.name, "kind": c.kind} for c in rows],
    }


def prediction_attrs(case: Case, checkpoint: Path, run_key: str, settings: InferenceSettings, classes: ClassTable,
                     predicted: list[str], midline_x_mm: float, source_affine: np.ndarray) -> dict:
    """The ``universal`` attributes of a prediction: where it came from and how it was made."""
    return {"case_id": case.case_id, "dataset": case.dataset, "source_image": str(case.image),
            "source_affine": source_affine.tolist(), "checkpoint": str(checkpoint), "run_key": run_key,
            "midline_x_mm": midline_x_mm, "threshold": settings.threshold,
            "spacing_model_mm": list(settings.spacing), "window_hu": list(settings.window_hu),
            "roi": list(settings.roi), "class_table_digest": classes.digest(), "predicted_classes": predicted}


def write_prediction(path: str | Path, image: Volume, organs: np.ndarray, tumours: np.ndarray,
                     classes: ClassTable, attrs: dict, probabilities: GridProbabilities | None = None) -> None:
    """Write one case's prediction group atomically (:func:`~universal.core.atomic.atomic_output`).

    ``image`` is the CT (RAS+, int16 HU); ``organs`` and ``tumours`` are uint8 universal label maps on its grid;
    ``probabilities``, when given, become the ``probabilities`` image (quantised one class at a time).
    """
    with atomic_output(path) as tmp:
        _write_case_group(tmp, image, organs, tumours, classes, attrs, probabilities)


def _write_case_group(tmp: Path, image: Volume, organs: np.ndarray, tumours: np.ndarray, classes: ClassTable,
                      attrs: dict, probabilities: GridProbabilities | None) -> None:
    root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    with warnings.catch_warnings():
        # ome-zarr deprecates coordinate_transformations in favour of `scale`, which cannot carry a translation
        warnings.simplefilter("ignore", DeprecationWarning)
        _write_groups(root, image, organs, tumours, classes, Path(attrs.get("case_id", "image")).name)
    if probabilities is not None:
        _write_probabilities(root.create_group("probabilities"), probabilities, classes)
    root.attrs["universal"] = {**attrs, "affine_ras": image.affine.tolist(), "array_order": "zyx",
                               "classes": [{"index": c.index, "name": c.name, "kind": c.kind} for c in classes]}


def _write_groups(root: zarr.Group, image: Volume, organs: np.ndarray, tumours: np.ndarray, classes: ClassTable,
                  name: str) -> None:
    fmt = FormatV05()
    zyx = image.array.transpose(2, 1, 0)
    write_multiscale([zyx], root, fmt=fmt, axes=AXES, coordinate_transformations=_transforms(image),
                     storage_options=_storage(zyx.shape), name=name)
    for name, labels, rows in (("organs", organs, classes.organs()), ("tumours", tumours, classes.tumours())):
        write_multiscale_labels([labels.transpose(2, 1, 0)], root, name=name, fmt=fmt, axes=AXES,
                                coordinate_transformations=_transforms(image), storage_options=_storage(zyx.shape),
                                label_metadata=_label_metadata(rows))


def _write_probabilities(group: zarr.Group, probabilities: GridProbabilities, classes: ClassTable) -> None:
    """The ``probabilities`` image: (c, z, y, x) uint8, one chunk row per class, written class by class so that
    memory holds one quantised class at a time."""
    count, *shape = probabilities.array.shape
    zyx = tuple(shape[::-1])
    array = group.create_array("0", shape=(count, *zyx), dtype=np.uint8, chunks=(1, *_storage(zyx)["chunks"]),
                               fill_value=0)
    for k in range(count):
        array[k] = quantise_probability(probabilities.array[k]).transpose(2, 1, 0)
    scale, translation = _transforms(Volume(probabilities.array[0], probabilities.grid))[0]  # the grid's, z y x
    transforms = [{"type": "scale", "scale": [1.0, *scale["scale"]]},
                  {"type": "translation", "translation": [0.0, *translation["translation"]]}]
    channels = [{"label": name, "color": "{:02X}{:02X}{:02X}".format(*classes[name].colour), "active": True,
                 "window": {"min": 0, "max": PROBABILITY_STEPS, "start": 0, "end": PROBABILITY_STEPS}}
                for name in probabilities.names]
    write_multiscales_metadata(group, [{"path": "0", "coordinateTransformations": transforms}], fmt=FormatV05(),
                               axes=[{"name": "c", "type": "channel"}, *AXES], name="probabilities",
                               metadata={"omero": {"channels": channels}})
    group.attrs["universal"] = {"classes": list(probabilities.names), "steps": PROBABILITY_STEPS,
                                "affine_ras": probabilities.grid.tolist(), "array_order": "czyx"}


def read_probabilities(path: str | Path) -> GridProbabilities | None:
    """The ``probabilities`` image of a prediction group as (K, X, Y, Z) uint8 steps (q / 255) with its class
    names and grid affine; None when the prediction was written without it."""
    root = zarr.open_group(str(path), mode="r", zarr_format=3)
    if "probabilities" not in root:
        return None
    group = root["probabilities"]
    meta = group.attrs["universal"]
    array = _full_resolution(group)[...].transpose(0, 3, 2, 1)
    return GridProbabilities(list(meta["classes"]), array, np.asarray(meta["affine_ras"], dtype=np.float64))


def read_prediction(path: str | Path) -> tuple[Volume, np.ndarray, np.ndarray, dict]:
    """Read a prediction group back as (image, organs, tumours, universal attrs), arrays in RAS+ (x, y, z)."""
    root = zarr.open_group(str(path), mode="r", zarr_format=3)
    meta = dict(root.attrs["universal"])
    affine = np.asarray(meta["affine_ras"], dtype=np.float64)
    image = Volume(_full_resolution(root)[...].transpose(2, 1, 0), affine)
    organs = _full_resolution(root["labels/organs"])[...].transpose(2, 1, 0)
    tumours = _full_resolution(root["labels/tumours"])[...].transpose(2, 1, 0)
    return image, organs, tumours, meta


def _full_resolution(group: zarr.Group) -> zarr.Array:
    """The first (full-resolution) dataset of a multiscale group, by its OME metadata."""
    return group[group.attrs["ome"]["multiscales"][0]["datasets"][0]["path"]]


def predicted_mask(organs: np.ndarray, tumours: np.ndarray, cls: UniversalClass) -> np.ndarray:
    """Where a prediction marks ``cls``: its value in the organ map, or in the tumour map for a tumour class."""
    return (tumours if cls.is_tumour else organs) == cls.index


def union_label_map(organs: np.ndarray, tumours: np.ndarray) -> np.ndarray:
    """One exclusive universal label map: tumour values over organ values."""
    return np.where(tumours > 0, tumours, organs).astype(np.uint8)


def clear(path: str | Path) -> None:
    """Remove a prediction group (and its partial twin) if present."""
    for p in (Path(path), Path(str(path) + ".partial")):
        shutil.rmtree(p, ignore_errors=True)
