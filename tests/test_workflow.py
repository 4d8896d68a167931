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
from slurm_cluster import local_demo_run

from universal.core.volume import load_nifti
from universal.data.catalog import read_manifest
from universal.infer.ome import read_prediction

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


TEST_CONFIG = REPO / ".test" / "config" / "config.yaml"


def _deploy(target: Path, overrides: dict, base: Path = REPO / "config" / "config.yaml") -> Path:
    """A working directory with the workflow linked in and a config derived from ``base`` (the demo config)."""
    for name in ("workflow", "profiles"):
        (target / name).symlink_to(REPO / name)
    (target / "config").mkdir()
    for name in ("classes.yaml", "datasets.yaml"):
        shutil.copy(REPO / "config" / name, target / "config" / name)
    config = yaml.safe_load(base.read_text())
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


def test_a_bad_sample_sheet_fails_at_the_start_naming_row_and_column(tmp_path):
    workdir = _deploy(tmp_path, {})
    (workdir / "ct.nii.gz").write_bytes(b"")
    (workdir / "cases.tsv").write_text("case_id\timage\nfine\tct.nii.gz\nbad/id\tct.nii.gz\nscan\tscan.nrrd\n")
    result = _snakemake(workdir, "infer_external", "-n", "--config", "external_samples=cases.tsv")
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "AssertionError" not in output
    assert "row 2, column case_id: 'bad/id' does not match" in output
    assert "row 3, column image:" in output and "does not exist" in output


def test_a_dataset_folder_with_a_space_reaches_the_command_whole(tmp_path):
    spaced = "resources/demo data"
    roots = {key: {**value, "root": value["root"].replace("resources/demo", spaced)}
             for key, value in yaml.safe_load(TEST_CONFIG.read_text())["datasets"].items()}
    workdir = _deploy(tmp_path, {"demo": {"out": spaced}, "datasets": roots}, base=TEST_CONFIG)
    result = _snakemake(workdir, "--cores", "1", "results/manifests/demo_msd_spleen.tsv")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    cases = read_manifest(workdir / "results" / "manifests" / "demo_msd_spleen.tsv")
    assert len(cases) == 2 and all("demo data" in str(case.image) and (workdir / case.image).exists() for case in cases)


def test_infer_external_without_a_model_says_it_trains_one(tmp_path):
    workdir = _deploy(tmp_path, {})
    ct = workdir / "ct.nii.gz"
    ct.write_bytes(b"")
    (workdir / "cases.tsv").write_text(f"case_id\timage\nct\t{ct}\n")
    result = _snakemake(workdir, "infer_external", "-n", "--config", "external_samples=cases.tsv")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "external_samples without a `model`" in output
    counts = _job_counts(result.stdout)
    assert counts["train"] == 1 and counts["infer"] == 2 and "evaluate" not in counts
    assert "results/predictions/demo_external" not in output  # the demo's own external set is not predicted


@pytest.mark.parametrize("config", ["config/config.yaml", "config/real.yaml", ".test/config/config.yaml"])
def test_lint_is_clean(config):
    result = _snakemake(REPO, "--lint", "--configfile", config)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_demo_workflow_end_to_end(tmp_path_factory, classes, shared_data):
    workdir, result, _ = local_demo_run(tmp_path_factory)  # the run the Slurm test compares with, made once
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
    folder = results / "predictions" / "demo_external"
    for batch, case in enumerate(cases):  # two batches: case i goes to batch i % 2
        report = pd.read_csv(folder / f"batch_{batch}.tsv", sep="\t")
        assert report["case_id"].tolist() == [case.case_id] and report["status"].tolist() == ["ok"]
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
    assert {"nsd", "hd95_mm", "annotated"} <= set(per_case.columns) and per_case["nsd"].between(0, 1).any()
    assert (results / "evaluation" / "dice_per_class.png").stat().st_size > 1000
    assert len(pd.read_parquet(results / "evaluation" / "detection.parquet")) == len(classes.tumours())

    assert pd.read_csv(results / "evaluation" / "failed_cases.tsv", sep="\t").empty

    report = _snakemake(workdir, "--report", "report.html")
    assert report.returncode == 0, report.stderr[-3000:]
    html = (workdir / "report.html").read_text()
    assert all(name in html for name in ("dice_per_class.png", "nsd_per_class.png", "detection.tsv"))

    _infer_external_as_users_type_it(workdir, shared_data)


def _infer_external_as_users_type_it(workdir: Path, shared_data: Path) -> None:
    """`snakemake infer_external` with a two-row sample sheet of real CTs and the demo's trained checkpoint: only
    the sample sheet's manifest and inference jobs run, predictions land in results/predictions/<sheet name>/, on
    each input's own grid, and a second run has nothing to do."""
    (workdir / "elsewhere").mkdir()
    model = workdir / "elsewhere" / "model.pt"
    shutil.copy(workdir / "results" / "model" / "final.pt", model)
    sheet = workdir / "cases.tsv"
    ct = shared_data / "totalsegmentator"
    sheet.write_text(f"case_id\timage\nsmall\t{ct / 'example_ct_sm.nii.gz'}\nwhole\t{ct / 'example_ct.nii.gz'}\n")
    typed = ["infer_external", "--cores", "2", "--config", f"external_samples={sheet}", f"model={model}"]
    dry = _snakemake(workdir, *typed, "-n")
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    stats = _job_counts(dry.stdout)
    assert stats == {"sample_sheet_manifest": 1, "infer": 2, "infer_external": 1, "total": 4}, dry.stdout[-3000:]
    run = _snakemake(workdir, *typed)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    folder = workdir / "results" / "predictions" / "cases"
    for case_id, name in (("small", "example_ct_sm.nii.gz"), ("whole", "example_ct.nii.gz")):
        image, organs, _, meta = read_prediction(folder / f"{case_id}.ome.zarr")
        source = load_nifti(ct / name)
        assert organs.shape == source.shape and meta["checkpoint"] == str(model)
        np.testing.assert_allclose(image.affine, source.affine, atol=1e-4)
        assert meta["spacing_model_mm"] == [4.0, 4.0, 4.0]  # the checkpoint's grid, though the config says nothing
    again = _snakemake(workdir, *typed, "-n")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stdout[-2000:]


def _job_counts(output: str) -> dict[str, int]:
    """The job stats table of a Snakemake run as {rule: count}."""
    lines = output[output.index("Job stats:"):].splitlines()[3:]
    counts = {}
    for line in lines:
        words = line.split()
        if len(words) != 2 or not words[1].isdigit():
            break
        counts[words[0]] = int(words[1])
    return counts
