"""Resampling a 512x512x200 CT (0.8 x 0.8 x 2.5 mm) to 1.5 mm: our separable resampler vs SimpleITK and MONAI.

Run: .venv/bin/python benchmarks/bench_resample.py  (prints a Markdown table for BENCHMARKS.md)
"""

from __future__ import annotations

import time

import numpy as np
import SimpleITK as sitk
import torch
from monai.transforms import Spacing

from universal.core.volume import Volume, resample

SHAPE, SPACING, TARGET = (512, 512, 200), (0.8, 0.8, 2.5), (1.5, 1.5, 1.5)


def _ct() -> np.ndarray:
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.linspace(-1, 1, SHAPE[0]), np.linspace(-1, 1, SHAPE[1]), indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 < 1
    slab = np.where(body, 40, -1000).astype(np.int16)[..., None].repeat(SHAPE[2], axis=2)
    return slab + rng.normal(0, 15, SHAPE).astype(np.int16)


def _best(function, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    torch.set_num_threads(2)
    array = _ct()
    affine = np.diag([*SPACING, 1.0])
    volume = Volume(array, affine)
    image = sitk.GetImageFromArray(array.transpose(2, 1, 0).astype(np.float32))
    image.SetSpacing(SPACING)
    out = resample(volume, TARGET, order=1)
    size = out.shape

    def with_sitk(interpolator):
        return sitk.Resample(image, size, sitk.Transform(), interpolator, (0, 0, 0), TARGET,
                             (1, 0, 0, 0, 1, 0, 0, 0, 1), -1000.0, sitk.sitkFloat32)

    tensor = torch.from_numpy(array.astype(np.float32))[None]
    monai_linear = Spacing(pixdim=TARGET, mode="bilinear")
    monai_nearest = Spacing(pixdim=TARGET, mode="nearest")
    from monai.data import MetaTensor
    meta = MetaTensor(tensor, affine=torch.from_numpy(affine))
    rows = [
        ("universal.core.volume.resample", _best(lambda: resample(volume, TARGET, 1)),
         _best(lambda: resample(Volume(array.astype(np.uint8), affine), TARGET, 0))),
        ("SimpleITK ResampleImageFilter", _best(lambda: with_sitk(sitk.sitkLinear)),
         _best(lambda: with_sitk(sitk.sitkNearestNeighbor))),
        ("MONAI Spacing", _best(lambda: monai_linear(meta)), _best(lambda: monai_nearest(meta))),
    ]
    print(f"512x512x200 at {SPACING} mm -> {size} at 1.5 mm; best of 3, 2 threads\n")
    print("| method | linear (image) s | nearest (labels) s |\n|---|---|---|")
    for name, linear, nearest in rows:
        print(f"| {name} | {linear:.2f} | {nearest:.2f} |")


if __name__ == "__main__":
    main()
