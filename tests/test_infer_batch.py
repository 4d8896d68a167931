"""Tests of a batch of inference as users run it: preprocessing from the checkpoint, one bad case never stops the
batch, exit statuses that tell the truth, and a rerun that computes only what is missing."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from synthetic import write_tiny_checkpoint

from universal.cli import main
from universal.core.classes import load_class_table
from universal.core.volume import Volume, save_nifti
from universal.data.catalog import Case, write_manifest
from universal.infer.batch import infer_cases, int16_hu, load_run
from universal.infer.settings import InferenceSettings, settings_from_checkpoint
from universal.model.preprocessing import Preprocessing

PREPROCESSING = Preprocessing((4.0, 4.0, 4.0), (-175.0, 250.0), (32, 32, 32)).to_dict()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "model.pt", 4.0, ["Liver", "Spleen"])


@pytest.fixture
def cases(tmp_path: Path) -> list[Case]:
    """Two readable CTs (2 mm, RAS) and one file that is not a NIfTI."""
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    found = []
    for case_id in ("good_a", "good_b"):
        image = tmp_path / "cts" / f"{case_id}.nii.gz"
        save_nifti(Volume(rng.normal(0, 300, (40, 36, 30)).astype(np.int16), affine), image)
        found.append(Case("set", case_id, image, None))
    junk = tmp_path / "cts" / "junk.nii.gz"
    junk.write_bytes(b"this is not a NIfTI file")
    return [*found, Case("set", "junk", junk, None)]


def _infer(tmp_path: Path, checkpoint: Path, cases: list[Case], *extra: str) -> int:
    manifest = tmp_path / "manifest.tsv"
    write_manifest(cases, manifest)
    return main(["infer", "--manifest", str(manifest), "--checkpoint", str(checkpoint), "--out",
                 str(tmp_path / "out"), "--report", str(tmp_path / "out" / "batch_0.tsv"), *extra])


def _report(tmp_path: Path) -> pd.DataFrame:
    return pd.read_csv(tmp_path / "out" / "batch_0.tsv", sep="\t", keep_default_na=False)


def test_a_bad_case_fails_alone_and_the_exit_status_says_so(tmp_path, checkpoint, cases) -> None:
    assert _infer(tmp_path, checkpoint, cases) == 1
    report = _report(tmp_path)
    assert report["status"].tolist() == ["ok", "ok", "failed"]
    assert "junk.nii.gz" in report["error"][2] and "\n" not in report["error"][2]
    assert (tmp_path / "out" / "good_b.ome.zarr" / "zarr.json").exists()
    assert _infer(tmp_path, checkpoint, cases, "--tolerate-failures") == 0


def test_a_batch_where_every_case_failed_exits_non_zero_even_when_tolerated(tmp_path, checkpoint, cases) -> None:
    assert _infer(tmp_path, checkpoint, cases[2:], "--tolerate-failures") == 1
    assert _report(tmp_path)["status"].tolist() == ["failed"]


def test_a_rerun_skips_complete_predictions_of_the_same_run(tmp_path, checkpoint, cases) -> None:
    assert _infer(tmp_path, checkpoint, cases[:2], "--nifti") == 0
    written = (tmp_path / "out" / "good_a_organs.nii.gz").stat().st_mtime_ns
    assert _infer(tmp_path, checkpoint, cases[:2], "--nifti") == 0
    assert _report(tmp_path)["status"].tolist() == ["skipped", "skipped"]
    assert (tmp_path / "out" / "good_a_organs.nii.gz").stat().st_mtime_ns == written
    assert _infer(tmp_path, checkpoint, cases[:2], "--nifti", "--threshold", "0.4") == 0  # another run: redone
    assert _report(tmp_path)["status"].tolist() == ["ok", "ok"]
    assert not list((tmp_path / "out").glob("*partial*"))


def test_a_failure_removes_the_case_s_old_prediction(tmp_path, checkpoint, cases) -> None:
    assert _infer(tmp_path, checkpoint, cases[:1]) == 0
    cases[0].image.write_bytes(b"truncated")
    assert _infer(tmp_path, checkpoint, cases[:1], "--threshold", "0.4") == 1
    assert not (tmp_path / "out" / "good_a.ome.zarr").exists()


def test_a_case_id_that_is_not_a_file_name_fails_without_writing_outside(tmp_path, checkpoint, cases) -> None:
    escaping = Case("set", "../outside", cases[0].image, None)
    run = load_run(checkpoint, load_class_table(), InferenceSettings())
    outcomes = infer_cases([escaping, cases[1]], run, load_class_table(), tmp_path / "out", tmp_path / "r.tsv")
    assert [o.status for o in outcomes] == ["failed", "ok"] and "'..' component" in outcomes[0].error
    assert not (tmp_path / "outside.ome.zarr").exists()


def test_preprocessing_comes_from_the_checkpoint_and_an_override_is_named(checkpoint, caplog) -> None:
    meta = {"preprocessing": PREPROCESSING}
    settings = settings_from_checkpoint(checkpoint, meta, InferenceSettings())
    assert (settings.spacing, settings.window_hu, settings.roi) == ((4.0, 4.0, 4.0), (-175.0, 250.0), (32, 32, 32))
    with caplog.at_level(logging.WARNING):
        settings = settings_from_checkpoint(checkpoint, meta, InferenceSettings(), spacing=(1.5, 1.5, 1.5))
    assert settings.spacing == (1.5, 1.5, 1.5)
    assert "spacing_mm [1.5, 1.5, 1.5] overrides" in caplog.text and "[4.0, 4.0, 4.0]" in caplog.text
    with pytest.raises(ValueError, match="does not record its preprocessing"):
        settings_from_checkpoint(checkpoint, {}, InferenceSettings(), spacing=(1.5, 1.5, 1.5))


def test_a_class_threshold_in_the_class_table_overrides_the_settings(tmp_path) -> None:
    from universal.infer.predict import class_thresholds

    table = tmp_path / "classes.yaml"
    table.write_text("classes:\n"
                     "  - {index: 1, name: Spleen, kind: organ, colour: [1, 2, 3], postprocess: none, threshold: 0.3}\n"
                     "  - {index: 2, name: Liver, kind: organ, colour: [1, 2, 3], postprocess: none}\n")
    classes = load_class_table(table)
    assert class_thresholds(classes, [1, 0], InferenceSettings(threshold=0.6)).tolist() == pytest.approx([0.6, 0.3])


def test_a_blank_ct_is_segmented_with_a_warning_naming_it(tmp_path, checkpoint, caplog) -> None:
    blank = tmp_path / "cts" / "blank.nii.gz"
    save_nifti(Volume(np.full((24, 24, 24), -1000, np.int16), np.diag([2.0, 2.0, 2.0, 1.0])), blank)
    with caplog.at_level(logging.WARNING):
        assert _infer(tmp_path, checkpoint, [Case("set", "blank", blank, None)]) == 0
    assert f"case blank: {blank} looks blank (HU from -1000 to -1000)" in caplog.text


def test_evaluation_lists_failed_cases_and_goes_on(tmp_path, checkpoint, cases, catalog) -> None:
    """Cases that inference failed, or whose evaluation fails, are listed with the stage and the reason; the
    others are scored."""
    from universal.evaluate.metrics import evaluate_predictions

    assert _infer(tmp_path, checkpoint, cases, "--tolerate-failures") == 0
    labelled = [Case("set", c.case_id, c.image, c.image) for c in cases]  # the CT as a "label": unmapped values
    written = evaluate_predictions(labelled, catalog["demo_external"], load_class_table(), tmp_path / "out",
                                   tmp_path / "out" / "batch_0.tsv", tmp_path / "metrics", tmp_path / "failed.tsv")
    failed = pd.read_csv(tmp_path / "failed.tsv", sep="\t", keep_default_na=False)
    assert written == [] and failed["case_id"].tolist() == ["good_a", "good_b", "junk"]
    assert failed["stage"].tolist() == ["evaluate", "evaluate", "infer"]
    assert "junk.nii.gz" in failed["error"][2]


def test_probabilities_on_request_are_the_model_grid_s_quantised(tmp_path, checkpoint, cases) -> None:
    from universal.core.volume import resample
    from universal.data.images import read_ct
    from universal.infer.ome import read_probabilities
    from universal.infer.predict import predict_on_grid

    assert _infer(tmp_path, checkpoint, cases[:1], "--probabilities") == 0
    stored = read_probabilities(tmp_path / "out" / "good_a.ome.zarr")
    assert stored.names == ["Liver", "Spleen"]  # the classes the checkpoint predicts, in class-table order
    assert stored.array.shape == (2, 20, 18, 15) and stored.array.dtype == np.uint8  # 40×36×30 of 2 mm at 4 mm
    assert np.allclose(stored.grid, np.diag([4.0, 4.0, 4.0, 1.0]))  # the CT's origin, the model's spacing
    classes = load_class_table()
    run = load_run(checkpoint, classes, InferenceSettings())
    grid = resample(read_ct(cases[0].image), run.settings.spacing, 1)
    expected = predict_on_grid(run.model, grid, classes, run.settings, run.predicted).probabilities
    assert np.array_equal(stored.array, np.rint(expected.astype(np.float32) * 255).astype(np.uint8))
    _infer(tmp_path, checkpoint, cases[1:2])
    assert read_probabilities(tmp_path / "out" / "good_b.ome.zarr") is None  # not asked for: not written


def test_the_ct_is_stored_as_int16_hu_rounded_and_clipped_without_a_copy_of_an_int16_ct() -> None:
    hu = np.array([-1024, 0, 3071], dtype=np.int16)
    assert int16_hu(hu) is hu
    floats = np.array([-40000.0, -1.5, 0.4, 2.5, 40000.0], dtype=np.float32)
    assert int16_hu(floats).dtype == np.int16
    assert int16_hu(floats).tolist() == [-32768, -2, 0, 2, 32767]
