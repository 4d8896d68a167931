"""The demo workflow on a real Slurm: the test config through inference and evaluation with the executor plugin
and the project's profile (profiles/slurm filled in for the one-node cluster). Every job completes in sacct, each
asked for the CPUs its rule declares, and the outputs equal those of the same config run on this machine."""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from slurm_cluster import (
    CI_PROFILE,
    deploy,
    local_demo_run,
    log_tail,
    require_slurm,
    sacct_jobs,
    seconds,
    snakemake,
    submitted_job_ids,
)

from universal.infer.ome import read_prediction

EXPECTED_JOBS = {"demo_data": 1, "manifest": 5, "embed": 1, "harmonize": 5, "train": 1, "infer": 2, "evaluate": 2,
                 "aggregate": 1}  # the test config: 4 training datasets and 1 external one, in 2 batches


def _rule(comment: str) -> str:
    """The rule of a job from the comment the plugin gives it (rule_<name> or rule_<name>_wildcards_<values>)."""
    return comment.removeprefix("rule_").split("_wildcards_")[0]


@pytest.mark.slurm
@pytest.mark.slow
def test_the_demo_workflow_on_slurm_equals_the_local_run(tmp_path: Path, tmp_path_factory) -> None:
    require_slurm()
    local = local_demo_run(tmp_path_factory)
    assert local.result.returncode == 0, log_tail(local.result)

    workdir = deploy(tmp_path / "slurm", {})
    began = datetime.now() - timedelta(seconds=2)
    started = time.perf_counter()
    result = snakemake(workdir, "--profile", str(CI_PROFILE))
    wall = time.perf_counter() - started
    assert result.returncode == 0, log_tail(result)

    # Every job went through Slurm and completed; the jobs asked for the CPUs their rules declare.
    submitted = submitted_job_ids(result.stdout + result.stderr)
    jobs = sacct_jobs(workdir, began, expect=submitted)
    assert {job["JobIDRaw"] for job in jobs} == submitted
    assert [job for job in jobs if job["State"] != "COMPLETED"] == []
    assert Counter(_rule(job["Comment"]) for job in jobs) == EXPECTED_JOBS
    cpus = {_rule(job["Comment"]): int(job["AllocCPUS"]) for job in jobs}
    assert cpus["train"] == 2 and cpus["aggregate"] == 2 and cpus["harmonize"] == 1  # threads -> --cpus-per-task

    # The same outputs as the local run: the checkpoint's weights, every prediction's labels, every metric.
    local_results, slurm_results = local.workdir / "results", workdir / "results"
    ours = torch.load(slurm_results / "model" / "final.pt", map_location="cpu", weights_only=True)["model"]
    theirs = torch.load(local_results / "model" / "final.pt", map_location="cpu", weights_only=True)["model"]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    predictions = sorted(p.name for p in (slurm_results / "predictions" / "demo_external").glob("*.ome.zarr"))
    assert predictions and predictions == sorted(
        p.name for p in (local_results / "predictions" / "demo_external").glob("*.ome.zarr"))
    for name in predictions:
        _, organs, tumours, _ = read_prediction(slurm_results / "predictions" / "demo_external" / name)
        _, local_organs, local_tumours, _ = read_prediction(local_results / "predictions" / "demo_external" / name)
        assert np.array_equal(organs, local_organs) and np.array_equal(tumours, local_tumours), name
    for table in ("per_case.tsv", "per_class.tsv", "per_dataset_class.tsv", "failed_cases.tsv"):
        pd.testing.assert_frame_equal(pd.read_csv(slurm_results / "evaluation" / table, sep="\t"),
                                      pd.read_csv(local_results / "evaluation" / table, sep="\t"), obj=table)

    waits = [seconds(job, "Submit", "Start") for job in jobs]
    busy = sum(float(job["ElapsedRaw"]) for job in jobs)
    print(f"\nthe test config on Slurm: {wall:.1f} s wall ({len(jobs)} jobs, {busy:.0f} s of job run time, queue wait "
          f"{np.mean(waits):.1f} s on average); the same run on this machine (--cores 2): {local.seconds:.1f} s")
