"""End-to-end tests of the Snakemake workflow on the synthetic demo (run in a copy of the workflow in tmp)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from universal.core.volume import load_nifti
from universal.data.catalog import read_manifest
from universal.infer.ome import read_prediction

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def _deploy(target: Path, overrides: dict) -> Path:
    """A working directory with the workflow linked in and a config derived from the demo config."""
    for name in ("Snakefile", "workflow", "profiles"):
        (target / name).symlink_to(REPO / name)
    (target / "config").mkdir()
    for name in ("classes.yaml", "datasets.yaml"):
        shutil.copy(REPO / "config" / name, target / "config" / name)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for key, value in overrides.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    (target / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    return target


def _snakemake(workdir: Path, *args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([*SNAKEMAKE, *args], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_schema_violation_fails_before_any_job(tmp_path):
    workdir = _deploy(tmp_path, {"train": {"batch_size": 0}})
    result = _snakemake(workdir, "--cores", "1", "-n")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "batch_size" in output and "minimum of 1" in output
    assert not (workdir / "results").exists()


def test_unknown_dataset_key_is_named(tmp_path):
    workdir = _deploy(tmp_path, {"datasets": {"lits": {"root": "x"}}})
    result = _snakemake(workdir, "--cores", "1", "-n")
    assert result.returncode != 0 and "['lits'] are not in the catalog" in result.stdout + result.stderr


def test_real_data_config_layered_over_the_demo_leaves_the_phantoms_out(tmp_path):
    workdir = _deploy(tmp_path, {})
    result = _snakemake(workdir, "-n", "--configfile", str(REPO / "config" / "real.yaml"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    stats = output[output.index("Job stats"):]
    assert "download" in stats and "train" in stats and "harmonize" in stats
    assert "demo_data" not in stats and "demo_" not in output


def test_lint_is_clean():
    result = _snakemake(REPO, "--lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_demo_workflow_end_to_end(tmp_path, classes):
    workdir = _deploy(tmp_path, {"demo": {"cases_per_dataset": 2, "external_cases": 2},
                                 "train": {"steps": 6, "checkpoint_every": 3, "num_workers": 0}})
    result = _snakemake(workdir, "--cores", "2")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    results = workdir / "results"
    for dataset in ("demo_msd_liver", "demo_msd_spleen", "demo_btcv", "demo_kits"):
        assert (results / "store" / f"{dataset}.zarr" / "zarr.json").exists()
    assert (results / "model" / "final.pt").exists() and (results / "embeddings" / "prompts.pt").exists()
    log = pd.read_csv(results / "model" / "train_log.csv")
    assert len(log) == 6 and np.isfinite(log["loss"]).all()
    validation = pd.read_csv(results / "model" / "val_log.csv")  # validation runs at the last step
    trained = {"Liver", "Liver Tumor", "Spleen", "Left Kidney", "Right Kidney", "Kidney Tumor", "Gall Bladder",
               "Esophagus", "Stomach", "Pancreas", "Duodenum"}
    assert set(validation["step"]) == {6} and set(validation["class"]) == trained
    assert validation["case_id"].nunique() == 2 and validation["dice"].dropna().between(0, 1).all()

    cases = read_manifest(results / "manifests" / "demo_external.tsv")
    assert len(cases) == 2
    for batch, case in enumerate(cases):  # two batches: case i goes to batch i % 2
        folder = results / "predictions" / "demo_external" / f"batch_{batch}"
        image, organs, tumours, _ = read_prediction(folder / f"{case.case_id}.ome.zarr")
        source = load_nifti(workdir / case.image)  # manifest paths are relative to the working directory
        assert organs.shape == source.shape and tumours.shape == source.shape
        np.testing.assert_allclose(image.affine, source.affine, atol=1e-4)
        assert set(np.unique(organs)) <= {c.index for c in classes.organs()} | {0}
        exported = load_nifti(folder / f"{case.case_id}_organs.nii.gz")
        np.testing.assert_allclose(exported.affine, source.affine, atol=1e-4)
        assert np.array_equal(exported.array, organs)

    per_case = pd.read_csv(results / "evaluation" / "per_case.tsv", sep="\t")
    assert len(per_case) == len(cases) * len(classes)
    assert set(per_case.groupby("case_id")["class"].nunique()) == {len(classes)}
    assert (results / "evaluation" / "dice_per_class.png").stat().st_size > 1000

    report = _snakemake(workdir, "--report", "report.html")
    assert report.returncode == 0, report.stderr[-3000:]
    assert "dice_per_class.png" in (workdir / "report.html").read_text()
