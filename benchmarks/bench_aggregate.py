"""Dask aggregation of many per-case metric tables: ``universal.evaluate.aggregate.aggregate`` end to end.

Run: .venv/bin/python benchmarks/bench_aggregate.py [--cases 2000] [--threads 2] [--repeats 3]
     [--files-per-partition 64 1] [--workers thread process]

Setup (not timed): ``--cases`` per-case TSVs of the 31 classes (``write_metrics``, as evaluation writes them) in a
temporary folder, spread over 4 datasets, with random Dice, NSD and HD95, every 7th class absent (NaN), a few
infinite HD95 values and tumours detected or not. Timed: ``aggregate`` with ``--threads`` threads, fresh output
folder each time: reading every table, the per-class and per-dataset summaries, the detection tables, every table
as TSV and Parquet, and the three box plots. Each ``--files-per-partition`` setting (tables read per dask
partition) and each ``--workers`` kind is timed ``--repeats`` times, the settings interleaved. Workers: ``thread``
is what ``aggregate`` starts by default (a ``LocalCluster`` of one worker in the process, ``--threads`` threads);
``process`` is a ``LocalCluster`` of ``--threads`` single-threaded worker processes (started and closed inside the
timed part, as the default one is), handed to ``aggregate`` as a running scheduler.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from distributed import LocalCluster

from universal.core.classes import ClassTable, load_class_table
from universal.evaluate import aggregate as aggregation
from universal.evaluate.metrics import METRIC_COLUMNS, write_metrics

DATASETS = ("ext_a", "ext_b", "ext_c", "ext_d")
log = logging.getLogger("bench_aggregate")


def case_table(classes: ClassTable, case: int, rng: np.random.Generator) -> pd.DataFrame:
    """One synthetic per-case table (31 rows, the columns evaluation writes)."""
    n = len(classes)
    absent = np.array([c.index % 7 == 0 for c in classes])
    dice = np.where(absent, np.nan, rng.beta(8, 2, n))
    hd95 = np.where(absent, np.nan, rng.gamma(2.0, 3.0, n))
    hd95[rng.random(n) < 0.02] = np.inf
    gt_ml = np.where(rng.random(n) < 0.7, rng.gamma(2.0, 50.0, n), 0.0)
    pred_ml = np.where(rng.random(n) < 0.7, rng.gamma(2.0, 50.0, n), 0.0)
    return pd.DataFrame({
        "dataset": DATASETS[case % len(DATASETS)], "case_id": f"case_{case:05d}", "class": classes.names,
        "kind": [c.kind for c in classes], "predicted": True, "annotated": True, "dice": dice,
        "nsd": np.where(absent, np.nan, rng.beta(6, 2, n)), "nsd_tolerance_mm": 1.0, "hd95_mm": hd95,
        "gt_ml": gt_ml, "pred_ml": pred_ml}, columns=list(METRIC_COLUMNS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--files-per-partition", type=int, nargs="+", default=[aggregation.FILES_PER_PARTITION])
    parser.add_argument("--workers", nargs="+", choices=("thread", "process"), default=["thread"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    classes = load_class_table()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "metrics"
        began = time.perf_counter()
        paths = []
        for case in range(args.cases):
            paths.append(folder / f"case_{case:05d}.tsv")
            write_metrics(case_table(classes, case, rng), paths[-1])
        log.info("setup: %d tables written in %.1f s", len(paths), time.perf_counter() - began)
        settings = [(files, workers) for files in args.files_per_partition for workers in args.workers]
        times: dict[tuple[int, str], list[float]] = {setting: [] for setting in settings}
        for repeat in range(args.repeats):
            for files, workers in settings:
                aggregation.FILES_PER_PARTITION = files
                out = Path(work) / f"out_{files}_{workers}_{repeat}"
                began = time.perf_counter()
                run_aggregation(paths, classes, out, args.threads, workers)
                times[files, workers].append(time.perf_counter() - began)
                log.info("%d files per partition, %s workers, run %d: %.2f s", files, workers, repeat + 1,
                         times[files, workers][-1])
        rows = len(pd.read_parquet(out / "per_case.parquet"))
    print(f"\n{args.cases} per-case tables ({rows} rows), {args.threads} threads, {args.repeats} runs each\n")
    print("| files per partition | workers | runs (s) | median s | min–max s |\n|---|---|---|---|---|")
    for (files, workers), runs in times.items():
        print(f"| {files} | {workers} | {' / '.join(f'{t:.2f}' for t in runs)} | {statistics.median(runs):.2f} | "
              f"{min(runs):.2f}–{max(runs):.2f} |")


def run_aggregation(paths: list[Path], classes: ClassTable, out: Path, threads: int, workers: str) -> None:
    """``aggregate`` on its default cluster (``thread``) or on a cluster of worker processes started here."""
    if workers == "thread":
        aggregation.aggregate(paths, classes, out, threads=threads)
        return
    with LocalCluster(n_workers=threads, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        aggregation.aggregate(paths, classes, out, scheduler=cluster.scheduler_address)


if __name__ == "__main__":
    main()
