"""Aggregate per-case metric tables with dask into per-class and per-dataset summaries, and plot them.

Per-case tables (TSV, one row per class: see :mod:`universal.evaluate.metrics`) are read lazily by a dask dataframe,
so thousands of cases aggregate in parallel on the cores the rule was given (a local threaded scheduler by
default; pass a ``scheduler`` address to use an existing dask cluster).
"""

from __future__ import annotations

from pathlib import Path

import dask
import dask.dataframe as dd
import matplotlib
import pandas as pd

from universal.core.atomic import atomic_output
from universal.core.classes import ClassTable
from universal.evaluate.metrics import FAILURE_COLUMNS

matplotlib.use("Agg")
import matplotlib.pyplot as plt

METRIC_DTYPES = {"dataset": str, "case_id": str, "class": str, "kind": str, "predicted": bool, "dice": "float64",
                 "gt_ml": "float64", "pred_ml": "float64"}
SUMMARY = {"dice": ["mean", "median", "std", "count"], "gt_ml": ["mean"], "pred_ml": ["mean"]}


def read_metrics(paths: list[str | Path]) -> dd.DataFrame:
    """A dask dataframe over per-case metric TSVs (one partition per file)."""
    if not paths:
        raise ValueError("no per-case metric tables to aggregate")
    return dd.read_csv([str(p) for p in paths], sep="\t", dtype=METRIC_DTYPES)


def summarise(frame: dd.DataFrame, by: list[str], threads: int) -> pd.DataFrame:
    """Mean, median, std and count of Dice (NaN excluded) and mean volumes, grouped by ``by`` columns."""
    with dask.config.set(scheduler="threads", num_workers=max(1, threads)):
        table = frame.groupby(by).agg(SUMMARY).compute()
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    return table.reset_index()


def aggregate(paths: list[str | Path], classes: ClassTable, out_dir: str | Path, threads: int = 1,
              failures: list[str | Path] = ()) -> dict[str, Path]:
    """Write per_case.tsv, per_class.tsv, per_dataset_class.tsv, dice_per_class.png and failed_cases.tsv (the
    evaluation batches' failure lists joined: the cases that could not be scored, with the stage and reason)
    into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = read_metrics(paths)
    order = {name: i for i, name in enumerate(classes.names)}
    per_class = summarise(frame, ["class", "kind", "predicted"], threads)
    per_class = per_class.sort_values("class", key=lambda s: s.map(order)).reset_index(drop=True)
    per_dataset = summarise(frame, ["dataset", "class", "kind", "predicted"], threads)
    per_dataset = per_dataset.sort_values(["dataset", "class"], key=lambda s: s.map(order) if s.name == "class"
                                          else s).reset_index(drop=True)
    with dask.config.set(scheduler="threads", num_workers=max(1, threads)):
        per_case = frame.compute()
    outputs = {"per_case": out_dir / "per_case.tsv", "per_class": out_dir / "per_class.tsv",
               "per_dataset_class": out_dir / "per_dataset_class.tsv", "plot": out_dir / "dice_per_class.png",
               "failed": out_dir / "failed_cases.tsv"}
    failed = [pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False) for p in failures]
    _write_tsv(pd.concat(failed, ignore_index=True) if failed else pd.DataFrame(columns=FAILURE_COLUMNS),
               outputs["failed"])
    for key, table in (("per_case", per_case), ("per_class", per_class), ("per_dataset_class", per_dataset)):
        _write_tsv(table, outputs[key])
    plot_dice(per_case, classes, outputs["plot"])
    return outputs


def _write_tsv(table: pd.DataFrame, path: Path) -> None:
    with atomic_output(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.4f")


def plot_dice(per_case: pd.DataFrame, classes: ClassTable, path: Path) -> None:
    """Box plot of per-case Dice for each predicted class with ground truth, in the class colours."""
    predicted = set(per_case.loc[per_case["predicted"].astype(bool), "class"])
    present = [c for c in classes
               if c.name in predicted and per_case.loc[per_case["class"] == c.name, "dice"].notna().any()]
    skipped = len({c.name for c in classes} & set(per_case["class"]) - predicted)
    data = [per_case.loc[per_case["class"] == c.name, "dice"].dropna().to_numpy() for c in present]
    figure, axis = plt.subplots(figsize=(max(6.0, 0.38 * len(present) + 2), 4.5), dpi=110)
    boxes = axis.boxplot(data, patch_artist=True, widths=0.6) if data else None
    if boxes is not None:
        for patch, cls in zip(boxes["boxes"], present, strict=True):
            patch.set_facecolor([v / 255 for v in cls.colour])
    axis.set_xticks(range(1, len(present) + 1), [c.name for c in present], rotation=70, ha="right", fontsize=8)
    axis.set_ylim(0, 1)
    axis.set_ylabel("Dice per case")
    note = f"\n{skipped} classes not predicted: no training case annotates them" if skipped else ""
    axis.set_title(f"Dice per class, {per_case['case_id'].nunique()} cases{note}", fontsize=10)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp)
    plt.close(figure)
