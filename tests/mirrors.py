"""Small synthetic mirrors of every catalog dataset, in its native layout, file format and label numbering.

:func:`write_mirror` draws phantom CTs (:mod:`universal.synthetic.phantom`) on a coarse grid and stores them the way the
real dataset does: MSD ``dataset.json`` folders, pattern layouts split over several folders, KiTS19's permuted
axis order, LPS-stored NIfTI, float label maps (CT-ORG), DICOM series with one DICOM mask series per structure
(3D-IRCADb), DICOM with one PNG mask per slice (CHAOS) and one NIfTI mask per structure (TotalSegmentator).
Labels follow the entry's raw numbering (:func:`universal.synthetic.demo_data.native_label`); values the dataset drops
are painted too (bone as CT-ORG's 5, whole femurs as TotalSegmentator's femur, ...) so that dropping them is
exercised; cases whose number a layout excludes (``case_numbers``) are written as decoys.

Every mirror holds ``MIRROR.json``: the grid and, per case, the phantom seed, so the ground truth can be drawn
again with :func:`mirror_phantom`. Where a dataset splits a bilateral organ by side, the two sides are kept
apart as in a real body: the phantom's lungs meet across the midline, so the voxels of a right organ that touch
its left partner are cleared (:func:`separate_sides`, a thin "pleura"), and phantoms are drawn until every
component of the pair lies on its own side of the body midline (what a component-wise side split needs to be
exact); the seed recorded is the one kept.
"""

from __future__ import annotations

import json
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from universal.core.classes import ClassTable, load_class_table
from universal.core.sides import body_midline_x_mm
from universal.core.volume import Volume, save_nifti
from universal.data.catalog import DatasetEntry
from universal.synthetic.demo_data import case_paths, native_label, to_kits_axes, write_msd_json
from universal.synthetic.phantom import Phantom, make_phantom

MIRROR_SHAPE = (64, 56, 64)
MIRROR_SPACING = (6.0, 6.0, 6.0)
MAX_DRAWS = 40
BONE_HU = 300
NIFTI_SUFFIXES = (".nii.gz", ".nii")
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class MirrorSpec:
    """How the mirror of one dataset is written.

    ``numbers``: case numbers, the i-th case going to the layout's i-th pattern group (cyclically);
    ``case_format``: the case id of a number; ``axes``: "ras", "lps" or "kits" (KiTS19's (z, y, x));
    ``label_dtype``: NIfTI label dtype; ``dropped``: raw value -> what to paint with it (a universal class,
    "bone" or the default "blob", a small cube of unlabelled body); ``decoys``: case numbers the layout must
    skip; per-structure layouts: ``mask_format`` ("nifti", "dicom" or "png"), ``structure_sources`` (mask
    name -> universal class drawn for it instead of its raw value), ``extra_structures`` (masks the catalog
    does not list, which the reader must ignore), ``missing_structures`` (masks left out of the last case),
    ``dicom_name``/``png_name`` (slice file names, ``{}`` = file index).
    """

    numbers: tuple[int, ...] = (1,)
    case_format: str = "{:04d}"
    axes: str = "ras"
    shape: tuple[int, int, int] = MIRROR_SHAPE
    spacing: tuple[float, float, float] = MIRROR_SPACING
    label_dtype: str = "uint8"
    dropped: dict[int, str] = field(default_factory=dict)
    decoys: tuple[int, ...] = ()
    mask_format: str = "nifti"
    structure_sources: dict[str, str] = field(default_factory=dict)
    extra_structures: dict[str, str] = field(default_factory=dict)
    missing_structures: tuple[str, ...] = ()
    dicom_name: str = "image_{}"
    png_name: str = "mask_{:03d}.png"


BTCV_DROPPED_BY_TCIA = {2: "Right Kidney", 8: "Aorta", 9: "Postcava", 10: "Portal Vein and Splenic Vein",
                        12: "Right Adrenal Gland", 13: "Left Adrenal Gland"}

MIRRORS: dict[str, MirrorSpec] = {
    "demo_msd_liver": MirrorSpec(numbers=(0,), case_format="liver_{:d}"),
    "demo_msd_spleen": MirrorSpec(numbers=(2,), case_format="spleen_{:d}"),
    "demo_btcv": MirrorSpec(numbers=(61,)),
    "demo_kits": MirrorSpec(numbers=(0,), case_format="{:05d}", axes="kits"),
    "demo_external": MirrorSpec(numbers=(0,), case_format="ext_{:03d}"),
    "btcv": MirrorSpec(numbers=(1, 61)),
    "tcia_pancreas_ct": MirrorSpec(numbers=(2,), axes="lps", dropped=BTCV_DROPPED_BY_TCIA),
    "chaos_ct": MirrorSpec(numbers=(1,), case_format="{:d}", mask_format="png", dicom_name="i{:04d},0000b.dcm",
                           png_name="liver_GT_{:03d}.png"),
    "lits2017": MirrorSpec(numbers=(0, 28), case_format="{:d}", axes="lps"),
    "kits19": MirrorSpec(numbers=(0,), case_format="{:05d}", axes="kits", spacing=(6.0, 6.0, 5.5)),
    "ircadb": MirrorSpec(numbers=(1, 2), case_format="{:d}", mask_format="dicom",
                         structure_sources={"livertumor*": "Liver Tumor"},
                         extra_structures={"portalvein": "Portal Vein and Splenic Vein", "bone": "bone"},
                         missing_structures=("stomach",)),
    "word": MirrorSpec(numbers=(1, 101)),
    "abdomenct_1k": MirrorSpec(numbers=(1,), case_format="{:05d}", axes="lps"),
    "amos22_ct": MirrorSpec(numbers=(1,), decoys=(507,), spacing=(5.5, 5.5, 6.5)),
    "msd_task03_liver": MirrorSpec(numbers=(0,), case_format="liver_{:d}"),
    "msd_task06_lung": MirrorSpec(numbers=(1,), case_format="lung_{:03d}"),
    "msd_task07_pancreas": MirrorSpec(numbers=(1,), case_format="pancreas_{:03d}"),
    "msd_task08_hepatic_vessel": MirrorSpec(numbers=(1,), case_format="hepaticvessel_{:03d}"),
    "msd_task09_spleen": MirrorSpec(numbers=(2,), case_format="spleen_{:d}"),
    "msd_task10_colon": MirrorSpec(numbers=(1,), case_format="colon_{:03d}"),
    "ct_org": MirrorSpec(numbers=(0,), case_format="{:d}", label_dtype="float32", dropped={5: "bone"}),
    "abdomenct_12organ": MirrorSpec(numbers=(1,)),
    "totalsegmentator": MirrorSpec(numbers=(0,), case_format="s{:04d}",
                                   dropped={75: "Left Head of Femur", 76: "Right Head of Femur", 31: "bone"}),
    "totalsegmentator_ml": MirrorSpec(numbers=(1,), case_format="s{:04d}", axes="lps",
                                      dropped={75: "Left Head of Femur", 76: "Right Head of Femur", 31: "bone"}),
}


def mirror_spec(entry: DatasetEntry) -> MirrorSpec:
    """The spec of ``entry``'s mirror (a default one for datasets this module does not know, e.g. private ones)."""
    if entry.key in MIRRORS:
        return MIRRORS[entry.key]
    if entry.layout_kind == "msd":
        return MirrorSpec(case_format=Path(entry.layout.get("root", "case")).name.split("_")[-1].lower() + "_{:d}")
    return MirrorSpec()


def write_mirror(entry: DatasetEntry, out_root: Path, cases: int, seed: int,
                 classes: ClassTable | None = None) -> Path:
    """Write ``cases`` cases of ``entry``'s dataset under ``out_root/<key>`` in its native layout; return it.

    The folder is built as ``<key>.partial`` and replaces any previous mirror when complete.
    """
    if cases < 1:
        raise ValueError(f"cases must be at least 1, got {cases}")
    classes = classes or load_class_table()
    spec = mirror_spec(entry)
    root, partial = Path(out_root) / entry.key, Path(out_root) / f"{entry.key}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    numbers = list(spec.numbers)
    while len(numbers) < cases:
        numbers.append(max(numbers) + 1)
    record: dict = {"dataset": entry.key, "seed": seed, "shape": list(spec.shape), "spacing": list(spec.spacing),
                    "note": "synthetic phantoms (tests/mirrors.py); draw a case again with "
                            "make_phantom(phantom_seed, shape, spacing)", "cases": [], "decoys": []}
    written: list[tuple[str, str]] = []
    for position, number in enumerate(numbers[:cases]):
        case = spec.case_format.format(number)
        last = position == cases - 1
        info = _write_case(entry, classes, spec, partial, case, position, seed, last, written)
        record["cases"].append(info)
    for offset, number in enumerate(spec.decoys):
        case = spec.case_format.format(number)
        info = _write_case(entry, classes, spec, partial, case, 0, seed + 7 + offset, False, written)
        record["decoys"].append(info)
    if entry.layout_kind == "msd":
        write_msd_json(partial / entry.layout.get("root", ""), entry, written)
    (partial / "MIRROR.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    partial.replace(root)
    return root


def mirror_phantom(entry: DatasetEntry, phantom_seed: int, shape: tuple[int, int, int],
                   spacing: tuple[float, float, float], classes: ClassTable | None = None) -> Phantom:
    """The phantom a mirror case was drawn from (its ground truth), from the seed recorded in ``MIRROR.json``."""
    return separate_sides(make_phantom(phantom_seed, shape, spacing), entry, classes or load_class_table())


def separate_sides(phantom: Phantom, entry: DatasetEntry, classes: ClassTable) -> Phantom:
    """The phantom with, for every organ pair ``entry`` splits by side, the right organ's voxels that touch the
    left organ (26-neighbourhood, tumours counted as their organ) set to background in both label maps."""
    label, organ = phantom.label, phantom.organ_label
    for rule in entry.labels:
        if not rule.split:
            continue
        right, left = classes[rule.classes[0]].index, classes[rule.classes[1]].index
        touching = (organ == right) & ndimage.binary_dilation(organ == left, structure=CONNECTIVITY_26)
        if touching.any():
            label, organ = np.where(touching, 0, label).astype(label.dtype), np.where(touching, 0, organ).astype(
                organ.dtype)
    return Phantom(phantom.image, label, organ, phantom.affine)


def draw_phantom(entry: DatasetEntry, classes: ClassTable, base_seed: int, shape: tuple[int, int, int],
                 spacing: tuple[float, float, float]) -> tuple[int, Phantom]:
    """The first phantom from ``base_seed`` on whose side-split organs a component-wise split is exact."""
    for attempt in range(MAX_DRAWS):
        phantom_seed = base_seed + 7919 * attempt
        phantom = mirror_phantom(entry, phantom_seed, shape, spacing, classes)
        if sides_are_separable(phantom, entry, classes):
            return phantom_seed, phantom
    raise RuntimeError(f"{entry.key}: no phantom in {MAX_DRAWS} draws from seed {base_seed} has its bilateral "
                       "organs in components of one side each")


def sides_are_separable(phantom: Phantom, entry: DatasetEntry, classes: ClassTable) -> bool:
    """True when every 26-connected component of each side-split organ pair (tumours counted as their organ)
    holds one side's organ only and its centroid lies on that side of the body midline."""
    midline = body_midline_x_mm(Volume(phantom.image, phantom.affine))
    for rule in entry.labels:
        if not rule.split:
            continue
        right, left = classes[rule.classes[0]].index, classes[rule.classes[1]].index
        region = np.isin(phantom.organ_label, [right, left])
        components, _ = ndimage.label(region, structure=CONNECTIVITY_26)
        for index, box in enumerate(ndimage.find_objects(components), start=1):
            inside = components[box] == index
            values = np.unique(phantom.organ_label[box][inside])
            if len(values) != 1:
                return False
            centre = np.argwhere(inside).mean(axis=0) + [s.start for s in box]
            on_right = float(phantom.affine[0, :3] @ centre + phantom.affine[0, 3]) > midline
            if on_right != (values[0] == right):
                return False
    return True


# ---------------------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------------------


def _write_case(entry: DatasetEntry, classes: ClassTable, spec: MirrorSpec, root: Path, case: str, position: int,
                seed: int, last: bool, written: list[tuple[str, str]]) -> dict:
    base = seed * 100_003 + zlib.crc32(entry.key.encode()) % 10_007 * 101 + position * 13
    phantom_seed, phantom = draw_phantom(entry, classes, base, spec.shape, spec.spacing)
    annotated = set(entry.annotated_for(case))
    missing = set(spec.missing_structures) if last else set()
    if entry.layout_kind == "per_structure" and missing:
        annotated -= _classes_of_structures(entry, missing)
    raw = native_label(phantom, entry, case, classes, annotated)
    raw = _paint_dropped(raw, phantom, entry, classes, spec, np.random.default_rng(phantom_seed))
    image = Volume(phantom.image, phantom.affine)
    groups = [entry.layout, *entry.layout.get("extra", ())] if entry.layout_kind != "msd" else [entry.layout]
    group = groups[position % len(groups)]
    if entry.layout_kind == "per_structure":
        _write_per_structure(entry, classes, spec, root, case, group, phantom, raw, missing)
    else:
        if entry.layout_kind == "msd":
            image_path, label_path = case_paths(entry, case)
            written.append((image_path, label_path))
        else:
            image_path, label_path = (group[k].replace("{case}", case) for k in ("image", "label"))
        label = Volume(raw.astype(spec.label_dtype), phantom.affine)
        save_nifti(_stored(image, spec.axes), root / image_path)
        save_nifti(_stored(label, spec.axes), root / label_path)
    return {"case_id": case, "phantom_seed": phantom_seed, "pattern_group": groups.index(group),
            "missing_structures": sorted(missing)}


def _classes_of_structures(entry: DatasetEntry, names: set[str]) -> set[str]:
    """The classes only the structures ``names`` name (not also named by another listed structure)."""
    structures = entry.layout["structures"]
    gone = {structures[n] for n in names} - {v for n, v in structures.items() if n not in names}
    return {c for rule in entry.labels if rule.raw in gone for c in rule.classes}


def _paint_dropped(raw: np.ndarray, phantom: Phantom, entry: DatasetEntry, classes: ClassTable, spec: MirrorSpec,
                   rng: np.random.Generator) -> np.ndarray:
    """Paint each raw value the entry drops where nothing annotated is: a class's voxels, bone or a small blob."""
    dropped = [rule.raw for rule in entry.labels if rule.dropped]
    if not dropped:
        return raw
    raw = raw.copy()
    free = (raw == 0) & (phantom.label == 0) & (phantom.image > -500)
    for value in dropped:
        source = spec.dropped.get(value, "blob")
        if source == "bone":
            where = free & (phantom.image > BONE_HU)
        elif source in classes:
            where = (phantom.organ_label == classes[source].index) & (raw == 0)
        else:
            candidates = np.argwhere(free)
            if not len(candidates):
                raise RuntimeError(f"{entry.key}: no free body voxel left to paint dropped value {value}")
            corner = candidates[rng.integers(len(candidates))]
            where = np.zeros(raw.shape, dtype=bool)
            where[tuple(slice(c, c + 2) for c in corner)] = True
            where &= free
        if not where.any():
            raise RuntimeError(f"{entry.key}: nothing to paint dropped value {value} ({source}) on")
        raw[where] = value
        free &= ~where
    return raw


def _stored(volume: Volume, axes: str) -> Volume:
    """The volume in the array order a dataset stores: RAS as drawn, LPS (x and y reversed) or KiTS19's."""
    if axes == "ras":
        return volume
    if axes == "kits":
        return to_kits_axes(volume)
    if axes == "lps":
        nx, ny, _ = volume.shape
        flip = np.array([[-1, 0, 0, nx - 1], [0, -1, 0, ny - 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
        return Volume(np.ascontiguousarray(volume.array[::-1, ::-1, :]), volume.affine @ flip)
    raise ValueError(f"unknown axis order {axes!r}")


# ---------------------------------------------------------------------------------------------------------
# Per-structure layouts: NIfTI masks, DICOM series, PNG slices
# ---------------------------------------------------------------------------------------------------------


def _write_per_structure(entry: DatasetEntry, classes: ClassTable, spec: MirrorSpec, root: Path, case: str,
                         group: dict, phantom: Phantom, raw: np.ndarray, missing: set[str]) -> None:
    image_path = root / group["image"].replace("{case}", case)
    label_folder = root / group["label"].replace("{case}", case)
    image = Volume(phantom.image, phantom.affine)
    nifti_image = image_path.name.endswith(NIFTI_SUFFIXES)
    if nifti_image:
        save_nifti(_stored(image, spec.axes), image_path)
    else:
        write_dicom_series(image, image_path, spec.dicom_name, hu=True)
    suffix = entry.layout.get("suffix", "")
    masks: dict[str, np.ndarray] = {}
    for name, value in entry.layout["structures"].items():
        if name in missing:
            continue
        source = spec.structure_sources.get(name)
        mask = raw == value if source is None else phantom.label == classes[source].index
        masks[name.replace("*", "01")] = mask
    for name, source in spec.extra_structures.items():
        masks[name] = (phantom.label == 0) & (phantom.image > BONE_HU) if source == "bone" else \
            phantom.label == classes[source].index
    label_folder.mkdir(parents=True, exist_ok=True)
    for name, mask in masks.items():
        volume = Volume(mask.astype(np.uint8), phantom.affine)
        if spec.mask_format == "nifti":
            save_nifti(_stored(volume, spec.axes), label_folder / f"{name}{suffix}")
        elif spec.mask_format == "dicom":
            write_dicom_series(Volume(volume.array * np.uint8(255), phantom.affine), label_folder / name,
                               spec.dicom_name, hu=False)
        elif spec.mask_format == "png":
            write_png_slices(volume, label_folder / name, spec.png_name)
        else:
            raise ValueError(f"unknown mask format {spec.mask_format!r}")


def _slice_pixels(volume: Volume, k: int) -> np.ndarray:
    """Slice ``k`` of a RAS volume as DICOM pixels of an axial LPS series: rows run posterior, columns left."""
    return np.ascontiguousarray(volume.array[::-1, ::-1, k].T)


def write_dicom_series(volume: Volume, folder: Path, name: str, hu: bool, patient_id: str = "MIRROR",
                       modality: str = "CT") -> None:
    """Write a RAS volume (axis-aligned affine) as an axial DICOM series, one file per slice, the first file
    the most superior slice (``name`` formats the file index). ``hu``: CT pixels stored as HU + 1024 with
    RescaleIntercept -1024; otherwise the values as they are (masks). ``patient_id`` and ``modality`` fill
    PatientID and Modality."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    nx, ny, nz = volume.shape
    sx, sy, sz = volume.spacing
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for index in range(nz):
        k = nz - 1 - index
        corner = volume.world(np.array([nx - 1, ny - 1, k], dtype=np.float64))  # RAS of pixel (0, 0)
        pixels = _slice_pixels(volume, k).astype(np.int32)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.InstanceNumber = modality, patient_id, index + 1
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [float(-corner[0]), float(-corner[1]), float(corner[2])]
        ds.PixelSpacing, ds.SliceThickness = [float(sy), float(sx)], float(sz)
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024 if hu else 0
        ds.PixelData = (pixels + 1024 if hu else pixels).astype(np.uint16).tobytes()
        ds.save_as(folder / name.format(index), enforce_file_format=True)


def write_png_slices(volume: Volume, folder: Path, name: str) -> None:
    """Write a RAS mask as CHAOS does: one 8-bit PNG per slice (255 inside), in the order of
    :func:`write_dicom_series`'s files, pixels laid out as that series' rows and columns."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    nz = volume.shape[2]
    for index in range(nz):
        pixels = (_slice_pixels(volume, nz - 1 - index) != 0).astype(np.uint8) * np.uint8(255)
        Image.fromarray(pixels).save(folder / name.format(index))
