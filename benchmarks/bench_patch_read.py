"""Reading one random 96³ training patch: our zarr store against NIfTI (.nii.gz) and the original's training loader.

Run: .venv/bin/python benchmarks/bench_patch_read.py [--repeats 3]  (prints Markdown tables for BENCHMARKS.md;
~1.5 min per round on 2 cores)

Setup (not timed): the phantom of bench_harmonize.py (512x512x200 int16 at 0.8x0.8x2.5 mm, .nii.gz; an MSD
Task03 liver case) is harmonized and resampled to 1.5 mm (273x273x333) and written with
``universal.data.store.write_case``, as ``harmonize_dataset`` does; the resampled image is also saved as .nii.gz
(nibabel's default compression), and the original's post_label (1, 32, X, Y, Z) uint8 as h5 (gzip 9). All files are
read from a warm page cache.

Timed, in interleaved rounds (every route once per round, the same random patch positions for every route within a
round; the first few for the slow routes):

- ours: ``open_case(...).image[x0:x1, y0:y1, z0:z1]`` (and the label) from the open store, as the training
  dataset does with its cached case handles (its foreground index, built once per case and worker, is timed
  apart and not charged per patch);
- the resampled volume as .nii.gz: ``nibabel.load`` + full read + crop (what a loader that keeps resampled
  NIfTIs does per sample), and nibabel's proxy slicing (decompresses up to the last needed byte);
- the source .nii.gz: ``nibabel.load`` + full read + crop of the same physical region;
- the original's training loader (reference/original_model.md §4.2-4.3; ``dataset/dataloader.py get_loader``), up
  to and including its crop, through MONAI's own ``Dataset`` and ``CacheDataset``. Its deterministic part
  (what ``CacheDataset`` caches): LoadImaged(image, label) (float32) and the full h5 post_label read (uint8,
  32 channels), EnsureChannelFirstd (the original's AddChanneld), Orientationd(RAS), Spacingd(1.5 mm; bilinear,
  nearest), ScaleIntensityRanged(-175..250 HU -> 0..1), CropForegroundd(image > 0), SpatialPadd(96³); then
  RandCropByPosNegLabeld(pos 2, neg 1, ``num_samples`` crops of image, label and post_label), the crop of 12 of
  its 16 dataset keys (this phantom's key, 10_03, would take RandCropByLabelClassesd, slightly slower, and a
  RandZoomd of the whole volume with probability 0.3: neither is timed, nor are the later augmentations).
  One call yields ``num_samples`` patches, so its time is charged per patch: divided by ``num_samples``, for
  2 (train.py's default) and 4 (the README's training command).

  * uncached: ``Dataset(...)[0]``, everything per call;
  * cached: ``CacheDataset(...)[0]`` on a filled cache: MONAI deep-copies the cached item (``copy_cache=True``,
    its default, which the original keeps) and runs the crop; also with ``copy_cache=False`` (the crop alone);
  * expected at the README's cache rate 0.6: 0.6 x cached + 0.4 x uncached, per patch, from the same round.

The RAM a cached case holds is the cached item's tensors (image float32, label float32, post_label 32 x uint8,
on the foreground-cropped grid); ours holds an open zarr handle and the foreground index, and reads from disk.

h5py is a benchmark-only dependency (``.venv/bin/pip install h5py``).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from bench_harmonize import CASE_ID, DATASET, LIVER_CHANNEL, NUM_CLASS, TARGET, TUMOUR_CHANNEL, make_case

PATCH = 96
POSITIONS = 50  # zarr patches per round
SLOW_REPEATS = 3  # NIfTI patches per round
CACHED_REPEATS = 5  # cached calls of the original's loader per round
SAMPLES = (2, 4)  # the original's num_samples: train.py's default, the README's command
CACHE_RATE = 0.6  # the README's training command
HU_WINDOW = (-175.0, 250.0)  # the original's ScaleIntensityRanged a_min, a_max


def _positions(shape: tuple[int, ...], count: int, seed: int) -> list[tuple[int, int, int]]:
    """``count`` random patch corners (x, y, z voxel indices) that keep a 96³ patch inside ``shape``."""
    rng = np.random.default_rng(seed)
    return [tuple(int(rng.integers(0, n - PATCH + 1)) for n in shape) for _ in range(count)]


def _box(start: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(s, s + PATCH) for s in start)


def _timed(read: Callable[[tuple[int, int, int]], object], starts: list) -> list[float]:
    """Milliseconds of ``read(start)`` for each start."""
    times = []
    for start in starts:
        begin = time.perf_counter()
        read(start)
        times.append((time.perf_counter() - begin) * 1000)
    return times


def _call_ms(call: Callable[[], object]) -> float:
    begin = time.perf_counter()
    call()
    return (time.perf_counter() - begin) * 1000


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


def original_loader(files: dict, num_samples: int, cached: bool):
    """The original's training loader up to its crop, as MONAI's ``Dataset`` or ``CacheDataset`` (cache rate 1
    over this one case, filled here): item 0 is a list of ``num_samples`` dicts of (C, 96, 96, 96) crops."""
    import h5py
    from monai.data import CacheDataset, Dataset
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        LoadImaged,
        MapTransform,
        Orientationd,
        RandCropByPosNegLabeld,
        ScaleIntensityRanged,
        Spacingd,
        SpatialPadd,
    )

    class ReadPostLabel(MapTransform):
        """The h5 post_label (1, 32, X, Y, Z) uint8 read in full; keeps (32, X, Y, Z), as the original's loader."""

        def __call__(self, data: dict) -> dict:
            d = dict(data)
            with h5py.File(d["post_label"], "r") as handle:
                d["post_label"] = handle["post_label"][()][0]
            return d

    volumes, every = ["image", "label"], ["image", "label", "post_label"]
    transform = Compose([
        LoadImaged(keys=volumes), ReadPostLabel(keys=["post_label"]), EnsureChannelFirstd(keys=volumes),
        Orientationd(keys=volumes, axcodes="RAS"), Spacingd(keys=volumes, pixdim=TARGET, mode=("bilinear", "nearest")),
        ScaleIntensityRanged(keys=["image"], a_min=HU_WINDOW[0], a_max=HU_WINDOW[1], b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys=every, source_key="image"),
        SpatialPadd(keys=every, spatial_size=(PATCH,) * 3, mode="constant"),
        RandCropByPosNegLabeld(keys=every, label_key="label", spatial_size=(PATCH,) * 3, pos=2, neg=1,
                               num_samples=num_samples, image_key="image", image_threshold=0)])
    data = [{"image": str(files["image"]), "label": str(files["label"]), "post_label": str(files["h5"])}]
    if cached:
        return CacheDataset(data=data, transform=transform, cache_rate=1.0, progress=False)
    return Dataset(data=data, transform=transform)


def cached_bytes(dataset) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """Per key of the cached item: dtype, shape and bytes (reads MONAI's ``CacheDataset._cache``)."""
    item = dataset._cache[0]
    return {key: (str(item[key].dtype), tuple(item[key].shape), int(item[key].numel() * item[key].element_size()))
            for key in ("image", "label", "post_label")}


def main() -> None:
    import nibabel as nib
    import torch

    from universal.core.classes import load_class_table
    from universal.data.store import open_case
    from universal.train.patches import PatchConfig, index_case

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # MONAI 1.6's notices on defaults and metadata, per transform and call
    torch.set_num_threads(2)
    folder = Path(tempfile.mkdtemp(prefix="bench_patch_read_"))
    try:
        start = time.perf_counter()
        files = setup(folder)
        print(f"setup (phantom, harmonize, store, .nii.gz, h5) {time.perf_counter() - start:.1f} s; "
              f"store grid {files['shape']}; {PATCH}³ patches at random positions, warm page cache, "
              f"torch 2 threads; {args.repeats} interleaved rounds\n")
        case = open_case(files["store"], CASE_ID)
        begin = time.perf_counter()
        index = index_case(case, load_class_table(), PatchConfig().foreground_samples, np.random.default_rng(0))
        index_s = time.perf_counter() - begin
        index_bytes = sum(p.nbytes for p in index.positions.values())
        store_bytes = sum(p.stat().st_size for p in (files["store"] / CASE_ID).rglob("*") if p.is_file())
        uncached = {n: original_loader(files, n, cached=False) for n in SAMPLES}
        begin = time.perf_counter()
        cached = {n: original_loader(files, n, cached=True) for n in SAMPLES}
        fill_s = (time.perf_counter() - begin) / len(SAMPLES)
        held = cached_bytes(cached[SAMPLES[0]])
        source_spacing = files["source_spacing"]

        def zarr_image(s):
            return case.image[_box(s)]

        def zarr_both(s):
            return case.image[_box(s)], case.label[_box(s)]

        def nifti_full(s):
            return np.asarray(nib.load(files["resampled"]).dataobj)[_box(s)]

        def nifti_proxy(s):
            return np.asarray(nib.load(files["resampled"]).dataobj[_box(s)])

        def source_full(s):
            array = np.asarray(nib.as_closest_canonical(nib.load(files["image"])).dataobj)
            box = tuple(slice(int(a * t / v), int(np.ceil((a + PATCH) * t / v)))
                        for a, t, v in zip(s, TARGET, source_spacing, strict=True))
            return array[box]

        rounds = []
        for round_ in range(args.repeats):
            starts = _positions(files["shape"], POSITIONS, seed=round_ + 1)
            row = {"ours: zarr image": np.median(_timed(zarr_image, starts)),
                   "ours: zarr image + label": np.median(_timed(zarr_both, starts)),
                   "resampled .nii.gz: load + full read + crop": np.median(_timed(nifti_full, starts[:SLOW_REPEATS])),
                   "resampled .nii.gz: proxy slicing": np.median(_timed(nifti_proxy, starts[:SLOW_REPEATS])),
                   "source .nii.gz: load + full read + crop": np.median(_timed(source_full, starts[:SLOW_REPEATS]))}
            for n in SAMPLES:
                dataset = cached[n]
                row[f"uncached, n={n}"] = _call_ms(lambda d=uncached[n]: d[0]) / n
                dataset.copy_cache = True
                row[f"cached, n={n}"] = np.median([_call_ms(lambda d=dataset: d[0])
                                                   for _ in range(CACHED_REPEATS)]) / n
                dataset.copy_cache = False
                row[f"cached without the copy, n={n}"] = np.median([_call_ms(lambda d=dataset: d[0])
                                                                    for _ in range(CACHED_REPEATS)]) / n
                row[f"expected at cache rate {CACHE_RATE}, n={n}"] = (
                    CACHE_RATE * row[f"cached, n={n}"] + (1 - CACHE_RATE) * row[f"uncached, n={n}"])
            rounds.append(row)
            print(f"round {round_ + 1}: " + "; ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
        report(rounds)
        print(f"\nours, once per case and worker: foreground index {index_s * 1000:.0f} ms, held in RAM "
              f"{index_bytes / 1024:.1f} KiB; the case on disk (image + label, zarr) {store_bytes / 2**20:.1f} MiB")
        print(f"original, once per case: filling the cache {fill_s:.1f} s; held in RAM per cached case "
              f"{sum(b for _, _, b in held.values()) / 2**20:,.0f} MiB: "
              + ", ".join(f"{k} {d} {s} {b / 2**20:,.1f} MiB" for k, (d, s, b) in held.items()))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def report(rounds: list[dict]) -> None:
    """Per route: ms per patch in each round, the median, and the median (range) of its per-round ratio to ours
    (image-only routes against ours' image, the original's against ours' image + label)."""
    print("\n| route | ms per patch, per round | median ms | × ours, median of rounds (range) |\n|---|---|---|---|")
    for name in rounds[0]:
        own = "ours: zarr image" if name.startswith(("ours: zarr image", "resampled", "source")) \
            else "ours: zarr image + label"
        values = [row[name] for row in rounds]
        ratios = [row[name] / row[own] for row in rounds]
        label = name if name.startswith(("ours", "resampled", "source")) else f"original loader, {name}"
        print(f"| {label} | {' / '.join(f'{v:.1f}' for v in values)} | {np.median(values):.1f} | "
              f"{np.median(ratios):.1f}× ({min(ratios):.1f}–{max(ratios):.1f}) |")


if __name__ == "__main__":
    main()
