"""Where the dask aggregation runs: a LocalCluster sized from the job by default, a scheduler the user started
(address or scheduler file), or a dask-jobqueue SLURMCluster (its job script always; a real worker job on Slurm
where one runs)."""

from __future__ import annotations

import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from distributed import LocalCluster
from slurm_cluster import require_slurm

from universal.cli import main
from universal.evaluate.aggregate import dask_client, start_slurm_cluster
from universal.evaluate.metrics import write_metrics


@pytest.fixture
def metrics(classes, tmp_path: Path) -> Path:
    """A folder of per-case metric tables: 6 cases of two datasets."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "metrics" / "batch_0"
    for case in range(6):
        rows = [{"dataset": "ext" if case < 4 else "other", "case_id": f"c{case}", "class": c.name, "kind": c.kind,
                 "predicted": True, "annotated": True, "dice": rng.random(), "nsd": rng.random(),
                 "nsd_tolerance_mm": 1.0, "hd95_mm": 10 * rng.random(), "gt_ml": 1.0, "pred_ml": 2.0}
                for c in classes]
        write_metrics(pd.DataFrame(rows), folder / f"c{case}.tsv")
    return folder


def _aggregate(metrics: Path, out: Path, *options: str) -> pd.DataFrame:
    assert main(["aggregate", "--metrics", str(metrics), "--out", str(out), *options]) == 0
    return pd.read_csv(out / "per_class.tsv", sep="\t").set_index("class")


def _expected_mean_dice(metrics: Path) -> pd.Series:
    return pd.concat(pd.read_csv(p, sep="\t") for p in sorted(metrics.glob("*.tsv"))).groupby("class")["dice"].mean()


@pytest.mark.parametrize("given_as", ["address", "scheduler file"])
def test_the_aggregation_runs_on_a_scheduler_the_user_started(metrics: Path, tmp_path: Path, given_as: str) -> None:
    scheduler_file = tmp_path / "scheduler.json"
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None,
                      scheduler_kwargs={"scheduler_file": str(scheduler_file)}) as cluster:
        before = cluster.scheduler.transition_counter
        where = cluster.scheduler_address if given_as == "address" else str(scheduler_file)
        per_class = _aggregate(metrics, tmp_path / "out", "--scheduler", where)
        assert cluster.scheduler.transition_counter > before + 10  # the tasks went through this scheduler
    expected = _expected_mean_dice(metrics)
    for name in ("Liver", "Spleen", "Kidney Tumor"):
        assert per_class.loc[name, "dice_mean"] == pytest.approx(expected[name], abs=1e-4)
        assert per_class.loc[name, "dice_count"] == 6


def test_the_default_cluster_is_sized_from_the_jobs_threads_and_memory() -> None:
    with dask_client(threads=2, memory_mb=3000) as client:
        workers = client.scheduler_info()["workers"].values()
        assert [w["nthreads"] for w in workers] == [2]  # one worker, a thread per thread of the job
        assert [w["memory_limit"] for w in workers] == [3000 * 2**20]  # the job's memory


def test_one_backend_at_a_time(metrics: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"), dask_client(scheduler="tcp://127.0.0.1:1",
                                                                    slurm_cluster={"cores": 1, "memory": "1GB"}):
        pass
    with pytest.raises(ValueError, match=r"\['memory'\]"):
        start_slurm_cluster({"cores": 1})


def test_the_slurm_cluster_options_become_its_job_script() -> None:
    """SLURMCluster with the options of the config (no job is submitted: it is scaled to 0 at once)."""
    pytest.importorskip("dask_jobqueue")
    cluster = start_slurm_cluster({"jobs": 0, "cores": 4, "memory": "16GB", "queue": "cpu", "account": "lab",
                                   "walltime": "01:00:00", "job_extra_directives": ["--qos=short"]})
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for directive in ("#SBATCH -p cpu", "#SBATCH -A lab", "#SBATCH -t 01:00:00", "#SBATCH --cpus-per-task=4",
                      "#SBATCH --mem=15G", "#SBATCH --qos=short"):
        assert directive in script, script


@pytest.mark.slurm
def test_the_aggregation_runs_on_a_slurm_cluster_of_dask_workers(metrics: Path, tmp_path: Path) -> None:
    """The opt-in SLURMCluster on a real Slurm: one worker job submitted with sbatch runs the aggregation."""
    require_slurm()
    pytest.importorskip("dask_jobqueue")
    began = datetime.now() - timedelta(seconds=2)
    options = ("{jobs: 1, cores: 1, memory: 2GB, processes: 1, queue: debug, account: ci, walltime: '00:10:00', "
               f"log_directory: '{tmp_path / 'dask-logs'}'}}")
    started = time.perf_counter()
    per_class = _aggregate(metrics, tmp_path / "out", "--slurm-cluster", options)
    print(f"aggregation on a SLURMCluster of 1 worker job: {time.perf_counter() - started:.1f} s")
    expected = _expected_mean_dice(metrics)
    assert per_class.loc["Liver", "dice_mean"] == pytest.approx(expected["Liver"], abs=1e-4)
    # The worker job ran under the account and partition given (closing the cluster cancels it). Slurm hands the
    # record to the accounting daemon a moment later: wait for it.
    deadline = time.monotonic() + 60
    while not (jobs := _worker_jobs(began)) and time.monotonic() < deadline:
        time.sleep(1)
    assert jobs and all(job[2:] == ["ci", "debug"] and job[1] != "Unknown" for job in jobs), jobs


def _worker_jobs(since: datetime) -> list[list[str]]:
    """sacct's JobIDRaw, Start, Account and Partition of the dask worker jobs submitted since ``since``."""
    result = subprocess.run(["sacct", "-X", "-n", "-P", "-S", since.strftime("%Y-%m-%dT%H:%M:%S"), "--name",
                             "dask-worker", "--format=JobIDRaw,Start,Account,Partition"], capture_output=True,
                            text=True, check=True)
    return [line.split("|") for line in result.stdout.splitlines()]
