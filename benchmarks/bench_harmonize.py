"""Harmonizing one CT into the training store: our route against the original's label_transfer route (MONAI + h5py).

Run: .venv/bin/python benchmarks/bench_harmonize.py [--repeats N]  (prints Markdown tables for BENCHMARKS.md; ~1.5 min
per round on 2 cores)

A deterministic phantom (512x512x200 int16 HU at 0.8x0.8x2.5 mm, stored LPS like most DICOM conversions: body,
fat, lungs, spine, aorta, liver with two tumours, spleen, kidneys, plus Gaussian noise) and its label map (liver 1,
tumour 2, uint8) are written as .nii.gz (nibabel's default compression) into a temporary folder. Each route then
runs in its own fresh Python process, so that its peak RSS (``os.wait4``'s ``ru_maxrss``) is its own:

- ``ours``: ``harmonize_case(case, entry, classes, (1.5, 1.5, 1.5))`` + ``store.write_case`` into a zarr store,
  what ``harmonize_dataset`` does per case (entry ``demo_msd_liver``: 1 -> Liver, 2 -> Liver Tumor);
- ``original, minimal``: MONAI LoadImaged(image, label) -> EnsureChannelFirstd -> Orientationd(RAS) ->
  Spacingd(1.5 mm; bilinear, nearest) -> the 32-channel uint8 one-hot of the original's ``generate_label``
  (channels the dataset does not annotate hold 255, the liver channel covers the tumour, the tumour channel is
  the raw tumour) built directly in uint8 -> h5py dataset ``post_label`` (1, 32, X, Y, Z), gzip level 9;
- ``original, as written``: the same with the original's ``label_transfer.py`` data path (reference/
  original_model.md §3.4): a third key ``label_raw`` (the label loaded and resampled a second time), the
  template mapping into a float64 array before resampling, and the one-hot built as a float32 torch tensor
  cast to uint8 at the end. The original's DataLoader workers are left out (batch size 1, one case).

Both original routes load, reorient and resample the image and then discard it: the original writes only the
post_label h5 and keeps the source NIfTI, which its training loader reads and resamples again for every sample
(see bench_patch_read.py). Ours writes the resampled image and the label map.

h5py is a benchmark-only dependency (the original's storage format; not used by the package):
``.venv/bin/pip install h5py``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

SHAPE = (512, 512, 200)
SPACING = (0.8, 0.8, 2.5)
TARGET = (1.5, 1.5, 1.5)
DATASET = "demo_msd_liver"
CASE_ID = "liver_0"
NUM_CLASS = 32
LIVER_CHANNEL, TUMOUR_CHANNEL = 5, 26  # original template 10_03: [6, 27], channel = index - 1
ROUTES = ("ours", "original-minimal", "original-as-written")
ROUTE_NAMES = {"ours": "ours: harmonize_case + write_case (zarr)",
               "original-minimal": "original route, minimal (MONAI + uint8 one-hot + h5 gzip 9)",
               "original-as-written": "original route as in label_transfer.py (label_raw, float one-hot)"}

# Phantom: (centre mm, radii mm, HU, label) in RAS mm around the volume centre; radius inf = a z-cylinder.
INF = float("inf")
ORGANS = [
    ((0, 0, 0), (170, 120, INF), -100, 0),       # body outline (subcutaneous fat)
    ((0, 0, 0), (158, 108, INF), 40, 0),         # muscle and soft tissue
    ((75, 0, 170), (65, 80, 120), -850, 0),      # right lung
    ((-75, 0, 170), (60, 80, 120), -850, 0),     # left lung
    ((0, -80, 0), (20, 20, INF), 500, 0),        # spine
    ((-15, -50, 0), (12, 12, INF), 160, 0),      # aorta
    ((70, 10, 30), (85, 70, 90), 60, 1),         # liver (patient's right = +x)
    ((95, 5, 45), (18, 18, 16), 25, 2),          # liver tumour
    ((45, 30, 10), (11, 12, 10), 30, 2),         # second liver tumour
    ((-85, -30, 40), (35, 50, 55), 50, 0),       # spleen
    ((70, -60, -40), (28, 25, 55), 35, 0),       # right kidney
    ((-70, -60, -35), (28, 25, 55), 35, 0),      # left kidney
]


# ---------------------------------------------------------------------------------------------------------
# Test case
# ---------------------------------------------------------------------------------------------------------


def case_paths(folder: Path) -> tuple[Path, Path]:
    root = Path(folder) / "Task03_Liver"
    return root / "imagesTr" / f"{CASE_ID}.nii.gz", root / "labelsTr" / f"{CASE_ID}.nii.gz"


def _axis_mm(axis: int) -> np.ndarray:
    n, s = SHAPE[axis], SPACING[axis]
    return ((np.arange(n) - (n - 1) / 2) * s).astype(np.float32)


def _paint(targets: list[tuple[np.ndarray, int]], centre: tuple, radii: tuple) -> None:
    """Set ``value`` in each (array, value) of ``targets`` inside an axis-aligned ellipsoid (RAS mm)."""
    bounds, terms = [], []
    for axis in range(3):
        mm = _axis_mm(axis)
        if radii[axis] == INF:
            bounds.append(slice(None))
            terms.append(None)
            continue
        inside = np.nonzero(np.abs(mm - centre[axis]) <= radii[axis])[0]
        bounds.append(slice(int(inside[0]), int(inside[-1]) + 1))
        terms.append(((mm[bounds[-1]] - centre[axis]) / radii[axis]) ** 2)
    inplane = terms[0][:, None] + terms[1][None, :]
    for array, value in targets:
        view = array[tuple(bounds)]
        if terms[2] is None:
            view[inplane <= 1] = value
        else:
            view[inplane[:, :, None] + terms[2][None, None, :] <= 1] = value


def make_case(folder: str | Path) -> tuple[Path, Path]:
    """Write the phantom CT and its label map as .nii.gz under ``folder`` (deterministic); returns both paths."""
    from universal.core.volume import Volume, save_nifti

    ct = np.full(SHAPE, -1000, dtype=np.int16)
    label = np.zeros(SHAPE, dtype=np.uint8)
    for centre, radii, hu, value in ORGANS:
        _paint([(ct, hu), (label, value)], centre, radii)  # later structures win where they overlap
    rng = np.random.default_rng(0)
    for z0 in range(0, SHAPE[2], 20):
        slab = ct[:, :, z0:z0 + 20]
        noise = rng.standard_normal(slab.shape, dtype=np.float32) * 15
        slab[...] = np.clip(np.rint(slab + noise), -1024, 3071).astype(np.int16)
    # stored LPS (x and y flipped), as DICOM conversions usually are; both routes reorient to RAS
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    affine[:3, 3] = [(SHAPE[0] - 1) / 2 * SPACING[0], (SHAPE[1] - 1) / 2 * SPACING[1],
                     -(SHAPE[2] - 1) / 2 * SPACING[2]]
    image_path, label_path = case_paths(Path(folder))
    save_nifti(Volume(np.ascontiguousarray(ct[::-1, ::-1]), affine), image_path)
    save_nifti(Volume(np.ascontiguousarray(label[::-1, ::-1]), affine), label_path)
    return image_path, label_path


# ---------------------------------------------------------------------------------------------------------
# Routes (each runs in a child process)
# ---------------------------------------------------------------------------------------------------------


def _ours(folder: Path, stages: dict) -> dict:
    from universal.core.classes import load_class_table
    from universal.data.catalog import Case, load_catalog
    from universal.data.harmonize import harmonize_case
    from universal.data.store import open_store, write_case

    classes = load_class_table()
    entry = load_catalog(None, classes)[DATASET]
    image_path, label_path = case_paths(folder)
    case = Case(DATASET, CASE_ID, image_path, label_path)
    store = folder / "out" / f"{DATASET}.zarr"
    start = time.perf_counter()
    result = harmonize_case(case, entry, classes, TARGET)
    stages["harmonize_case (read, map labels, resample)"] = time.perf_counter() - start
    start = time.perf_counter()
    root = open_store(store, mode="w")
    root.attrs.update({"dataset": entry.key, "spacing": list(TARGET), "class_table_digest": classes.digest()})
    write_case(store, CASE_ID, result.image, result.label, result.attrs)
    stages["write_case (zarr, image + label)"] = time.perf_counter() - start
    return {"shape": list(result.image.shape), "outputs": [str(store)]}


def _original(folder: Path, stages: dict, as_written: bool) -> dict:
    import h5py
    import torch
    from monai.data import MetaTensor
    from monai.transforms import EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

    image_path, label_path = case_paths(folder)
    # the original's third key is "label_raw"; MONAI >= 1.0 takes keys starting with "label_" for label's
    # metadata dicts, so it is called "raw" here (same data, same transforms)
    keys = ["image", "label", "raw"] if as_written else ["image", "label"]
    modes = ("bilinear", "nearest", "nearest") if as_written else ("bilinear", "nearest")
    data = {key: str(image_path if key == "image" else label_path) for key in keys}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        stages[name] = now - clock[0]
        clock[0] = now

    data = LoadImaged(keys=keys)(data)
    lap("LoadImaged")
    data = Orientationd(keys=keys, axcodes="RAS")(EnsureChannelFirstd(keys=keys)(data))
    lap("EnsureChannelFirstd + Orientationd")
    if as_written:  # ToTemplatelabeld for key 10_03: 1 -> 6, 2 -> 27, then the tumour joins the organ (27 -> 6)
        raw = np.asarray(data["label"])
        mapped = np.zeros(raw.shape)
        for src, tgt in enumerate((6, 27), start=1):
            mapped[raw == src] = tgt
        mapped[mapped == 27] = 6
        data["label"] = MetaTensor(torch.from_numpy(mapped), meta=data["label"].meta)
        lap("template mapping (float64)")
    data = Spacingd(keys=keys, pixdim=TARGET, mode=modes)(data)
    lap("Spacingd")
    if as_written:  # generate_label: float32 one-hot, -1 where not annotated, tumour channel from the raw label
        label = data["label"][None].long()
        organ_list = (6, 27)
        result = torch.zeros((1, NUM_CLASS, *label.shape[2:]))
        for channel in range(NUM_CLASS):
            if channel + 1 in organ_list:
                result[0, channel] = label[0, 0] == channel + 1
            else:
                result[0, channel] = -1
        result[0, TUMOUR_CHANNEL] = data["raw"][0] == 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # -1.0 -> uint8 gives 255, as in the original
            post = result.numpy().astype(np.uint8)
        del result
    else:
        label = np.asarray(data["label"][0])
        post = np.full((1, NUM_CLASS, *label.shape), 255, dtype=np.uint8)
        post[0, LIVER_CHANNEL] = label > 0
        post[0, TUMOUR_CHANNEL] = label == 2
    lap("one-hot post_label")
    out = folder / "out" / f"post_label_{'written' if as_written else 'minimal'}.h5"
    out.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(out, "w") as handle:
        handle.create_dataset("post_label", data=post, compression="gzip", compression_opts=9)
    lap("h5py write (gzip 9)")
    return {"shape": list(post.shape), "outputs": [str(out)], "post_255": int((post == 255).sum()),
            "liver_voxels": int(post[0, LIVER_CHANNEL].sum())}


def child(route: str, folder: Path, profile: bool) -> None:
    import importlib

    import torch

    torch.set_num_threads(2)
    # import what the route uses first: imports count in the process time, not in the route time
    modules = ("universal.data.harmonize", "universal.data.store") if route == "ours" else ("h5py", "monai.transforms")
    for module in modules:
        importlib.import_module(module)
    before = resource.getrusage(resource.RUSAGE_SELF)
    stages: dict[str, float] = {}
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    info = _ours(folder, stages) if route == "ours" else _original(folder, stages, route == "original-as-written")
    if profiler:
        profiler.disable()
    after = resource.getrusage(resource.RUSAGE_SELF)
    info.update(route_s=sum(stages.values()), stages=stages, baseline_kib=before.ru_maxrss,
                route_cpu_s=after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    if profiler:
        info["profile"] = _profile_rows(profiler)
    print("RESULT " + json.dumps(info), flush=True)


def _profile_rows(profiler: cProfile.Profile) -> list[list]:
    """Cumulative and own time of the universal, zarr, nibabel and numcodecs functions worth naming."""
    rows = []
    for (path, line, name), (_, calls, own, cumulative, _) in pstats.Stats(profiler).stats.items():
        if cumulative < 0.05:
            continue
        where = path.replace("\\", "/").split("/site-packages/")[-1].split("/universal/")[-1]
        rows.append([f"{where}:{line}({name})", calls, own, cumulative])
    return sorted(rows, key=lambda r: -r[3])[:40]


# ---------------------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------------------


def run_child(route: str, folder: Path, profile: bool = False) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", route, "--folder", str(folder)]
    if profile:
        command.append("--profile")
    start = time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        stdout = process.stdout.read() if process.stdout else ""
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"route {route} failed with exit code {process.returncode}:\n{stdout}")
    line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
    info = json.loads(line[len("RESULT "):])
    info.update(process_s=wall, process_cpu_s=usage.ru_utime + usage.ru_stime, peak_mib=usage.ru_maxrss / 1024,
                baseline_mib=info["baseline_kib"] / 1024)
    return info


def _size_mib(path: str) -> float:
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=ROUTES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="also run ours once under cProfile")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of the three routes (interleaved); more than 1 adds a per-round table and "
                             "the speed-up of the median route times")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.folder, args.profile)
        return
    folder = Path(tempfile.mkdtemp(prefix="bench_harmonize_"))
    try:
        start = time.perf_counter()
        image_path, label_path = make_case(folder)
        print(f"phantom {SHAPE} int16 at {SPACING} mm (LPS) + uint8 label, nibabel .nii.gz: "
              f"{_size_mib(str(image_path)):.1f} + {_size_mib(str(label_path)):.1f} MiB, made in "
              f"{time.perf_counter() - start:.1f} s; one fresh process per route, torch 2 threads\n")
        rounds = [{route: run_child(route, folder) for route in ROUTES} for _ in range(max(1, args.repeats))]
        report(rounds[0])
        if len(rounds) > 1:
            report_rounds(rounds)
        if args.profile:
            report_profile(run_child("ours", folder, profile=True))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def report(results: dict) -> None:
    ours = results["ours"]
    print("| route | route s | route CPU s | process s (with imports) | process CPU s | peak RSS MiB "
          "| RSS after imports MiB | output | output MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for route, info in results.items():
        output = "zarr image + label" if route == "ours" else "h5 post_label"
        size = sum(_size_mib(p) for p in info["outputs"])
        print(f"| {ROUTE_NAMES[route]} | {info['route_s']:.2f} | {info['route_cpu_s']:.2f} | {info['process_s']:.2f} | "
              f"{info['process_cpu_s']:.2f} | {info['peak_mib']:.0f} | {info['baseline_mib']:.0f} | "
              f"{output} {tuple(info['shape'])} | {size:.1f} |")
    print()
    print("| comparison | speed-up (route wall) | speed-up (route CPU) | speed-up (process wall) "
          "| peak RSS ratio (original / ours) |")
    print("|---|---|---|---|---|")
    for route in ROUTES[1:]:
        info = results[route]
        print(f"| {ROUTE_NAMES[route].split(' (')[0]} / ours | {info['route_s'] / ours['route_s']:.1f}× | "
              f"{info['route_cpu_s'] / ours['route_cpu_s']:.1f}× | {info['process_s'] / ours['process_s']:.1f}× | "
              f"{info['peak_mib'] / ours['peak_mib']:.1f}× |")
    print()
    print("| route | stage | s |\n|---|---|---|")
    for route, info in results.items():
        for stage, seconds in info["stages"].items():
            print(f"| {route} | {stage} | {seconds:.2f} |")


def report_rounds(rounds: list[dict]) -> None:
    """Route wall time of every round, and the speed-up of the median times over the rounds."""
    print(f"\nRoute wall time in {len(rounds)} interleaved rounds (the first is the round detailed above):\n")
    print("| round | ours s | original (minimal) s | speed-up | as written s | speed-up |\n|---|---|---|---|---|---|")
    rows = [(str(i + 1), *(r[route]["route_s"] for route in ROUTES)) for i, r in enumerate(rounds)]
    rows.append(("median", *(float(np.median([r[route]["route_s"] for r in rounds])) for route in ROUTES)))
    for name, ours, minimal, written in rows:
        print(f"| {name} | {ours:.2f} | {minimal:.2f} | {minimal / ours:.1f}× | {written:.2f} | "
              f"{written / ours:.1f}× |")


def report_profile(info: dict) -> None:
    print(f"\ncProfile of ours ({info['route_s']:.2f} s under the profiler), functions with ≥ 0.05 s cumulative:\n")
    print("| function | calls | own s | cumulative s |\n|---|---|---|---|")
    for name, calls, own, cumulative in info["profile"]:
        print(f"| `{name}` | {calls} | {own:.2f} | {cumulative:.2f} |")


if __name__ == "__main__":
    main()
