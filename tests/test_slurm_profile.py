"""The profiles for Slurm, checked without a cluster: the site template filled in is all a user needs, the
workflow profile never hides it, and a dry run shows what each job asks Slurm for (GPUs of multi-GPU training
included), turned into sbatch options by the plugin's own code."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from slurm_cluster import CI_PROFILE, REPO, SITE_PROFILE, deploy, fill_in_profile, log_tail, snakemake
from snakemake_executor_plugin_slurm.submit_string import get_submit_command
from snakemake_executor_plugin_slurm.utils import set_gres_string

WORKFLOW_PROFILE = REPO / "workflow" / "profiles" / "default" / "profile.yaml"
CI_ONLY = {"slurm-init-seconds-before-status-checks", "set-threads"}  # the settings marked CI in the CI profile
SITE = {"FILL_IN_ACCOUNT": "lab", "FILL_IN_CPU_PARTITION": "cpu", "FILL_IN_GPU_PARTITION": "gpu"}


def _placeholders_filled(template: object, values: dict[str, str]) -> object:
    if isinstance(template, dict):
        return {key: _placeholders_filled(value, values) for key, value in template.items()}
    return values.get(template, template) if isinstance(template, str) else template


def test_the_ci_profile_is_the_site_profile_filled_in() -> None:
    """What CI runs with is profiles/slurm with account and partitions filled in, and two marked CI settings."""
    site = yaml.safe_load(SITE_PROFILE.read_text())
    ci = yaml.safe_load(CI_PROFILE.read_text())
    filled = _placeholders_filled(site, {"FILL_IN_ACCOUNT": "ci", "FILL_IN_CPU_PARTITION": "debug",
                                         "FILL_IN_GPU_PARTITION": "debug"})
    assert {key: ci[key] for key in site} == filled
    assert set(ci) - set(site) == CI_ONLY


def test_the_workflow_profile_sets_no_resources() -> None:
    """A key set by both workflow/profiles/default and a --profile is taken from the workflow profile alone, so a
    resource mapping there would drop the site profile's account and partitions."""
    settings = yaml.safe_load(WORKFLOW_PROFILE.read_text())
    assert not {"default-resources", "set-resources", "set-threads", "resources"} & set(settings)
    site = yaml.safe_load(SITE_PROFILE.read_text())
    assert not set(settings) & set(site), "a key in both profiles: the site's value would be ignored"


def _dry_run_jobs(output: str) -> list[dict]:
    """The jobs of a dry run's output: rule, threads, resources (name -> value as printed) and shell command."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:\n)", output):
        head = re.match(r"(local)?rule (\w+):\n", block)
        if not head:
            continue
        job = {"rule": head.group(2), "local": bool(head.group(1)), "threads": 1, "resources": {}, "shell": ""}
        for line in block.splitlines():
            line = line.strip()
            if line.startswith("threads:"):
                job["threads"] = int(line.split()[1])
            elif line.startswith("resources:"):
                pairs = (item.split("=", 1) for item in line[len("resources:"):].split(", "))
                job["resources"] = {key.strip(): value for key, value in pairs}
            elif line.startswith("Shell command:"):
                job["shell"] = line[len("Shell command:"):].strip()
        jobs.append(job)
    return jobs


class _Resources(dict):
    """A job's resources as the plugin reads them (``.get`` and attributes)."""

    def __getattr__(self, name: str) -> object:
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err


def _sbatch(job: dict) -> str:
    """The sbatch command the Slurm plugin builds for a dry-run job (its own get_submit_command and
    set_gres_string; account and partition in the form its executor passes them)."""
    printed = job["resources"]
    resources = _Resources({key: int(value) if value.isdigit() else value for key, value in printed.items()
                            if key in ("mem_mb", "runtime", "gpu", "slurm_account", "slurm_partition")})
    stand_in = SimpleNamespace(resources=resources, threads=job["threads"], name=job["rule"], wildcards=[],
                               is_group=lambda: False)
    params = {"run_uuid": "run", "slurm_logfile": "slurm.log", "comment_str": f"rule_{job['rule']}",
              "account": f"-A {resources['slurm_account']}", "partition": f"-p {resources['slurm_partition']}",
              "workdir": None}
    return get_submit_command(stand_in, params) + set_gres_string(stand_in)


@pytest.mark.parametrize("gpus", [2, 1])
def test_a_dry_run_shows_what_gpu_jobs_ask_slurm_for(tmp_path: Path, gpus: int) -> None:
    """device: cuda with train.gpus: the training job asks for that many GPUs (the gpu resource: --gpus, never
    slurm_extra) in the GPU partition, with threads and memory per GPU, and runs torchrun with one process per
    GPU when there are several; inference asks for one GPU; the other jobs for none, in the CPU partition."""
    workdir = deploy(tmp_path / "run", {"device": "cuda", "train": {"gpus": gpus}})
    profile = fill_in_profile(tmp_path / "site", SITE)
    # A dry run plans as if on this machine, capping threads at --cores (1 by default): lift the cap.
    result = snakemake(workdir, "-n", "--profile", str(profile), "--cores", "64")
    assert result.returncode == 0, log_tail(result)
    jobs = [job for job in _dry_run_jobs(result.stdout) if not job["local"] and job["rule"] != "all"]
    assert {job["rule"] for job in jobs} >= {"demo_data", "harmonize", "embed", "train", "infer", "evaluate"}
    for job in jobs:
        assert job["resources"]["slurm_account"] == "lab", job
        gpu_rule = job["rule"] in ("train", "infer")
        assert job["resources"]["slurm_partition"] == ("gpu" if gpu_rule else "cpu"), job
        assert int(job["resources"].get("gpu", 0)) == ({"train": gpus, "infer": 1}.get(job["rule"], 0)), job
        assert "slurm_extra" not in job["resources"]

    train = next(job for job in jobs if job["rule"] == "train")
    assert train["threads"] == 2 * gpus and train["resources"]["mem_mb"] == str(16000 * gpus)
    if gpus > 1:
        assert train["shell"].startswith(f"torchrun --standalone --nproc_per_node={gpus} -m universal.cli train ")
    else:
        assert train["shell"].startswith("universal train ")
    sbatch = _sbatch(train).split()
    for option in ("-A lab", "-p gpu", "-t 1440", f"--mem {16000 * gpus}"):
        assert " ".join(sbatch).count(option) == 1, (option, sbatch)
    assert f"--gpus={gpus}" in sbatch and f"--cpus-per-task={2 * gpus}" in sbatch
    assert not any(arg.startswith(("--gres", "--ntasks")) for arg in sbatch), sbatch

    infer = next(job for job in jobs if job["rule"] == "infer")
    assert "--gpus=1" in _sbatch(infer).split()
    harmonize = _sbatch(next(job for job in jobs if job["rule"] == "harmonize")).split()
    assert "-p" in harmonize and harmonize[harmonize.index("-p") + 1] == "cpu"
    assert "--ntasks=1" in harmonize and not any(arg.startswith("--gpus") for arg in harmonize)
