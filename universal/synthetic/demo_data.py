"""Write the synthetic demo datasets: phantom CTs in the on-disk layouts and label conventions of real datasets.

Each demo dataset of the catalog (``config/datasets.yaml``) gets its own folder, layout, voxel grid and raw label
numbering, so that every adapter of the workflow runs on them as it would on the real data:

- ``demo_msd_liver``: MSD Task03 Liver (``dataset.json``, ``imagesTr``, ``labelsTr``; 1 liver, 2 tumour);
- ``demo_msd_spleen``: MSD Task09 Spleen (1 spleen), 5 mm slices as in the real task;
- ``demo_btcv``: BTCV ``RawData/Training/{img,label}`` from case 0061 on (only the 8 organs BTCV annotates
  for cases >= 60, in BTCV numbering; tumours count as the organ they grow in), 3 mm in-plane;
- ``demo_kits``: KiTS19 ``case_XXXXX/{imaging,segmentation}.nii.gz`` (1 kidney, 2 tumour), stored in KiTS19's
  permuted axis order: array axes (z, y, x), axis codes ('I', 'P', 'L');
- ``demo_external``: ``images/`` and ``labels/`` with every class in universal numbering.

Which classes a case labels and their raw values come from the catalog entry (``labels`` and
``annotated_for``): a tumour a dataset does not annotate is labelled as its parent organ when that organ is
annotated, and as background otherwise. Images are int16 HU, labels uint8.

The pieces are reusable: :func:`native_label` (the raw label map of any catalog entry, also when several raw
values name one class), :func:`case_paths`, :func:`write_msd_json` and :func:`to_kits_axes` serve
:mod:`mirrors`, which writes a small mirror of every catalog dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from universal.core.atomic import atomic_output
from universal.core.classes import ClassTable, load_class_table
from universal.core.volume import Volume, save_nifti
from universal.data.catalog import DatasetEntry, load_catalog
from universal.synthetic.phantom import Phantom, make_phantom

MAX_CASES = 100
MSD_LABEL_NAMES = {"Liver": "liver", "Liver Tumor": "cancer", "Spleen": "spleen"}  # the names MSD uses


@dataclass(frozen=True)
class DemoDataset:
    """How one demo dataset is drawn: grid ``shape`` (x, y, z voxels) and ``spacing`` (x, y, z mm), the seed
    offset of its cases, the number of its first case, the case id format and whether it is stored in KiTS19's
    axis order."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    seed_offset: int
    first_case: int
    case_format: str
    kits_axes: bool = False


DEMO_DATASETS = {
    "demo_msd_liver": DemoDataset((96, 80, 96), (4.0, 4.0, 4.0), 0, 0, "liver_{:d}"),
    "demo_msd_spleen": DemoDataset((96, 80, 78), (4.0, 4.0, 5.0), 400, 2, "spleen_{:d}"),
    # 3 mm in-plane: at 3.8 mm, nearest-neighbour resampling to the 4 mm store grid dropped one row in 19, at the
    # same place in every case, and stored every left kidney 7 % too small and every oesophagus 11 % too large
    "demo_btcv": DemoDataset((122, 101, 96), (3.0, 3.0, 4.0), 100, 61, "{:04d}"),
    "demo_kits": DemoDataset((92, 80, 96), (4.0, 4.0, 3.8), 200, 0, "{:05d}", kits_axes=True),
    "demo_external": DemoDataset((96, 80, 96), (3.9, 3.9, 4.0), 300, 0, "ext_{:03d}"),
}


def case_seed(seed: int, key: str, position: int) -> int:
    """The phantom seed of the ``position``-th case (0-based) of a demo dataset."""
    return seed * 1000 + DEMO_DATASETS[key].seed_offset + position


def case_id(key: str, position: int) -> str:
    """The case id of the ``position``-th case (0-based) of a demo dataset, e.g. ``0061`` for BTCV."""
    spec = DEMO_DATASETS[key]
    return spec.case_format.format(spec.first_case + position)


def raw_label(phantom: Phantom, entry: DatasetEntry, case: str, classes: ClassTable) -> np.ndarray:
    """The phantom's label map as the dataset of ``entry`` records it for case ``case`` (uint8 raw values).

    Classes the case does not annotate become 0; an unannotated tumour takes its parent organ's value.
    """
    annotated = set(entry.annotated_for(case))
    lut = np.zeros(classes.max_index + 1, dtype=np.uint8)
    for rule in entry.labels:
        for name in rule.classes:
            if name in annotated:
                lut[classes[name].index] = rule.raw
    return lut[recorded_classes(phantom, annotated, classes)]


def recorded_classes(phantom: Phantom, annotated: set[str] | frozenset[str], classes: ClassTable) -> np.ndarray:
    """The phantom's universal label map with every tumour not in ``annotated`` replaced by its parent organ
    (what a dataset that does not label that tumour records: the organ, tumour included)."""
    source = phantom.label.copy()
    for tumour in classes.tumours():
        if tumour.name not in annotated:
            voxels = phantom.label == tumour.index
            source[voxels] = phantom.organ_label[voxels]
    return source


def native_label(phantom: Phantom, entry: DatasetEntry, case: str, classes: ClassTable,
                 annotated: set[str] | None = None) -> np.ndarray:
    """The phantom's label map in the raw numbering of ``entry`` for case ``case`` (uint8, or uint16 when a raw
    value exceeds 255).

    As :func:`raw_label` (``annotated`` defaults to ``entry.annotated_for(case)``), and where several raw
    values name the same class (TotalSegmentator's lung lobes, a cyst value counted as kidney) the class's
    voxels are shared among them in equal bands along z, the first value lowest, so that every value occurs.
    """
    annotated = set(entry.annotated_for(case)) if annotated is None else set(annotated)
    dtype = np.uint8 if max((r.raw for r in entry.labels), default=0) < 256 else np.uint16
    source = recorded_classes(phantom, annotated, classes)
    out = np.zeros(source.shape, dtype=dtype)
    for name in sorted(annotated & set(classes.names), key=lambda n: classes[n].index):
        values = [rule.raw for rule in entry.labels if name in rule.classes]
        voxels = np.nonzero(source == classes[name].index)
        if not values or not len(voxels[0]):
            continue
        z = voxels[2]
        band = np.zeros(len(z), dtype=np.int64)
        if len(values) > 1:
            edges = np.quantile(z, np.linspace(0, 1, len(values) + 1)[1:-1])
            band = np.searchsorted(edges, z, side="right")
        out[voxels] = np.asarray(values, dtype=dtype)[band]
    return out


def to_kits_axes(volume: Volume) -> Volume:
    """The same voxels stored as KiTS19 does: array axes (z, y, x) with axis codes ('I', 'P', 'L').

    ``volume`` must be RAS+ ordered (x, y, z). The affine changes with the array, so every voxel keeps its
    world position and reading the result back with RAS reorientation gives ``volume`` again.
    """
    nx, ny, nz = volume.shape
    new_to_old = np.array([[0, 0, -1, nx - 1], [0, -1, 0, ny - 1], [-1, 0, 0, nz - 1], [0, 0, 0, 1]], dtype=float)
    array = np.ascontiguousarray(volume.array[::-1, ::-1, ::-1].transpose(2, 1, 0))
    return Volume(array, volume.affine @ new_to_old)


def write_demo_data(out_dir: str | Path, cases_per_dataset: int = 6, external_cases: int = 4,
                    seed: int = 0) -> dict[str, Path]:
    """Write the demo datasets under ``out_dir`` and return dataset key -> dataset root folder.

    Training datasets get ``cases_per_dataset`` cases each, the external one ``external_cases``. A dataset
    folder is written under a temporary name and replaces any previous one when complete.
    """
    for name, count in (("cases_per_dataset", cases_per_dataset), ("external_cases", external_cases)):
        if not 1 <= count <= MAX_CASES:
            raise ValueError(f"{name} must be between 1 and {MAX_CASES}, got {count}")
    out_dir = Path(out_dir)
    classes = load_class_table()
    catalog = load_catalog(None, classes)
    roots = {}
    for key in DEMO_DATASETS:
        entry = catalog[key]
        count = external_cases if entry.role == "external" else cases_per_dataset
        roots[key] = _write_dataset(out_dir, entry, classes, count, seed)
    (out_dir / "README.txt").write_text(_readme(seed, roots))
    return roots


def _write_dataset(out_dir: Path, entry: DatasetEntry, classes: ClassTable, count: int, seed: int) -> Path:
    """Write one dataset into a temporary folder, then move it to ``<out_dir>/<key>``."""
    root = out_dir / entry.key
    with atomic_output(root) as partial:
        _write_cases(partial, entry, classes, count, seed)
    return root


def _write_cases(partial: Path, entry: DatasetEntry, classes: ClassTable, count: int, seed: int) -> None:
    spec = DEMO_DATASETS[entry.key]
    written = []
    for position in range(count):
        case = case_id(entry.key, position)
        phantom = make_phantom(case_seed(seed, entry.key, position), spec.shape, spec.spacing)
        image = Volume(phantom.image, phantom.affine)
        label = Volume(raw_label(phantom, entry, case, classes), phantom.affine)
        if spec.kits_axes:
            image, label = to_kits_axes(image), to_kits_axes(label)
        image_path, label_path = case_paths(entry, case)
        save_nifti(image, partial / image_path)
        save_nifti(label, partial / label_path)
        written.append((image_path, label_path))
    if entry.layout_kind == "msd":
        write_msd_json(partial / entry.layout.get("root", ""), entry, written)


def case_paths(entry: DatasetEntry, case: str) -> tuple[str, str]:
    """Image and label paths of a case relative to the dataset root, from the catalog layout."""
    if entry.layout_kind == "msd":
        task = Path(entry.layout.get("root", ""))
        return (task / "imagesTr" / f"{case}.nii.gz").as_posix(), (task / "labelsTr" / f"{case}.nii.gz").as_posix()
    return entry.layout["image"].replace("{case}", case), entry.layout["label"].replace("{case}", case)


def write_msd_json(task_root: Path, entry: DatasetEntry, written: list[tuple[str, str]]) -> None:
    """The MSD ``dataset.json``: task metadata, label names and the training list (paths relative to the task)."""
    labels = {"0": "background"} | {str(rule.raw): MSD_LABEL_NAMES.get(rule.classes[0], rule.classes[0].lower())
                                     for rule in entry.labels}
    task = entry.layout.get("root", "")
    meta = {
        "name": task_root.name.split("_", 1)[-1],
        "description": f"Synthetic phantoms in the layout of MSD {task_root.name} (made by universal demo-data)",
        "reference": "universal demo-data",
        "licence": "CC0-1.0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": labels,
        "numTraining": len(written),
        "numTest": 0,
        "training": [{"image": f"./{Path(image).relative_to(task).as_posix()}",
                      "label": f"./{Path(label).relative_to(task).as_posix()}"} for image, label in written],
        "test": [],
    }
    (task_root / "dataset.json").write_text(json.dumps(meta, indent=4) + "\n")


def _readme(seed: int, roots: dict[str, Path]) -> str:
    lines = [
        f"Synthetic abdominal CT phantoms made by `universal demo-data` (seed {seed}).",
        "Licence: CC0-1.0. No patient data: every image and label was drawn by universal.synthetic.phantom.",
        "",
        "Datasets (each in the on-disk layout and label numbering of the real dataset it imitates):",
    ]
    for key, root in roots.items():
        spec = DEMO_DATASETS[key]
        stored = ", stored with array axes (z, y, x), axis codes I, P, L as in KiTS19" if spec.kits_axes else ""
        lines.append(f"  {root.name}: RAS grid (x, y, z) {spec.shape} voxels of {spec.spacing} mm{stored}")
    return "\n".join(lines) + "\n"
