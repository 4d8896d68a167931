"""The universal class table: the one place that knows the classes, their prompts and their relations.

The table lives in ``config/classes.yaml``. Everything else asks a :class:`ClassTable` for names, label
values, prompts, colours, the parent relation (a tumour voxel also counts as its organ) and the
post-processing rule of a class.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from universal.core.project import CONFIG_DIR

KINDS = ("organ", "tumour")
SIDES = ("right", "left")
POSTPROCESS_RULES = ("none", "largest_component", "lung_pair", "largest_component_per_side", "within_parent")
# Rules that act on a right/left pair of rows: the two rows share their name but for the "Right "/"Left " prefix.
PAIR_RULES = ("lung_pair", "largest_component_per_side")
DEFAULT_PROMPT_TEMPLATE = "A computerized tomography of a {name}"
DEFAULT_NSD_TOLERANCE_MM = 1.0


class ClassTableError(ValueError):
    """The class table file is malformed; the message names the file, the row and the problem."""


@dataclass(frozen=True)
class UniversalClass:
    """One row of the class table.

    ``index`` is the label value in universal label maps (1-based; 0 is background). ``nsd_tolerance_mm`` is the
    tolerance (mm) of the class's normalised surface distance in the evaluation.
    """

    index: int
    name: str
    prompt: str
    kind: str
    colour: tuple[int, int, int]
    postprocess: str
    parents: tuple[str, ...] = ()
    side: str | None = None
    enabled: bool = True
    threshold: float | None = None
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM

    @property
    def is_tumour(self) -> bool:
        return self.kind == "tumour"


@dataclass(frozen=True)
class ClassTable:
    """The enabled classes in label order, plus a lookup by name.

    ``channel(name)`` is the model's output channel (0-based position among the enabled classes).
    """

    classes: tuple[UniversalClass, ...]
    source: str = "<memory>"
    _by_name: dict[str, UniversalClass] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {c.name: c for c in self.classes})

    def __len__(self) -> int:
        return len(self.classes)

    def __iter__(self):
        return iter(self.classes)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def prompts(self) -> list[str]:
        return [c.prompt for c in self.classes]

    @property
    def max_index(self) -> int:
        return max(c.index for c in self.classes)

    def __getitem__(self, name: str) -> UniversalClass:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"unknown class {name!r}; the class table {self.source} has: "
                           f"{', '.join(self.names)}") from None

    def channel(self, name: str) -> int:
        return self.names.index(self[name].name)

    def channels(self, names: list[str] | tuple[str, ...]) -> list[int]:
        return [self.channel(n) for n in names]

    def index_to_channel(self) -> np.ndarray:
        """Lookup array: universal label value -> output channel, -1 for background and unknown values."""
        lut = np.full(self.max_index + 1, -1, dtype=np.int64)
        for channel, c in enumerate(self.classes):
            lut[c.index] = channel
        return lut

    def organs(self) -> list[UniversalClass]:
        return [c for c in self.classes if c.kind == "organ"]

    def side_pairs(self, rule: str) -> list[tuple[str, str]]:
        """(right, left) class names of the pairs whose rows have post-processing ``rule`` (see PAIR_RULES)."""
        pairs = []
        for members in _pair_groups(self.classes, rule).values():
            by_side = {m.side: m.name for m in members}
            pairs.append((by_side["right"], by_side["left"]))
        return pairs

    def mirror_channels(self) -> list[int]:
        """For each channel, the channel of its left-right partner ("Right Kidney" <-> "Left Kidney"; a class
        without a side is its own partner): where a left-right mirrored CT puts each class."""
        by_pair = {(pair_name(c.name), c.side): i for i, c in enumerate(self.classes) if c.side is not None}
        other = {"right": "left", "left": "right"}
        return [by_pair.get((pair_name(c.name), other[c.side]), i) if c.side is not None else i
                for i, c in enumerate(self.classes)]

    def tumours(self) -> list[UniversalClass]:
        return [c for c in self.classes if c.kind == "tumour"]

    def digest(self) -> str:
        """A short hash of names, indices and prompts: identifies a class table in outputs and checkpoints."""
        payload = json.dumps([(c.index, c.name, c.prompt) for c in self.classes]).encode()
        return hashlib.sha256(payload).hexdigest()[:16]


def default_class_table_path() -> Path:
    """The class table shipped with the project (``config/classes.yaml`` beside the package)."""
    return CONFIG_DIR / "classes.yaml"


def load_class_table(path: str | Path | None = None, include: list[str] | tuple[str, ...] = ()) -> ClassTable:
    """Load and validate a class table.

    ``include`` names rows with ``enabled: false`` to switch on (e.g. ``["Kidney Cyst"]``).
    Raises :class:`ClassTableError` naming the file and row for any inconsistency.
    """
    path = Path(path) if path is not None else default_class_table_path()
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ClassTableError(f"{path}: cannot read the class table: {err}") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("classes"), list):
        raise ClassTableError(f"{path}: expected a mapping with a 'classes' list")
    template = doc.get("prompt_template", DEFAULT_PROMPT_TEMPLATE)
    if "{name}" not in template:
        raise ClassTableError(f"{path}: prompt_template {template!r} has no {{name}} placeholder")
    rows = [_parse_row(path, i, row, template) for i, row in enumerate(doc["classes"])]
    _check_unique(path, rows)
    known = {r.name for r in rows}
    for wanted in include:
        if wanted not in known:
            raise ClassTableError(f"{path}: cannot include {wanted!r}: no such row")
    chosen = tuple(r for r in rows if r.enabled or r.name in include)
    chosen_names = {r.name for r in chosen}
    for r in chosen:
        for parent in r.parents:
            if parent not in known:
                raise ClassTableError(f"{path}: class {r.name!r} names unknown parent {parent!r}")
            if parent not in chosen_names:
                raise ClassTableError(f"{path}: class {r.name!r} needs its parent {parent!r} enabled")
    chosen = tuple(sorted(chosen, key=lambda c: c.index))
    _check_pairs(path, chosen)
    return ClassTable(chosen, source=str(path))


def pair_name(name: str) -> str:
    """A bilateral class's name without its side: "Right Kidney" -> "Kidney"."""
    for prefix in ("Right ", "Left "):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _pair_groups(rows: tuple[UniversalClass, ...], rule: str) -> dict[str, list[UniversalClass]]:
    """The rows with post-processing ``rule``, grouped by :func:`pair_name`."""
    groups: dict[str, list[UniversalClass]] = {}
    for r in rows:
        if r.postprocess == rule:
            groups.setdefault(pair_name(r.name), []).append(r)
    return groups


def _check_pairs(path: Path, rows: tuple[UniversalClass, ...]) -> None:
    """Every row with a pair rule has a partner with the same rule and name on the other side."""
    for rule in PAIR_RULES:
        for name, members in _pair_groups(rows, rule).items():
            if sorted(str(m.side) for m in members) != ["left", "right"]:
                raise ClassTableError(f"{path}: postprocess {rule} needs one 'Right {name}' (side: right) and one "
                                      f"'Left {name}' (side: left) with that rule, got "
                                      f"{[(m.name, m.side) for m in members]}")


def _parse_row(path: Path, position: int, row: object, template: str) -> UniversalClass:
    where = f"{path}: classes[{position}]"
    if not isinstance(row, dict):
        raise ClassTableError(f"{where}: expected a mapping, got {row!r}")
    unknown = set(row) - {"index", "name", "prompt", "kind", "colour", "postprocess", "parents", "side", "enabled",
                          "threshold", "nsd_tolerance_mm"}
    if unknown:
        raise ClassTableError(f"{where}: unknown keys {sorted(unknown)}")
    for key in ("index", "name", "kind", "colour", "postprocess"):
        if key not in row:
            raise ClassTableError(f"{where}: missing required key {key!r}")
    name = row["name"]
    where = f"{path}: class {name!r}"
    index = row["index"]
    if not isinstance(index, int) or not 1 <= index <= 254:
        raise ClassTableError(f"{where}: index must be an integer in 1..254, got {index!r}")
    if row["kind"] not in KINDS:
        raise ClassTableError(f"{where}: kind must be one of {KINDS}, got {row['kind']!r}")
    colour = row["colour"]
    if not (isinstance(colour, list) and len(colour) == 3 and all(isinstance(v, int) and 0 <= v <= 255
                                                                  for v in colour)):
        raise ClassTableError(f"{where}: colour must be three integers 0..255, got {colour!r}")
    if row["postprocess"] not in POSTPROCESS_RULES:
        raise ClassTableError(f"{where}: postprocess must be one of {POSTPROCESS_RULES}, got {row['postprocess']!r}")
    side = row.get("side")
    if side is not None and side not in SIDES:
        raise ClassTableError(f"{where}: side must be one of {SIDES}, got {side!r}")
    parents = tuple(row.get("parents", ()))
    if row["kind"] == "tumour" and not parents:
        raise ClassTableError(f"{where}: a tumour needs at least one parent organ")
    if row["kind"] == "organ" and parents:
        raise ClassTableError(f"{where}: an organ cannot have parents")
    if row["postprocess"] == "within_parent" and not parents:
        raise ClassTableError(f"{where}: postprocess within_parent needs parents")
    threshold = row.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0.0 < threshold < 1.0):
        raise ClassTableError(f"{where}: threshold must be a probability in (0, 1), got {threshold!r}")
    tolerance = row.get("nsd_tolerance_mm", DEFAULT_NSD_TOLERANCE_MM)
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not 0 <= tolerance < float("inf"):
        raise ClassTableError(f"{where}: nsd_tolerance_mm must be a finite number of mm >= 0, got {tolerance!r}")
    prompt = row.get("prompt") or template.format(name=name)
    return UniversalClass(index=index, name=name, prompt=prompt, kind=row["kind"], colour=tuple(colour),
                          postprocess=row["postprocess"], parents=parents, side=side,
                          enabled=bool(row.get("enabled", True)),
                          threshold=None if threshold is None else float(threshold),
                          nsd_tolerance_mm=float(tolerance))


def _check_unique(path: Path, rows: list[UniversalClass]) -> None:
    for attr in ("index", "name"):
        seen: set[object] = set()
        for r in rows:
            value = getattr(r, attr)
            if value in seen:
                raise ClassTableError(f"{path}: duplicate class {attr} {value!r}")
            seen.add(value)
    for r in rows:
        for parent in r.parents:
            if parent in {x.name for x in rows if x.kind == "tumour"}:
                raise ClassTableError(f"{path}: class {r.name!r}: parent {parent!r} is a tumour, not an organ")
