"""Load and fault test on a real Slurm: 500 tiny external CTs segmented in 10 batch jobs with a tiny model, one
batch cancelled with scancel while it runs. Its retry computes only the cases the cancelled job had not
finished, every case ends with exactly one complete output, and no half-written output is taken as done."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from slurm_cluster import (
    CI_PROFILE,
    deploy,
    require_slurm,
    sacct_jobs,
    seconds,
    snakemake_command,
    snakemake_env,
    submitted_job_ids,
)

from universal.core.atomic import is_partial, partial_name
from universal.core.classes import load_class_table
from universal.core.volume import Volume, save_nifti
from universal.infer.ome import read_prediction
from universal.model.network import ModelConfig, build_model, save_checkpoint
from universal.model.preprocessing import Preprocessing

CASES = 500
BATCHES = 10
SHAPE = (20, 20, 20)  # voxels of 4 mm: the model's grid, so nothing is resampled
TINY = ModelConfig(backbone="unet", features=(4, 4, 4, 4, 4, 4))
SHEET = "cases"  # the sample sheet's name: predictions go to results/predictions/cases/


def _tiny_model(path: Path) -> Path:
    classes = load_class_table()
    torch.manual_seed(0)
    model = build_model(TINY, torch.randn(len(classes), 512))
    save_checkpoint(path, model, TINY, classes.names, {"trained_classes": ["Liver", "Spleen"]},
                    Preprocessing((4.0, 4.0, 4.0), (-175.0, 250.0), (32, 32, 32)).to_dict())
    return path


def _sample_sheet(folder: Path) -> tuple[Path, list[str]]:
    """CASES synthetic CTs (noise around a bright sphere) and the sample sheet listing them."""
    rng = np.random.default_rng(0)
    grid = np.indices(SHAPE).transpose(1, 2, 3, 0) - np.array(SHAPE) / 2
    sphere = (grid**2).sum(-1) < 36
    case_ids, rows = [], ["case_id\timage"]
    for i in range(CASES):
        array = rng.normal(-100, 40, SHAPE) + 160 * sphere
        path = folder / "cts" / f"ct_{i:03d}.nii.gz"
        save_nifti(Volume(array.astype(np.int16), np.diag([4.0, 4.0, 4.0, 1.0])), path)
        case_ids.append(f"ct_{i:03d}")
        rows.append(f"{case_ids[-1]}\t{path}")
    sheet = folder / f"{SHEET}.tsv"
    sheet.write_text("\n".join(rows) + "\n")
    return sheet, case_ids


def _running_infer_jobs(workdir: Path) -> dict[int, str]:
    """{batch: Slurm job id} of this workdir's inference jobs that are running now (squeue)."""
    queue = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i|%k|%Z"], capture_output=True, text=True,
                           check=True).stdout
    running = {}
    for line in queue.splitlines():
        job, comment, folder = line.split("|", 2)
        if comment.startswith(f"rule_infer_wildcards_{SHEET}_") and Path(folder).resolve() == workdir.resolve():
            running[int(comment.rsplit("_", 1)[1])] = job
    return running


def _finished(out: Path, cases: list[str]) -> set[str]:
    """The cases with a complete prediction: the final name exists (it appears only by the last rename)."""
    return {case for case in cases if (out / f"{case}.ome.zarr").is_dir()}


def _half_written(out: Path, cases: list[str]) -> set[str]:
    """The cases whose prediction is being written now (or was, by a killed job): a temporary-named output."""
    return {name.split(".")[0] for name in os.listdir(out) if is_partial(name)} & set(cases)


def _cancel_a_batch_mid_run(process: subprocess.Popen, workdir: Path, out: Path, batches: list[list[str]],
                            timeout: float = 420) -> tuple[int, set[str], set[str]]:
    """scancel the job of a running batch that has finished a few of its cases, at a moment when it is writing a
    prediction if one is seen within its first half; wait until the job is gone and return (batch, the cases
    finished by then, the cases left half-written).

    Where the kill did not land mid-write, a half-written output is left as a kill mid-write leaves it: the
    prediction of a finished case copied under the temporary name of the next unfinished one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        for batch, job in _running_infer_jobs(workdir).items():
            cases = batches[batch]
            while 3 <= len(_finished(out, cases)) <= len(cases) // 2 and not _half_written(out, cases):
                time.sleep(0.01)
            if not 3 <= len(_finished(out, cases)) <= len(cases) // 2 + 1:
                continue
            subprocess.run(["scancel", job], check=True)
            while job in subprocess.run(["squeue", "-h", "-j", job, "-o", "%i"], capture_output=True,
                                        text=True).stdout.split():
                time.sleep(0.1)
            finished, half = _finished(out, cases), _half_written(out, cases)
            caught = bool(half)
            if not half:
                unfinished = next(case for case in cases if case not in finished)
                shutil.copytree(out / f"{sorted(finished)[0]}.ome.zarr", partial_name(out / f"{unfinished}.ome.zarr"))
                half = {unfinished}
            print(f"scancel {job} (batch {batch}) with {len(finished)}/{len(cases)} cases finished; half-written: "
                  f"{sorted(half)} ({'the kill landed mid-write' if caught else 'left by the test'})")
            return batch, finished, half
        time.sleep(0.2)
    pytest.fail("no inference batch was seen running with a few of its cases finished")


def _stop(process: subprocess.Popen) -> None:
    """End a Snakemake that is still running (a failed test): SIGTERM makes it cancel its Slurm jobs."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slurm
@pytest.mark.slow
def test_500_cases_in_batches_on_slurm_survive_a_cancelled_batch(tmp_path: Path) -> None:
    require_slurm()
    workdir = deploy(tmp_path / "run", {"infer": {"batches": BATCHES, "export_nifti": False}})
    model = _tiny_model(tmp_path / "model.pt")
    sheet, case_ids = _sample_sheet(tmp_path)
    batches = [case_ids[b::BATCHES] for b in range(BATCHES)]  # case i belongs to batch i % batches
    out = workdir / "results" / "predictions" / SHEET
    command = snakemake_command("infer_external", "--profile", str(CI_PROFILE), "--config",
                                f"external_samples={sheet}", f"model={model}")
    began = datetime.now() - timedelta(seconds=2)
    started = time.perf_counter()
    log = tmp_path / "snakemake.log"
    with log.open("w") as stream:
        process = subprocess.Popen(command, cwd=workdir, env=snakemake_env(), stdout=stream,
                                   stderr=subprocess.STDOUT)
        try:
            cancelled, finished, half = _cancel_a_batch_mid_run(process, workdir, out, batches)
            returncode = process.wait(timeout=600)
        finally:
            _stop(process)
    wall = time.perf_counter() - started
    output = log.read_text()
    assert returncode == 0, output[-6000:]

    # Every case has exactly one output, complete; no half-written output is left.
    predictions = sorted(p.name for p in out.glob("*.ome.zarr"))
    assert predictions == [f"{case}.ome.zarr" for case in case_ids]
    assert not [p.name for p in out.iterdir() if is_partial(p.name)]
    run_keys = {json.loads((out / f"{case}.ome.zarr" / "zarr.json").read_text())["attributes"]["universal"]["run_key"]
                for case in case_ids}
    assert len(run_keys) == 1
    for case in case_ids[::25]:
        _, organs, _, _ = read_prediction(out / f"{case}.ome.zarr")
        assert organs.shape == SHAPE

    # Each case was computed once: the retry of the cancelled batch skipped what it had finished, and recomputed
    # the rest, the half-written case included; the other batches computed all their cases.
    reports = {b: pd.read_csv(out / f"batch_{b}.tsv", sep="\t", keep_default_na=False) for b in range(BATCHES)}
    assert sorted(c for r in reports.values() for c in r["case_id"]) == case_ids
    statuses = reports[cancelled].set_index("case_id")["status"]
    assert set(statuses[statuses == "skipped"].index) == finished
    assert set(statuses[statuses == "ok"].index) == set(batches[cancelled]) - finished
    assert half <= set(statuses[statuses == "ok"].index)
    for batch, report in reports.items():
        if batch != cancelled:
            assert set(report["status"]) == {"ok"}, (batch, report)

    # sacct: one job per batch COMPLETED, and the cancelled one.
    jobs = sacct_jobs(workdir, began, expect=submitted_job_ids(output))
    infer = [job for job in jobs if job["Comment"].startswith("rule_infer_")]
    states = sorted(job["State"].split()[0] for job in infer)
    assert states == ["CANCELLED"] + ["COMPLETED"] * BATCHES, (states, output[-3000:])
    assert all(job["State"] == "COMPLETED" for job in jobs if not job["Comment"].startswith("rule_infer_"))

    _print_overhead(workdir, completed=[job for job in infer if job["State"] == "COMPLETED"], reports=reports,
                    wall=wall)


def _print_overhead(workdir: Path, completed: list[dict[str, str]], reports: dict[int, pd.DataFrame],
                    wall: float) -> None:
    """Where a batch job's time goes, from sacct (Submit, Start, End) and the batch's log (the model loaded, the
    last case written): queue wait, start-up (the job's Snakemake, srun, imports, the model), the cases, and the
    wind-down (report, exits) until Slurm records the end."""
    wait, startup, cases, winddown = [], [], [], []
    for job in completed:
        batch = int(job["Comment"].rsplit("_", 1)[1])
        stamps = [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f") for line in
                  (workdir / "logs" / "infer" / f"{SHEET}_batch_{batch}.log").read_text().splitlines()
                  if line[:2] == "20"]
        start, end = datetime.fromisoformat(job["Start"]), datetime.fromisoformat(job["End"])
        wait.append(seconds(job, "Submit", "Start"))
        startup.append((stamps[0] - start).total_seconds())
        cases.append(float(reports[batch]["seconds"].sum()))
        winddown.append((end - stamps[-1]).total_seconds())
    print(f"\n{CASES} cases, {BATCHES} batch jobs on Slurm: {wall:.1f} s wall (Snakemake's start to its end, the "
          f"cancelled batch's retry included). Per completed batch job, mean (max): queue wait {np.mean(wait):.1f} "
          f"({max(wait):.0f}) s, start-up to the model loaded {np.mean(startup):.1f} ({max(startup):.0f}) s, "
          f"{CASES // BATCHES} cases {np.mean(cases):.1f} ({max(cases):.0f}) s, wind-down {np.mean(winddown):.1f} "
          f"({max(winddown):.0f}) s")
