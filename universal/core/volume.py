"""A CT volume with its geometry, NIfTI reading and writing, and resampling to a target spacing.

Arrays are indexed (x, y, z) in RAS+ voxel order after :func:`load_nifti`: the first index grows toward the
patient's right, the second toward anterior, the third toward superior. Spacing is in millimetres and the
affine maps voxel indices (x, y, z, 1) to RAS+ world coordinates in millimetres, as in NIfTI.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from isal import igzip

from universal.core.atomic import atomic_output


class VolumeError(ValueError):
    """A file cannot be used as a 3D volume; the message names the file and the problem."""


@dataclass
class Volume:
    """A 3D array and the affine (4x4, voxel -> RAS+ mm) that places it in the patient."""

    array: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along each array axis, in mm."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def origin(self) -> tuple[float, float, float]:
        """RAS+ position of the centre of voxel (0, 0, 0), in mm."""
        return tuple(float(v) for v in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def direction(self) -> np.ndarray:
        """Unit direction cosines of the array axes in RAS+ (3x3, columns = axes)."""
        return self.affine[:3, :3] / np.asarray(self.spacing)

    def world(self, index: np.ndarray) -> np.ndarray:
        """RAS+ mm coordinates of voxel indices (..., 3)."""
        return index @ self.affine[:3, :3].T + self.affine[:3, 3]


def canonical(array: np.ndarray, affine: np.ndarray) -> Volume:
    """The same voxels reoriented to RAS+ (axis permutation and flips only, no interpolation), as
    :func:`load_nifti` returns them; ``affine`` maps voxel indices of ``array`` to RAS mm."""
    image = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    return Volume(np.asarray(image.dataobj), np.asarray(image.affine, dtype=np.float64))


def load_nifti(path: str | Path, dtype: type | None = None) -> Volume:
    """Read a 3D NIfTI file and reorient it to RAS+ (axis permutation and flips only, no interpolation).

    Raises :class:`VolumeError` naming the file for unreadable, corrupt, non-3D or non-finite data.
    """
    path = Path(path)
    try:
        image = _read_image(path)
        check_affine(image.affine, path)
        canonical = nib.as_closest_canonical(image)
        array = np.asarray(canonical.dataobj)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, nib.filebasedimages.ImageFileError,
            nib.orientations.OrientationError, ValueError) as err:
        if isinstance(err, VolumeError):
            raise
        raise VolumeError(f"{path}: cannot read as NIfTI: {err}") from err
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise VolumeError(f"{path}: expected a 3D volume, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise VolumeError(f"{path}: contains {int((~np.isfinite(array)).sum())} NaN or infinite voxels")
    affine = np.asarray(canonical.affine, dtype=np.float64)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    return Volume(array, affine)


def check_affine(affine: np.ndarray, path: object) -> None:
    """Raise :class:`VolumeError` naming ``path`` when a voxel -> world affine (4x4, mm) is not finite or singular
    (a zero voxel size or two parallel axes), which no orientation or spacing can be read from."""
    affine = np.asarray(affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError(f"{path}: the header's affine (sform/qform) is singular or not finite (a zero voxel size "
                          f"or parallel axes): {affine.tolist()}; fix the header (the voxel size and orientation), "
                          "e.g. by exporting the image again")


NIFTI_HEADER_SIZES = {348: nib.Nifti1Image, 540: nib.Nifti2Image}


def _read_image(path: Path) -> nib.Nifti1Image:
    """Open a NIfTI file; gzip files are inflated in memory with ISA-L (about twice as fast as zlib here)."""
    if not path.name.endswith(".gz"):
        return nib.load(str(path))
    data = igzip.decompress(path.read_bytes())
    for byteorder in ("little", "big"):
        kind = NIFTI_HEADER_SIZES.get(int.from_bytes(data[:4], byteorder))
        if kind is not None:
            return kind.from_bytes(data)
    return nib.load(str(path))


def save_nifti(volume: Volume, path: str | Path) -> None:
    """Write a volume as NIfTI (gzip when the name ends in .gz) under a temporary name, then rename."""
    image = nib.Nifti1Image(volume.array, volume.affine)
    image.set_qform(volume.affine, code=1)
    image.set_sform(volume.affine, code=1)
    with atomic_output(path) as tmp:
        nib.save(image, str(tmp))


def same_grid(a: Volume, b: Volume, tolerance_mm: float = 1e-3) -> bool:
    """True when two volumes share shape and affine (to ``tolerance_mm``)."""
    return a.shape == b.shape and bool(np.allclose(a.affine, b.affine, atol=tolerance_mm))


def resampled_shape(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> tuple[int, ...]:
    """Grid size covering the same extent at the target spacing (ITK/MONAI convention: round n * s / t)."""
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target, strict=True))


def resample(volume: Volume, target_spacing: tuple[float, float, float], order: int,
             shape: tuple[int, int, int] | None = None) -> Volume:
    """Resample along the array axes to ``target_spacing`` (mm), keeping the centre of voxel 0 in place.

    Samples sit where SimpleITK's ResampleImageFilter puts them for an output grid with the same origin
    and direction; positions past the last input voxel take the edge value. ``order`` 1 is trilinear
    (images), 0 is nearest neighbour (label maps: no value is invented). The output dtype equals the input's.
    ``shape`` fixes the output grid size (e.g. to map a prediction back onto its source grid exactly).
    """
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
    spacing = volume.spacing
    out_shape = shape or resampled_shape(volume.shape, spacing, target_spacing)
    zoom = tuple(s / t for s, t in zip(spacing, target_spacing, strict=True))
    # Work in the array's memory order: a NIfTI array is Fortran-ordered, often with flipped axes after RAS
    # reorientation, and copying it into C order costs a cache-unfriendly transpose of the whole volume.
    order_axes = tuple(int(a) for a in np.argsort([-abs(st) for st in volume.array.strides], kind="stable"))
    data = torch.from_numpy(np.ascontiguousarray(volume.array.transpose(order_axes)))
    work = resample_tensor(data if order == 0 else data.to(torch.float32), tuple(zoom[a] for a in order_axes),
                           tuple(out_shape[a] for a in order_axes), order)
    if order == 1 and not np.issubdtype(volume.array.dtype, np.floating):
        info = np.iinfo(volume.array.dtype)
        work = work.round_().clamp_(info.min, info.max)
    array = work.numpy().astype(volume.array.dtype, copy=False).transpose(np.argsort(order_axes))
    affine = volume.affine.copy()
    affine[:3, :3] = volume.direction * np.asarray(target_spacing)
    return Volume(array, affine)


def resample_tensor(data: torch.Tensor, zoom: tuple[float, float, float], shape: tuple[int, int, int],
                    order: int, out_start: tuple[int, int, int] = (0, 0, 0),
                    in_start: tuple[int, int, int] = (0, 0, 0),
                    axis_order: Sequence[int] | None = None) -> torch.Tensor:
    """Resample the last three axes of ``data`` (..., X, Y, Z): output voxel i samples input position i / zoom.

    ``zoom`` is input spacing / output spacing per axis; order 1 needs a floating tensor. For a crop of both
    grids, ``data`` holds the input from voxel ``in_start`` on and the output starts at voxel ``out_start`` of
    the full output grid: output voxel ``out_start + j`` samples input position ``(out_start + j) / zoom``,
    exactly where the full resampling samples it; positions outside the crop take the crop's edge values.
    ``axis_order`` is the order in which the axes are resampled (default: :func:`shrink_first_order`); linear
    interpolation rounds differently in another order, so pieces of one grid resampled in the order of the whole
    grid give its values bit for bit.
    """
    for axis in axis_order if axis_order is not None else shrink_first_order(data.shape[-3:], shape):
        data = _resample_axis(data, data.ndim - 3 + axis, zoom[axis], shape[axis], order, out_start[axis],
                              in_start[axis])
    return data


def shrink_first_order(in_shape: Sequence[int], out_shape: Sequence[int]) -> list[int]:
    """The axes in the order :func:`resample_tensor` resamples them: those whose output is smallest relative to
    their input first, so later passes move less data."""
    return sorted(range(3), key=lambda a: out_shape[a] / in_shape[a])


def _resample_axis(data: torch.Tensor, axis: int, zoom: float, size: int, order: int, out_start: int = 0,
                   in_start: int = 0) -> torch.Tensor:
    """Resample one axis: output voxel i samples input position (out_start + i) / zoom − in_start (in input voxel
    units of ``data``)."""
    n = data.shape[axis]
    if size == n and zoom == 1.0 and out_start == in_start:
        return data
    # (integer + i) / zoom − integer: the same float as the full grid's position, shifted exactly
    position = (torch.arange(size, dtype=torch.float64) + out_start) / zoom - in_start
    before = (slice(None),) * axis  # advanced indexing: much faster than index_select on CPU
    if order == 0:
        index = position.add(0.5).floor().clamp_(0, n - 1).long()
        return data[(*before, index)]
    position = position.clamp_(0, n - 1)
    low = position.floor().long().clamp_(0, n - 1)
    high = (low + 1).clamp_(max=n - 1)
    weight = (position - low).to(torch.float32)
    view = [1] * data.ndim
    view[axis] = size
    weight = weight.view(view)
    return torch.lerp(data[(*before, low)], data[(*before, high)], weight)
