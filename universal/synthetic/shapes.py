"""Geometry of the phantoms: the voxel grid being painted, blocks of it, and the shapes drawn on it.

Shapes live in *patient coordinates* (mm, RAS+: +x toward the patient's right, +y anterior, +z superior,
origin near the centre of the body): deformed ellipsoids, capsules and tubes along smooth curves (unions of
capsules). A shape's ``level`` is a normalised radius, <= 1 inside. The :class:`Canvas` rasterises them on a
voxel grid whose array axes are (x, y, z) in RAS+; world (RAS+ mm) is patient coordinates rotated about z by
the case's yaw, and world 0 is the centre of the grid. Intensities are Hounsfield units (HU).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline

AIR_HU = -1000.0

Slices = tuple[slice, slice, slice]


@dataclass(frozen=True)
class Block:
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


class Waves:
    """A smooth random field of unit variance: a sum of plane waves with random directions and phases."""

    def __init__(self, rng: np.random.Generator, wavelength_mm: float, count: int = 6):
        directions = rng.normal(size=(count, 3))
        lengths = wavelength_mm * rng.uniform(0.7, 1.3, count)
        self.k = directions / np.linalg.norm(directions, axis=1, keepdims=True) * (2 * np.pi / lengths)[:, None]
        self.phase = rng.uniform(0, 2 * np.pi, count)

    def __call__(self, block: Block) -> np.ndarray:
        total = np.zeros(block.shape, dtype=np.float32)
        for (kx, ky, kz), phase in zip(self.k, self.phase, strict=True):
            total += np.cos(kx * block.px + ky * block.py + kz * block.pz + phase, dtype=np.float32)
        return total * np.float32(np.sqrt(2.0 / len(self.phase)))


@dataclass(frozen=True)
class Bumps:
    """Smooth radial deformation of a unit sphere: ``1 + sum(a * sin(k . u + phase))`` for unit vectors u.

    :meth:`random` draws ``count`` waves of about 1.5 cycles over the sphere whose amplitudes add up to
    about 1.3 x ``amplitude`` (a fraction of the radius).
    """

    k: np.ndarray
    phase: np.ndarray
    amplitude: np.ndarray

    @classmethod
    def random(cls, rng: np.random.Generator, amplitude: float, count: int = 4) -> Bumps:
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


NO_BUMPS = Bumps(np.zeros((0, 3)), np.zeros(0), np.zeros(0))


def rotation_matrix(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """Rotation matrix Rz(yaw) Ry(pitch) Rx(roll), angles in degrees; columns are the local axes."""
    a, b, c = np.radians([yaw, pitch, roll])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class Ellipsoid:
    """A deformed ellipsoid: centre and radii in mm, ``rotation`` columns = its axes in patient coordinates."""

    center: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray
    bumps: Bumps = NO_BUMPS

    def parts(self) -> tuple[Ellipsoid, ...]:
        return (self,)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        half = np.sqrt(((self.rotation * self.radii) ** 2).sum(axis=1)) * self.bumps.max_factor
        return self.center - half, self.center + half

    def level(self, block: Block) -> np.ndarray:
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

    def level(self, block: Block) -> np.ndarray:
        """Distance to the axis over the local radius: <= 1 inside."""
        ab = self.b - self.a
        d = (block.px - self.a[0], block.py - self.a[1], block.pz - self.a[2])
        t = np.clip((d[0] * ab[0] + d[1] * ab[1] + d[2] * ab[2]) / max(float(ab @ ab), 1e-9), 0.0, 1.0)
        dist = np.sqrt((d[0] - t * ab[0]) ** 2 + (d[1] - t * ab[1]) ** 2 + (d[2] - t * ab[2]) ** 2)
        return dist / (self.ra + t * (self.rb - self.ra))


@dataclass(frozen=True)
class Union:
    """Several primitives drawn as one structure (level = the smallest of theirs)."""

    members: tuple[Ellipsoid | _Capsule, ...]

    def parts(self) -> tuple[Ellipsoid | _Capsule, ...]:
        return self.members

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lows, highs = zip(*(m.bounds() for m in self.members), strict=True)
        return np.min(lows, axis=0), np.max(highs, axis=0)


Shape = Ellipsoid | _Capsule | Union
HUFunction = Callable[[Block, np.ndarray], np.ndarray]
Into = Callable[[Slices], np.ndarray]


def tube(points: Sequence[Sequence[float]], radii: Sequence[float], step_mm: float = 5.0,
         ripple: float = 0.0, ripple_mm: float = 40.0) -> Union:
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
    return Union(tuple(_Capsule(curve[i], curve[i + 1], float(radius[i]), float(radius[i + 1]))
                       for i in range(len(t) - 1)))


class Canvas:
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

    def block(self, low: np.ndarray, high: np.ndarray) -> Block | None:
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

    def block_at(self, slices: Slices) -> Block:
        """The block of the given grid slices."""
        w = [self.origin[i] + self.spacing[i] * np.arange(slices[i].start, slices[i].stop) for i in range(3)]
        wx, wy = w[0][:, None, None], w[1][None, :, None]
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        return Block(slices, c * wx + s * wy, -s * wx + c * wy, w[2][None, None, :])

    def full_block(self) -> Block:
        return self.block_at(tuple(slice(0, n) for n in self.shape))  # type: ignore[arg-type]

    def rasterize(self, shape: Shape) -> tuple[Block, np.ndarray] | None:
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


def bbox(mask: np.ndarray) -> Slices | None:
    """The smallest slices holding every True voxel of a 3D mask, or None when it is empty."""
    return ndimage.find_objects(mask.view(np.uint8), max_label=1)[0]
