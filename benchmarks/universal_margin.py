"""How far the universal model is ahead of the best dataset-specific model, class by class, over repeated runs.

Run on the work folders of ``bench_universal_vs_dataset.py``, one per seed (each seed makes its own phantoms and
trains every model anew, so the runs are independent repeats of the whole benchmark):

    .venv/bin/python benchmarks/universal_margin.py --work X0 F8 F9 X10 X11

Per run and class, the margin is the universal model's mean Dice over the external cases that hold the class minus
that of the run's best dataset-specific model for the class (the benchmark's own comparison). Per class it prints
the margin's mean over the runs, its standard deviation between runs, a 95 % confidence interval for the mean
margin (Student's t over the runs, ``scipy.stats.ttest_1samp``) and the number of runs with a margin >= 0.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from bench_universal_vs_dataset import UNIVERSAL, class_means
from scipy import stats

from universal.core.classes import load_class_table


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, nargs="+", required=True,
                        help="bench_universal_vs_dataset work folders, one per seed (at least two)")
    parser.add_argument("--confidence", type=float, default=0.95, help="of the interval for the mean margin")
    return parser.parse_args()


def run_margins(work: Path) -> pd.Series:
    """Universal mean Dice minus the best dataset-specific model's, per class that a dataset-specific model
    predicts, for one run (``work/dice_per_case.tsv``)."""
    path = work / "dice_per_case.tsv"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no per-case Dice; run bench_universal_vs_dataset.py --work {work} first")
    means = class_means(pd.read_csv(path, sep="\t"))
    best = means.drop(columns=UNIVERSAL).max(axis=1, skipna=True)
    return (means[UNIVERSAL] - best).dropna()


def margin_table(margins: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """Per class (rows of ``margins``, runs as columns): mean, between-run SD, the t interval for the mean and the
    runs ahead."""
    rows = {}
    for name, values in margins.iterrows():
        interval = stats.ttest_1samp(values.to_numpy(), 0.0).confidence_interval(confidence)
        rows[name] = {"mean": values.mean(), "sd": values.std(ddof=1), "low": interval.low, "high": interval.high,
                      "runs_ahead": int((values >= 0).sum())}
    return pd.DataFrame.from_dict(rows, orient="index")


def main() -> None:
    args = parse_args()
    if len(args.work) < 2:
        raise SystemExit("--work needs at least two runs for a between-run interval")
    margins = pd.concat({work.name: run_margins(work) for work in args.work}, axis=1, join="inner")
    margins = margins.reindex([name for name in load_class_table().names if name in margins.index])
    table = margin_table(margins, args.confidence)
    percent = f"{args.confidence:.0%}"
    print(f"| class | {' | '.join(margins.columns)} | mean | SD between runs | {percent} interval | runs ahead |")
    print("|---|" + "---|" * (len(margins.columns) + 4))
    for name, row in table.iterrows():
        cells = " | ".join(f"{value:+.3f}" for value in margins.loc[name])
        print(f"| {name} | {cells} | {row['mean']:+.4f} | {row['sd']:.3f} | {row['low']:+.3f} to {row['high']:+.3f} "
              f"| {int(row['runs_ahead'])} of {len(margins.columns)} |")


if __name__ == "__main__":
    main()
