"""Synthetic abdominal CT phantoms: a portal-venous contrast CT from the lung bases to the femoral heads.

A phantom is drawn in *patient coordinates* (mm, RAS+: +x toward the patient's right, +y anterior, +z superior,
origin near the centre of the body) from deformed ellipsoids and tubes along smooth curves, then rasterised on
a voxel grid whose array axes are (x, y, z) in RAS+. Each case varies organ shape (random radii and smooth
bumps), size (organ volume within +-15 %), position (+-10 mm) and a global rotation about z (+-5 degrees),
applied to image and label alike because both come from the same drawing.

Structures are painted in priority order into space that is still free, so organs abut rather than overlap:
vessels first, then solid organs (the liver wraps the gall bladder, the IVC and the portal vein), then hollow
organs, small bowel last. Tumours replace part of their parent organ and always lie inside it.

Intensities are Hounsfield units of a portal-venous CT (liver ~100, spleen ~110, kidney ~170, vessels
~150-180, fat -100, lung -850, bone 250-700), smoothed slightly (partial volume) and with Gaussian noise.
All class values come from the universal class table (``config/classes.yaml``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from statistics import NormalDist

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline

from universal.core.classes import load_class_table

DEFAULT_SHAPE = (96, 80, 96)
DEFAULT_SPACING = (4.0, 4.0, 4.0)
AIR_HU = -1000.0
FAT_HU = -100.0
VISCERAL_FAT_HU = -90.0
MUSCLE_HU = 50.0
GAS_HU = -950.0

Slices = tuple[slice, slice, slice]


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


@cache
def _class_values() -> dict[str, int]:
    return {c.name: c.index for c in load_class_table()}


def _v(name: str) -> int:
    """Universal label value of a class."""
    return _class_values()[name]


# ---------------------------------------------------------------------------------------------------------
# Geometry: the voxel grid, blocks of it in patient coordinates, and the shapes drawn on it
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Block:
    """A box of voxels (``slices`` of the grid) with the patient coordinates (mm) of their centres.

    ``px``, ``py`` have shape (nx, ny, 1) and ``pz`` (1, 1, nz): they broadcast to the block's shape.
    """

    slices: Slices
    px: np.ndarray
    py: np.ndarray
    pz: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(s.stop - s.start for s in self.slices)  # type: ignore[return-value]


class _Waves:
    """A smooth random field of unit variance: a sum of plane waves with random directions and phases."""

    def __init__(self, rng: np.random.Generator, wavelength_mm: float, count: int = 6):
        directions = rng.normal(size=(count, 3))
        lengths = wavelength_mm * rng.uniform(0.7, 1.3, count)
        self.k = directions / np.linalg.norm(directions, axis=1, keepdims=True) * (2 * np.pi / lengths)[:, None]
        self.phase = rng.uniform(0, 2 * np.pi, count)

    def __call__(self, block: _Block) -> np.ndarray:
        total = np.zeros(block.shape, dtype=np.float32)
        for (kx, ky, kz), phase in zip(self.k, self.phase, strict=True):
            total += np.cos(kx * block.px + ky * block.py + kz * block.pz + phase, dtype=np.float32)
        return total * np.float32(np.sqrt(2.0 / len(self.phase)))


@dataclass(frozen=True)
class _Bumps:
    """Smooth radial deformation of a unit sphere: ``1 + sum(a * sin(k . u + phase))`` for unit vectors u.

    :meth:`random` draws ``count`` waves of about 1.5 cycles over the sphere whose amplitudes add up to
    about 1.3 x ``amplitude`` (a fraction of the radius).
    """

    k: np.ndarray
    phase: np.ndarray
    amplitude: np.ndarray

    @classmethod
    def random(cls, rng: np.random.Generator, amplitude: float, count: int = 4) -> _Bumps:
        k = rng.normal(size=(count, 3)) * 1.6
        return cls(k, rng.uniform(0, 2 * np.pi, count), amplitude * rng.uniform(0.6, 2.0, count) / count)

    @property
    def max_factor(self) -> float:
        return 1.0 + float(np.abs(self.amplitude).sum())

    def __call__(self, ux: np.ndarray, uy: np.ndarray, uz: np.ndarray) -> np.ndarray:
        total = np.ones(np.broadcast_shapes(ux.shape, uy.shape, uz.shape), dtype=np.float32)
        for (kx, ky, kz), phase, amp in zip(self.k, self.phase, self.amplitude, strict=True):
            total += amp * np.sin(kx * ux + ky * uy + kz * uz + phase)
        return total


NO_BUMPS = _Bumps(np.zeros((0, 3)), np.zeros(0), np.zeros(0))


def _rotation(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """Rotation matrix Rz(yaw) Ry(pitch) Rx(roll), angles in degrees; columns are the local axes."""
    a, b, c = np.radians([yaw, pitch, roll])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class _Ellipsoid:
    """A deformed ellipsoid: centre and radii in mm, ``rotation`` columns = its axes in patient coordinates."""

    center: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray
    bumps: _Bumps = NO_BUMPS

    def parts(self) -> tuple[_Ellipsoid, ...]:
        return (self,)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        half = np.sqrt(((self.rotation * self.radii) ** 2).sum(axis=1)) * self.bumps.max_factor
        return self.center - half, self.center + half

    def level(self, block: _Block) -> np.ndarray:
        """Normalised radius: <= 1 inside, 1 on the (deformed) surface."""
        d = (block.px - self.center[0], block.py - self.center[1], block.pz - self.center[2])
        q = [sum(self.rotation[j, i] * d[j] for j in range(3)) / self.radii[i] for i in range(3)]
        rho = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2) + 1e-6
        return rho / self.bumps(q[0] / rho, q[1] / rho, q[2] / rho)


@dataclass(frozen=True)
class _Capsule:
    """A segment from ``a`` to ``b`` (mm) with a radius growing linearly from ``ra`` to ``rb``."""

    a: np.ndarray
    b: np.ndarray
    ra: float
    rb: float

    def parts(self) -> tuple[_Capsule, ...]:
        return (self,)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        r = max(self.ra, self.rb)
        return np.minimum(self.a, self.b) - r, np.maximum(self.a, self.b) + r

    def level(self, block: _Block) -> np.ndarray:
        """Distance to the axis over the local radius: <= 1 inside."""
        ab = self.b - self.a
        d = (block.px - self.a[0], block.py - self.a[1], block.pz - self.a[2])
        t = np.clip((d[0] * ab[0] + d[1] * ab[1] + d[2] * ab[2]) / max(float(ab @ ab), 1e-9), 0.0, 1.0)
        dist = np.sqrt((d[0] - t * ab[0]) ** 2 + (d[1] - t * ab[1]) ** 2 + (d[2] - t * ab[2]) ** 2)
        return dist / (self.ra + t * (self.rb - self.ra))


@dataclass(frozen=True)
class _Union:
    """Several primitives drawn as one structure (level = the smallest of theirs)."""

    members: tuple[_Ellipsoid | _Capsule, ...]

    def parts(self) -> tuple[_Ellipsoid | _Capsule, ...]:
        return self.members

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lows, highs = zip(*(m.bounds() for m in self.members), strict=True)
        return np.min(lows, axis=0), np.max(highs, axis=0)


Shape = _Ellipsoid | _Capsule | _Union
HUFunction = Callable[[_Block, np.ndarray], np.ndarray]
Into = Callable[[Slices], np.ndarray]


def _tube(points: Sequence[Sequence[float]], radii: Sequence[float], step_mm: float = 5.0,
          ripple: float = 0.0, ripple_mm: float = 40.0) -> _Union:
    """A tube along a smooth curve through ``points`` (mm), radius interpolated from ``radii`` (mm).

    ``ripple`` modulates the radius along the curve by +-ripple (fraction) with period ``ripple_mm``
    (colonic haustra).
    """
    pts = np.asarray(points, dtype=float)
    steps = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    keep = np.concatenate([[True], steps > 1e-3])
    pts, radii = pts[keep], np.asarray(radii, dtype=float)[keep]
    arc = np.concatenate([[0.0], np.cumsum(steps[keep[1:]])])
    t = np.linspace(0.0, arc[-1], max(2, int(np.ceil(arc[-1] / step_mm)) + 1))
    curve = CubicSpline(arc, pts, axis=0, bc_type="natural")(t)
    radius = np.interp(t, arc, radii) * (1 + ripple * np.sin(2 * np.pi * t / ripple_mm))
    return _Union(tuple(_Capsule(curve[i], curve[i + 1], float(radius[i]), float(radius[i + 1]))
                        for i in range(len(t) - 1)))


class _Canvas:
    """The voxel grid being painted: HU, exclusive labels, organ labels and an occupancy mask.

    Grid arrays are (x, y, z) in RAS+. World (RAS+ mm) = patient coordinates rotated by ``yaw`` about z;
    voxel (0, 0, 0) sits at ``origin`` so that world 0 is the centre of the grid.
    """

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float], yaw_deg: float):
        self.shape = tuple(int(n) for n in shape)
        self.spacing = np.asarray(spacing, dtype=float)
        self.origin = -(np.asarray(self.shape) - 1) / 2 * self.spacing
        self.yaw = np.radians(yaw_deg)
        self.hu = np.full(self.shape, AIR_HU, dtype=np.float32)
        self.label = np.zeros(self.shape, dtype=np.uint8)
        self.organ = np.zeros(self.shape, dtype=np.uint8)
        self.occupied = np.ones(self.shape, dtype=bool)
        self.inner = np.zeros(self.shape, dtype=bool)
        self.thorax = np.zeros(self.shape, dtype=bool)

    @property
    def affine(self) -> np.ndarray:
        affine = np.diag([*self.spacing, 1.0])
        affine[:3, 3] = self.origin
        return affine

    @property
    def abdomen(self) -> np.ndarray:
        return self.inner & ~self.thorax

    def to_patient(self, index: np.ndarray) -> np.ndarray:
        """Patient coordinates (mm) of voxel indices (..., 3)."""
        w = self.origin + np.asarray(index) * self.spacing
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        return np.stack([c * w[..., 0] + s * w[..., 1], -s * w[..., 0] + c * w[..., 1], w[..., 2]], axis=-1)

    def block(self, low: np.ndarray, high: np.ndarray) -> _Block | None:
        """The voxels whose centres lie in the patient-coordinate box [low, high] (mm), or None."""
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        (x0, y0, z0), (x1, y1, z1) = (float(v) for v in low), (float(v) for v in high)
        wx = (c * x0 - s * y0, c * x0 - s * y1, c * x1 - s * y0, c * x1 - s * y1)
        wy = (s * x0 + c * y0, s * x0 + c * y1, s * x1 + c * y0, s * x1 + c * y1)
        slices = []
        for axis, (w0, w1) in enumerate(((min(wx), max(wx)), (min(wy), max(wy)), (z0, z1))):
            o, d, n = self.origin[axis], self.spacing[axis], self.shape[axis]
            start, stop = max(0, math.ceil((w0 - o) / d)), min(n, math.floor((w1 - o) / d) + 1)
            if stop <= start:
                return None
            slices.append(slice(start, stop))
        return self.block_at(tuple(slices))  # type: ignore[arg-type]

    def block_at(self, slices: Slices) -> _Block:
        """The block of the given grid slices."""
        w = [self.origin[i] + self.spacing[i] * np.arange(slices[i].start, slices[i].stop) for i in range(3)]
        wx, wy = w[0][:, None, None], w[1][None, :, None]
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        return _Block(slices, c * wx + s * wy, -s * wx + c * wy, w[2][None, None, :])

    def full_block(self) -> _Block:
        return self.block_at(tuple(slice(0, n) for n in self.shape))  # type: ignore[arg-type]

    def rasterize(self, shape: Shape) -> tuple[_Block, np.ndarray] | None:
        """The block covering a shape and its level there (<= 1 inside), or None when off the grid."""
        block = self.block(*shape.bounds())
        if block is None:
            return None
        level = np.full(block.shape, np.inf, dtype=np.float32)
        for part in shape.parts():
            sub = self.block(*part.bounds())
            if sub is None:
                continue
            rel = tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(sub.slices, block.slices,
                                                                                  strict=True))
            np.minimum(level[rel], part.level(sub), out=level[rel])
        return block, level

    def paint(self, shape: Shape, value: int, hu: HUFunction, into: Into, organ: bool = True) -> None:
        """Paint a shape where ``into`` allows: HU from ``hu(block, level)``, label ``value``.

        ``organ=False`` (tumours) leaves the organ label map as it is.
        """
        hit = self.rasterize(shape)
        if hit is None:
            return
        block, level = hit
        mask = (level <= 1.0) & into(block.slices)
        if mask.any():
            values = np.broadcast_to(hu(block, level), block.shape)
            self.put(block.slices, mask, values, value, organ)

    def put(self, slices: Slices, mask: np.ndarray, values: np.ndarray, value: int = 0, organ: bool = True) -> None:
        """Write HU ``values`` and label ``value`` at ``mask`` within ``slices``; mark those voxels taken."""
        self.hu[slices][mask] = values[mask]
        self.label[slices][mask] = value
        if organ:
            self.organ[slices][mask] = value
        self.occupied[slices][mask] = True

    def free_in(self, region: np.ndarray) -> Into:
        """Voxels of ``region`` (a grid mask) that nothing has taken yet."""
        return lambda sl: region[sl] & ~self.occupied[sl]

    def within(self, *values: int) -> Into:
        """Voxels currently labelled with one of ``values``."""
        return lambda sl: np.isin(self.label[sl], values)

    def in_body(self) -> Into:
        """Any voxel inside the skin (bones and muscles may replace fat and wall)."""
        return lambda sl: self.hu[sl] > AIR_HU


# ---------------------------------------------------------------------------------------------------------
# Intensity models
# ---------------------------------------------------------------------------------------------------------


def _tissue(rng: np.random.Generator, base: float, rim_hu: float | None = None, rim: float = 0.2,
            texture: float = 4.0, wavelength_mm: float = 30.0) -> HUFunction:
    """A solid tissue: ``base`` HU (+-5 % per case) with a smooth texture of ``texture`` HU (std) and an
    optional rim (wall, cortex) of ``rim_hu`` in the outer ``rim`` fraction of the normalised radius."""
    base = base * rng.uniform(0.95, 1.05)
    waves = _Waves(rng, wavelength_mm)

    def hu(block: _Block, level: np.ndarray) -> np.ndarray:
        field = texture * waves(block)
        if rim_hu is None:
            return base + field
        return np.where(level > 1 - rim, rim_hu + 0.5 * field, base + field)

    return hu


def _lumen(rng: np.random.Generator, content: float, wall: float, gas_fraction: float,
           wall_rim: float = 0.25, wavelength_mm: float = 35.0) -> HUFunction:
    """A hollow organ: ``content`` HU with gas pockets (about ``gas_fraction`` of the lumen) and a ``wall``."""
    waves = _Waves(rng, wavelength_mm)
    texture = _Waves(rng, 12.0)
    threshold = NormalDist().inv_cdf(1 - gas_fraction) if gas_fraction > 0 else np.inf

    def hu(block: _Block, level: np.ndarray) -> np.ndarray:
        field = waves(block)
        out = np.where(field > threshold, GAS_HU, content + 12.0 * texture(block))
        return np.where(level > 1 - wall_rim, wall, out)

    return hu


def _bone(cancellous: float = 250.0, cortical: float = 650.0, rim: float = 0.3) -> HUFunction:
    """Bone: cancellous interior with a cortical shell in the outer ``rim`` of the normalised radius."""

    def hu(block: _Block, level: np.ndarray) -> np.ndarray:
        return np.where(level > 1 - rim, cortical, cancellous).astype(np.float32)

    return hu


def _tumour(rng: np.random.Generator, base: float, core: float) -> HUFunction:
    """A hypodense mass: ``base`` HU (+-10 %), mottled, with a necrotic ``core`` HU centre."""
    base = base * rng.uniform(0.9, 1.1)
    waves = _Waves(rng, 10.0)

    def hu(block: _Block, level: np.ndarray) -> np.ndarray:
        return np.where(level < 0.45, core, base) + 8.0 * waves(block)

    return hu


# ---------------------------------------------------------------------------------------------------------
# Anatomy
# ---------------------------------------------------------------------------------------------------------


def _offset(rng: np.random.Generator, sd_mm: float = 4.0, limit_mm: float = 10.0) -> np.ndarray:
    """A random displacement (mm), each component within +-``limit_mm``."""
    return np.clip(rng.normal(0.0, sd_mm, 3), -limit_mm, limit_mm)


def _size(rng: np.random.Generator) -> float:
    """A linear scale factor that changes a volume by -13 % to +15 %."""
    return float(rng.uniform(0.87, 1.15) ** (1 / 3))


def _organ(rng: np.random.Generator, center: Sequence[float], radii: Sequence[float],
           rotation: np.ndarray | None = None, bumps: float = 0.1) -> _Ellipsoid:
    """A per-case variant of a nominal ellipsoid: shifted, resized, reshaped (radii +-8 %) and deformed."""
    aspect = rng.uniform(0.92, 1.08, 3)
    radii = np.asarray(radii, dtype=float) * _size(rng) * aspect / np.prod(aspect) ** (1 / 3)
    return _Ellipsoid(np.asarray(center, dtype=float) + _offset(rng), radii,
                      np.eye(3) if rotation is None else rotation, _Bumps.random(rng, bumps))


def _moved(rng: np.random.Generator, points: Sequence[Sequence[float]], jitter_mm: float = 3.0) -> np.ndarray:
    """Control points shifted together (+-10 mm) and each by a little (``jitter_mm`` std)."""
    pts = np.asarray(points, dtype=float)
    return pts + _offset(rng) + rng.normal(0.0, jitter_mm, pts.shape)


def _paint_body(canvas: _Canvas, rng: np.random.Generator) -> float:
    """Skin outline, subcutaneous fat, muscle wall, ribs, the diaphragm and the inner (visceral) cavity.

    Returns the height (z, mm) of the right diaphragmatic dome.
    """
    b = canvas.full_block()
    half_x, half_y = rng.uniform(152, 170), rng.uniform(112, 124)
    fat, muscle = rng.uniform(12, 26), rng.uniform(8, 12)
    taper = (1 + 0.03 * np.sin(b.pz / 90 + rng.uniform(0, 2 * np.pi))).astype(np.float32)
    y_scale = np.where(b.py < 0, 0.94 * half_y, half_y)
    e = (np.abs(b.px / half_x) ** 2.4 + np.abs(b.py / y_scale) ** 2.4) ** (1 / 2.4) / taper
    mean_radius = (half_x + half_y) / 2
    fat_in, wall_in = 1 - fat / mean_radius, 1 - (fat + muscle) / mean_radius
    canvas.hu[:] = np.select([e > 1, e > fat_in, e > wall_in], [AIR_HU, FAT_HU, MUSCLE_HU], VISCERAL_FAT_HU)
    canvas.inner[:] = e <= wall_in
    canvas.occupied[:] = ~canvas.inner
    right_apex = 148 + rng.uniform(-8, 8)
    dome = _diaphragm_height(b, right_apex, right_apex - rng.uniform(6, 14))
    canvas.thorax[:] = canvas.inner & (b.pz > dome)
    diaphragm = canvas.inner & (np.abs(b.pz - dome) < 3.5)
    canvas.put(b.slices, diaphragm, np.full(canvas.shape, MUSCLE_HU - 10, dtype=np.float32))
    ribs = (e > wall_in - 0.05) & (e <= fat_in) & (b.pz + 0.35 * b.py > 0)
    ribs &= np.sin(2 * np.pi * (b.pz + 0.3 * b.py) / 30.0) > 0.45
    canvas.put(b.slices, ribs, np.full(canvas.shape, 450.0, dtype=np.float32))
    return right_apex


def _diaphragm_height(b: _Block, right_apex: float, left_apex: float) -> np.ndarray:
    """Height (z, mm) of the diaphragm at each (x, y): two domes meeting lower at the midline."""
    right = right_apex - 55 * (((b.px - 60) / 100) ** 2 + (b.py / 110) ** 2)
    left = left_apex - 55 * (((b.px + 60) / 100) ** 2 + ((b.py + 5) / 110) ** 2)
    return np.maximum(right, left)


def _paint_spine_and_muscles(canvas: _Canvas, rng: np.random.Generator) -> None:
    """Paraspinal and psoas muscles, the lumbar and lower thoracic spine (vertebrae, discs, canal), sacrum."""
    body = canvas.in_body()
    muscle = _tissue(rng, MUSCLE_HU, texture=5.0)
    for side in (1, -1):
        canvas.paint(_tube([[35 * side, -80, 200], [36 * side, -82, 0], [32 * side, -85, -90]], [22, 22, 14]),
                     0, muscle, body)
        canvas.paint(_tube(_moved(rng, [[30 * side, -38, 75], [40 * side, -35, 0], [55 * side, -25, -60],
                                        [75 * side, -5, -125]], 1.0), [7, 15, 21, 17]), 0, muscle, body)
    block = canvas.block(np.array([-60.0, -115.0, -75.0]), np.array([60.0, -10.0, 400.0]))
    if block is not None:
        _paint_vertebrae(canvas, block, rng.uniform(0, 34))
    sacrum = _Union((*_tube([[0, -45, -55], [0, -70, -120], [0, -90, -170]], [18, 14, 8]).members,
                     *_tube([[30, -48, -65], [14, -75, -140]], [14, 8]).members,
                     *_tube([[-30, -48, -65], [-14, -75, -140]], [14, 8]).members))
    canvas.paint(sacrum, 0, _bone(), body)


def _paint_vertebrae(canvas: _Canvas, b: _Block, phase_mm: float) -> None:
    """Vertebral bodies (centre y = -35 mm) with discs every 34 mm, arches, processes and the spinal canal."""
    level_mm = np.mod(b.pz - phase_mm, 34.0)
    disc = level_mm < 8.0
    vb = np.sqrt((b.px / 21) ** 2 + ((b.py + 35) / 17) ** 2)
    canal = np.sqrt((b.px / 9) ** 2 + ((b.py + 61) / 8) ** 2)
    arch = (canal > 1) & (np.sqrt((b.px / 16) ** 2 + ((b.py + 63) / 14) ** 2) <= 1)
    spinous = (np.abs(b.px) < 4) & (b.py < -70) & (b.py > -103) & ~disc
    transverse = (np.abs(b.px) < 45) & (np.abs(b.py + 58) < 5) & (level_mm > 12) & (level_mm < 24)
    above_sacrum = b.pz > -60
    inside_vb = vb <= 1
    hu = np.select([inside_vb & disc, inside_vb & (vb > 0.8), inside_vb, canal <= 1], [90.0, 650.0, 250.0, 20.0],
                   550.0).astype(np.float32)
    spine = (inside_vb | (canal <= 1) | arch | spinous | transverse) & above_sacrum
    canvas.put(b.slices, np.broadcast_to(spine, b.shape), np.broadcast_to(hu, b.shape))


def _paint_pelvic_bones(canvas: _Canvas, rng: np.random.Generator) -> None:
    """Iliac wings, pubic and ischial rami, acetabula, femoral necks and shafts (label 0), femoral heads."""
    body = canvas.in_body()
    bone = _bone()
    for side, name in ((1, "Right Head of Femur"), (-1, "Left Head of Femur")):
        mirror = np.array([side, 1, 1])
        wing = _Union((*_tube(mirror * [[40, -68, -60], [85, -55, -40], [122, -22, -50], [118, 0, -85],
                                         [100, -5, -125]], [9, 8, 8, 9, 11]).members,
                       *_tube(mirror * [[55, -62, -50], [108, -30, -62], [95, -12, -112]], [7, 7, 9]).members))
        canvas.paint(wing, 0, bone, body)
        canvas.paint(_tube(mirror * [[95, 0, -150], [70, 35, -165], [18, 52, -168]], [10, 9, 9]), 0, bone, body)
        canvas.paint(_tube(mirror * [[85, -25, -160], [72, -32, -195]], [12, 10]), 0, bone, body)
        head = _organ(rng, mirror * [92, -5, -150], [23, 23, 23], bumps=0.02)
        canvas.paint(_Ellipsoid(head.center + mirror * [-7, 0, 5], np.full(3, 31.0), np.eye(3)), 0, bone, body)
        neck = _tube([head.center, head.center + mirror * [28, 8, -32], head.center + mirror * [34, 14, -120]],
                     [14, 14, 13])
        canvas.paint(neck, 0, bone, body)
        canvas.paint(_Ellipsoid(head.center + mirror * [36, -2, -26], np.full(3, 17.0), np.eye(3)), 0, bone, body)
        canvas.paint(head, _v(name), _bone(300.0, 700.0, 0.15), body)


def _paint_vessels(canvas: _Canvas, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Aorta with celiac trunk, SMA and iliac arteries; IVC with iliac veins; portal, splenic and SMV veins.

    Returns landmarks (patient mm) the liver's vessels start from: ``porta`` (hepatis) and ``ivc_top``.
    """
    cavity = canvas.free_in(canvas.inner)
    artery, vein, portal = _tissue(rng, 175, texture=3), _tissue(rng, 150, texture=3), _tissue(rng, 170, texture=3)
    aorta = _moved(rng, [[-20, -10, 240], [-17, -6, 120], [-14, -3, 40], [-10, -3, -50]], 1.0)
    canvas.paint(_tube(aorta, [12, 12, 11, 9]), _v("Aorta"), artery, cavity)
    for side in (1, -1):
        canvas.paint(_tube([aorta[-1], [45 * side, -8, -100], [70 * side, 2, -140]], [6, 6, 5]), 0, artery, cavity)
    celiac = _point_at_height(aorta, 85.0 + rng.uniform(-5, 5)) + np.array([0, 8, 0])
    canvas.paint(_tube(celiac + np.array([[0, 0, 0], [2, 12, 2], [4, 22, 4]]), [3.8, 3.6, 3.4]), _v("Celiac Trunk"),
                 artery, cavity)
    sma = _point_at_height(aorta, 70.0) + np.array([0, 8, 0])
    canvas.paint(_tube(sma + np.array([[0, 0, 0], [8, 20, -25], [12, 30, -110]]), [4.5, 4.5, 3.5]), 0, artery, cavity)
    ivc = _moved(rng, [[22, -5, -55], [24, -2, 60], [24, -6, 120], [18, 2, 240]], 1.0)
    canvas.paint(_tube(ivc, [10, 11, 12, 13]), _v("Postcava"), vein, cavity)
    for side in (1, -1):
        canvas.paint(_tube([ivc[0], [55 * side, -16, -105], [72 * side, -6, -140]], [8, 8, 7]), 0, vein, cavity)
    confluence = np.array([5.0, 24.0, 45.0]) + _offset(rng, 2.0, 5.0)
    porta = np.array([45.0, 15.0, 85.0]) + _offset(rng, 3.0, 8.0)
    canvas.paint(_tube([confluence, (confluence + porta) / 2 + [0, 3, 0], porta], [7.5, 7.5, 7]),
                 _v("Portal Vein and Splenic Vein"), portal, cavity)
    splenic = _moved(rng, [[-28, 8, 55], [-58, -8, 65], [-80, -20, 75]], 1.5)
    canvas.paint(_tube([confluence, *splenic], [5, 5, 5, 5.5]), _v("Portal Vein and Splenic Vein"), portal, cavity)
    canvas.paint(_tube([[12, 36, -45], [9, 32, 10], confluence], [5, 5.5, 6]), 0, portal, cavity)
    return {"porta": porta, "ivc_top": _point_at_height(ivc, 140.0)}


def _point_at_height(points: np.ndarray, z: float) -> np.ndarray:
    """The point (mm) at height ``z`` of a roughly vertical polyline through ``points`` (K, 3)."""
    order = np.argsort(points[:, 2])
    return np.array([np.interp(z, points[order, 2], points[order, i]) for i in range(3)])


def _paint_thorax(canvas: _Canvas, rng: np.random.Generator, dome_mm: float) -> None:
    """Esophagus, heart, mediastinal fat and both lung bases (with vessel texture) above the diaphragm."""
    esophagus = _moved(rng, [[-5, 2, 240], [-10, 8, 165], [-25, 18, 142], [-40, 24, 133]], 1.0)
    canvas.paint(_tube(esophagus, [9, 9, 9, 10]), _v("Esophagus"), _lumen(rng, 40, 55, 0.12, 0.4),
                 canvas.free_in(canvas.inner))
    heart = _organ(rng, [-25, 38, dome_mm + 45], [72, 55, 60], _rotation(yaw=30), 0.05)
    canvas.paint(heart, 0, _tissue(rng, 150, rim_hu=110, rim=0.2), canvas.free_in(canvas.thorax))
    b = canvas.block(np.array([-33.0, -30.0, 0.0]), np.array([23.0, 30.0, 400.0]))
    if b is not None:
        mediastinum = canvas.thorax[b.slices] & ~canvas.occupied[b.slices]
        canvas.put(b.slices, mediastinum, np.full(b.shape, -80.0, dtype=np.float32))
    sl = _bbox(canvas.thorax & ~canvas.occupied)
    if sl is None:
        return
    b = canvas.block_at(sl)
    free = canvas.thorax[sl] & ~canvas.occupied[sl]
    hu = np.where(_Waves(rng, 9.0, 8)(b) > 1.6, 20.0, -860.0 + 20.0 * _Waves(rng, 40.0)(b))
    right = free & (b.px > 0)
    canvas.put(sl, right, hu, _v("Right Lung"))
    canvas.put(sl, free & ~right, hu, _v("Left Lung"))


def _paint_retroperitoneum(canvas: _Canvas, rng: np.random.Generator) -> None:
    """Kidneys (the right one lower), adrenal glands above them, pancreas and duodenum."""
    free = canvas.free_in(canvas.abdomen)
    for side, name, z in ((1, "Right Kidney", 8), (-1, "Left Kidney", 24)):
        rotation = _rotation(yaw=-25 * side, pitch=-15 * side, roll=10)
        kidney = _organ(rng, [76 * side, -30, z], [27.5, 25, 57], rotation, 0.06)
        canvas.paint(kidney, _v(name), _tissue(rng, 170, rim_hu=185, rim=0.3), free)
    for side, name, center in ((1, "Right Adrenal Gland", [38, -27, 88]), (-1, "Left Adrenal Gland", [-40, -20, 84])):
        adrenal = _organ(rng, center, [5, 11, 15], _rotation(yaw=30 * side, roll=15), 0.1)
        canvas.paint(adrenal, _v(name), _tissue(rng, 60), free)
    pancreas = _moved(rng, [[30, 14, 18], [28, 22, 38], [5, 34, 50], [-30, 22, 58], [-60, 2, 66], [-80, -14, 72]])
    canvas.paint(_tube(pancreas, [16, 17, 12, 12, 11, 10]), _v("Pancreas"),
                 _tissue(rng, 90, texture=8.0, wavelength_mm=9.0), free)
    duodenum = _moved(rng, [[12, 46, 68], [35, 32, 66], [50, 16, 55], [54, 12, 25], [48, 12, 0], [25, 14, -10],
                            [-5, 16, -12], [-25, 10, 0], [-32, 6, 16]], 2.0)
    canvas.paint(_tube(duodenum, [10, 12, 12, 12, 12, 11, 11, 11, 10]), _v("Duodenum"),
                 _lumen(rng, 30, 90, 0.15), free)


def _paint_liver_and_upper_organs(canvas: _Canvas, rng: np.random.Generator, landmarks: dict[str, np.ndarray]) -> None:
    """Gall bladder, liver (two lobes wrapping the IVC and portal vein) with its vessels, spleen, stomach."""
    free = canvas.free_in(canvas.abdomen)
    gall = _organ(rng, [50, 48, 52], [15, 15, 33], _rotation(yaw=20, pitch=10, roll=30), 0.06)
    canvas.paint(gall, _v("Gall Bladder"), _tissue(rng, 10, rim_hu=40, rim=0.12, texture=2.0), free)
    right_lobe = _organ(rng, [58, 10, 90], [80, 86, 70], _rotation(yaw=rng.uniform(-10, 10)), 0.08)
    left_lobe = _organ(rng, [-18, 42, 104], [64, 32, 38], _rotation(yaw=-15), 0.1)
    canvas.paint(_Union((right_lobe, left_lobe)), _v("Liver"), _tissue(rng, 100), free)
    _paint_hepatic_vessels(canvas, rng, landmarks)
    spleen = _organ(rng, [-85, -35, 92], [24, 52, 42], _rotation(yaw=35), 0.08)
    canvas.paint(spleen, _v("Spleen"), _tissue(rng, 110), free)
    stomach = _moved(rng, [[-40, 24, 133], [-60, 20, 128], [-55, 45, 100], [-35, 60, 78], [-5, 60, 70],
                           [12, 46, 68]], 2.0)
    canvas.paint(_tube(stomach, [14, 34, 33, 27, 18, 11]), _v("Stomach"), _stomach_hu(rng), free)


def _paint_hepatic_vessels(canvas: _Canvas, rng: np.random.Generator, landmarks: dict[str, np.ndarray]) -> None:
    """Hepatic veins from the IVC and portal branches from the porta hepatis, inside the liver only."""
    vessel = _tissue(rng, 165, texture=3)
    liver = canvas.within(_v("Liver"))
    top, porta = landmarks["ivc_top"], landmarks["porta"]
    for end in ([100, -10, 125], [60, 45, 120], [-10, 50, 125]):
        canvas.paint(_tube([top, _moved(rng, [end], 4.0)[0]], [5.0, 3.2]), _v("Hepatic Vessel"), vessel, liver)
    for path in ([[85, 2, 92], [112, 10, 70]], [[15, 38, 100], [-30, 45, 105]], [[70, 30, 110], [95, 45, 135]]):
        points = [porta, *_moved(rng, path, 4.0)]
        canvas.paint(_tube(points, [5.0, 4.0, 3.2]), _v("Hepatic Vessel"), vessel, liver)


def _stomach_hu(rng: np.random.Generator) -> HUFunction:
    """Gastric fluid (~25 HU) with an enhancing wall and gas collected anteriorly (the patient lies supine)."""
    fluid = _lumen(rng, 25, 100, 0.05, 0.15)
    gas_level = 55 + rng.uniform(-10, 15)

    def hu(block: _Block, level: np.ndarray) -> np.ndarray:
        return np.where((block.py > gas_level) & (level <= 0.85), GAS_HU, fluid(block, level))

    return hu


def _paint_pelvis_and_bowel(canvas: _Canvas, rng: np.random.Generator) -> None:
    """Bladder, prostate, rectum, the colon frame (with haustra and stool) and the small bowel loops."""
    free = canvas.free_in(canvas.abdomen)
    bladder = _organ(rng, [0, 45, -122], [42, 32, 28], bumps=0.06)
    canvas.paint(bladder, _v("Bladder"), _tissue(rng, 10, rim_hu=35, rim=0.1, texture=2.0), free)
    prostate = _organ(rng, [0, 22, -167], [20, 15, 17], bumps=0.06)
    canvas.paint(prostate, _v("Prostate"), _tissue(rng, 40, texture=6.0, wavelength_mm=10.0), free)
    rectum = _moved(rng, [[0, -30, -116], [0, -40, -140], [0, -38, -165], [0, -25, -192]], 2.0)
    canvas.paint(_tube(rectum, [16, 19, 16, 12]), _v("Rectum"), _lumen(rng, 20, 60, 0.2), free)
    colon = _moved(rng, [[80, 15, -75], [88, 15, -20], [88, 15, 25], [72, 30, 42], [40, 58, 25], [0, 66, 15],
                         [-40, 60, 25], [-80, 25, 55], [-95, 5, 20], [-95, 5, -45], [-75, 18, -85], [-35, 25, -100],
                         [-5, 10, -110], [0, -30, -116]], 3.0)
    canvas.paint(_tube(colon, [26, 24, 22, 22, 20, 18, 18, 18, 18, 18, 17, 16, 15, 15], ripple=0.1),
                 _v("Colon"), _lumen(rng, 15, 70, 0.3, 0.2), free)
    path = _small_bowel_path(rng, start=np.array([-32.0, 6.0, 16.0]), end=np.array([75.0, 12.0, -70.0]))
    canvas.paint(_tube(path, np.full(len(path), 13.0) * rng.uniform(0.9, 1.1, len(path))), _v("Intestine"),
                 _lumen(rng, 30, 110, 0.1, 0.25), free)


def _small_bowel_path(rng: np.random.Generator, start: np.ndarray, end: np.ndarray, count: int = 28) -> np.ndarray:
    """Control points of the small bowel: random points in the mid/lower abdomen chained nearest-first."""
    direction = rng.normal(size=(count, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    points = np.array([5.0, 28.0, -45.0]) + direction * rng.random((count, 1)) ** (1 / 3) * [75, 35, 55]
    path = [start]
    remaining = list(points)
    while remaining:
        nearest = int(np.argmin([np.linalg.norm(p - path[-1]) for p in remaining]))
        path.append(remaining.pop(nearest))
    return np.array([*path, end])


# ---------------------------------------------------------------------------------------------------------
# Tumours
# ---------------------------------------------------------------------------------------------------------


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


def _paint_tumours(canvas: _Canvas, rng: np.random.Generator) -> None:
    """Each tumour type with its probability; a bilateral parent is chosen at random."""
    for spec in TUMOURS:
        present = rng.random() < spec.probability
        parent = spec.parents[rng.integers(len(spec.parents))]
        volume = rng.uniform(*spec.volume_ml)
        hu = _tumour(rng, spec.hu, spec.core_hu)
        if present:
            _add_tumour(canvas, rng, _v(spec.name), _v(parent), volume, hu)


def _add_tumour(canvas: _Canvas, rng: np.random.Generator, value: int, parent: int, volume_ml: float,
                hu: HUFunction) -> None:
    """A deformed ball of about ``volume_ml`` centred deep inside ``parent`` and clipped to it."""
    mask = canvas.label == parent
    sl = _bbox(mask)
    if sl is None:
        return
    depth = ndimage.distance_transform_edt(np.pad(mask[sl], 1), sampling=canvas.spacing)[1:-1, 1:-1, 1:-1]
    if depth.max() < 1.5 * canvas.spacing.max():
        return
    radius = min((3 * volume_ml * 1000 / (4 * np.pi)) ** (1 / 3), 0.85 * float(depth.max()))
    candidates = np.argwhere(depth >= radius)
    index = candidates[rng.integers(len(candidates))] + [s.start for s in sl]
    aspect = rng.uniform(0.85, 1.15, 3)
    shape = _Ellipsoid(canvas.to_patient(index), radius * aspect / np.prod(aspect) ** (1 / 3),
                       _rotation(*rng.uniform(0, 360, 3)), _Bumps.random(rng, 0.08))
    canvas.paint(shape, value, hu, canvas.within(parent), organ=False)


def _bbox(mask: np.ndarray) -> Slices | None:
    """The smallest slices holding every True voxel of a 3D mask, or None when it is empty."""
    return ndimage.find_objects(mask.view(np.uint8), max_label=1)[0]


# ---------------------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------------------


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
    canvas = _Canvas(shape, spacing, yaw_deg=rng.uniform(-5, 5))
    dome = _paint_body(canvas, rng)
    _paint_spine_and_muscles(canvas, rng)
    _paint_pelvic_bones(canvas, rng)
    landmarks = _paint_vessels(canvas, rng)
    _paint_thorax(canvas, rng, dome)
    _paint_retroperitoneum(canvas, rng)
    _paint_liver_and_upper_organs(canvas, rng, landmarks)
    _paint_pelvis_and_bowel(canvas, rng)
    _paint_tumours(canvas, rng)
    return _finish(canvas, rng)


def _finish(canvas: _Canvas, rng: np.random.Generator) -> Phantom:
    """Blur slightly (partial volume), add Gaussian noise (10-15 HU std) and store as int16 HU."""
    blurred = ndimage.gaussian_filter(canvas.hu, sigma=0.6)
    noise = rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(rng.uniform(10, 15))
    image = np.clip(np.rint(blurred + noise), -1024, 3071).astype(np.int16)
    return Phantom(image, canvas.label, canvas.organ, canvas.affine)
