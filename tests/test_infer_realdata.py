"""Inference on the real files of ../shared/data: NIfTI and DICOM series in, outputs on each input's exact grid,
the same prediction from the NIfTI and the DICOM form of one scan, and a DICOM-SEG that reads back in highdicom."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
from synthetic import write_tiny_checkpoint

from universal.core.classes import load_class_table
from universal.core.volume import Volume, load_nifti, resample
from universal.data.catalog import Case
from universal.data.images import read_ct
from universal.evaluate.metrics import dice
from universal.infer.batch import infer_cases, load_run
from universal.infer.ome import predicted_mask, read_prediction
from universal.infer.settings import InferenceSettings
from universal.infer.source_grid import label_map_on_source_grid


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random U-Net predicting every class on a 3 mm grid."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "model.pt", 3.0)


def _predict(tmp_path: Path, checkpoint: Path, cases: list[Case], **settings) -> list:
    classes = load_class_table()
    run = load_run(checkpoint, classes, InferenceSettings(**settings))
    outcomes = infer_cases(cases, run, classes, tmp_path / "out", tmp_path / "out" / "batch_0.tsv")
    assert [o.status for o in outcomes] == ["ok"] * len(cases), [o.error for o in outcomes]
    return [read_prediction(tmp_path / "out" / f"{case.case_id}.ome.zarr") for case in cases]


def test_outputs_lie_on_each_input_s_exact_grid(shared_data, tmp_path, checkpoint) -> None:
    cases = [Case("real", "ts_nifti", shared_data / "totalsegmentator" / "example_ct_sm.nii.gz", None),
             Case("real", "ts_dicom", shared_data / "totalsegmentator" / "example_ct_dicom", None),
             Case("real", "ge_3slice", shared_data / "dcmqi" / "ct-3slice", None)]
    for case, (image, organs, tumours, _) in zip(cases, _predict(tmp_path, checkpoint, cases, export_nifti=True),
                                                 strict=True):
        source = read_ct(case.image)
        assert organs.shape == tumours.shape == source.shape
        np.testing.assert_allclose(image.affine, source.affine, atol=1e-4)
        np.testing.assert_array_equal(image.array, source.array)
        exported = nib.load(str(tmp_path / "out" / f"{case.case_id}_organs.nii.gz"))
        assert exported.shape == source.shape
        statistics = pd.read_csv(tmp_path / "out" / f"{case.case_id}.statistics.tsv", sep="\t")
        assert list(statistics.columns) == ["class", "kind", "volume_ml", "mean_hu", "median_hu"]
    nifti = nib.load(str(cases[0].image))
    exported = nib.load(str(tmp_path / "out" / "ts_nifti_organs.nii.gz"))
    np.testing.assert_allclose(exported.affine, nifti.affine, atol=1e-4)  # the NIfTI input's own orientation


def test_the_nifti_and_the_dicom_form_of_one_scan_give_the_same_prediction(shared_data, tmp_path, checkpoint):
    folder = shared_data / "totalsegmentator" / "example_ct_dicom"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    as_nifti = tmp_path / "scan.nii.gz"
    sitk.WriteImage(reader.Execute(), str(as_nifti))  # SimpleITK's conversion, not ours
    (_, organs_a, tumours_a, _), (_, organs_b, tumours_b, _) = _predict(
        tmp_path, checkpoint, [Case("real", "dicom", folder, None), Case("real", "nifti", as_nifti, None)])
    assert organs_a.any()
    np.testing.assert_array_equal(organs_a, organs_b)
    np.testing.assert_array_equal(tumours_a, tumours_b)


def test_the_dicom_seg_reads_back_with_references_names_and_voxels(shared_data, tmp_path, checkpoint) -> None:
    folder = shared_data / "dcmqi" / "ct-3slice"
    (_, organs, tumours, _), = _predict(tmp_path, checkpoint, [Case("real", "ge", folder, None)],
                                           export_dicom_seg=True)
    seg = hd.seg.segread(tmp_path / "out" / "ge.seg.dcm")
    sources = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in sorted(folder.iterdir())}
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(sources)
    classes = load_class_table()
    labels = [item.SegmentLabel for item in seg.SegmentSequence]
    present = [c.name for c in classes if predicted_mask(organs, tumours, c).any()]
    assert labels == present and labels
    image = read_ct(folder)
    for number, name in enumerate(labels, start=1):
        expected = predicted_mask(organs, tumours, classes[name])
        total = 0
        for uid, path in sources.items():
            frame = seg.get_pixels_by_source_instance([uid], segment_numbers=[number], ignore_spatial_locations=True)
            position = np.asarray(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient, float)
            ras = np.array([-position[0], -position[1], position[2]])  # DICOM positions are LPS
            z = round(float(np.linalg.solve(image.affine[:3, :3], ras - image.affine[:3, 3])[2]))
            total += int(frame.sum())
            assert int(frame.sum()) == int(expected[:, :, z].sum())
        assert total == int(expected.sum())


def test_a_reference_label_map_survives_the_preprocessing_and_back(shared_data) -> None:
    """TotalSegmentator's labels of the example CT, each class resampled to the 1.5 mm model grid as a probability
    (linear), thresholded there and mapped back onto the CT's grid: Dice >= 0.98 per class."""
    reference = load_nifti(shared_data / "totalsegmentator" / "example_seg.nii.gz")
    values = [v for v in np.unique(reference.array) if v and (reference.array == v).sum() >= 500]
    grid = [resample(Volume((reference.array == v).astype(np.float32), reference.affine), (1.5, 1.5, 1.5), 1)
            for v in values]
    probabilities = np.stack([g.array for g in grid])
    mapped = label_map_on_source_grid(probabilities > 0.5, probabilities, list(range(len(values))),
                                      [int(v) for v in values], grid[0].spacing, reference.shape, reference.spacing,
                                      [0.5] * len(values))
    scores = {int(v): dice(mapped == v, reference.array == v) for v in values}
    assert len(scores) >= 10 and min(scores.values()) >= 0.98, scores
