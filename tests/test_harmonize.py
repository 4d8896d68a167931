from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from universal.core.sides import body_midline_x_mm
from universal.core.volume import Volume, load_nifti, save_nifti
from universal.data.catalog import Case
from universal.data.harmonize import HarmonizeError, harmonize_case, harmonize_dataset, harmonize_labels
from universal.data.store import list_cases, open_case

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _box(shape, *slices) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[slices] = True
    return mask


def test_single_class_values_map_exactly(catalog, classes):
    raw = np.zeros((10, 10, 10), np.uint8)
    raw[1:4] = 1
    raw[5:7] = 2
    out = harmonize_labels(Volume(raw, AFFINE), catalog["demo_msd_liver"], classes, None)
    assert set(np.unique(out)) == {0, 6, 27}
    assert np.array_equal(out == 6, raw == 1) and np.array_equal(out == 27, raw == 2)


def test_btcv_numbering_passes_through(catalog, classes):
    raw = np.arange(15, dtype=np.uint8).reshape(15, 1, 1).repeat(2, 1).repeat(2, 2)
    out = harmonize_labels(Volume(raw, AFFINE), catalog["demo_btcv"], classes, 0.0)
    assert np.array_equal(out[:, 0, 0], np.arange(15))


def test_kidneys_split_by_side_with_tumour_joined(catalog, classes):
    raw = np.zeros((40, 20, 20), np.uint8)
    raw[28:36, 5:15, 5:15] = 1      # patient's right (+x) kidney
    raw[4:12, 5:15, 5:15] = 1       # left kidney
    raw[24:28, 8:12, 8:12] = 2      # tumour bulging out of the right kidney
    raw[20:24, 8:12, 8:12] = 1      # a kidney fragment joined to the right kidney only through the tumour
    out = harmonize_labels(Volume(raw, AFFINE), catalog["demo_kits"], classes, midline_x_mm=38.0)
    assert set(np.unique(out)) == {0, 2, 3, 26}
    assert (out[28:36, 5:15, 5:15] == 2).all() and (out[4:12, 5:15, 5:15] == 3).all()
    assert (out[24:28, 8:12, 8:12] == 26).all()
    assert (out[20:24, 8:12, 8:12] == 2).all()


def test_single_kidney_goes_to_its_anatomical_side(catalog, classes):
    raw = np.zeros((40, 10, 10), np.uint8)
    raw[2:8, 2:8, 2:8] = 1  # left of the midline: the original would have called it "right"
    out = harmonize_labels(Volume(raw, AFFINE), catalog["demo_kits"], classes, midline_x_mm=40.0)
    assert set(np.unique(out)) == {0, 3}


def test_three_components_each_by_side_without_midline(catalog, classes):
    raw = np.zeros((60, 10, 10), np.uint8)
    raw[40:55, 1:9, 1:9] = 1
    raw[5:20, 1:9, 1:9] = 1
    raw[35:37, 4:6, 4:6] = 1   # small fragment near the right one
    out = harmonize_labels(Volume(raw, AFFINE), catalog["demo_kits"], classes, midline_x_mm=None)
    assert (out[40:55, 1:9, 1:9] == 2).all() and (out[5:20, 1:9, 1:9] == 3).all()
    assert (out[35:37, 4:6, 4:6] == 2).all()


def test_unknown_label_value_is_named(catalog, classes):
    raw = np.zeros((5, 5, 5), np.uint8)
    raw[0, 0, 0] = 7
    with pytest.raises(HarmonizeError, match=r"label values \[7\].*demo_kits"):
        harmonize_labels(Volume(raw, AFFINE), catalog["demo_kits"], classes, None, "demo_kits/x")


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.int64])
def test_label_lookup_is_the_same_for_every_integer_type(catalog, classes, dtype):
    raw = np.zeros((6, 4, 4), dtype)
    raw[1:3] = 1
    raw[4] = 2
    out = harmonize_labels(Volume(raw, AFFINE), catalog["demo_msd_liver"], classes, None)
    assert out.dtype == np.uint8 and np.array_equal(out, np.choose(raw.astype(np.int64), [0, 6, 27]))
    for bad in (-1, 3, 100):
        if np.iinfo(dtype).min <= bad <= np.iinfo(dtype).max:
            raw[0, 0, 0] = bad
            with pytest.raises(HarmonizeError, match=rf"label values \[{bad}\]"):
                harmonize_labels(Volume(raw, AFFINE), catalog["demo_msd_liver"], classes, None)
            raw[0, 0, 0] = 0


def test_body_midline():
    image = np.full((50, 10, 10), -1000, np.int16)
    image[10:30] = 40
    volume = Volume(image, np.diag([2.0, 1.0, 1.0, 1.0]))
    assert body_midline_x_mm(volume) == pytest.approx(2.0 * 19.5)


def _write_case(folder: Path, name: str, image: np.ndarray, label: np.ndarray, label_affine=None) -> Case:
    save_nifti(Volume(image, AFFINE), folder / f"{name}_img.nii.gz")
    save_nifti(Volume(label, AFFINE if label_affine is None else label_affine), folder / f"{name}_lbl.nii.gz")
    return Case("demo_msd_liver", name, folder / f"{name}_img.nii.gz", folder / f"{name}_lbl.nii.gz")


def test_dataset_goes_on_past_bad_cases_and_reports_them(catalog, classes, tmp_path):
    image = np.full((30, 30, 30), -1000, np.int16)
    image[5:25, 5:25, 5:25] = 100
    label = np.zeros((30, 30, 30), np.uint8)
    label[8:20, 8:20, 8:20] = 1
    label[10:13, 10:13, 10:13] = 2
    shifted = AFFINE.copy()
    shifted[0, 3] = 5.0
    bad_values = label.copy()
    bad_values[0, 0, 0] = 9
    cases = [_write_case(tmp_path, "good", image, label),
             _write_case(tmp_path, "shifted", image, label, shifted),
             _write_case(tmp_path, "values", image, bad_values)]
    broken = tmp_path / "broken_img.nii.gz"
    broken.write_bytes(b"not a nifti")
    cases.append(Case("demo_msd_liver", "broken", broken, cases[0].label))
    store, report = tmp_path / "store.zarr", tmp_path / "report.tsv"
    failed = harmonize_dataset(cases, catalog["demo_msd_liver"], classes, store, (3.0, 3.0, 3.0), report)
    assert failed == ["shifted", "values", "broken"]
    text = report.read_text()
    assert "do not share a grid" in text and "label values [9]" in text and "broken_img.nii.gz" in text
    assert list_cases(store) == ["good"]
    case = open_case(store, "good")
    assert case.image.shape == (20, 20, 20) and case.image.dtype == np.int16
    assert set(np.unique(case.label[...])) == {0, 6, 27}
    assert case.annotated == ["Liver", "Liver Tumor"]
    np.testing.assert_allclose(case.attrs["spacing"], [3.0, 3.0, 3.0])
    assert case.attrs["original_shape"] == [30, 30, 30]
    assert not store.with_name("store.zarr.partial").exists()


def test_every_case_failing_is_an_error(catalog, classes, tmp_path):
    broken = tmp_path / "x.nii.gz"
    broken.write_bytes(b"junk")
    with pytest.raises(HarmonizeError, match="every case failed"):
        harmonize_dataset([Case("demo_msd_liver", "x", broken, broken)], catalog["demo_msd_liver"], classes,
                          tmp_path / "s.zarr", (2.0, 2.0, 2.0), tmp_path / "r.tsv")
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("case", ["case_00061", "case_00148"])
def test_real_kits_labels_split_by_anatomy(catalog, classes, shared_data, case):
    raw = load_nifti(shared_data / "kits19" / f"{case}_segmentation.nii.gz")
    out = harmonize_labels(raw, catalog["demo_kits"], classes, None, case)
    assert set(np.unique(out)) <= {0, 2, 3, 26}
    kidney_voxels = int(np.isin(np.asarray(raw.array), [1]).sum())
    assert int(np.isin(out, [2, 3]).sum()) == kidney_voxels
    assert int((out == 26).sum()) == int((raw.array == 2).sum())
    right = raw.world(np.argwhere(out == 2).mean(axis=0))[0]
    left = raw.world(np.argwhere(out == 3).mean(axis=0))[0]
    assert right > left  # RAS: +x is the patient's right
    tumour = out == 26
    touching = np.unique(out[ndimage.binary_dilation(tumour, iterations=2) & ~tumour])
    assert {2, 3} & set(touching.tolist())  # the tumour lies in a kidney


def test_harmonize_case_keeps_geometry(catalog, classes, tmp_path):
    image = np.full((20, 24, 10), -1000, np.int16)
    image[4:16, 4:20, 2:8] = 60
    label = np.zeros(image.shape, np.uint8)
    label[6:12, 6:12, 3:6] = 1
    case = _write_case(tmp_path, "c", image, label)
    result = harmonize_case(case, catalog["demo_msd_liver"], classes, (4.0, 4.0, 4.0))
    assert result.image.shape == (10, 12, 5) and result.label.shape == (10, 12, 5)
    np.testing.assert_allclose(result.image.origin, (0.0, 0.0, 0.0))
    assert result.attrs["midline_x_mm"] == pytest.approx(19.0)


def _body(shape=(30, 30, 30)) -> tuple[np.ndarray, np.ndarray]:
    image = np.full(shape, -1000, np.int16)
    image[5:25, 5:25, 5:25] = 100
    label = np.zeros(shape, np.uint8)
    label[8:20, 8:20, 8:20] = 1
    return image, label


def _report_rows(path: Path) -> dict[str, dict]:
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    return {row["case_id"]: row for row in (dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:])}


def test_a_singular_affine_fails_its_case_only(catalog, classes, tmp_path):
    image, label = _body()
    good = _write_case(tmp_path, "good", image, label)
    header = nib.Nifti1Header()
    header.set_data_shape(image.shape)
    header.set_data_dtype(np.int16)
    header["srow_x"], header["srow_y"], header["srow_z"] = [2, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]
    header["sform_code"], header["vox_offset"] = 1, 352
    singular = tmp_path / "singular_img.nii"
    singular.write_bytes(header.binaryblock + bytes(4) + image.tobytes(order="F"))
    cases = [good, Case("demo_msd_liver", "singular", singular, good.label)]
    failed = harmonize_dataset(cases, catalog["demo_msd_liver"], classes, tmp_path / "s.zarr", (3.0, 3.0, 3.0),
                               tmp_path / "r.tsv")
    assert failed == ["singular"] and list_cases(tmp_path / "s.zarr") == ["good"]
    assert "singular_img.nii: the header's affine" in _report_rows(tmp_path / "r.tsv")["singular"]["error"]


def test_any_error_of_a_case_is_one_report_line_and_the_others_go_on(catalog, classes, tmp_path, monkeypatch):
    from universal.data import harmonize

    image, label = _body()
    cases = [_write_case(tmp_path, name, image, label) for name in ("a", "odd", "b")]
    real = harmonize.read_image

    def flaky(case, entry):
        if case.case_id == "odd":
            raise ZeroDivisionError("decoder crashed:\n  in frame 3")
        return real(case, entry)

    monkeypatch.setattr(harmonize, "read_image", flaky)
    failed = harmonize_dataset(cases, catalog["demo_msd_liver"], classes, tmp_path / "s.zarr", (3.0, 3.0, 3.0),
                               tmp_path / "r.tsv")
    assert failed == ["odd"] and list_cases(tmp_path / "s.zarr") == ["a", "b"]
    assert len((tmp_path / "r.tsv").read_text().splitlines()) == 4
    assert _report_rows(tmp_path / "r.tsv")["odd"]["error"] == (
        "demo_msd_liver/odd: ZeroDivisionError: decoder crashed: | in frame 3")


@pytest.mark.parametrize("case_id", ["..", "../x", "."])
def test_a_case_id_that_is_no_file_name_fails_without_writing_outside(catalog, classes, tmp_path, case_id):
    image, label = _body()
    data = tmp_path / "data"
    good = _write_case(data, "good", image, label)
    cases = [good, Case("demo_msd_liver", case_id, good.image, good.label)]
    store = tmp_path / "stores" / "s.zarr"
    failed = harmonize_dataset(cases, catalog["demo_msd_liver"], classes, store, (3.0, 3.0, 3.0), tmp_path / "r.tsv")
    assert failed == [case_id] and list_cases(store) == ["good"]
    assert "cannot name a case group" in _report_rows(tmp_path / "r.tsv")[case_id]["error"]
    assert sorted(p.name for p in (tmp_path / "stores").iterdir()) == ["s.zarr"]
    assert sorted(p.name for p in data.iterdir()) == ["good_img.nii.gz", "good_lbl.nii.gz"]


@pytest.mark.parametrize("fill, message", [(-1024, "every voxel is -1024 HU"), (0, "every voxel is 0 HU"),
                                           (None, "no voxel above -500 HU")])
def test_a_blank_ct_is_stored_with_a_warning_naming_it(catalog, classes, tmp_path, caplog, fill, message):
    image, label = _body()
    blank = np.full(image.shape, fill, np.int16) if fill is not None else np.where(image > 0, -600, -1000)
    cases = [_write_case(tmp_path, "good", image, label), _write_case(tmp_path, "blank", blank.astype(np.int16), label)]
    failed = harmonize_dataset(cases, catalog["demo_msd_liver"], classes, tmp_path / "s.zarr", (3.0, 3.0, 3.0),
                               tmp_path / "r.tsv")
    rows = _report_rows(tmp_path / "r.tsv")
    assert failed == [] and rows["good"]["warning"] == ""
    assert rows["blank"]["status"] == "ok" and message in rows["blank"]["warning"]
    assert any("demo_msd_liver/blank" in r.message and r.levelname == "WARNING" for r in caplog.records)
