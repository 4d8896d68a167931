"""Reading one random 96³ training patch: our zarr store against NIfTI (.nii.gz) and the original's per-sample route.

Run: .venv/bin/python benchmarks/bench_patch_read.py  (prints a Markdown table for BENCHMARKS.md; ~2 min on 2 cores)

Setup (not timed): the phantom of bench_harmonize.py (512x512x200 int16 at 0.8x0.8x2.5 mm, .nii.gz) is harmonized
and resampled to 1.5 mm (273x273x333) and written with ``universal.data.store.write_case``, as
``harmonize_dataset`` does; the resampled image is also saved as .nii.gz (nibabel's default compression), and the
original's post_label (1, 32, X, Y, Z) uint8 as h5 (gzip 9). All files are read from a warm page cache.

Timed, at the same random patch positions (the first few for the slow routes):

- ours: ``open_case(...).image[x0:x1, y0:y1, z0:z1]`` (and the label) from the open store, as the training
  dataset does with its cached case handles;
- the resampled volume as .nii.gz: ``nibabel.load`` + full read + crop (what a loader that keeps resampled
  NIfTIs does per sample), and nibabel's proxy slicing (decompresses up to the last needed byte);
- the source .nii.gz: ``nibabel.load`` + full read + crop of the same physical region;
- the original's per-sample route without its cache (reference/original_model.md §4.2 steps 0-3): MONAI
  LoadImaged(image, label) -> EnsureChannelFirstd -> Orientationd(RAS) -> Spacingd(1.5 mm; bilinear, nearest),
  plus the full h5 post_label read, then the crop.

h5py is a benchmark-only dependency (``.venv/bin/pip install h5py``).
"""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from bench_harmonize import CASE_ID, DATASET, LIVER_CHANNEL, NUM_CLASS, TARGET, TUMOUR_CHANNEL, make_case

PATCH = 96
POSITIONS = 50  # zarr patches
SLOW_REPEATS = 5  # NIfTI patches
ORIGINAL_REPEATS = 3  # the original's full per-sample route


def _positions(shape: tuple[int, ...], count: int) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(1)
    return [tuple(int(rng.integers(0, n - PATCH + 1)) for n in shape) for _ in range(count)]


def _box(start: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(s, s + PATCH) for s in start)


def _timed(read: Callable[[tuple[int, int, int]], object], starts: list) -> list[float]:
    times = []
    for start in starts:
        begin = time.perf_counter()
        read(start)
        times.append((time.perf_counter() - begin) * 1000)
    return times


def setup(folder: Path) -> dict:
    """Write the source case, the store, the resampled .nii.gz and the original's post_label h5."""
    import h5py

    from universal.core.classes import load_class_table
    from universal.core.volume import save_nifti
    from universal.data.catalog import Case, load_catalog
    from universal.data.harmonize import harmonize_case
    from universal.data.store import open_store, write_case

    image_path, label_path = make_case(folder)
    classes = load_class_table()
    entry = load_catalog(None, classes)[DATASET]
    result = harmonize_case(Case(DATASET, CASE_ID, image_path, label_path), entry, classes, TARGET)
    store = folder / f"{DATASET}.zarr"
    open_store(store, mode="w")
    write_case(store, CASE_ID, result.image, result.label, result.attrs)
    resampled = folder / "resampled_image.nii.gz"
    save_nifti(result.image, resampled)
    labels = result.label.array
    post = np.full((1, NUM_CLASS, *labels.shape), 255, dtype=np.uint8)
    post[0, LIVER_CHANNEL] = (labels == classes["Liver"].index) | (labels == classes["Liver Tumor"].index)
    post[0, TUMOUR_CHANNEL] = labels == classes["Liver Tumor"].index
    h5_path = folder / "post_label.h5"
    with h5py.File(h5_path, "w") as handle:
        handle.create_dataset("post_label", data=post, compression="gzip", compression_opts=9)
    return {"image": image_path, "label": label_path, "store": store, "resampled": resampled, "h5": h5_path,
            "shape": result.image.shape, "source_spacing": result.attrs["original_spacing"]}


def main() -> None:
    import h5py
    import nibabel as nib
    import torch

    from universal.data.store import open_case

    torch.set_num_threads(2)
    folder = Path(tempfile.mkdtemp(prefix="bench_patch_read_"))
    try:
        start = time.perf_counter()
        files = setup(folder)
        print(f"setup (phantom, harmonize, store, .nii.gz, h5) {time.perf_counter() - start:.1f} s; "
              f"store grid {files['shape']}; {PATCH}³ patches at random positions, warm page cache, "
              f"torch 2 threads\n")
        starts = _positions(files["shape"], POSITIONS)
        case = open_case(files["store"], CASE_ID)
        rows = []

        def zarr_image(s):
            return case.image[_box(s)]

        def zarr_both(s):
            return case.image[_box(s)], case.label[_box(s)]

        def nifti_full(s):
            return np.asarray(nib.load(files["resampled"]).dataobj)[_box(s)]

        def nifti_proxy(s):
            return np.asarray(nib.load(files["resampled"]).dataobj[_box(s)])

        source_spacing = files["source_spacing"]

        def source_full(s):
            array = np.asarray(nib.as_closest_canonical(nib.load(files["image"])).dataobj)
            box = tuple(slice(int(a * t / v), int(np.ceil((a + PATCH) * t / v)))
                        for a, t, v in zip(s, TARGET, source_spacing, strict=True))
            return array[box]

        original = _original_route(files, h5py)
        rows.append(("ours: zarr image", "image", _timed(zarr_image, starts)))
        rows.append(("ours: zarr image + label", "image + label", _timed(zarr_both, starts)))
        rows.append(("resampled .nii.gz: nibabel load + full read + crop", "image",
                     _timed(nifti_full, starts[:SLOW_REPEATS])))
        rows.append(("resampled .nii.gz: nibabel proxy slicing", "image", _timed(nifti_proxy, starts[:SLOW_REPEATS])))
        rows.append(("source .nii.gz (512×512×200): nibabel load + full read + crop", "image (source grid)",
                     _timed(source_full, starts[:SLOW_REPEATS])))
        rows.append(("original per-sample route, uncached: MONAI load + Orientation + Spacing, h5 post_label",
                     "image + label + post_label", _timed(original, starts[:ORIGINAL_REPEATS])))
        report(rows)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _original_route(files: dict, h5py) -> Callable:
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

    keys = ["image", "label"]
    transform = Compose([LoadImaged(keys=keys), EnsureChannelFirstd(keys=keys), Orientationd(keys=keys, axcodes="RAS"),
                         Spacingd(keys=keys, pixdim=TARGET, mode=("bilinear", "nearest"))])

    def read(start):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = transform({"image": str(files["image"]), "label": str(files["label"])})
        with h5py.File(files["h5"], "r") as handle:
            post = handle["post_label"][0]
        box = (slice(None), *_box(start))
        return data["image"][box], data["label"][box], post[box]

    return read


def report(rows: list) -> None:
    ours = float(np.median(rows[0][2]))
    print("| route | reads | patches | median ms | p90 ms | median / ours (image) |")
    print("|---|---|---|---|---|---|")
    for name, what, times in rows:
        median = float(np.median(times))
        print(f"| {name} | {what} | {len(times)} | {median:.1f} | {np.percentile(times, 90):.1f} | "
              f"{median / ours:.0f}× |")


if __name__ == "__main__":
    main()
