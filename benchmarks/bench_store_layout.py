"""Chunk shape and compressor of the training store, chosen by measurement: write time, size, random 96³ reads.

Run: .venv/bin/python benchmarks/bench_store_layout.py  (prints a Markdown table for BENCHMARKS.md; ~1 min on 2 cores)

The volume is the phantom of bench_harmonize.py after ``harmonize_case`` (273x273x333 at 1.5 mm: image int16,
label uint8). Every layout (chunks 32³, 64³, 128³, and 64³ chunks in 256³ shards) is written with every
compressor (Blosc zstd 3 + bitshuffle, the store's choice; zstd 3 + byte shuffle; lz4 5 + bitshuffle; none) into
a fresh zarr v3 array, as ``universal.data.store._write_array`` does (fill value 0), then read back: 30 random 96³
patches from a freshly opened array (median ms; the same positions for every layout) and the whole image once.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from bench_harmonize import CASE_ID, DATASET, TARGET, make_case
from zarr.codecs import BloscCodec, BloscShuffle

PATCH = 96
POSITIONS = 30
LAYOUTS = {"32³": ((32,) * 3, None), "64³": ((64,) * 3, None), "128³": ((128,) * 3, None),
           "64³ in 256³ shards": ((64,) * 3, (256,) * 3)}
COMPRESSORS = {
    "zstd 3 + bitshuffle": lambda: [BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle)],
    "zstd 3 + shuffle": lambda: [BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle)],
    "lz4 5 + bitshuffle": lambda: [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.bitshuffle)],
    "none": lambda: None,
}
CURRENT = ("64³", "zstd 3 + bitshuffle")  # universal.data.store: CHUNKS = (64, 64, 64), zstd 3 + bitshuffle


def resampled_case(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The phantom harmonized and resampled to 1.5 mm: (image int16, label uint8)."""
    from universal.core.classes import load_class_table
    from universal.data.catalog import Case, load_catalog
    from universal.data.harmonize import harmonize_case

    image_path, label_path = make_case(folder)
    classes = load_class_table()
    entry = load_catalog(None, classes)[DATASET]
    result = harmonize_case(Case(DATASET, CASE_ID, image_path, label_path), entry, classes, TARGET)
    return result.image.array, result.label.array


def _write(path: Path, data: np.ndarray, chunks: tuple, shards: tuple | None, compressors) -> float:
    start = time.perf_counter()
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    chunks = tuple(min(c, n) for c, n in zip(chunks, data.shape, strict=True))
    array = group.create_array("data", shape=data.shape, dtype=data.dtype, chunks=chunks, shards=shards,
                               compressors=compressors, fill_value=0)
    array[...] = data
    return time.perf_counter() - start


def _disk(path: Path) -> tuple[float, int]:
    files = [p for p in (path / "data").rglob("*") if p.is_file() and p.name != "zarr.json"]
    return sum(p.stat().st_size for p in files) / 2**20, len(files)


def _read_patches(path: Path, starts: list, expected: np.ndarray) -> float:
    array = zarr.open_array(str(path / "data"), mode="r", zarr_format=3)
    times = []
    for start in starts:
        box = tuple(slice(s, s + PATCH) for s in start)
        begin = time.perf_counter()
        patch = array[box]
        times.append((time.perf_counter() - begin) * 1000)
        if not np.array_equal(patch, expected[box]):
            raise AssertionError(f"{path}: patch at {start} differs from the written data")
    return float(np.median(times))


def _read_whole(path: Path) -> float:
    array = zarr.open_array(str(path / "data"), mode="r", zarr_format=3)
    start = time.perf_counter()
    array[...]
    return time.perf_counter() - start


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="bench_store_layout_"))
    try:
        start = time.perf_counter()
        image, label = resampled_case(folder)
        rng = np.random.default_rng(2)
        starts = [tuple(int(rng.integers(0, n - PATCH + 1)) for n in image.shape) for _ in range(POSITIONS)]
        print(f"setup {time.perf_counter() - start:.1f} s; image {image.shape} int16 {image.nbytes / 2**20:.1f} MiB, "
              f"label uint8 {label.nbytes / 2**20:.1f} MiB; {POSITIONS} random {PATCH}³ patches per array, "
              f"zarr {zarr.__version__}\n")
        print("| chunks | compressor | write s (image + label) | image MiB | label MiB | files (image + label) "
              "| image patch ms | label patch ms | whole image read s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for layout, (chunks, shards) in LAYOUTS.items():
            for name, compressors in COMPRESSORS.items():
                out = folder / "stores" / f"{layout}_{name}".replace(" ", "_").replace("³", "")
                write = sum(_write(out / kind, data, chunks, shards, compressors())
                            for kind, data in (("image", image), ("label", label)))
                image_mib, image_files = _disk(out / "image")
                label_mib, label_files = _disk(out / "label")
                image_ms = _read_patches(out / "image", starts, image)
                label_ms = _read_patches(out / "label", starts, label)
                whole = _read_whole(out / "image")
                mark = " **(store.py)**" if (layout, name) == CURRENT else ""
                print(f"| {layout}{mark} | {name} | {write:.2f} | {image_mib:.1f} | {label_mib:.2f} | "
                      f"{image_files + label_files} | {image_ms:.1f} | {label_ms:.1f} | {whole:.2f} |")
                shutil.rmtree(out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
