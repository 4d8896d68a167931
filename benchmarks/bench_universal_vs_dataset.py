"""The paper's claim in miniature: one universal model against one model per dataset, on the demo phantoms.

Run: .venv/bin/python benchmarks/bench_universal_vs_dataset.py --work /tmp/universal_vs_dataset
(prints Markdown tables for BENCHMARKS.md and writes ``summary.json`` in ``--work``; ~42 min on 2 cores with the
defaults, of which ~half is the universal model's training).

What runs, with the library functions the workflow's rules call:

1. the demo datasets (``universal.synthetic.demo_data``: partially labelled phantoms in the layouts of MSD Task03 Liver,
   BTCV cases >= 61 and KiTS19, plus fully labelled external phantoms), harmonized and resampled into zarr stores
   at ``--spacing`` mm, and the class prompts embedded with open_clip's ViT-B-32 text tower (``pretrained:
   none``, as in the demo: nothing is downloaded), or, with ``--embeddings-from``, a precomputed table such as
   the original's CLIP ``txt_encoding.pth``;
2. the universal model trained on all training stores for ``--steps`` steps, with the demo config's training
   settings (``config/config.yaml``: backbone, features, patch size, batch size, learning rate, ...) and its
   dataset sampling weights;
3. one model per training dataset, same architecture and settings, each trained on its own store for
   ``--steps / N`` steps (N datasets): the same total compute, in steps of the same batch of patches;
4. every model predicts the ``--external-cases`` external phantoms (``universal.infer.batch.infer_cases``:
   probabilities mapped back onto each phantom's grid) and is scored by
   ``universal.evaluate.metrics.evaluate_predictions`` (Dice per
   case and class on the source grid); a model predicts only the classes its training data annotate;
5. the time to run on one case: ``infer_cases`` on the first external case (model load, NIfTI read, resampling,
   sliding window, post-processing, mapping back, OME-Zarr write), best of ``--repeats`` rounds that time every
   model once each, for the universal model and summed over the dataset-specific models.

Stages whose outputs exist in ``--work`` are reused (delete the folder for a fresh run); training times come from
``summary.json`` then.

With several ``--seeds`` each seed is a run of its own in ``--work/seed_<n>`` (its own phantoms, so its own
training and external data, and its own models), and a last table gives every model's Dice per class averaged over
the seeds, with the number of seeds in which the universal model is at least as good as the best dataset-specific
model: one run can be won or lost on a class by the run-to-run spread of training (hundredths of Dice), which the
mean over independent runs narrows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from universal.core.classes import load_class_table
from universal.data.catalog import find_cases, load_catalog
from universal.data.harmonize import harmonize_dataset
from universal.embed.prompts import EncoderSpec, embed_prompts, import_embeddings, save_embeddings
from universal.evaluate.metrics import evaluate_predictions
from universal.infer.batch import infer_cases, load_run
from universal.infer.settings import InferenceSettings
from universal.synthetic.demo_data import DEMO_DATASETS, write_demo_data
from universal.train.config import train_config_from_options
from universal.train.loop import train

REPO = Path(__file__).resolve().parent.parent
UNIVERSAL = "universal"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="working folder (stages found there are reused)")
    parser.add_argument("--cases", type=int, default=20, help="phantoms per training dataset")
    parser.add_argument("--external-cases", type=int, default=20,
                        help="fully labelled external phantoms the models are scored on")
    parser.add_argument("--steps", type=int, default=1800, help="training steps of the universal model")
    parser.add_argument("--spacing", type=float, default=4.0, help="store and model grid (mm, isotropic)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed rounds of the one-case inference (every model once per round)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="one run per seed (phantoms drawn with it); several: a table over the seeds at the end")
    parser.add_argument("--embeddings-from", type=Path, default=None,
                        help="import a precomputed table (e.g. the original's txt_encoding.pth) instead of embedding "
                             "with the random ViT-B-32 text tower")
    return parser.parse_args()


def prepare_data(work: Path, seed: int, args: argparse.Namespace, classes, catalog) -> dict[str, list]:
    """Demo datasets drawn with ``seed`` -> harmonized stores; returns dataset key -> its cases."""
    if not (work / "data" / "README.txt").exists():
        write_demo_data(work / "data", cases_per_dataset=args.cases, external_cases=args.external_cases,
                        seed=seed)
    cases = {}
    for key in DEMO_DATASETS:
        cases[key] = find_cases(catalog[key], work / "data" / key)
        store = work / "store" / f"{key}.zarr"
        if not store.exists():
            harmonize_dataset(cases[key], catalog[key], classes, store, (args.spacing,) * 3,
                              work / "store" / f"{key}.report.tsv")
    embeddings = work / "prompts.pt"
    if not embeddings.exists():
        record = (import_embeddings(args.embeddings_from, classes) if args.embeddings_from is not None
                  else embed_prompts(classes, EncoderSpec(model="ViT-B-32", pretrained="none")))
        save_embeddings(record, embeddings)
    return cases


def train_model(work: Path, name: str, stores: list[Path], weights: list[float], steps: int, options: dict,
                timings: dict) -> Path:
    """Train one model into ``work/models/<name>`` (or reuse it) on ``stores`` sampled with ``weights`` and record
    its wall time in ``timings``."""
    out_dir = work / "models" / name
    final = out_dir / "final.pt"
    if not final.exists():
        config = train_config_from_options({**options, "steps": steps}, stores=stores, weights=weights,
                                           embeddings=work / "prompts.pt", classes=None, include_classes=[],
                                           out_dir=out_dir)
        began = time.perf_counter()
        train(config)
        timings[name] = time.perf_counter() - began
    return final


def settings_from_config(config: dict) -> InferenceSettings:
    """The config's inference settings; the grid, window and ROI come from each checkpoint."""
    infer = config["infer"]
    return InferenceSettings(overlap=infer["overlap"], sw_batch_size=infer["sw_batch_size"],
                             threshold=infer["threshold"], device="cpu")


def predict(cases: list, checkpoint: Path, classes, out_dir: Path, settings: InferenceSettings) -> Path:
    """Load the model and predict ``cases`` into ``out_dir``, as one inference batch does; returns the report."""
    report = out_dir / "batch_0.tsv"
    infer_cases(cases, load_run(checkpoint, classes, settings), classes, out_dir, report)
    return report


def evaluate_model(work: Path, name: str, checkpoint: Path, cases: list, entry, classes,
                   settings: InferenceSettings) -> pd.DataFrame:
    """Predict and score the external cases with one model; rows (case_id, class, dice, predicted, ...)."""
    predictions = work / "predictions" / name
    report = predict(cases, checkpoint, classes, predictions, settings)
    metrics = work / "metrics" / name
    paths = evaluate_predictions(cases, entry, classes, predictions, report, metrics, work / "metrics" /
                                 f"{name}.failures.tsv")
    table = pd.concat([pd.read_csv(path, sep="\t") for path in paths], ignore_index=True)
    return table.assign(model=name)


def one_case_seconds(work: Path, checkpoints: dict[str, Path], case, classes, settings: InferenceSettings,
                     repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` wall time (s) of ``infer_cases`` on one case, model loading included, per model.

    One untimed call first takes the process's one-off costs (lazy imports, thread pools); then the repeats run in
    rounds, every model once per round, so a slow spell of the machine falls on all models alike instead of on
    whichever model was being timed then.
    """
    first = next(iter(checkpoints.values()))
    predict([case], first, classes, work / "timing" / "warm_up", settings)
    times: dict[str, list[float]] = {name: [] for name in checkpoints}
    for repeat in range(repeats):
        for name, checkpoint in checkpoints.items():
            began = time.perf_counter()
            predict([case], checkpoint, classes, work / "timing" / f"{name}_{repeat}", settings)
            times[name].append(time.perf_counter() - began)
    return {name: min(values) for name, values in times.items()}


def main() -> None:
    args = parse_args()
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    classes = load_class_table()
    catalog = load_catalog(None, classes)
    train_keys = [key for key in DEMO_DATASETS if catalog[key].role == "train"]
    means = {}
    for seed in args.seeds:
        work = args.work if len(args.seeds) == 1 else args.work / f"seed_{seed}"
        print(f"\n## seed {seed} ({work})")
        means[seed] = run_seed(work, seed, args, config, classes, catalog, train_keys)
    if len(args.seeds) > 1:
        report_over_seeds(means, classes, train_keys)


def run_seed(work: Path, seed: int, args: argparse.Namespace, config: dict, classes, catalog,
             train_keys: list[str]) -> pd.DataFrame:
    """One run: data, the universal and the dataset-specific models, their scores and timings (``summary.json``
    in ``work``); returns the mean Dice per class (rows) and model (columns)."""
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cases = prepare_data(work, seed, args, classes, catalog)
    external = next(key for key in DEMO_DATASETS if catalog[key].role == "external")
    options = {**config["train"], "device": "cpu", "checkpoint_every": 300}
    summary_path = work / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"train_seconds": {}}
    timings = summary["train_seconds"]

    stores = {key: work / "store" / f"{key}.zarr" for key in train_keys}
    weights = [float(config["datasets"][key].get("weight", 1.0)) for key in train_keys]
    checkpoints = {UNIVERSAL: train_model(work, UNIVERSAL, list(stores.values()), weights, args.steps, options,
                                          timings)}
    for key in train_keys:
        checkpoints[key] = train_model(work, key, [stores[key]], [1.0], args.steps // len(train_keys), options,
                                       timings)
    summary_path.write_text(json.dumps(summary, indent=1))

    settings = settings_from_config(config)
    tables = [evaluate_model(work, name, path, cases[external], catalog[external], classes, settings)
              for name, path in checkpoints.items()]
    scores = pd.concat(tables, ignore_index=True)
    scores = scores[scores["predicted"]]
    scores.to_csv(work / "dice_per_case.tsv", sep="\t", index=False)

    seconds = one_case_seconds(work, checkpoints, cases[external][0], classes, settings, args.repeats)
    summary.update(report(scores, seconds, timings, classes, args, train_keys))
    summary_path.write_text(json.dumps(summary, indent=1))
    return class_means(scores)


def class_means(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean Dice per class (rows) and model (columns) over the external cases whose ground truth holds the class."""
    held = scores[scores["gt_ml"] > 0]
    return held.groupby(["model", "class"])["dice"].mean().unstack("model")


def compare_class(mean: pd.DataFrame, name: str, train_keys: list[str], classes
                  ) -> tuple[dict[str, float], float, str, str, str]:
    """One class of a mean-Dice table (classes x models): the dataset-specific models that predict it with their
    Dice, the best of them (NaN if none), its kind, their table cells and the universal model's verdict."""
    others = {key: mean.at[name, key] for key in train_keys if pd.notna(mean.at[name, key])}
    best = max(others.values()) if others else float("nan")
    kind = "tumour" if classes[name].is_tumour else "organ"
    cells = " | ".join(f"{others[k]:.3f}" if k in others else "–" for k in train_keys)
    margin = mean.at[name, UNIVERSAL] - best
    verdict = "yes" if margin >= 0 else f"no ({margin:+.3f})"
    return others, best, kind, cells, verdict


def report_over_seeds(means: dict[int, pd.DataFrame], classes, train_keys: list[str]) -> None:
    """Print every model's Dice per class averaged over the seeds' runs, the best dataset-specific model's by that
    mean, and in how many runs the universal model was at least as good as that run's best specific model."""
    seeds = list(means)
    average = sum(means[seed] for seed in seeds) / len(seeds)
    print(f"\n## over {len(seeds)} seeds ({', '.join(map(str, seeds))}): mean Dice per class, each seed's mean over "
          "the external cases that hold the class\n")
    print(f"| class | kind | universal | {' | '.join(train_keys)} | universal >= best specific (mean) | "
          "runs with universal >= best specific |")
    print("|---|---|---|" + "---|" * len(train_keys) + "---|---|")
    wins = 0
    for name in average[UNIVERSAL].dropna().index:
        others, best, kind, cells, verdict = compare_class(average, name, train_keys, classes)
        wins += average.at[name, UNIVERSAL] >= best
        runs = sum(means[seed].at[name, UNIVERSAL] >= max(means[seed].at[name, key] for key in others)
                   for seed in seeds)
        print(f"| {name} | {kind} | {average.at[name, UNIVERSAL]:.3f} | {cells} | {verdict} | {runs} of "
              f"{len(seeds)} |")
    universal = average[UNIVERSAL].dropna()
    organs = [n for n in universal.index if not classes[n].is_tumour]
    tumours = [n for n in universal.index if classes[n].is_tumour]
    print(f"\nover the seeds, universal: organs {universal[organs].mean():.3f}, tumours "
          f"{universal[tumours].mean():.3f}; at least as good as the best specific model on {wins} of "
          f"{len(universal)} classes")


def report(scores: pd.DataFrame, seconds: dict[str, float], timings: dict[str, float], classes, args,
           train_keys: list[str]) -> dict:
    """Print the Markdown tables and return the figures for ``summary.json``.

    A class's mean Dice runs over the external cases whose ground truth holds it, the same cases for every model
    (MONAI's ``ignore_empty``). Per case a prediction of an absent class scores 0 and an absent class left empty
    NaN (nnU-Net's rule), so averaging each model over its own non-NaN rows would compare means over different
    cases: a model with one false voxel on a tumour-free case would average one case more, scored 0. False alarms,
    cases without the class where a model predicts it anyway, are counted in their own column.
    """
    mean = class_means(scores)
    absent = scores[scores["gt_ml"] == 0]
    false_alarms = (absent["pred_ml"] > 0).groupby([absent["class"], absent["model"]]).sum().unstack("model")
    absent_cases = absent.groupby("class")["case_id"].nunique()
    universal = mean[UNIVERSAL].dropna()
    rows, specific_best = [], {}
    for name in universal.index:
        others, specific_best[name], kind, cells, verdict = compare_class(mean, name, train_keys, classes)
        alarms = "–"
        if name in absent_cases.index:
            counts = " / ".join(f"{int(false_alarms.at[name, m])}" for m in [UNIVERSAL, *others])
            alarms = f"{counts} of {absent_cases[name]}"
        rows.append(f"| {name} | {kind} | {universal[name]:.3f} | {cells} | {verdict} | {alarms} |")
    print(f"\n{len(scores['case_id'].unique())} external phantoms, {args.spacing} mm; mean Dice per class over the "
          "cases that hold it; false alarms: cases without the class where it is predicted (universal / "
          "specific models):\n")
    print(f"| class | kind | universal | {' | '.join(train_keys)} | universal >= best specific | false alarms |")
    print("|---|---|---|" + "---|" * len(train_keys) + "---|---|")
    print("\n".join(rows))
    organs = [n for n in universal.index if not classes[n].is_tumour]
    tumours = [n for n in universal.index if classes[n].is_tumour]
    figures = {
        "universal_mean_dice_organs": float(universal[organs].mean()),
        "universal_mean_dice_tumours": float(universal[tumours].mean()),
        "classes_universal_at_least_best_specific": int(sum(universal[n] >= specific_best[n] for n in universal.index)),
        "classes": len(universal),
        "one_case_seconds": seconds,
        "one_case_speedup": sum(seconds[k] for k in train_keys) / seconds[UNIVERSAL],
    }
    print(f"\nmean Dice, universal: organs {figures['universal_mean_dice_organs']:.3f} ({len(organs)} classes), "
          f"tumours {figures['universal_mean_dice_tumours']:.3f} ({len(tumours)} classes)")
    print("\n| model | training steps | training s | one case s |\n|---|---|---|---|")
    for name in [UNIVERSAL, *train_keys]:
        steps = args.steps if name == UNIVERSAL else args.steps // len(train_keys)
        print(f"| {name} | {steps} | {timings.get(name, float('nan')):.0f} | {seconds[name]:.2f} |")
    print(f"\none case: universal {seconds[UNIVERSAL]:.2f} s, all dataset-specific models together "
          f"{sum(seconds[k] for k in train_keys):.2f} s: {figures['one_case_speedup']:.1f}x")
    return figures


if __name__ == "__main__":
    main()
