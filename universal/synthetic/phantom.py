"""Synthetic abdominal CT phantoms: a portal-venous contrast CT from the lung bases to the femoral heads.

A phantom is drawn in *patient coordinates* (mm, RAS+: +x toward the patient's right, +y anterior, +z superior,
origin near the centre of the body) from deformed ellipsoids and tubes along smooth curves, then rasterised on
a voxel grid whose array axes are (x, y, z) in RAS+. Each case varies organ shape (random radii and smooth
bumps), size (organ volume within +-15 %), position (+-10 mm) and a global rotation about z (+-5 degrees),
applied to image and label alike because both come from the same drawing.

This module holds the public entry point (:func:`make_phantom`, :class:`Phantom`), the tumours, which replace
part of their parent organ and always lie inside it, and the finish: intensities in Hounsfield units, smoothed
slightly (partial volume) and with Gaussian noise. The grid and shapes are in :mod:`universal.synthetic.shapes`,
the tissues and organs in :mod:`universal.synthetic.anatomy`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from universal.synthetic.anatomy import (
    label_value,
    paint_body,
    paint_liver_and_upper_organs,
    paint_pelvic_bones,
    paint_pelvis_and_bowel,
    paint_retroperitoneum,
    paint_spine_and_muscles,
    paint_thorax,
    paint_vessels,
)
from universal.synthetic.shapes import Block, Bumps, Canvas, Ellipsoid, HUFunction, Waves, bbox, rotation_matrix

DEFAULT_SHAPE = (96, 80, 96)
DEFAULT_SPACING = (4.0, 4.0, 4.0)


@dataclass(frozen=True)
class Phantom:
    """One synthetic CT.

    ``image``: int16 HU; ``label``: uint8 universal label values, exclusive (a tumour voxel carries the
    tumour's value); ``organ_label``: the same map with every tumour voxel set to its parent organ (what a
    dataset that labels organs but not tumours records). Arrays are indexed (x, y, z) in RAS+ voxel order;
    ``affine`` (4x4) maps voxel indices to RAS+ mm and has the spacing (mm) on its positive diagonal.
    """

    image: np.ndarray
    label: np.ndarray
    organ_label: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along x, y, z in mm."""
        return tuple(float(v) for v in np.diag(self.affine)[:3])  # type: ignore[return-value]


def make_phantom(seed: int, shape: tuple[int, int, int] = DEFAULT_SHAPE,
                 spacing: tuple[float, float, float] = DEFAULT_SPACING) -> Phantom:
    """Draw one synthetic portal-venous abdominal CT, deterministic for a given ``seed``.

    ``shape`` is the grid size (x, y, z) in voxels and ``spacing`` the voxel size (x, y, z) in mm; the grid is
    RAS+ with world 0 at its centre. The anatomy spans about 330 x 240 mm in-plane and z from -200 to +200 mm
    (femoral heads near z = -150, lung bases above about z = +100): use at least ~360 x 280 x 380 mm of field
    of view to see all of it (the default, 96 x 80 x 96 voxels of 4 mm, does).
    """
    if len(shape) != 3 or min(shape) < 1 or len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"shape must be 3 positive sizes and spacing 3 positive mm, got {shape}, {spacing}")
    rng = np.random.default_rng(seed)
    canvas = Canvas(shape, spacing, yaw_deg=rng.uniform(-5, 5))
    dome = paint_body(canvas, rng)
    paint_spine_and_muscles(canvas, rng)
    paint_pelvic_bones(canvas, rng)
    landmarks = paint_vessels(canvas, rng)
    paint_thorax(canvas, rng, dome)
    paint_retroperitoneum(canvas, rng)
    paint_liver_and_upper_organs(canvas, rng, landmarks)
    paint_pelvis_and_bowel(canvas, rng)
    _paint_tumours(canvas, rng)
    return _finish(canvas, rng)


def _finish(canvas: Canvas, rng: np.random.Generator) -> Phantom:
    """Blur slightly (partial volume), add Gaussian noise (10-15 HU std) and store as int16 HU."""
    blurred = ndimage.gaussian_filter(canvas.hu, sigma=0.6)
    noise = rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(rng.uniform(10, 15))
    image = np.clip(np.rint(blurred + noise), -1024, 3071).astype(np.int16)
    return Phantom(image, canvas.label, canvas.organ, canvas.affine)


@dataclass(frozen=True)
class _TumourSpec:
    """A tumour type: where it grows, how often, how big (mL) and how it looks (HU of mass and core)."""

    name: str
    parents: tuple[str, ...]
    probability: float
    volume_ml: tuple[float, float]
    hu: float
    core_hu: float


TUMOURS = (
    _TumourSpec("Liver Tumor", ("Liver",), 0.85, (10, 60), 50, 25),
    _TumourSpec("Liver Tumor", ("Liver",), 0.35, (5, 20), 50, 25),
    _TumourSpec("Kidney Tumor", ("Right Kidney", "Left Kidney"), 0.85, (10, 50), 90, 45),
    _TumourSpec("Pancreas Tumor", ("Pancreas",), 0.7, (5, 20), 50, 35),
    _TumourSpec("Hepatic Vessel Tumor", ("Liver",), 0.7, (5, 25), 60, 40),
    _TumourSpec("Lung Tumor", ("Right Lung", "Left Lung"), 0.7, (5, 15), 35, 20),
    _TumourSpec("Colon Tumor", ("Colon",), 0.7, (5, 25), 70, 50),
)


def _paint_tumours(canvas: Canvas, rng: np.random.Generator) -> None:
    """Each tumour type with its probability; a bilateral parent is chosen at random."""
    for spec in TUMOURS:
        present = rng.random() < spec.probability
        parent = spec.parents[rng.integers(len(spec.parents))]
        volume = rng.uniform(*spec.volume_ml)
        hu = _tumour(rng, spec.hu, spec.core_hu)
        if present:
            _add_tumour(canvas, rng, label_value(spec.name), label_value(parent), volume, hu)


def _add_tumour(canvas: Canvas, rng: np.random.Generator, value: int, parent: int, volume_ml: float,
                hu: HUFunction) -> None:
    """A deformed ball of about ``volume_ml`` centred deep inside ``parent`` and clipped to it."""
    mask = canvas.label == parent
    sl = bbox(mask)
    if sl is None:
        return
    depth = ndimage.distance_transform_edt(np.pad(mask[sl], 1), sampling=canvas.spacing)[1:-1, 1:-1, 1:-1]
    if depth.max() < 1.5 * canvas.spacing.max():
        return
    radius = min((3 * volume_ml * 1000 / (4 * np.pi)) ** (1 / 3), 0.85 * float(depth.max()))
    candidates = np.argwhere(depth >= radius)
    index = candidates[rng.integers(len(candidates))] + [s.start for s in sl]
    aspect = rng.uniform(0.85, 1.15, 3)
    shape = Ellipsoid(canvas.to_patient(index), radius * aspect / np.prod(aspect) ** (1 / 3),
                      rotation_matrix(*rng.uniform(0, 360, 3)), Bumps.random(rng, 0.08))
    canvas.paint(shape, value, hu, canvas.within(parent), organ=False)


def _tumour(rng: np.random.Generator, base: float, core: float) -> HUFunction:
    """A hypodense mass: ``base`` HU (+-10 %), mottled, with a necrotic ``core`` HU centre."""
    base = base * rng.uniform(0.9, 1.1)
    waves = Waves(rng, 10.0)

    def hu(block: Block, level: np.ndarray) -> np.ndarray:
        return np.where(level < 0.45, core, base) + 8.0 * waves(block)

    return hu
