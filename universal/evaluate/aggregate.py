"""Aggregate per-case metric tables with dask into per-class and per-dataset summaries, tumour detection, and box
plots.

Per-case tables (TSV, one row per class: see :mod:`universal.evaluate.metrics`) are read lazily by a dask dataframe,
a batch of files per partition, so thousands of cases aggregate in parallel. The frame is read once, kept in the
workers' memory (``persist``), and every table is computed from it in one ``dask.compute``. Where the work runs
(:func:`dask_client`):

- by default a ``distributed.LocalCluster`` sized from the job: one worker inside this process with a thread per
  thread the rule was given and the job's memory (``mem_mb``) as its limit, so dask stays inside what Slurm
  granted (worker processes took twice as long: ``benchmarks/bench_aggregate.py``);
- ``scheduler``: an existing dask scheduler, by address (``tcp://host:8786``) or scheduler file (the JSON file
  ``dask scheduler --scheduler-file`` or ``dask-mpi`` write);
- ``slurm_cluster``: a dask-jobqueue ``SLURMCluster`` this process starts (its worker jobs are submitted to Slurm
  beside Snakemake's own, outside its job limits: meant for interactive analysis of large evaluations).

Summaries leave NaN out: a class a case does not annotate, or absent from both prediction and ground truth, counts
in no Dice, NSD or HD95 statistic. HD95 is summarised by its median and the number of infinite values (prediction or
ground truth empty), never by a mean.

Tumour detection as the paper's Table 4 counts it: over the cases that annotate a tumour class, a case is positive
when its ground truth has the tumour (``gt_ml > 0``) and called positive when a tumour of the class remains in the
post-processed prediction (``pred_ml > 0``); sensitivity = TP / (TP + FN), specificity = TN / (TN + FP), NaN with
no case to count.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
import dask.dataframe as dd
import matplotlib
import numpy as np
import pandas as pd

from universal.core.atomic import atomic_output
from universal.core.classes import ClassTable
from universal.evaluate.metrics import FAILURE_COLUMNS, METRIC_COLUMNS

matplotlib.use("Agg")
import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from dask_jobqueue import SLURMCluster
    from distributed import Client

log = logging.getLogger(__name__)

METRIC_DTYPES = {"dataset": str, "case_id": str, "class": str, "kind": str, "predicted": bool, "annotated": bool,
                 "dice": "float64", "nsd": "float64", "nsd_tolerance_mm": "float64", "hd95_mm": "float64",
                 "gt_ml": "float64", "pred_ml": "float64"}
TEXT_COLUMNS = {name: str for name, kind in METRIC_DTYPES.items() if kind is str}
SUMMARY = {"annotated": ["sum"], "dice": ["mean", "median", "std", "count"], "nsd": ["mean", "median", "std", "count"],
           "hd95_mm": ["median", "count"], "hd95_inf": ["sum"], "gt_ml": ["mean"], "pred_ml": ["mean"]}
SUMMARY_NAMES = {"annotated_sum": "annotated_cases", "hd95_inf_sum": "hd95_mm_inf"}
DETECTION_COUNTS = ("true_positive", "false_negative", "false_positive", "true_negative")
BY_CLASS = ["class", "kind", "predicted", "nsd_tolerance_mm"]
FILES_PER_PARTITION = 256
PLOTS = {"dice": ("dice_per_class", "Dice", (0.0, 1.0)), "nsd": ("nsd_per_class", "NSD", (0.0, 1.0)),
         "hd95_mm": ("hd95_per_class", "HD95 (mm)", None)}
WORKER_WAIT_SECONDS = 600  # how long a SLURMCluster may take to get its first worker job running


@contextmanager
def dask_client(threads: int = 1, memory_mb: int | None = None, scheduler: str | Path | None = None,
                slurm_cluster: dict[str, Any] | None = None) -> Iterator[Client]:
    """A dask ``Client`` for the aggregation, closed (with any cluster it started) on exit.

    ``scheduler``: connect to a running scheduler, given as the path of a scheduler file if such a file exists,
    else as an address. ``slurm_cluster``: start a dask-jobqueue ``SLURMCluster`` with these options (``jobs``:
    how many worker jobs, default 1; every other key goes to ``SLURMCluster``: ``cores``, ``memory``, ``queue``,
    ``account``, ``walltime``, ``job_extra_directives``, ...) and wait for its first worker. Neither: a
    ``LocalCluster`` of one worker in this process with ``threads`` threads and ``memory_mb`` (default: dask's
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
        memory = f"{memory_mb}MiB" if memory_mb else "auto"
        cluster = LocalCluster(n_workers=1, threads_per_worker=max(1, threads), processes=False,
                               memory_limit=memory, dashboard_address=None)
        client = Client(cluster)
        log.info("dask: a local cluster of one worker of %d threads in this process, memory limit %s",
                 max(1, threads), memory)
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
    """A dask dataframe over per-case metric TSVs, ``FILES_PER_PARTITION`` files per partition: the columns of
    ``METRIC_DTYPES`` plus the flags the summaries count (see :func:`_with_flags`)."""
    if not paths:
        raise ValueError("no per-case metric tables to aggregate")
    groups = [tuple(str(p) for p in paths[i:i + FILES_PER_PARTITION])
              for i in range(0, len(paths), FILES_PER_PARTITION)]
    return dd.from_map(_read_tables, groups, meta=_read_tables(groups[0][:1]).iloc[:0])


def _read_tables(paths: tuple[str, ...]) -> pd.DataFrame:
    """Per-case metric TSVs concatenated, with the column types of ``METRIC_DTYPES`` (text columns read as text,
    so that a case id "007" stays one), and their flags."""
    tables = [_read_table(p) for p in paths]
    return _with_flags(pd.concat(tables, ignore_index=True).astype(METRIC_DTYPES))


def _read_table(path: str) -> pd.DataFrame:
    """One per-case metric TSV; a table without every column of ``METRIC_DTYPES`` is refused, naming the file."""
    table = pd.read_csv(path, sep="\t", dtype=TEXT_COLUMNS)
    missing = [name for name in METRIC_DTYPES if name not in table.columns]
    if missing:
        raise ValueError(f"{path}: per-case metric table without columns {missing} (written by an older version? "
                         f"evaluate the batch again, e.g. snakemake --forcerun evaluate)")
    return table


def _with_flags(table: pd.DataFrame) -> pd.DataFrame:
    """Add ``hd95_inf`` (HD95 infinite) and, for the tumour rows of cases annotating them (``tumour``), the four
    detection outcomes: positive when ``gt_ml > 0``, called positive when ``pred_ml > 0``."""
    tumour = (table["kind"] == "tumour") & table["annotated"]
    positive, called = table["gt_ml"] > 0, table["pred_ml"] > 0
    return table.assign(hd95_inf=table["hd95_mm"] == np.inf, tumour=tumour,
                        true_positive=tumour & positive & called, false_negative=tumour & positive & ~called,
                        false_positive=tumour & ~positive & called, true_negative=tumour & ~positive & ~called)


def summary(frame: dd.DataFrame, by: list[str]) -> dd.DataFrame:
    """Per group of ``by`` columns (lazy): cases annotating the class; mean, median, std and count of Dice and NSD;
    median and count of HD95 (mm) and its number of infinite values; mean volumes (mL). NaN values are left out."""
    return frame.groupby(by).agg(SUMMARY)


def _summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """A computed :func:`summary` with flat column names (``dice_mean``, ``annotated_cases``, ...)."""
    table.columns = [SUMMARY_NAMES.get(f"{metric}_{stat}", f"{metric}_{stat}") for metric, stat in table.columns]
    return table.reset_index()


def detection(frame: dd.DataFrame, by: list[str]) -> dd.DataFrame:
    """Tumour detection counts per group of ``by`` columns (lazy), over the cases annotating each tumour class."""
    tumours = frame[frame["tumour"]]
    return tumours[[*by, *DETECTION_COUNTS]].groupby(by).sum()


def _detection_table(table: pd.DataFrame) -> pd.DataFrame:
    """A computed :func:`detection` with ``cases``, ``sensitivity`` and ``specificity`` (NaN without positive, or
    negative, cases)."""
    table = table.astype("int64")
    table["cases"] = table[list(DETECTION_COUNTS)].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        table["sensitivity"] = table["true_positive"] / (table["true_positive"] + table["false_negative"])
        table["specificity"] = table["true_negative"] / (table["true_negative"] + table["false_positive"])
    return table.reset_index()


def aggregate(paths: list[str | Path], classes: ClassTable, out_dir: str | Path, threads: int = 1,
              failures: list[str | Path] = (), memory_mb: int | None = None, scheduler: str | Path | None = None,
              slurm_cluster: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write into ``out_dir``: per_case, per_class, per_dataset_class, detection and detection_per_dataset tables
    (each .tsv and .parquet), box plots per class of Dice, NSD and HD95 (.png), and failed_cases.tsv (the
    evaluation batches' failure lists joined: the cases that could not be scored, with the stage and reason).
    The dask work runs where :func:`dask_client` says (``threads``, ``memory_mb``, ``scheduler``,
    ``slurm_cluster``). Returns the paths by key (the table names, ``{table}_parquet``, the plot names and
    ``failed``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with dask_client(threads, memory_mb, scheduler, slurm_cluster):
        frame = read_metrics(paths).persist()
        (computed,) = dask.compute({
            "per_case": frame[list(METRIC_COLUMNS)], "per_class": summary(frame, BY_CLASS),
            "per_dataset_class": summary(frame, ["dataset", *BY_CLASS]), "detection": detection(frame, ["class"]),
            "detection_per_dataset": detection(frame, ["dataset", "class"])})
    by_class = _class_order(classes)
    tables = {
        "per_case": computed["per_case"].reset_index(drop=True),
        "per_class": _summary_table(computed["per_class"]).sort_values("class", key=by_class),
        "per_dataset_class": _summary_table(computed["per_dataset_class"])
        .sort_values(["dataset", "class"], key=by_class),
        "detection": _detection_table(computed["detection"]).sort_values("class", key=by_class),
        "detection_per_dataset": _detection_table(computed["detection_per_dataset"])
        .sort_values(["dataset", "class"], key=by_class),
    }
    outputs = {"failed": out_dir / "failed_cases.tsv"}
    failed = [pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False) for p in failures]
    _write_tsv(pd.concat(failed, ignore_index=True) if failed else pd.DataFrame(columns=FAILURE_COLUMNS),
               outputs["failed"])
    for key, table in tables.items():
        table = table.reset_index(drop=True)
        outputs[key], outputs[f"{key}_parquet"] = out_dir / f"{key}.tsv", out_dir / f"{key}.parquet"
        _write_tsv(table, outputs[key])
        with atomic_output(outputs[f"{key}_parquet"]) as tmp:
            table.to_parquet(tmp, index=False)
    for metric, (name, label, limits) in PLOTS.items():
        outputs[name] = out_dir / f"{name}.png"
        plot_metric(tables["per_case"], classes, metric, label, limits, outputs[name])
    return outputs


def _class_order(classes: ClassTable):
    """A sort key for ``sort_values``: class columns by class-table order, other columns as they are."""
    order = {name: i for i, name in enumerate(classes.names)}
    return lambda column: column.map(order) if column.name == "class" else column


def _write_tsv(table: pd.DataFrame, path: Path) -> None:
    with atomic_output(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.4f")


def plot_metric(per_case: pd.DataFrame, classes: ClassTable, metric: str, label: str,
                limits: tuple[float, float] | None, path: Path) -> None:
    """Box plot of a per-case ``metric`` (axis ``label``, y range ``limits``) for each predicted class with a finite
    value, in the class colours; infinite values (HD95 with an empty side) are counted in the title, not drawn."""
    values = per_case[metric].astype("float64")
    finite = np.isfinite(values)
    predicted = set(per_case.loc[per_case["predicted"].astype(bool), "class"])
    present = [c for c in classes if c.name in predicted and finite[per_case["class"] == c.name].any()]
    skipped = len({c.name for c in classes} & set(per_case["class"]) - predicted)
    data = [values[(per_case["class"] == c.name) & finite].to_numpy() for c in present]
    figure, axis = plt.subplots(figsize=(max(6.0, 0.38 * len(present) + 2), 4.5), dpi=110)
    boxes = axis.boxplot(data, patch_artist=True, widths=0.6) if data else None
    if boxes is not None:
        for patch, cls in zip(boxes["boxes"], present, strict=True):
            patch.set_facecolor([v / 255 for v in cls.colour])
    axis.set_xticks(range(1, len(present) + 1), [c.name for c in present], rotation=70, ha="right", fontsize=8)
    if limits is not None:
        axis.set_ylim(*limits)
    axis.set_ylabel(f"{label} per case")
    infinite = int(np.isinf(values[per_case["class"].isin([c.name for c in present])]).sum())
    notes = [f"{skipped} classes not predicted: no training case annotates them" if skipped else "",
             f"{infinite} infinite values (an empty side) not drawn" if infinite else ""]
    note = "".join(f"\n{n}" for n in notes if n)
    axis.set_title(f"{label} per class, {per_case['case_id'].nunique()} cases{note}", fontsize=10)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp)
    plt.close(figure)
