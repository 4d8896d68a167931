"""Aggregate per-case metric tables with dask into per-class and per-dataset summaries, and plot them.

Per-case tables (TSV, one row per class: see :mod:`universal.evaluate.metrics`) are read lazily by a dask dataframe,
so thousands of cases aggregate in parallel. Where the work runs (:func:`dask_client`):

- by default a ``distributed.LocalCluster`` sized from the job: one single-threaded worker process per thread the
  rule was given, sharing the job's memory (``mem_mb``), so dask stays inside what Slurm granted;
- ``scheduler``: an existing dask scheduler, by address (``tcp://host:8786``) or scheduler file (the JSON file
  ``dask scheduler --scheduler-file`` or ``dask-mpi`` write);
- ``slurm_cluster``: a dask-jobqueue ``SLURMCluster`` this process starts (its worker jobs are submitted to Slurm
  beside Snakemake's own, outside its job limits: meant for interactive analysis of large evaluations).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask.dataframe as dd
import matplotlib
import pandas as pd

from universal.core.atomic import atomic_output
from universal.core.classes import ClassTable
from universal.evaluate.metrics import FAILURE_COLUMNS

matplotlib.use("Agg")
import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from dask_jobqueue import SLURMCluster
    from distributed import Client

log = logging.getLogger(__name__)

METRIC_DTYPES = {"dataset": str, "case_id": str, "class": str, "kind": str, "predicted": bool, "dice": "float64",
                 "gt_ml": "float64", "pred_ml": "float64"}
SUMMARY = {"dice": ["mean", "median", "std", "count"], "gt_ml": ["mean"], "pred_ml": ["mean"]}
WORKER_WAIT_SECONDS = 600  # how long a SLURMCluster may take to get its first worker job running


@contextmanager
def dask_client(threads: int = 1, memory_mb: int | None = None, scheduler: str | Path | None = None,
                slurm_cluster: dict[str, Any] | None = None) -> Iterator[Client]:
    """A dask ``Client`` for the aggregation, closed (with any cluster it started) on exit.

    ``scheduler``: connect to a running scheduler, given as the path of a scheduler file if such a file exists,
    else as an address. ``slurm_cluster``: start a dask-jobqueue ``SLURMCluster`` with these options (``jobs``:
    how many worker jobs, default 1; every other key goes to ``SLURMCluster``: ``cores``, ``memory``, ``queue``,
    ``account``, ``walltime``, ``job_extra_directives``, ...) and wait for its first worker. Neither: a
    ``LocalCluster`` of ``threads`` single-threaded worker processes that share ``memory_mb`` (default: dask's
    share of the machine's memory).
    """
    from distributed import Client, LocalCluster

    if scheduler and slurm_cluster is not None:
        raise ValueError("give either a dask scheduler to connect to or SLURMCluster options, not both")
    cluster = None
    if scheduler:
        scheduler = str(scheduler)
        client = Client(scheduler_file=scheduler) if Path(scheduler).is_file() else Client(scheduler)
        log.info("dask: connected to the scheduler at %s", client.scheduler.address)
    elif slurm_cluster is not None:
        cluster = start_slurm_cluster(slurm_cluster)
        client = Client(cluster)
        client.wait_for_workers(1, timeout=WORKER_WAIT_SECONDS)
    else:
        workers = max(1, threads)
        memory = f"{memory_mb // workers}MiB" if memory_mb else "auto"
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit=memory,
                               dashboard_address=None)
        client = Client(cluster)
        log.info("dask: a local cluster of %d worker processes, memory limit %s each", workers, memory)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def start_slurm_cluster(options: dict[str, Any]) -> SLURMCluster:
    """A dask-jobqueue ``SLURMCluster`` scaled to ``options["jobs"]`` worker jobs (default 1); the other options
    are ``SLURMCluster``'s (``cores`` and ``memory`` of one job are required). dask-jobqueue is imported here
    only: install it with ``pip install 'universal[slurm]'``."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as err:
        raise ValueError("slurm_cluster needs dask-jobqueue: pip install 'universal[slurm]'") from err
    settings = dict(options)
    jobs = int(settings.pop("jobs", 1))
    missing = [key for key in ("cores", "memory") if key not in settings]
    if missing:
        raise ValueError(f"slurm_cluster options miss {missing} (the cores and memory of one worker job)")
    cluster = SLURMCluster(**settings)
    cluster.scale(jobs=jobs)
    log.info("dask: a SLURMCluster of %d worker jobs; job script:\n%s", jobs, cluster.job_script())
    return cluster


def read_metrics(paths: list[str | Path]) -> dd.DataFrame:
    """A dask dataframe over per-case metric TSVs (one partition per file)."""
    if not paths:
        raise ValueError("no per-case metric tables to aggregate")
    return dd.read_csv([str(p) for p in paths], sep="\t", dtype=METRIC_DTYPES)


def summarise(frame: dd.DataFrame, by: list[str], client: Client) -> pd.DataFrame:
    """Mean, median, std and count of Dice (NaN excluded) and mean volumes, grouped by ``by`` columns."""
    table = client.compute(frame.groupby(by).agg(SUMMARY)).result()
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    return table.reset_index()


def aggregate(paths: list[str | Path], classes: ClassTable, out_dir: str | Path, threads: int = 1,
              failures: list[str | Path] = (), memory_mb: int | None = None, scheduler: str | Path | None = None,
              slurm_cluster: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write per_case.tsv, per_class.tsv, per_dataset_class.tsv, dice_per_class.png and failed_cases.tsv (the
    evaluation batches' failure lists joined: the cases that could not be scored, with the stage and reason)
    into ``out_dir``. The dask work runs where :func:`dask_client` says (``threads``, ``memory_mb``,
    ``scheduler``, ``slurm_cluster``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = read_metrics(paths)
    order = {name: i for i, name in enumerate(classes.names)}
    with dask_client(threads, memory_mb, scheduler, slurm_cluster) as client:
        per_class = summarise(frame, ["class", "kind", "predicted"], client)
        per_dataset = summarise(frame, ["dataset", "class", "kind", "predicted"], client)
        per_case = client.compute(frame).result()
    per_class = per_class.sort_values("class", key=lambda s: s.map(order)).reset_index(drop=True)
    per_dataset = per_dataset.sort_values(["dataset", "class"], key=lambda s: s.map(order) if s.name == "class"
                                          else s).reset_index(drop=True)
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
