"""The dataset catalog: declarative entries that say where a dataset's cases are and what its labels mean.

An entry (see ``config/datasets.yaml``) maps each raw label value to a universal class, to a pair of classes
split by anatomical side, or to nothing (dropped). Nothing downstream guesses file names: :func:`find_cases`
turns an entry and a dataset folder into a validated case manifest.

Layout kinds:

- ``msd``: cases listed in a Medical Segmentation Decathlon ``dataset.json`` under ``root``;
- ``pattern``: ``image`` and ``label`` paths with ``{case}`` (one NIfTI label map per case; without ``label``
  the cases are unlabelled CTs, for an external dataset to segment); ``extra`` lists further ``{image, label}``
  pattern pairs for datasets split over several folders (e.g. training and validation);
- ``per_structure``: ``image`` (a NIfTI file or a DICOM series folder) and ``label``, the case's folder of
  one mask per structure; ``structures`` maps each mask's name (a file name without ``suffix``, or a folder of
  DICOM or PNG slices; a shell pattern such as ``livertumor*`` matches several) to a raw label value, and
  :mod:`universal.data.layouts` assembles the masks into one raw label map (later structures win where masks
  overlap). ``allow_missing: true`` accepts cases without some of the masks.

Every kind takes an optional ``case_numbers: [first, last]`` that keeps only cases whose number (the last
group of digits of the case id) lies in that range, e.g. the CT cases of a dataset that also holds MRI.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from universal.core.classes import ClassTable
from universal.core.paths import PathEscapeError, file_name_problem, join_inside, relative_path_problem
from universal.core.project import CONFIG_DIR
from universal.core.tsv import write_tsv

LAYOUT_KINDS = ("msd", "pattern", "per_structure")
ROLES = ("train", "external")
SOURCE_KINDS = ("generated", "url", "zenodo", "idc", "manual", "local")


class CatalogError(ValueError):
    """A catalog entry or a dataset folder is malformed; the message names the dataset and the problem."""


@dataclass(frozen=True)
class LabelRule:
    """What one raw label value becomes: one class, a side-split pair (right, left), or nothing."""

    raw: int
    classes: tuple[str, ...]

    @property
    def dropped(self) -> bool:
        return not self.classes

    @property
    def split(self) -> bool:
        return len(self.classes) == 2


@dataclass(frozen=True)
class AnnotatedOverride:
    """Cases whose number is at least ``cases_from`` annotate only ``annotated``."""

    cases_from: int
    annotated: tuple[str, ...]


@dataclass(frozen=True)
class DatasetEntry:
    """One catalog entry, validated against the class table."""

    key: str
    name: str
    licence: str
    citation: str
    source: dict
    layout_kind: str
    layout: dict
    labels: tuple[LabelRule, ...]
    annotated: tuple[str, ...]
    role: str
    overrides: tuple[AnnotatedOverride, ...] = field(default=())

    def annotated_for(self, case_id: str) -> tuple[str, ...]:
        """The classes a case annotates (the overrides apply by the case's number)."""
        number = _case_number(case_id)
        chosen = self.annotated
        for rule in self.overrides:
            if number is not None and number >= rule.cases_from:
                chosen = rule.annotated
        return chosen

    @property
    def labelled(self) -> bool:
        """Whether the dataset's cases come with label maps (a ``pattern`` layout may list unlabelled CTs)."""
        return self.layout_kind != "pattern" or self.layout.get("label") is not None

    def raw_values(self) -> set[int]:
        return {r.raw for r in self.labels} | {0}


@dataclass(frozen=True)
class Case:
    """One case of a dataset: its id and the absolute paths of its image and (optional) label."""

    dataset: str
    case_id: str
    image: Path
    label: Path | None


def default_catalog_path() -> Path:
    """The dataset catalog shipped with the project (``config/datasets.yaml``)."""
    return CONFIG_DIR / "datasets.yaml"


def load_catalog(path: str | Path | None, classes: ClassTable) -> dict[str, DatasetEntry]:
    """Load and validate every entry of a catalog file against the class table."""
    path = Path(path) if path is not None else default_catalog_path()
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise CatalogError(f"{path}: cannot read the dataset catalog: {err}") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("datasets"), dict):
        raise CatalogError(f"{path}: expected a mapping with a 'datasets' mapping")
    return {key: _parse_entry(path, key, body, classes) for key, body in doc["datasets"].items()}


def _parse_entry(path: Path, key: str, body: object, classes: ClassTable) -> DatasetEntry:
    where = f"{path}: dataset {key!r}"
    if not isinstance(body, dict):
        raise CatalogError(f"{where}: expected a mapping")
    for required in ("name", "licence", "source", "layout", "labels", "role"):
        if required not in body:
            raise CatalogError(f"{where}: missing required key {required!r}")
    source = body["source"]
    if not isinstance(source, dict) or source.get("kind") not in SOURCE_KINDS:
        raise CatalogError(f"{where}: source.kind must be one of {SOURCE_KINDS}")
    layout = dict(body["layout"])
    kind = layout.get("kind")
    if kind not in LAYOUT_KINDS:
        raise CatalogError(f"{where}: layout.kind must be one of {LAYOUT_KINDS}, got {kind!r}")
    if kind in ("pattern", "per_structure"):
        for group in (layout, *_extra_patterns(where, layout)):
            keys = ("image",) if kind == "pattern" and group.get("label") is None else ("image", "label")
            for k in keys:
                if str(group.get(k, "")).count("{case}") != 1:
                    raise CatalogError(f"{where}: layout.{k} must be a path containing {{case}} once")
                if problem := relative_path_problem(str(group[k])):
                    raise CatalogError(f"{where}: layout.{k} {group[k]!r} must be a path inside the dataset "
                                       f"folder; it is {problem}")
    if kind == "msd" and (problem := relative_path_problem(str(layout.get("root", "")) or ".")):
        raise CatalogError(f"{where}: layout.root {layout['root']!r} must be a folder inside the dataset folder; "
                           f"it is {problem}")
    if kind == "pattern" and body["role"] == "train" and layout.get("label") is None:
        raise CatalogError(f"{where}: a training dataset needs labels: give layout.label")
    _check_case_numbers(where, layout)
    if body["role"] not in ROLES:
        raise CatalogError(f"{where}: role must be one of {ROLES}, got {body['role']!r}")
    labels = tuple(_parse_label(where, raw, target, classes) for raw, target in body["labels"].items())
    if kind == "per_structure":
        _check_structures(where, layout, {rule.raw for rule in labels})
    mapped = [c for rule in labels for c in rule.classes]
    annotated = tuple(body.get("annotated") or dict.fromkeys(mapped))
    overrides = tuple(AnnotatedOverride(int(o["cases_from"]), tuple(o["annotated"]))
                      for o in body.get("annotated_overrides", ()))
    for names in [annotated, *(o.annotated for o in overrides)]:
        for name in names:
            if name not in classes:
                raise CatalogError(f"{where}: annotated class {name!r} is not in the class table")
            if name not in mapped:
                raise CatalogError(f"{where}: annotated class {name!r} is the class of no raw label value, so it "
                                   "would be learnt as absent from every case; map a raw value to it in labels, "
                                   "or drop it from annotated")
    return DatasetEntry(key=key, name=body["name"], licence=body["licence"], citation=body.get("citation", ""),
                        source=source, layout_kind=kind, layout=layout, labels=labels,
                        annotated=annotated, role=body["role"], overrides=overrides)


def _parse_label(where: str, raw: object, target: object, classes: ClassTable) -> LabelRule:
    if not isinstance(raw, int) or raw <= 0:
        raise CatalogError(f"{where}: raw label value {raw!r} must be a positive integer")
    if target is None:
        return LabelRule(raw, ())
    names = (target,) if isinstance(target, str) else tuple(target)
    if len(names) not in (1, 2):
        raise CatalogError(f"{where}: label {raw} must map to one class or a (right, left) pair")
    for name in names:
        if name not in classes:
            raise CatalogError(f"{where}: label {raw} maps to {name!r}, which is not in the class table")
    if len(names) == 2 and (classes[names[0]].side, classes[names[1]].side) != ("right", "left"):
        raise CatalogError(f"{where}: label {raw} split pair must be (right, left) classes, got {names}")
    return LabelRule(raw, names)


def _extra_patterns(where: str, layout: dict) -> list[dict]:
    extra = layout.get("extra") or []
    if not isinstance(extra, list) or not all(isinstance(group, dict) for group in extra):
        raise CatalogError(f"{where}: layout.extra must be a list of {{image, label}} patterns")
    return extra


def _check_case_numbers(where: str, layout: dict) -> None:
    bounds = layout.get("case_numbers")
    if bounds is None:
        return
    if (not isinstance(bounds, list) or len(bounds) != 2 or not all(isinstance(b, int) for b in bounds)
            or bounds[0] > bounds[1]):
        raise CatalogError(f"{where}: layout.case_numbers must be [first, last] integers, got {bounds!r}")


def _check_structures(where: str, layout: dict, raw_values: set[int]) -> None:
    structures = layout.get("structures")
    if not isinstance(structures, dict) or not structures:
        raise CatalogError(f"{where}: layout.structures must map mask names to raw label values")
    for name, raw in structures.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise CatalogError(f"{where}: structure name {name!r} must be a non-empty file or folder name")
        if raw not in raw_values:
            raise CatalogError(f"{where}: structure {name!r} has raw value {raw!r}, which is not in labels")
    if not isinstance(layout.get("suffix", ""), str):
        raise CatalogError(f"{where}: layout.suffix must be a string such as '.nii.gz'")


def _case_number(case_id: str) -> int | None:
    digits = re.findall(r"\d+", case_id)
    return int(digits[-1]) if digits else None


def find_cases(entry: DatasetEntry, root: str | Path) -> list[Case]:
    """List a dataset's cases from its folder, by the entry's layout. Raises if none or if files are missing."""
    root = Path(root)
    if entry.layout_kind == "msd":
        cases = _msd_cases(entry, root)
    else:
        cases = _pattern_cases(entry, root)
    bounds = entry.layout.get("case_numbers")
    if bounds is not None:
        cases = [c for c in cases if (n := _case_number(c.case_id)) is not None and bounds[0] <= n <= bounds[1]]
    if not cases:
        raise CatalogError(f"dataset {entry.key!r}: no cases found under {root} with layout {entry.layout}")
    missing = [str(p) for c in cases for p in (c.image, c.label) if p is not None and not p.exists()]
    if missing:
        raise CatalogError(f"dataset {entry.key!r}: {len(missing)} listed files are missing, e.g. {missing[:3]}")
    return cases


def _msd_cases(entry: DatasetEntry, root: Path) -> list[Case]:
    """The cases of a Medical Segmentation Decathlon ``dataset.json``: its ``training`` list of ``{image, label}``
    paths relative to the task folder, each case named by its image's file name up to the first dot."""
    task_root = root / entry.layout.get("root", "")
    meta_path = task_root / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CatalogError(f"dataset {entry.key!r}: cannot read {meta_path}: {err}") from err
    where = f"dataset {entry.key!r}: {meta_path}"
    training = meta.get("training") if isinstance(meta, dict) else None
    if not isinstance(training, list):
        raise CatalogError(f"{where}: expected a JSON object with a 'training' list of {{image, label}} entries; "
                           "is it the Decathlon's dataset.json?")
    cases: dict[str, Case] = {}
    for position, item in enumerate(training):
        if not isinstance(item, dict) or not all(isinstance(item.get(key), str) for key in ("image", "label")):
            raise CatalogError(f"{where}: training[{position}] must have 'image' and 'label' paths, got {item!r}")
        try:
            image = join_inside(task_root, item["image"], f"training[{position}].image")
            label = join_inside(task_root, item["label"], f"training[{position}].label")
        except PathEscapeError as err:
            raise CatalogError(f"{where}: {err}") from err
        case_id = image.name.split(".")[0]
        if problem := file_name_problem(case_id):
            raise CatalogError(f"{where}: training[{position}].image {item['image']!r} gives no case id: {problem}")
        if case_id in cases:
            raise CatalogError(f"{where}: training entries {cases[case_id].image} and {image} share the case id "
                               f"{case_id!r} (the file name up to its first dot), so one would overwrite the other; "
                               "rename one of the files")
        cases[case_id] = Case(entry.key, case_id, image, label)
    return sorted(cases.values(), key=lambda c: c.case_id)


def _pattern_cases(entry: DatasetEntry, root: Path) -> list[Case]:
    cases: dict[str, Case] = {}
    for group in (entry.layout, *entry.layout.get("extra", ())):
        image_pattern = group["image"]
        prefix, suffix = image_pattern.split("{case}")
        for image in sorted(root.glob(image_pattern.replace("{case}", "*"))):
            relative = image.relative_to(root).as_posix()
            case_id = relative[len(prefix): len(relative) - len(suffix)]
            if case_id in cases:
                raise CatalogError(f"dataset {entry.key!r}: case {case_id!r} is found twice: {cases[case_id].image} "
                                   f"and {image}")
            label = root / group["label"].replace("{case}", case_id) if group.get("label") is not None else None
            cases[case_id] = Case(entry.key, case_id, image, label)
    return list(cases.values())


MANIFEST_COLUMNS = ("dataset", "case_id", "image", "label")


def select_batch(cases: list[Case], batch: int, batches: int) -> list[Case]:
    """The cases of one batch: case i of the manifest belongs to batch i % batches."""
    if not 0 <= batch < batches:
        raise ValueError(f"batch {batch} is outside 0..{batches - 1}")
    return [c for i, c in enumerate(cases) if i % batches == batch]


def write_manifest(cases: list[Case], path: str | Path) -> None:
    """Write a case manifest (TSV) atomically: a temporary file renamed when complete."""
    write_tsv(path, MANIFEST_COLUMNS, ([c.dataset, c.case_id, c.image, c.label] for c in cases))


def read_manifest(path: str | Path) -> list[Case]:
    """Read a case manifest written by :func:`write_manifest`."""
    path = Path(path)
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        if tuple(reader.fieldnames or ()) != MANIFEST_COLUMNS:
            raise CatalogError(f"{path}: expected columns {MANIFEST_COLUMNS}, got {reader.fieldnames}")
        return [Case(r["dataset"], r["case_id"], Path(r["image"]), Path(r["label"]) if r["label"] else None)
                for r in reader]
