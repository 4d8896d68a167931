"""One large CT end to end: our inference against the original's route, and peak memory against a float32 MONAI
accumulator.

Run: .venv/bin/python benchmarks/bench_infer.py [--shape 512 512 200] [--spacing 0.78 0.78 2.5] [--routes ...]
     [--before DIR]

Setup (not timed): a synthetic CT (an elliptic body of soft tissue with noise, lungs above and air around it,
int16 HU) is written as .nii.gz; a model with the original U-Net's layers (Models Genesis UNet3D, batch
statistics; random weights, every class of the class table predicted) is saved twice: as the original's own
checkpoint (``net`` with ``module.backbone.*`` keys) and converted by ``universal import-checkpoint``; two U-Nets
of ours (MONAI blocks; ``unet``: the default widths, ``small``: the demo's) are saved with the original's
preprocessing (1.5 mm, -175..250 HU, 96³ windows). ``--model`` picks the one every route runs, so all routes run
the same weights.

Routes, each in its own process (wall time from the process's start of work to its last file; peak RSS):

- ``original``: the original's ``pred_pseudo.py`` route with MONAI as its README runs it: LoadImaged, Orientationd
  (RAS), Spacingd (1.5 mm, bilinear), ScaleIntensityRanged, CropForegroundd (HU > -175), then
  ``sliding_window_inference`` (96³, window batch 1, overlap 0.5, Gaussian), sigmoid, threshold 0.5, the largest
  26-connected component of each organ, and per class ``Invertd`` (nearest) and one NIfTI per class;
- ``ours``: ``universal.infer.batch``: our reader, resampling, float16 sliding window over the body (two windows
  per pass; one for the batch-statistics U-Net), post-processing, mapping back through the probabilities,
  OME-Zarr, per-class statistics and the organ and tumour label maps as NIfTI;
- ``monai32``: ``ours`` with the sliding window replaced by MONAI's ``sliding_window_inference`` and float32
  probabilities of every class (the inference before :mod:`universal.infer.sliding`), for the memory "before".

Every route runs the ``universal`` package of this script's checkout (put on the child's ``PYTHONPATH``);
``--before DIR`` runs route ``ours`` first with the package of another checkout (``DIR``, e.g. a ``git worktree``
of an older commit) on the same CT and weights, so one invocation measures a change before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROUTES = ("original", "ours", "monai32")
MODELS = {"original": "converted.pt", "unet": "ours.pt", "small": "small.pt"}


def write_ct(path: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int = 0) -> None:
    """A synthetic CT: air, an elliptic body (40 HU) filling 80 % of the field, lungs (-850 HU) in its upper
    third, a denser 'liver' and 'spleen' (60 and 50 HU), Gaussian noise of 15 HU; int16, RAS affine."""
    rng = np.random.default_rng(seed)
    x, y, z = (np.linspace(-1, 1, n, dtype=np.float32) for n in shape)
    body = (x[:, None] ** 2 / 0.8 ** 2 + y[None, :] ** 2 / 0.6 ** 2) <= 1.0
    ct = np.full(shape, -1000, dtype=np.int16)
    ct[body] = 40
    upper = z > 0.4
    lungs = (((np.abs(x[:, None]) - 0.4) ** 2 / 0.25 ** 2 + y[None, :] ** 2 / 0.35 ** 2) <= 1.0)
    ct[..., upper] = np.where(lungs[..., None], -850, ct[..., upper])
    for centre, radius, hu in (((-0.35, 0.0, 0.1), 0.3, 60), ((0.45, 0.1, 0.0), 0.15, 50)):
        organ = sum(((a - c) / radius) ** 2 for a, c in zip(np.meshgrid(x, y, z, indexing="ij", sparse=True),
                                                               centre, strict=True)) <= 1.0
        ct[organ] = hu
    ct = (ct + rng.normal(0, 15, shape).astype(np.float32)).clip(-1024, 3071).astype(np.int16)
    nib.save(nib.Nifti1Image(ct, np.diag([*spacing, 1.0])), str(path))


def make_checkpoints(work: Path) -> None:
    """The original's checkpoint file (random weights), our conversion of it, and a checkpoint of our own U-Net
    with the original's preprocessing."""
    from universal.core.classes import load_class_table
    from universal.model.import_original import import_original_checkpoint, original_model_config
    from universal.model.network import ModelConfig, build_model, save_checkpoint
    from universal.model.preprocessing import ORIGINAL_PREPROCESSING

    with_cyst = load_class_table(include=["Kidney Cyst"])  # the original's 32 rows, in its order
    torch.manual_seed(0)
    model = build_model(original_model_config("unet"), torch.randn(len(with_cyst), 512))
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    original = work / "original_unet.pth"
    torch.save({"net": state, "epoch": 0}, original)
    converted = work / "converted.pt"
    classes = load_class_table()
    import_original_checkpoint(original, converted, classes)
    ours = ModelConfig(backbone="unet")
    small = ModelConfig(backbone="unet", features=(16, 16, 32, 64, 128, 16))
    for name, config in (("ours.pt", ours), ("small.pt", small)):
        save_checkpoint(work / name, build_model(config, torch.randn(len(classes), 512)), config, classes.names,
                        {"trained_classes": classes.names}, ORIGINAL_PREPROCESSING.to_dict())


def route_ours(ct: Path, checkpoint: Path, out: Path, monai32: bool, device: str) -> None:
    from universal.core.classes import load_class_table
    from universal.data.catalog import Case
    from universal.infer.batch import infer_cases, load_run
    from universal.infer.settings import InferenceSettings

    if monai32:
        _use_monai_float32()
    classes = load_class_table()
    run = load_run(checkpoint, classes, InferenceSettings(export_nifti=True, device=device))
    outcomes = infer_cases([Case("bench", "ct", ct, None)], run, classes, out, out / "batch_0.tsv")
    if outcomes[0].status != "ok":
        raise RuntimeError(f"case {outcomes[0].status}: {outcomes[0].error}")


def _use_monai_float32() -> None:
    """Swap our float16 sliding window for MONAI's float32 one over the whole grid (the inference before)."""
    from monai.inferers import sliding_window_inference

    import universal.infer.predict as predict

    def monai_logits(model, hu, inputs, channels, roi, overlap, batch_size, device, mirror_channels=None):
        with torch.inference_mode():
            logits = sliding_window_inference(torch.from_numpy(inputs)[None, None], roi, batch_size,
                                              lambda x: model(x, classes=list(channels)), overlap=overlap,
                                              mode="gaussian")
        return torch.sigmoid(logits[0]).numpy()

    predict.predict_logits = monai_logits


def route_original(ct: Path, checkpoint: Path, out: Path) -> None:
    """The original's inference as its README's direct inference runs it, with MONAI transforms."""
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        Orientationd,
        SaveImaged,
        ScaleIntensityRanged,
        Spacingd,
    )

    from universal.core.classes import load_class_table
    from universal.infer.postprocess import largest_component
    from universal.model.network import load_checkpoint

    classes = load_class_table()
    model, _ = load_checkpoint(checkpoint)
    model.eval()
    transforms = Compose([
        LoadImaged(keys=["image"]), EnsureChannelFirstd(keys=["image"]), Orientationd(keys=["image"], axcodes="RAS"),
        Spacingd(keys=["image"], pixdim=(1.5, 1.5, 1.5), mode="bilinear"),
        ScaleIntensityRanged(keys=["image"], a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys=["image"], source_key="image"),
    ])
    data = transforms({"image": str(ct)})
    with torch.inference_mode():
        logits = sliding_window_inference(data["image"][None], (96, 96, 96), 1, model, overlap=0.5, mode="gaussian")
    masks = (torch.sigmoid(logits[0]) > 0.5).numpy()
    for k, cls in enumerate(classes):
        if cls.kind == "organ" and cls.postprocess != "none":
            masks[k] = largest_component(masks[k]) if masks[k].any() else masks[k]
    for k, cls in enumerate(classes):
        item = dict(data)
        item["pred"] = type(data["image"])(torch.from_numpy(masks[k:k + 1].astype(np.float32)),
                                           meta=data["image"].meta, applied_operations=data["image"].applied_operations)
        invert = Compose([Invertd(keys="pred", transform=transforms, orig_keys="image", nearest_interp=True),
                          SaveImaged(keys="pred", output_dir=str(out), output_postfix=cls.name, separate_folder=False,
                                     resample=False, print_log=False)])
        invert(item)


def child(route: str, work: Path, model: str, device: str) -> dict:
    ct, out, checkpoint = work / "ct.nii.gz", work / f"out_{route}_{model}_{device}", work / MODELS[model]
    shutil.rmtree(out, ignore_errors=True)  # an earlier run's outputs would be skipped, not computed
    began = time.perf_counter()
    if route == "original":
        route_original(ct, checkpoint, out)
    else:
        route_ours(ct, checkpoint, out, monai32=route == "monai32", device=device)
    return {"seconds": time.perf_counter() - began,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "files": sum(1 for _ in out.rglob("*") if _.is_file())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 200))
    parser.add_argument("--spacing", type=float, nargs=3, default=(0.78, 0.78, 2.5))
    parser.add_argument("--routes", nargs="+", choices=ROUTES, default=list(ROUTES))
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--child", choices=ROUTES, help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=tuple(MODELS), default="original")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--before", type=Path, default=None,
                        help="a checkout of older code: route ours runs with its universal package first")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_infer_"))
    if args.child:
        print(json.dumps(child(args.child, work, args.model, args.device)))
        return
    work.mkdir(parents=True, exist_ok=True)
    write_ct(work / "ct.nii.gz", tuple(args.shape), tuple(args.spacing))
    make_checkpoints(work)
    print(f"CT {tuple(args.shape)} at {tuple(args.spacing)} mm; model {args.model}; {torch.get_num_threads()} "
          f"threads; {args.device}\n")
    print("| route | code | s | peak RSS MiB | files |\n|---|---|---|---|---|")
    runs = [("ours", args.before)] if args.before else []
    for route, checkout in [*runs, *((route, None) for route in args.routes)]:
        checkout = checkout or Path(__file__).resolve().parents[1]  # default: this script's own checkout
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        result = subprocess.run([sys.executable, __file__, "--child", route, "--work", str(work), "--model",
                                 args.model, "--device", args.device], capture_output=True, text=True, env=env)
        code = commit_of(checkout)
        if result.returncode != 0:
            print(f"| {route} | {code} | failed: {result.stderr.strip().splitlines()[-1]} | | |", flush=True)
            continue
        row = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"| {route} | {code} | {row['seconds']:.1f} | {row['peak_rss_mib']:.0f} | {row['files']} |",
              flush=True)


def commit_of(path: Path) -> str:
    """The short commit of the checkout holding ``path`` (``+`` when it has uncommitted changes)."""
    head = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "") if head.returncode == 0 else "?"


if __name__ == "__main__":
    main()
