"""Dice + NSD + HD95 of the 31 classes on one 256x256x160 case: ``universal.evaluate.metrics.evaluate_case`` against
MONAI's ``DiceMetric``, ``SurfaceDiceMetric`` and ``HausdorffDistanceMetric``, side by side in one run.

Run: .venv/bin/python benchmarks/bench_metrics.py [--rounds 2] [--repeats 3] [--seed 0]

Setup (not timed): the phantom (``make_phantom``) at 256x256x160 voxels of 1.4x1.1x2.4 mm (x, y, z) is the ground
truth. The prediction is its two exclusive maps (organ regions, tumours) made wrong in the ways a model's are, class
by class in turn: unchanged, shifted by 1-2 voxels, one voxel thicker (into background) or one voxel thinner;
Celiac Trunk missed; 1,000 organ and 200 tumour voxels of random classes scattered over the volume (so every
class has far-away false positives and no class's box of prediction and truth stays small). MONAI gets what a user
would hand it: one-hot float32 tensors (1, 32, 256, 256, 160), channel 0 the background, channels 1-31 the class
regions (built once, its time reported apart).

Timed, in ``--rounds`` rounds so that both routes share the machine's load: ours, ``evaluate_case`` from the label
maps (per-class regions, Dice, NSD at 1 mm, HD95 and volumes), ``--repeats`` runs; then MONAI once, each metric's
call (``DiceMetric(include_background=False)``, ``SurfaceDiceMetric(class_thresholds=[1.0] * 31,
include_background=False)`` and ``HausdorffDistanceMetric(include_background=False, percentile=95)``, spacing given
to the last two). The speed-up of a round is MONAI's three against our median in that round. The values are
compared class by class where the definitions agree: Dice where the ground truth is not empty (MONAI: NaN
otherwise), NSD and HD95 where both are finite.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric
from scipy import ndimage

from universal.core.classes import ClassTable, load_class_table
from universal.core.volume import Volume
from universal.evaluate.metrics import evaluate_case, truth_maps
from universal.synthetic.phantom import make_phantom

SHAPE = (256, 256, 160)
SPACING = (1.4, 1.1, 2.4)
MIDLINE_X_MM = 0.0  # the phantom's sagittal plane
log = logging.getLogger("bench_metrics")


def perturbed(exclusive: np.ndarray, values: list[int], spots: int, rng: np.random.Generator) -> np.ndarray:
    """A wrong copy of an exclusive label map (x, y, z): the ``values`` in turn unchanged, shifted by 1-2 voxels,
    one voxel thicker into background, one voxel thinner; then ``spots`` voxels of random values scattered."""
    out = exclusive.copy()
    for k, value in enumerate(values):
        mask = exclusive == value
        if k % 4 == 1:
            out[mask] = 0
            out[np.roll(mask, 1 + k % 2, axis=k % 3) & (out == 0)] = value
        elif k % 4 == 2:
            out[ndimage.binary_dilation(mask) & (out == 0)] = value
        elif k % 4 == 3:
            out[mask & ~ndimage.binary_erosion(mask)] = 0
    out.reshape(-1)[rng.choice(out.size, spots, replace=False)] = rng.choice(values, spots)
    return out


def make_case(classes: ClassTable, seed: int) -> tuple[Volume, np.ndarray, np.ndarray]:
    """(ground truth label volume, predicted organ map, predicted tumour map), arrays (x, y, z)."""
    phantom = make_phantom(seed, SHAPE, SPACING)
    truth = Volume(phantom.label, phantom.affine)
    organ_regions, tumours = truth_maps(truth.array, classes, truth.affine, MIDLINE_X_MM)
    rng = np.random.default_rng(seed)
    organs = perturbed(organ_regions, [c.index for c in classes.organs()], 1000, rng)
    organs[organs == classes["Celiac Trunk"].index] = 0
    return truth, organs, perturbed(tumours, [c.index for c in classes.tumours()], 200, rng)


def one_hot(organs: np.ndarray, tumours: np.ndarray, classes: ClassTable) -> torch.Tensor:
    """(1, 1 + C, X, Y, Z) float32: channel 0 the background, then each class's region in class-table order."""
    out = torch.zeros((1, len(classes) + 1, *organs.shape), dtype=torch.float32)
    out[0, 0] = torch.from_numpy((organs == 0) & (tumours == 0))
    for channel, cls in enumerate(classes, start=1):
        out[0, channel] = torch.from_numpy((tumours if cls.is_tumour else organs) == cls.index)
    return out


def monai_metrics(y_pred: torch.Tensor, y: torch.Tensor, n: int) -> dict[str, tuple[np.ndarray, float]]:
    """Each MONAI metric's values (C,) and the seconds its call took."""
    metrics = {"Dice": (DiceMetric(include_background=False), {}),
               "NSD": (SurfaceDiceMetric(class_thresholds=[1.0] * n, include_background=False), {"spacing": SPACING}),
               "HD95": (HausdorffDistanceMetric(include_background=False, percentile=95), {"spacing": SPACING})}
    results = {}
    for name, (metric, kwargs) in metrics.items():
        began = time.perf_counter()
        values = metric(y_pred, y, **kwargs)
        results[name] = (values[0].numpy().astype(np.float64), time.perf_counter() - began)
    return results


def agreement(ours: np.ndarray, theirs: np.ndarray, where: np.ndarray) -> str:
    """'max |difference| over k classes' of the classes selected by ``where``."""
    if not where.any():
        return "no class to compare"
    return f"{np.max(np.abs(ours[where] - theirs[where])):.2e} over {int(where.sum())} classes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    warnings.filterwarnings("ignore", message=".*is all 0.*")  # MONAI's warnings for the empty classes
    classes = load_class_table()
    began = time.perf_counter()
    truth, organs, tumours = make_case(classes, args.seed)
    log.info("setup: phantom and prediction in %.1f s", time.perf_counter() - began)
    began = time.perf_counter()
    truth_organs, truth_tumours = truth_maps(truth.array, classes, truth.affine, MIDLINE_X_MM)
    y_pred, y = one_hot(organs, tumours, classes), one_hot(truth_organs, truth_tumours, classes)
    one_hot_s = time.perf_counter() - began
    ours_s, rounds, ratios = [], [], []
    for _ in range(args.rounds):
        ours_round = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            table = evaluate_case(organs, tumours, truth, classes, MIDLINE_X_MM, "bench", "case")
            ours_round.append(time.perf_counter() - began)
        rounds.append(monai_metrics(y_pred, y, len(classes)))
        ours_s += ours_round
        ratios.append(sum(t for _, t in rounds[-1].values()) / statistics.median(ours_round))
        log.info("ours %s s; MONAI %s", " / ".join(f"{t:.3f}" for t in ours_round),
                 ", ".join(f"{name} {t:.1f} s" for name, (_, t) in rounds[-1].items()))
    monai_s = [sum(t for _, t in r.values()) for r in rounds]
    values = {name: theirs for name, (theirs, _) in rounds[0].items()}
    dice, nsd, hd95 = (table[column].to_numpy(np.float64) for column in ("dice", "nsd", "hd95_mm"))
    gt_present = table["gt_ml"].to_numpy() > 0

    print(f"\n31 classes, {'x'.join(map(str, SHAPE))} voxels of {SPACING} mm, seed {args.seed}; torch threads "
          f"{torch.get_num_threads()}; one-hot tensors for MONAI built in {one_hot_s:.1f} s (not counted)\n")
    print("| route | runs (s) | median s | min–max s |\n|---|---|---|---|")
    print(f"| ours: `evaluate_case` (Dice + NSD + HD95 + volumes) | {' / '.join(f'{t:.3f}' for t in ours_s)} | "
          f"{statistics.median(ours_s):.3f} | {min(ours_s):.3f}–{max(ours_s):.3f} |")
    for name in ("Dice", "NSD", "HD95"):
        runs = [r[name][1] for r in rounds]
        print(f"| MONAI {name} | {' / '.join(f'{t:.1f}' for t in runs)} | {statistics.median(runs):.1f} | "
              f"{min(runs):.1f}–{max(runs):.1f} |")
    print(f"| MONAI, the three | {' / '.join(f'{t:.1f}' for t in monai_s)} | {statistics.median(monai_s):.1f} | "
          f"{min(monai_s):.1f}–{max(monai_s):.1f} |")
    print(f"\nspeed-up per round (MONAI's three / our median in that round): "
          f"{' / '.join(f'{r:.0f}x' for r in ratios)}; medians over all: "
          f"{statistics.median(monai_s) / statistics.median(ours_s):.0f}x\n")
    print("| metric | agreement with MONAI (max abs difference) | not compared |\n|---|---|---|")
    print(f"| Dice | {agreement(dice, values['Dice'], gt_present)} | {int((~gt_present).sum())} classes absent "
          f"from the ground truth (MONAI NaN, ours {', '.join(f'{v:g}' for v in dice[~gt_present])}) |")
    for name, ours in (("NSD", nsd), ("HD95", hd95)):
        both = np.isfinite(ours) & np.isfinite(values[name])
        others = [f"{cls}: ours {a:g}, MONAI {b:g}" for cls, a, b, ok
                  in zip(classes.names, ours, values[name], both, strict=True) if not ok]
        print(f"| {name} | {agreement(ours, values[name], both)} | {'; '.join(others) or '-'} |")


if __name__ == "__main__":
    main()
