"""Helpers of the Slurm tests: find a running Slurm (``.ci/slurm.sh start``), deploy the workflow into a folder,
run Snakemake there, fill in the site profile as a user does, and read the jobs back from sacct."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
TEST_CONFIG = REPO / ".test" / "config" / "config.yaml"
SITE_PROFILE = REPO / "profiles" / "slurm" / "profile.v9+.yaml"
CI_PROFILE = REPO / ".test" / "profiles" / "slurm" / "profile.v9+.yaml"
FILL_IN = {"FILL_IN_ACCOUNT": "account", "FILL_IN_CPU_PARTITION": "cpu", "FILL_IN_GPU_PARTITION": "gpu"}
SACCT_FIELDS = ("JobIDRaw", "JobName", "State", "Submit", "Start", "End", "ElapsedRaw", "AllocCPUS", "WorkDir",
                "Comment")


class DemoRun(NamedTuple):
    """A finished local run of the test config: its working directory, the process and its wall time (s)."""

    workdir: Path
    result: subprocess.CompletedProcess
    seconds: float


_DEMO_RUNS: dict[str, DemoRun] = {}


def slurm_problem() -> str | None:
    """Why no Slurm can run jobs here, or None when its node is up and sacct answers."""
    for command in ("sinfo", "sbatch", "sacct", "scancel"):
        if shutil.which(command) is None:
            return f"{command} not found"
    try:
        nodes = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
        accounting = subprocess.run(["sacct", "-n", "-X", "-S", "now-1minutes"], capture_output=True, text=True,
                                    timeout=20)
    except subprocess.TimeoutExpired as err:
        return f"{err.cmd[0]} did not answer within 20 s"
    if nodes.returncode != 0:
        return f"sinfo failed: {nodes.stderr.strip()}"
    if not {"idle", "mix", "alloc"} & set(nodes.stdout.split()):
        return f"no node is up (sinfo: {nodes.stdout.split()})"
    if accounting.returncode != 0:
        return f"sacct failed (no accounting): {accounting.stderr.strip()}"
    return None


def require_slurm() -> None:
    """Skip the calling test when no Slurm answers, with the reason (the one .ci/run passes on when .ci/slurm.sh
    could not start one, or what is missing); fail it instead where ``UNIVERSAL_SLURM=required`` (CI, after a
    successful start), so that CI never passes by skipping."""
    problem = slurm_problem()
    if problem is None:
        return
    if os.environ.get("UNIVERSAL_SLURM") == "required":
        pytest.fail(f"UNIVERSAL_SLURM=required but no Slurm answers: {problem}")
    reason = os.environ.get("UNIVERSAL_SLURM_SKIP") or problem
    pytest.skip(f"no Slurm here ({reason}); as root on Debian, `.ci/slurm.sh start` starts a one-node Slurm")


def deploy(target: Path, overrides: dict, base: Path = TEST_CONFIG) -> Path:
    """A working directory with the workflow linked in and the config ``base`` with ``overrides`` (a dict value
    updates that section)."""
    target.mkdir(parents=True, exist_ok=True)
    (target / "workflow").symlink_to(REPO / "workflow")
    (target / "config").mkdir()
    for name in ("classes.yaml", "datasets.yaml"):
        shutil.copy(REPO / "config" / name, target / "config" / name)
    config = yaml.safe_load(base.read_text())
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    (target / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def fill_in_profile(target: Path, values: dict[str, str] | None = None) -> Path:
    """A copy of the site profile (profiles/slurm) in ``target`` with its FILL_IN values replaced, as a user does:
    ``values`` maps each FILL_IN placeholder to the site's value (default: account, cpu, gpu)."""
    values = {**FILL_IN, **(values or {})}
    text = SITE_PROFILE.read_text()
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    left = re.findall(r"FILL_IN_\w+", text)
    assert not left, f"the site profile has placeholders the tests do not know: {left}"
    target.mkdir(parents=True, exist_ok=True)
    (target / SITE_PROFILE.name).write_text(text)
    return target


def snakemake_env() -> dict[str, str]:
    """The environment of a Snakemake run: this interpreter's bin first on PATH (snakemake, universal, torchrun),
    and this checkout first on PYTHONPATH, so that jobs (which inherit the environment: sbatch --export=ALL)
    import the code under test even where the installed package points at another checkout."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    python_path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PATH": path, "PYTHONPATH": python_path}


def snakemake_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", *args]


def snakemake(workdir: Path, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    """Run Snakemake in ``workdir`` and return the finished process (output captured)."""
    return subprocess.run(snakemake_command(*args), cwd=workdir, env=snakemake_env(), capture_output=True,
                          text=True, timeout=timeout)


def sacct_jobs(workdir: Path, since: datetime, expect: set[str] = frozenset(),
               wait: float = 60) -> list[dict[str, str]]:
    """The Slurm jobs submitted from ``workdir`` since ``since`` (allocations only, not steps), as sacct rows.

    slurmctld hands a job's records to the accounting daemon a moment after the job changes state, so this waits
    (up to ``wait`` seconds) until every job id in ``expect`` is there and none is still pending or running."""
    deadline = time.monotonic() + wait
    while True:
        result = subprocess.run(
            ["sacct", "-X", "-P", "--delimiter=\t", "-S", since.strftime("%Y-%m-%dT%H:%M:%S"), "-E", "now",
             f"--format={','.join(SACCT_FIELDS)}"],
            capture_output=True, text=True, check=True, timeout=60)
        rows = csv.DictReader(io.StringIO(result.stdout), delimiter="\t", quoting=csv.QUOTE_NONE)
        jobs = [row for row in rows if Path(row["WorkDir"]).resolve() == workdir.resolve()]
        settled = expect <= {job["JobIDRaw"] for job in jobs} and not any(
            job["State"] in ("PENDING", "RUNNING", "COMPLETING") for job in jobs)
        if settled or time.monotonic() > deadline:
            return jobs
        time.sleep(1)


def submitted_job_ids(snakemake_output: str) -> set[str]:
    """The Slurm job ids a Snakemake run reports submitting."""
    return set(re.findall(r"submitted with SLURM jobid (\d+)", snakemake_output))


def seconds(row: dict[str, str], start: str, end: str) -> float:
    """Seconds between two sacct timestamps of a row (e.g. Submit and Start)."""
    return (datetime.fromisoformat(row[end]) - datetime.fromisoformat(row[start])).total_seconds()


def log_tail(result: subprocess.CompletedProcess, chars: int = 6000) -> str:
    return result.stdout[-chars:] + "\n--- stderr\n" + result.stderr[-chars:]


def local_demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """The workflow run end to end on this machine (``--cores 2``) with the test config, once per test session:
    the end-to-end test checks it and the Slurm test compares its own run with it."""
    if "local" not in _DEMO_RUNS:
        workdir = deploy(tmp_path_factory.mktemp("local_demo_run"), {})
        started = time.perf_counter()
        result = snakemake(workdir, "--cores", "2", timeout=1800)
        _DEMO_RUNS["local"] = DemoRun(workdir, result, time.perf_counter() - started)
    return _DEMO_RUNS["local"]
