"""Tests of universal.data.dicom_convert: DICOM series (IDC downloads) to NIfTI, checked against SimpleITK."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from mirrors import write_dicom_series

from universal.core.classes import load_class_table
from universal.core.volume import Volume, load_nifti
from universal.data.catalog import load_catalog
from universal.data.dicom_convert import REPORT_NAME, ConversionError, convert_series
from universal.data.download.datasets import convert_idc_download

TEMPLATE = "img/{PatientID}.nii.gz"


def _volume(seed: int) -> Volume:
    """A small axis-aligned RAS CT volume (x, y, z) = (9, 7, 5) of int16 HU at 0.8 x 0.8 x 2.5 mm."""
    rng = np.random.default_rng(seed)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = [-100.0, 40.0, -300.0 + seed]
    return Volume(rng.integers(-1000, 1500, (9, 7, 5)).astype(np.int16), affine)


def _idc_series(root: Path, patient: str, volume: Volume, modality: str = "CT", tag: str = "") -> Path:
    """A series in idc-index's default folder template: <collection>/<PatientID>/<study>/<Modality>_<series>."""
    folder = root / "pancreas_ct" / (patient or "unknown") / f"study{tag}" / f"{modality}_series{tag}"
    write_dicom_series(volume, folder, "{:03d}.dcm", hu=True, patient_id=patient, modality=modality)
    return folder


def _report(out: Path) -> list[dict]:
    with (out / REPORT_NAME).open() as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


@pytest.mark.parametrize("folder", ["totalsegmentator/example_ct_dicom", "dcmqi/ct-3slice"])
def test_real_series_match_simpleitk(shared_data: Path, tmp_path: Path, folder: str) -> None:
    # example_ct_dicom is JPEG 2000 with empty UIDs and PatientID, ct-3slice uncompressed GE CT.
    source = shared_data / folder
    results = convert_series(source, tmp_path, "{Modality}.nii.gz")
    assert [(r.status, r.output) for r in results] == [("written", tmp_path / "CT.nii.gz")]
    ours = sitk.ReadImage(str(tmp_path / "CT.nii.gz"))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(source)))
    reference = reader.Execute()
    assert ours.GetSize() == reference.GetSize()
    np.testing.assert_allclose(ours.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(ours.GetSpacing(), reference.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(ours.GetDirection(), reference.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(reference))
    assert sitk.GetArrayFromImage(ours).dtype == np.int16


def test_idc_download_becomes_the_catalog_layout(tmp_path: Path) -> None:
    classes = load_class_table()
    entry = load_catalog(None, classes)["tcia_pancreas_ct"]
    root = tmp_path / "tcia_pancreas_ct"
    volumes = {"PANCREAS_0001": _volume(1), "PANCREAS_0002": _volume(2)}
    for number, (patient, volume) in enumerate(volumes.items()):
        _idc_series(root / "dicom", patient, volume, tag=str(number))
    _idc_series(root / "dicom", "PANCREAS_0001", _volume(3), modality="SEG", tag="seg")  # not converted

    results = convert_idc_download(entry, root)

    assert sorted(r.status for r in results) == ["written", "written"]
    for patient, volume in volumes.items():
        case = patient.split("_")[1]
        path = root / entry.layout["image"].format(case=case)
        assert path == root / entry.source["convert"]["image"].format(PatientID=patient)
        converted = load_nifti(path)
        assert np.array_equal(converted.array, volume.array)
        np.testing.assert_allclose(converted.affine, volume.affine, atol=1e-4)
    assert [row["status"] for row in _report(root)] == ["written", "written"]
    assert {r.status for r in convert_idc_download(entry, root)} == {"exists"}  # a rerun keeps what exists


def test_failed_series_are_reported_and_the_others_converted(tmp_path: Path) -> None:
    dicom, out = tmp_path / "dicom", tmp_path / "out"
    _idc_series(dicom, "PANCREAS_0001", _volume(1), tag="a")
    _idc_series(dicom, "PANCREAS_0002", _volume(2), tag="b")
    _idc_series(dicom, "PANCREAS_0002", _volume(3), tag="c")  # a second CT series of one patient
    _idc_series(dicom, "", _volume(4), tag="d")  # no PatientID
    broken = _idc_series(dicom, "PANCREAS_0005", _volume(5), tag="e")
    first = sorted(broken.iterdir())[0]
    ds = pydicom.dcmread(first)
    ds.PixelData = ds.PixelData[:10]  # truncated pixel data
    ds.save_as(first)
    mixed = _idc_series(dicom, "PANCREAS_0006", _volume(6), tag="f")
    write_dicom_series(_volume(7), mixed, "other_{:03d}.dcm", hu=True, patient_id="PANCREAS_0006")

    results = {r.folder.parent.parent.name + r.folder.name[-1]: r for r in convert_series(dicom, out, TEMPLATE)}

    assert results["PANCREAS_0001a"].status == "written"
    assert (out / "img" / "PANCREAS_0001.nii.gz").exists()
    for key in ("PANCREAS_0002b", "PANCREAS_0002c"):
        assert results[key].status == "failed" and "2 series map to PANCREAS_0002.nii.gz" in results[key].error
    assert results["unknownd"].status == "failed" and "no value for ['PatientID']" in results["unknownd"].error
    assert results["PANCREAS_0005e"].status == "failed" and "cannot decode the pixel data" in results[
        "PANCREAS_0005e"].error
    assert results["PANCREAS_0006f"].status == "failed" and "2 series in one folder" in results["PANCREAS_0006f"].error
    assert sorted(p.name for p in (out / "img").iterdir()) == ["PANCREAS_0001.nii.gz"]  # no partial files left
    assert len(_report(out)) == 6


@pytest.mark.parametrize("template, message", [("img/case.nii.gz", "must name DICOM attributes"),
                                               ("img/{PatientID}.mha", "must end in .nii.gz")])
def test_bad_template_is_refused(tmp_path: Path, template: str, message: str) -> None:
    _idc_series(tmp_path / "dicom", "P1", _volume(1))
    with pytest.raises(ConversionError, match=message):
        convert_series(tmp_path / "dicom", tmp_path / "out", template)


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="no such folder"):
        convert_series(tmp_path / "absent", tmp_path / "out", TEMPLATE)


@pytest.mark.parametrize("patient", ["../../escaped/X", "/tmp/escaped_X", "a/../../X", ".."])
def test_header_values_never_write_outside_out(tmp_path: Path, patient: str) -> None:
    dicom, out = tmp_path / "dicom", tmp_path / "work" / "out"
    _idc_series(dicom, "PANCREAS_0001", _volume(1), tag="a")
    write_dicom_series(_volume(2), dicom / "hostile", "{:03d}.dcm", hu=True, patient_id=patient)

    results = {r.folder.name: r for r in convert_series(dicom, out, TEMPLATE)}

    assert results["CT_seriesa"].status == "written"
    assert results["hostile"].status == "failed" and "PatientID" in results["hostile"].error
    assert "cannot be part of a file name" in results["hostile"].error
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.nii.gz"))
    assert written == ["work/out/img/PANCREAS_0001.nii.gz"]
    assert not Path("/tmp/escaped_X.nii.gz").exists()


def test_a_template_leaving_out_is_refused(tmp_path: Path) -> None:
    _idc_series(tmp_path / "dicom", "P1", _volume(1))
    with pytest.raises(ConversionError, match="must be a path inside the output folder"):
        convert_series(tmp_path / "dicom", tmp_path / "out", "../img/{PatientID}.nii.gz")


@pytest.mark.parametrize("which, keep", [("first", 50), ("last", 300), ("first", 0)])
def test_an_unreadable_end_slice_fails_the_series(tmp_path: Path, which: str, keep: int) -> None:
    folder = _idc_series(tmp_path / "dicom", "P1", _volume(1))
    files = sorted(folder.iterdir())
    broken = files[0] if which == "first" else files[-1]
    broken.write_bytes(broken.read_bytes()[:keep])

    [result] = convert_series(tmp_path / "dicom", tmp_path / "out", TEMPLATE)

    assert result.status == "failed" and broken.name in result.error
    assert "cannot be read as slices of the series" in result.error
    assert not (tmp_path / "out" / "img").exists()


def test_a_corrupt_middle_slice_is_named_not_called_uneven_spacing(tmp_path: Path) -> None:
    folder = _idc_series(tmp_path / "dicom", "P1", _volume(1))
    middle = sorted(folder.iterdir())[2]
    middle.write_bytes(b"\x00" * 700)

    [result] = convert_series(tmp_path / "dicom", tmp_path / "out", TEMPLATE)

    assert result.status == "failed" and f"{middle.name} (" in result.error
    assert "evenly spaced" not in result.error


def test_notes_and_other_objects_beside_the_slices_are_skipped(tmp_path: Path) -> None:
    folder = _idc_series(tmp_path / "dicom", "P1", _volume(1))
    (folder / "README.txt").write_text("downloaded from IDC")
    (folder / ".DS_Store").write_bytes(b"\x00\x01")
    [result] = convert_series(tmp_path / "dicom", tmp_path / "out", TEMPLATE)
    assert result.status == "written"
    assert load_nifti(result.output).shape == (9, 7, 5)


def test_a_series_without_pixel_spacing_fails_alone(tmp_path: Path) -> None:
    dicom, out = tmp_path / "dicom", tmp_path / "out"
    _idc_series(dicom, "P1", _volume(1), tag="a")
    broken = _idc_series(dicom, "P2", _volume(2), tag="b")
    for path in broken.iterdir():
        ds = pydicom.dcmread(path)
        del ds.PixelSpacing
        ds.save_as(path)

    results = {r.folder.name: r for r in convert_series(dicom, out, TEMPLATE)}

    assert results["CT_seriesa"].status == "written"
    assert results["CT_seriesb"].status == "failed" and "has no PixelSpacing" in results["CT_seriesb"].error
    assert [row["status"] for row in _report(out)] == ["written", "failed"]


def test_any_error_of_a_series_is_one_report_line(tmp_path: Path, monkeypatch) -> None:
    from universal.data import dicom_convert

    dicom, out = tmp_path / "dicom", tmp_path / "out"
    _idc_series(dicom, "P1", _volume(1), tag="a")
    _idc_series(dicom, "P2", _volume(2), tag="b")
    real = dicom_convert.read_dicom_series

    def flaky(folder: Path, with_pixels: bool):
        if folder.name == "CT_seriesb":
            raise RuntimeError("decoder crashed:\n  frame 3\n  frame 4")
        return real(folder, with_pixels)

    monkeypatch.setattr(dicom_convert, "read_dicom_series", flaky)
    results = {r.folder.name: r.status for r in convert_series(dicom, out, TEMPLATE)}

    assert results == {"CT_seriesa": "written", "CT_seriesb": "failed"}
    lines = (out / REPORT_NAME).read_text().splitlines()
    assert len(lines) == 3 and lines[2].endswith("RuntimeError: decoder crashed: | frame 3 | frame 4")


def test_a_folder_without_the_modality_names_what_it_holds(tmp_path: Path) -> None:
    _idc_series(tmp_path / "dicom", "P1", _volume(1), modality="MR")
    with pytest.raises(ConversionError, match=r"no CT series below it; found MR: 1 series"):
        convert_series(tmp_path / "dicom", tmp_path / "out", TEMPLATE)
    assert not (tmp_path / "out").exists()


def test_the_command_fails_for_a_folder_without_ct(tmp_path: Path, capsys) -> None:
    from universal import cli

    _idc_series(tmp_path / "dicom", "P1", _volume(1), modality="MR")
    assert cli.main(["dicom-to-nifti", "--input", str(tmp_path / "dicom"), "--out", str(tmp_path / "out")]) == 2
    assert "found MR: 1 series" in capsys.readouterr().err
