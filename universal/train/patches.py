"""Random training patches read from zarr training stores (see :mod:`universal.data.store`).

Sampling follows the original (``dataset/dataloader.py``): a dataset (one store) is drawn by its weight (default:
every dataset equally often, the original's ``--uniform_sample``), then a case uniformly within it. The patch centre
is a foreground voxel of an annotated class with probability pos/(pos+neg) and a random voxel otherwise (MONAI
RandCropByPosNegLabel, 2:1); for a case whose dataset annotates a tumour the centre is a background, organ or tumour
voxel with ratios (1, 1, 5) (MONAI RandCropByLabelClasses). Then RandRotate90 in the axial plane, optional
RandZoom, the intensity window, and RandShiftIntensity. Optionally (not in the original), a left-right mirror of
the whole patch last; a mirrored patch leaves its lateral classes unsupervised (:class:`PatchCollate`).

Only the patch region is read from zarr. Foreground voxel positions are indexed once per case and process (the
label read in full once, at most ``foreground_samples`` positions kept per label value).

Every sample is a pure function of (seed, sample index): whichever worker computes it, with any ``num_workers``,
the stream is the same, and resuming at step s means starting at sample index s × batch size
(:class:`PatchSampler`).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Flipd, MapTransform, RandRotate90d, RandShiftIntensityd, RandZoomd
from monai.utils import convert_to_tensor
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from universal.core.classes import ClassTable
from universal.core.intensity import DEFAULT_WINDOW_HU, window
from universal.core.settings import known_keys
from universal.data.store import StoredCase, list_cases, open_case
from universal.train.targets import annotated_mask

SPATIAL_KEYS = ("image", "label", "x_mm")
MIRROR_X = Flipd(SPATIAL_KEYS, spatial_axis=0)  # arrays are (channel, x, y, z)
FOREGROUND_CHOICES = ("class", "voxel")


@dataclass
class PatchConfig:
    """How patches are drawn and augmented.

    ``patch_size``: voxels (x, y, z). ``pos``/``neg``: foreground/random centre ratio. ``tumour_ratios``:
    (background, organ, tumour) centre ratios for cases whose dataset annotates a tumour. ``window_hu``: intensity
    window (low, high) in HU. ``pad_hu``: image value where a patch extends beyond the volume (label 0 there).
    ``rotate90_prob``: RandRotate90 in the axial (x, y) plane. ``shift_intensity_offset``/``_prob``:
    RandShiftIntensity on the windowed [0, 1] image. ``zoom_prob``/``zoom_range``: RandZoom (0 disables; the
    original uses 0.3 and 1.3–1.5 for some MSD datasets). ``foreground_samples``: positions kept per label value
    and case for positive centres. ``mirror_prob``: probability that a patch is mirrored left-right (image, label
    and ``x_mm`` flipped along x, after the other augmentations). The mirror shows every lateral class (one with a
    ``side`` in the class table) where its partner lies in a real CT, so a mirrored patch does not supervise those
    classes; the others, tumours above all, learn from both orientations: a kidney tumour seen in only one kidney
    of the training cases is shown in the other.
    """

    patch_size: tuple[int, int, int] = (96, 96, 96)
    pos: float = 2.0
    neg: float = 1.0
    tumour_ratios: tuple[float, float, float] = (1.0, 1.0, 5.0)
    window_hu: tuple[float, float] = DEFAULT_WINDOW_HU
    pad_hu: float = -1024.0
    rotate90_prob: float = 0.1
    shift_intensity_offset: float = 0.1
    shift_intensity_prob: float = 0.2
    zoom_prob: float = 0.0
    zoom_range: tuple[float, float] = (1.3, 1.5)
    foreground_samples: int = 2000
    foreground_choice: str = "class"
    mirror_prob: float = 0.0

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(n) for n in self.patch_size)
        self.tumour_ratios = tuple(float(r) for r in self.tumour_ratios)
        self.window_hu = tuple(float(v) for v in self.window_hu)
        self.zoom_range = tuple(float(v) for v in self.zoom_range)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive sizes, got {self.patch_size}")
        if self.rotate90_prob > 0 and self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"RandRotate90 in the axial plane needs patch x == y, got {self.patch_size}")
        if self.pos < 0 or self.neg < 0 or self.pos + self.neg <= 0:
            raise ValueError(f"pos/neg ratios must be >= 0 and not both 0, got {self.pos}/{self.neg}")
        if len(self.tumour_ratios) != 3 or min(self.tumour_ratios) < 0 or sum(self.tumour_ratios) <= 0:
            raise ValueError(f"tumour_ratios must be three ratios >= 0, got {self.tumour_ratios}")
        if not 0.0 <= self.mirror_prob <= 1.0:
            raise ValueError(f"mirror_prob must be a probability in [0, 1], got {self.mirror_prob}")
        if self.foreground_choice not in FOREGROUND_CHOICES:
            raise ValueError(f"foreground_choice must be one of {FOREGROUND_CHOICES}, got {self.foreground_choice!r}")

    def to_dict(self) -> dict:
        """JSON-able dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> PatchConfig:
        """Inverse of :meth:`to_dict`; raises ValueError naming unknown keys."""
        return cls(**known_keys(cls, data, "patch config"))


@dataclass
class CaseIndex:
    """What sampling needs to know about one case: shape, geometry and foreground positions.

    ``counts[v]``: voxels with label value v; ``positions[v]``: up to N of them as flat (C-order) voxel indices,
    int32 for volumes under 2³¹ voxels (4 bytes per position: thousands of cases stay cheap per worker).
    ``organ_values``/``tumour_values``: label values of the annotated organs/tumours.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    midline_x_mm: float
    annotated: list[str]
    counts: dict[int, int]
    positions: dict[int, np.ndarray]
    organ_values: list[int]
    tumour_values: list[int]

    @property
    def tumour_weighted(self) -> bool:
        """True when the case's dataset annotates a tumour (then centres favour tumour voxels)."""
        return bool(self.tumour_values)


def index_case(case: StoredCase, classes: ClassTable, max_positions: int, rng: np.random.Generator) -> CaseIndex:
    """Read a case's label once and index the foreground of its annotated classes."""
    if case.label is None:
        raise ValueError(f"case {case.case_id} has no label array: it cannot be used for training")
    if "midline_x_mm" not in case.attrs:
        raise ValueError(f"case {case.case_id} has no 'midline_x_mm' attribute")
    label = np.asarray(case.label[...])
    annotated = [classes[name] for name in case.annotated if name in classes]
    index_dtype = np.int32 if label.size < 2**31 else np.int64
    counts, positions = {}, {}
    for cls in annotated:
        flat = np.flatnonzero(label == cls.index)
        if flat.size:
            counts[cls.index] = int(flat.size)
            chosen = rng.choice(flat, size=min(max_positions, flat.size), replace=False)
            positions[cls.index] = np.sort(chosen).astype(index_dtype)
    return CaseIndex(shape=tuple(int(n) for n in label.shape), affine=case.affine,
                     midline_x_mm=float(case.attrs["midline_x_mm"]), annotated=case.annotated,
                     counts=counts, positions=positions,
                     organ_values=[c.index for c in annotated if not c.is_tumour],
                     tumour_values=[c.index for c in annotated if c.is_tumour])


def choose_centre(rng: np.random.Generator, index: CaseIndex, config: PatchConfig) -> np.ndarray:
    """A patch centre (3,) voxel index: a random voxel, or a foreground voxel of a group of label values.

    Groups and their ratios: (random, any annotated foreground) with (neg, pos), or for tumour-weighted cases
    (random, organs, tumours) with ``tumour_ratios``. Groups without voxels are dropped and the ratios
    renormalised, as MONAI does. Within a foreground group the class is drawn as ``config.foreground_choice``
    says, then one of its voxels.
    """
    if index.tumour_weighted:
        groups = [[], index.organ_values, index.tumour_values]
        ratios = list(config.tumour_ratios)
    else:
        groups = [[], index.organ_values + index.tumour_values]
        ratios = [config.neg, config.pos]
    counts = [sum(index.counts.get(v, 0) for v in group) for group in groups]
    weights = np.array([r if (i == 0 or counts[i] > 0) else 0.0 for i, r in enumerate(ratios)])
    if weights.sum() <= 0:
        weights[0] = 1.0
    group = int(rng.choice(len(groups), p=weights / weights.sum()))
    if group == 0:
        return rng.integers(0, index.shape)
    values = [v for v in groups[group] if index.counts.get(v, 0) > 0]
    if config.foreground_choice == "class":
        value = values[int(rng.integers(len(values)))]
    else:
        value_weights = np.array([index.counts[v] for v in values], dtype=np.float64)
        value = values[int(rng.choice(len(values), p=value_weights / value_weights.sum()))]
    candidates = index.positions[value]
    return np.array(np.unravel_index(int(candidates[int(rng.integers(len(candidates)))]), index.shape))


def patch_start(centre: np.ndarray, shape: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """First voxel (3,) of a patch around ``centre``: inside the volume where it fits, else centred (padding
    on both sides, so the start is negative)."""
    start = []
    for c, n, p in zip(centre, shape, size, strict=True):
        start.append(int(np.clip(c - p // 2, 0, n - p)) if n >= p else (n - p) // 2)
    return np.array(start, dtype=np.int64)


def read_patch(array, start: Sequence[int], size: Sequence[int], fill: float) -> np.ndarray:
    """Read ``array[start : start + size]`` (array indices, may extend beyond the volume) as numpy, filling the
    outside with ``fill``; only the overlapping region is read from the (zarr) array."""
    source = tuple(slice(max(s, 0), min(s + p, n)) for s, p, n in zip(start, size, array.shape, strict=True))
    target = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(source, start, strict=True))
    out = np.full(tuple(size), fill, dtype=array.dtype)
    out[target] = array[source]
    return out


def column_x_mm(affine: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """RAS x (mm) of each (x, y) voxel column of a patch, (X, Y) float32, taken at the patch's central z."""
    i = np.arange(start[0], start[0] + size[0], dtype=np.float64)[:, None]
    j = np.arange(start[1], start[1] + size[1], dtype=np.float64)[None, :]
    k = start[2] + size[2] / 2.0
    return (affine[0, 0] * i + affine[0, 1] * j + affine[0, 2] * k + affine[0, 3]).astype(np.float32)


class PatchDataset(Dataset):
    """Map-style dataset of random patches: item i is drawn with the random generator seeded by (seed, i).

    ``stores``: paths of zarr training stores (one per dataset); ``weights``: per-store sampling weights (default
    equal). An item is a dict: ``image`` (1, X, Y, Z) float32 windowed to [0, 1], ``label`` (X, Y, Z) int64
    exclusive universal values, ``x_mm`` (X, Y) float32 RAS x of each column (follows rotations), ``midline_x_mm``
    float, ``annotated`` list of class names, ``mirrored`` bool, ``case_id`` and ``dataset`` strings.

    Whether item i is mirrored is drawn from a generator of its own, seeded by (seed, i, 1): the patch before the
    mirror is the same whatever ``mirror_prob`` is.
    """

    def __init__(self, stores: Sequence[str | Path], classes: ClassTable, config: PatchConfig,
                 weights: Sequence[float] | None = None, seed: int = 0) -> None:
        self.stores = [Path(s) for s in stores]
        if not self.stores:
            raise ValueError("no training stores given")
        self.case_ids = [list_cases(s) for s in self.stores]
        empty = [str(s) for s, ids in zip(self.stores, self.case_ids, strict=True) if not ids]
        if empty:
            raise ValueError(f"training stores without cases: {empty}")
        self.weights = _normalised_weights(weights, len(self.stores))
        self.classes = classes
        self.config = config
        self.seed = seed
        self.transforms = _augmentations(config)
        self._reset_cache()

    def sampling_table(self) -> list[dict]:
        """The training manifest: one row per case with its dataset (store name), store, the store's normalised
        weight, the probability that a patch is drawn from the case (weight / cases of its store) and the
        classes the case annotates."""
        rows = []
        for store, ids, weight in zip(self.stores, self.case_ids, self.weights, strict=True):
            for case_id in ids:
                annotated = open_case(store, case_id).annotated
                rows.append({"dataset": store.name.removesuffix(".zarr"), "store": str(store), "case_id": case_id,
                             "store_weight": float(weight), "case_probability": float(weight) / len(ids),
                             "annotated": ",".join(annotated)})
        return rows

    def _reset_cache(self) -> None:
        self._pid = os.getpid()
        self._cases: dict[tuple[int, str], tuple[StoredCase, CaseIndex]] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cases"] = {}
        return state

    def __getitem__(self, item: int) -> dict:
        rng = np.random.default_rng([self.seed, int(item)])
        store = int(rng.choice(len(self.stores), p=self.weights))
        case_id = self.case_ids[store][int(rng.integers(len(self.case_ids[store])))]
        case, index = self._case(store, case_id)
        size = self.config.patch_size
        start = patch_start(choose_centre(rng, index, self.config), index.shape, size)
        image = read_patch(case.image, start, size, self.config.pad_hu)
        label = read_patch(case.label, start, size, 0)
        data = {"image": window(image, *self.config.window_hu)[None],
                "label": torch.from_numpy(label)[None],
                "x_mm": torch.from_numpy(column_x_mm(index.affine, start, size))[None, :, :, None]}
        data = self._augment(data, rng)
        mirrored = bool(np.random.default_rng([self.seed, int(item), 1]).random() < self.config.mirror_prob)
        if mirrored:
            data = _plain_tensors(MIRROR_X(data))
        return {"image": data["image"], "label": data["label"][0].long(), "x_mm": data["x_mm"][0, :, :, 0],
                "midline_x_mm": index.midline_x_mm, "annotated": index.annotated, "mirrored": mirrored,
                "case_id": case_id, "dataset": self.stores[store].name}

    def _case(self, store: int, case_id: str) -> tuple[StoredCase, CaseIndex]:
        """The opened case and its foreground index, cached per process (worker)."""
        if self._pid != os.getpid():
            self._reset_cache()
        key = (store, case_id)
        if key not in self._cases:
            case = open_case(self.stores[store], case_id)
            rng = np.random.default_rng([self.seed, store, zlib.crc32(case_id.encode())])
            self._cases[key] = (case, index_case(case, self.classes, self.config.foreground_samples, rng))
        return self._cases[key]

    def _augment(self, data: dict[str, Tensor], rng: np.random.Generator) -> dict[str, Tensor]:
        """Apply the MONAI random transforms, each seeded from ``rng``; returns plain tensors."""
        for transform in self.transforms:
            transform.set_random_state(seed=int(rng.integers(2**32)))
            data = transform(data)
        return _plain_tensors(data)


def _plain_tensors(data: dict) -> dict[str, Tensor]:
    """MONAI's outputs as plain tensors (no metadata tracking)."""
    return {k: convert_to_tensor(v, track_meta=False) for k, v in data.items()}


def _normalised_weights(weights: Sequence[float] | None, count: int) -> np.ndarray:
    if weights is None:
        return np.full(count, 1.0 / count)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (count,) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"need {count} non-negative store weights with a positive sum, got {list(weights)}")
    return w / w.sum()


def _augmentations(config: PatchConfig) -> list[MapTransform]:
    """RandRotate90 (axial plane), optional RandZoom, RandShiftIntensity, in the original's order."""
    keys = list(SPATIAL_KEYS)
    transforms: list[MapTransform] = [RandRotate90d(keys, prob=config.rotate90_prob, max_k=3, spatial_axes=(0, 1))]
    if config.zoom_prob > 0:
        transforms.append(RandZoomd(keys, prob=config.zoom_prob, min_zoom=config.zoom_range[0],
                                    max_zoom=config.zoom_range[1], mode=("area", "nearest", "trilinear")))
    transforms.append(RandShiftIntensityd("image", offsets=config.shift_intensity_offset,
                                          prob=config.shift_intensity_prob))
    return transforms


class PatchCollate:
    """Collate patch dicts into a batch: ``image`` (B, 1, X, Y, Z), ``label`` (B, X, Y, Z) int64, ``x_mm``
    (B, X, Y), ``midline_x_mm`` (B,), ``mask`` (B, K) bool supervised classes (the annotated ones, less the
    lateral classes on a mirrored patch), and the lists ``annotated``, ``case_id``, ``dataset``."""

    def __init__(self, classes: ClassTable) -> None:
        self.classes = classes
        self.lateral = torch.tensor([cls.side is not None for cls in classes], dtype=torch.bool)

    def __call__(self, samples: list[dict]) -> dict:
        annotated = [s["annotated"] for s in samples]
        mirrored = torch.tensor([s["mirrored"] for s in samples], dtype=torch.bool)
        mask = annotated_mask(annotated, self.classes) & ~(mirrored[:, None] & self.lateral[None, :])
        return {"image": torch.stack([s["image"] for s in samples]),
                "label": torch.stack([s["label"] for s in samples]),
                "x_mm": torch.stack([s["x_mm"] for s in samples]),
                "midline_x_mm": torch.tensor([s["midline_x_mm"] for s in samples], dtype=torch.float32),
                "mask": mask,
                "annotated": annotated,
                "case_id": [s["case_id"] for s in samples],
                "dataset": [s["dataset"] for s in samples]}


class PatchSampler(Sampler[int]):
    """Endless sample indices for one rank, batch after batch: sample j of step s on rank r is
    ``(s · world_size + r) · batch_size + j``, so every (step, rank) sees its own patches and a run resumed at
    ``start_step`` continues the same stream."""

    def __init__(self, batch_size: int, start_step: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.batch_size = batch_size
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        step = self.start_step
        while True:
            first = (step * self.world_size + self.rank) * self.batch_size
            yield from range(first, first + self.batch_size)
            step += 1


def patch_loader(dataset: PatchDataset, batch_size: int, start_step: int = 0, num_workers: int = 0,
                 rank: int = 0, world_size: int = 1) -> DataLoader:
    """An endless DataLoader of collated batches, starting at ``start_step``."""
    sampler = PatchSampler(batch_size, start_step, rank, world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=PatchCollate(dataset.classes),
                      pin_memory=torch.cuda.is_available())
