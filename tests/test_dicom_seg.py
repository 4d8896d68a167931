"""Tests of universal.infer.dicom_seg: label maps written as a DICOM-SEG of their source series and read back with
highdicom. Expected frames come from SimpleITK (each source file's own geometry, the label map resampled onto it),
from dcmqi's SEG and label map of the same liver, and from pydicom's code dictionary."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml
from mirrors import write_dicom_series
from pydicom.sr.codedict import codes as dicom_codes

from universal import __version__
from universal.core.classes import load_class_table
from universal.core.project import CONFIG_DIR
from universal.core.volume import Volume, load_nifti, save_nifti
from universal.data.layouts import read_dicom_series
from universal.infer.dicom_seg import write_dicom_seg
from universal.infer.ome import predicted_mask
from universal.infer.seg_codes import LOCAL_SCHEME, DicomSegError, dicom_cielab, load_code_table, rgb_to_cielab

REPO = Path(__file__).resolve().parent.parent


# highdicom warns about source patient names such as "JANCT000" (one name component); not what is tested
pytestmark = pytest.mark.filterwarnings("ignore:.*unlikely to represent the intended person name:UserWarning")


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def _sop_uid(path: Path) -> str:
    header = pydicom.dcmread(path, stop_before_pixels=True)
    return str(header.SOPInstanceUID or header.file_meta.MediaStorageSOPInstanceUID)


def _expected_maps(organs: np.ndarray, tumours: np.ndarray, affine: np.ndarray, files: list[Path],
                   tmp: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per source file (by SOP Instance UID), the organ and tumour maps resampled by SimpleITK (nearest) onto that
    file's pixels, (rows, columns) each: an oracle independent of the module's placement."""
    images = []
    for name, label in (("organs", organs), ("tumours", tumours)):
        save_nifti(Volume(label.astype(np.uint8), affine), tmp / f"oracle_{name}.nii.gz")
        images.append(sitk.ReadImage(str(tmp / f"oracle_{name}.nii.gz")))
    frames = {}
    for path in files:
        reader = sitk.ImageFileReader()  # the file's geometry as SimpleITK (GDCM) reads it; pixels not decoded
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        reference = sitk.Image(reader.GetSize(), sitk.sitkUInt8)
        reference.SetOrigin(reader.GetOrigin())
        reference.SetSpacing(reader.GetSpacing())
        reference.SetDirection(reader.GetDirection())
        frames[_sop_uid(path)] = tuple(
            sitk.GetArrayFromImage(sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0))[0]
            for image in images)
    return frames


def _segment_pixels(seg: hd.seg.Segmentation, uids: list[str]) -> np.ndarray:
    """(files, rows, columns, segments) of a SEG, frames in the order of ``uids``."""
    return seg.get_pixels_by_source_instance(uids, assert_missing_frames_are_empty=True)


def _nrrd_volume(path: Path) -> Volume:
    """A NRRD label map (LPS world) as a Volume: array (i, j, k) in the file's order, voxel -> RAS mm affine."""
    image = sitk.ReadImage(str(path))
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ direction * np.asarray(image.GetSpacing())
    affine[:3, 3] = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(image.GetOrigin())
    return Volume(sitk.GetArrayFromImage(image).transpose(2, 1, 0), affine)


def _canonical(volume: Volume) -> Volume:
    """The volume reoriented to RAS+ by nibabel (axis flips and permutations only)."""
    image = nib.as_closest_canonical(nib.Nifti1Image(volume.array, volume.affine))
    return Volume(np.asarray(image.dataobj), image.affine)


def _permuted(volume: Volume, order: tuple[int, int, int]) -> Volume:
    """The same voxels with the array axes permuted (the affine's columns follow)."""
    affine = volume.affine.copy()
    affine[:, :3] = volume.affine[:, list(order)]
    return Volume(np.ascontiguousarray(volume.array.transpose(order)), affine)


def _synthetic_series(tmp: Path) -> tuple[list[Path], np.ndarray]:
    """A 5-slice axial series of 7 rows × 9 columns (0.8 mm, 2.5 mm slices) and its RAS affine."""
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = [-100.0, 40.0, -300.0]
    folder = tmp / "series"
    write_dicom_series(Volume(np.zeros((9, 7, 5), np.int16), affine), folder, "{:03d}.dcm", hu=True)
    return _files(folder), affine


def _synthetic_maps(classes) -> tuple[np.ndarray, np.ndarray]:
    """Organ and tumour maps (9, 7, 5) with overlapping tumours: Liver, Spleen, Right Kidney, Portal Vein and Splenic
    Vein; Liver Tumor inside the liver, Kidney Tumor inside the right kidney."""
    organs = np.zeros((9, 7, 5), np.uint8)
    tumours = np.zeros_like(organs)
    organs[0:4, 0:5, 0:4] = classes["Liver"].index
    organs[5:9, 2:6, 1:3] = classes["Spleen"].index
    organs[4, 0:3, 2:5] = classes["Right Kidney"].index
    organs[6:8, 6, 4] = classes["Portal Vein and Splenic Vein"].index
    tumours[1:3, 1:3, 1:3] = classes["Liver Tumor"].index
    tumours[4, 1, 3] = classes["Kidney Tumor"].index
    return organs, tumours


def _code(item) -> tuple[str, str, str]:
    return str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.CodeMeaning)


# ---------------------------------------------------------------------------------------------------------
# Synthetic series (no shared data needed)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_seg(tmp_path_factory):
    """The synthetic series, its maps and the SEG written from them."""
    classes = load_class_table()
    tmp = tmp_path_factory.mktemp("synthetic_seg")
    files, affine = _synthetic_series(tmp)
    organs, tumours = _synthetic_maps(classes)
    path = tmp / "case.seg.dcm"
    labels = write_dicom_seg(Volume(organs, affine), Volume(tumours, affine), classes, files, path)
    return {"files": files, "affine": affine, "organs": organs, "tumours": tumours, "path": path,
            "labels": labels, "seg": hd.seg.segread(path), "classes": classes, "tmp": tmp}


def test_segments_are_the_present_classes_in_table_order(synthetic_seg):
    seg, classes = synthetic_seg["seg"], synthetic_seg["classes"]
    expected = ["Spleen", "Right Kidney", "Liver", "Portal Vein and Splenic Vein", "Kidney Tumor", "Liver Tumor"]
    assert synthetic_seg["labels"] == expected
    assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == expected
    assert seg.SegmentationType == "BINARY"
    assert seg.SegmentsOverlap == "YES"  # a tumour lies in its organ
    for number, name in enumerate(expected, start=1):
        description = seg.SegmentSequence[number - 1]
        assert description.SegmentDescription == f"universal label value {classes[name].index} ({classes[name].kind})"
        assert description.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = seg.get_segment_description(number).algorithm_identification[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("universal", __version__)


def test_segment_voxels_are_the_predicted_masks(synthetic_seg):
    """Each segment equals predicted_mask of the maps (an organ includes its tumour), frame by source image."""
    seg, classes, files = synthetic_seg["seg"], synthetic_seg["classes"], synthetic_seg["files"]
    uids = [_sop_uid(p) for p in files]
    pixels = _segment_pixels(seg, uids)
    assert pixels.shape == (5, 7, 9, len(synthetic_seg["labels"]))  # 7 rows × 9 columns per slice
    maps = _expected_maps(synthetic_seg["organs"], synthetic_seg["tumours"], synthetic_seg["affine"], files,
                          synthetic_seg["tmp"])
    for s, name in enumerate(synthetic_seg["labels"]):
        for f, uid in enumerate(uids):
            np.testing.assert_array_equal(pixels[f, :, :, s], predicted_mask(*maps[uid], classes[name]),
                                          err_msg=f"{name}, slice {f}")
        mask = predicted_mask(synthetic_seg["organs"], synthetic_seg["tumours"], classes[name])
        assert pixels[..., s].sum() == mask.sum() > 0
    liver, tumour = synthetic_seg["labels"].index("Liver"), synthetic_seg["labels"].index("Liver Tumor")
    assert np.all(pixels[..., liver][pixels[..., tumour] > 0])


def test_segment_codes_and_colours(synthetic_seg):
    seg, classes = synthetic_seg["seg"], synthetic_seg["classes"]
    items = {item.SegmentLabel: item for item in seg.SegmentSequence}
    anatomical = ("91723000", "SCT", "Anatomical Structure")
    assert _code(items["Spleen"].SegmentedPropertyCategoryCodeSequence[0]) == anatomical
    assert _code(items["Spleen"].SegmentedPropertyTypeCodeSequence[0]) == ("78961009", "SCT", "Spleen")
    assert _code(items["Liver"].SegmentedPropertyTypeCodeSequence[0]) == ("10200004", "SCT", "Liver")
    kidney = items["Right Kidney"].SegmentedPropertyTypeCodeSequence[0]
    assert _code(kidney) == ("64033007", "SCT", "Kidney")
    assert _code(kidney.SegmentedPropertyTypeModifierCodeSequence[0]) == ("24028007", "SCT", "Right")
    tumour = items["Liver Tumor"]
    assert _code(tumour.SegmentedPropertyCategoryCodeSequence[0]) == ("49755003", "SCT",
                                                                        "Morphologically Abnormal Structure")
    assert _code(tumour.SegmentedPropertyTypeCodeSequence[0]) == ("108369006", "SCT", "Neoplasm")
    assert _code(tumour.AnatomicRegionSequence[0]) == ("10200004", "SCT", "Liver")
    assert _code(items["Kidney Tumor"].AnatomicRegionSequence[0]) == ("64033007", "SCT", "Kidney")
    veins = items["Portal Vein and Splenic Vein"].SegmentedPropertyTypeCodeSequence[0]
    assert _code(veins) == ("UNIV0010", LOCAL_SCHEME, "Portal Vein and Splenic Vein")
    assert LOCAL_SCHEME in {item.CodingSchemeDesignator for item in seg.CodingSchemeIdentificationSequence}
    for label, item in items.items():
        assert tuple(item.RecommendedDisplayCIELabValue) == dicom_cielab(classes[label].colour), label


def test_colours_agree_with_highdicoms_conversion(synthetic_seg):
    """Newer highdicom (0.28, not 0.23) converts CIELab and sRGB too: its sRGB of each segment's CIELab is the class
    colour, and its CIELab of a colour is ours to 8 of 65535."""
    if not hasattr(hd.color.CIELabColor, "from_dicom_value"):
        pytest.skip(f"highdicom {hd.__version__} has no CIELab <-> sRGB conversion")
    for item in synthetic_seg["seg"].SegmentSequence:
        rgb = hd.color.CIELabColor.from_dicom_value(tuple(item.RecommendedDisplayCIELabValue)).to_rgb()
        assert np.abs(np.subtract(rgb, synthetic_seg["classes"][item.SegmentLabel].colour)).max() <= 1
    for rgb in [(221, 130, 101), (0, 151, 206), (157, 108, 162), (255, 253, 229), (255, 0, 0)]:
        ours = np.asarray(dicom_cielab(rgb))
        assert np.abs(ours - hd.color.CIELabColor.from_rgb(*rgb).value).max() <= 8, rgb


def test_seg_references_the_series_and_joins_its_study(synthetic_seg):
    seg, files = synthetic_seg["seg"], synthetic_seg["files"]
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    assert seg.StudyInstanceUID == headers[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == headers[0].FrameOfReferenceUID
    assert seg.SeriesInstanceUID != headers[0].SeriesInstanceUID
    assert seg.PatientID == headers[0].PatientID
    assert "PatientName" not in headers[0] and seg.PatientName == ""  # Type 2: copied empty
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == headers[0].SeriesInstanceUID
    assert sorted(i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence) == sorted(
        h.SOPInstanceUID for h in headers)
    sources = {h.SOPInstanceUID for h in headers}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        (source,) = frame.DerivationImageSequence[0].SourceImageSequence
        assert source.ReferencedSOPInstanceUID in sources
        assert source.SpatialLocationsPreserved == "YES"


def _reoriented(volume: Volume, affine: np.ndarray) -> Volume:
    """The volume with its axes flipped and permuted by nibabel to the orientation of ``affine``."""
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(volume.affine),
                                                nib.orientations.io_orientation(affine))
    image = nib.Nifti1Image(volume.array, volume.affine).as_reoriented(transform)
    return Volume(np.asarray(image.dataobj), image.affine)


@pytest.mark.parametrize("variant", ["dicom_order", "permuted", "flipped"])
def test_any_axis_order_of_the_maps_gives_the_same_seg(synthetic_seg, variant, tmp_path):
    """The maps are placed through their affines: reordered axes give the same frames."""
    affine = synthetic_seg["affine"]
    organs, tumours = Volume(synthetic_seg["organs"], affine), Volume(synthetic_seg["tumours"], affine)
    if variant == "dicom_order":  # the storage order in which universal's DICOM reader returns the CT
        grid = read_dicom_series(synthetic_seg["files"][0].parent, with_pixels=False)
        organs, tumours = _reoriented(organs, grid.affine), _reoriented(tumours, grid.affine)
        np.testing.assert_allclose(organs.affine, grid.affine, atol=1e-6)
        assert not np.allclose(organs.affine, affine)
    elif variant == "permuted":
        organs, tumours = _permuted(organs, (2, 0, 1)), _permuted(tumours, (2, 0, 1))
    elif variant == "flipped":  # a LPI-like storage order: x, y and z reversed, the affine following
        flip = np.diag([-1.0, -1.0, -1.0, 1.0])
        flip[:3, 3] = np.asarray(organs.shape) - 1
        organs = Volume(organs.array[::-1, ::-1, ::-1].copy(), organs.affine @ flip)
        tumours = Volume(tumours.array[::-1, ::-1, ::-1].copy(), tumours.affine @ flip)
    path = tmp_path / "variant.seg.dcm"
    write_dicom_seg(organs, tumours, synthetic_seg["classes"], synthetic_seg["files"], path)
    uids = [_sop_uid(p) for p in synthetic_seg["files"]]
    np.testing.assert_array_equal(_segment_pixels(hd.seg.segread(path), uids),
                                  _segment_pixels(synthetic_seg["seg"], uids))


def test_predicted_restricts_segments_and_empty_maps_are_refused(synthetic_seg, tmp_path):
    classes, files, affine = synthetic_seg["classes"], synthetic_seg["files"], synthetic_seg["affine"]
    organs, tumours = Volume(synthetic_seg["organs"], affine), Volume(synthetic_seg["tumours"], affine)
    path = tmp_path / "case.seg.dcm"
    with pytest.raises(DicomSegError, match="'Spleen', which is not a predicted class"):
        write_dicom_seg(organs, tumours, classes, files, path, predicted=["Liver", "Liver Tumor"])
    with pytest.raises(DicomSegError, match="not in the class table"):
        write_dicom_seg(organs, tumours, classes, files, path, predicted=["Liver", "Gallbladder"])
    empty = Volume(np.zeros_like(organs.array), affine)
    with pytest.raises(DicomSegError, match="no predicted class has a voxel"):
        write_dicom_seg(empty, empty, classes, files, path)
    assert not path.exists() and not list(tmp_path.glob("*partial*"))


def test_maps_with_foreign_values_are_refused(synthetic_seg, tmp_path):
    classes, files, affine = synthetic_seg["classes"], synthetic_seg["files"], synthetic_seg["affine"]
    organs, tumours = synthetic_seg["organs"].copy(), synthetic_seg["tumours"]
    organs[0, 0, 0] = classes["Liver Tumor"].index
    with pytest.raises(DicomSegError, match=r"organ map holds label value 27 \(Liver Tumor, a tumour\)"):
        write_dicom_seg(Volume(organs, affine), Volume(tumours, affine), classes, files, tmp_path / "a.dcm")
    organs[0, 0, 0] = 99
    with pytest.raises(DicomSegError, match=r"label value 99 \(no class of"):
        write_dicom_seg(Volume(organs, affine), Volume(tumours, affine), classes, files, tmp_path / "a.dcm")
    with pytest.raises(DicomSegError, match="not on one grid"):
        write_dicom_seg(Volume(organs, affine), Volume(tumours[:, :, :4], affine), classes, files, tmp_path / "a.dcm")


@pytest.mark.parametrize(("change", "message"), [
    ("shift_0.4mm", r"up to 0.400 mm from the label maps' voxel centres"),
    ("shift_1_voxel", r"outside the label maps"),
    ("fewer_slices", r"the series 9 columns × 7 rows × 5 slices"),
    ("coarser_grid", r"do not run along the label maps' voxel axes one voxel per pixel"),
])
def test_maps_off_the_series_grid_are_refused(synthetic_seg, change, message, tmp_path):
    classes, files = synthetic_seg["classes"], synthetic_seg["files"]
    organs, tumours = synthetic_seg["organs"], synthetic_seg["tumours"]
    affine = synthetic_seg["affine"].copy()
    if change == "shift_0.4mm":
        affine[0, 3] += 0.4
    elif change == "shift_1_voxel":
        affine[1, 3] += 0.8
    elif change == "fewer_slices":
        organs, tumours = organs[:, :, :4], tumours[:, :, :4]
    else:
        affine[:3, :3] *= 2.0
    path = tmp_path / "case.seg.dcm"
    with pytest.raises(DicomSegError, match=message) as caught:
        write_dicom_seg(Volume(organs, affine), Volume(tumours, affine), classes, files, path)
    assert str(files[0].parent) in str(caught.value)
    assert not path.exists()


def test_bad_source_files_are_refused(synthetic_seg, tmp_path):
    classes, files, affine = synthetic_seg["classes"], synthetic_seg["files"], synthetic_seg["affine"]
    organs, tumours = Volume(synthetic_seg["organs"], affine), Volume(synthetic_seg["tumours"], affine)
    text = tmp_path / "notes.txt"
    text.write_text("not DICOM")
    with pytest.raises(DicomSegError, match=f"{re.escape(str(text))}: cannot read as DICOM"):
        write_dicom_seg(organs, tumours, classes, [*files, text], tmp_path / "a.dcm")
    with pytest.raises(DicomSegError, match="no source files"):
        write_dicom_seg(organs, tumours, classes, [], tmp_path / "a.dcm")
    other, _ = _synthetic_series(tmp_path)  # a second series: new study, series and frame of reference UIDs
    mixed = f"{re.escape(str(other[0]))}: its StudyInstanceUID .* the files are not one series"
    with pytest.raises(DicomSegError, match=mixed):
        write_dicom_seg(organs, tumours, classes, [*files[1:], other[0]], tmp_path / "a.dcm")
    with pytest.raises(DicomSegError, match="lies at the position of"):
        copy = tmp_path / "copy.dcm"
        header = pydicom.dcmread(files[0])
        header.SOPInstanceUID = header.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        header.save_as(copy)
        write_dicom_seg(organs, tumours, classes, [*files, copy], tmp_path / "a.dcm")
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    for path in files:
        header = pydicom.dcmread(path)
        if path == files[2]:
            del header.FrameOfReferenceUID
        header.save_as(stripped / path.name)
    with pytest.raises(DicomSegError, match=f"{re.escape(str(stripped / files[2].name))}: lacks FrameOfReferenceUID"):
        write_dicom_seg(organs, tumours, classes, _files(stripped), tmp_path / "a.dcm")


# ---------------------------------------------------------------------------------------------------------
# Codes and colours
# ---------------------------------------------------------------------------------------------------------


def test_code_table_codes_are_pydicoms_snomed_codes():
    """Every SCT code of config/snomed.yaml is the code pydicom's DICOM dictionary holds under its keyword, every
    class (the optional Kidney Cyst too) has a row, and no row names a class the table lacks."""
    doc = yaml.safe_load((CONFIG_DIR / "snomed.yaml").read_text())
    table = load_code_table()
    for name, entry in doc["codes"].items():
        assert entry["scheme"] == "SCT", name
        expected = getattr(dicom_codes.SCT, entry["pydicom"])
        assert (table.codes[name].value, table.codes[name].scheme, table.codes[name].meaning) == (
            expected.value, expected.scheme_designator, expected.meaning), name
    classes = load_class_table(include=["Kidney Cyst"])
    assert set(table.rows) == set(classes.names)
    for cls in classes:
        codes = table.for_class(cls)
        assert codes.category == table.codes[
            "anatomical_structure" if cls.kind == "organ" else "morphologically_abnormal_structure"]
        if cls.side is not None:
            assert codes.modifier == table.codes[cls.side], cls.name
        for parent in cls.parents:  # a tumour's region is its organ, without the side
            assert codes.region.value == table.for_class(classes[parent]).type.value, cls.name


def test_docs_list_every_class_with_its_code():
    text = (REPO / "docs" / "outputs.md").read_text()
    table = load_code_table()
    classes = load_class_table(include=["Kidney Cyst"])
    for cls in classes:
        lines = [line for line in text.splitlines() if line.startswith(f"| {cls.name} |")]
        assert len(lines) == 1, cls.name
        assert table.for_class(cls).type.value in lines[0], cls.name


def test_unlisted_class_takes_its_kinds_default_row(caplog):
    table = load_code_table()
    classes = load_class_table(include=["Kidney Cyst"])
    cyst = classes["Kidney Cyst"]
    del table.rows["Kidney Cyst"]
    with caplog.at_level(logging.WARNING):
        codes = table.for_class(cyst)
    assert (codes.type.value, codes.type.scheme, codes.type.meaning) == ("UNIV0032", LOCAL_SCHEME, "Kidney Cyst")
    assert codes.category.value == "49755003" and codes.region is None
    assert "no row for class 'Kidney Cyst'" in caplog.text


def test_code_table_errors_name_file_and_entry(tmp_path):
    path = tmp_path / "snomed.yaml"
    doc = yaml.safe_load((CONFIG_DIR / "snomed.yaml").read_text())
    doc["classes"]["Liver"]["type"] = "livre"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(DicomSegError, match=f"{re.escape(str(path))}: classes.Liver: type names 'livre'"):
        load_code_table(path)
    doc["classes"]["Liver"]["type"] = "liver"
    doc["codes"]["liver"]["value"] = "1" * 17
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(DicomSegError, match=r"codes.liver: value must be a text of 1..16 characters"):
        load_code_table(path)


@pytest.mark.parametrize(("rgb", "lab"), [
    ((255, 255, 255), (100.0, 0.0, 0.0)),
    ((0, 0, 0), (0.0, 0.0, 0.0)),
    ((255, 0, 0), (53.24, 80.09, 67.20)),  # sRGB primaries in CIELab (D65), as colour-science tables give them
    ((0, 255, 0), (87.73, -86.18, 83.18)),
    ((0, 0, 255), (32.30, 79.19, -107.86)),
])
def test_rgb_to_cielab(rgb, lab):
    np.testing.assert_allclose(rgb_to_cielab(rgb), lab, atol=0.01)


def test_dicom_cielab_scaling():
    """L* 0..100 and a*, b* -128..127 scaled to 0..65535."""
    assert dicom_cielab((255, 255, 255)) == (65535, 32896, 32896)
    assert dicom_cielab((0, 0, 0)) == (0, 32896, 32896)
    assert dicom_cielab((255, 0, 0)) == (round(53.2408 * 655.35), round(208.0925 * 257), round(195.2032 * 257))


# ---------------------------------------------------------------------------------------------------------
# Real series (../shared/data)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def liver_seg(shared_data, tmp_path_factory):
    """dcmqi's liver label map as the organ map of its 3-slice CT series, written as a SEG."""
    classes = load_class_table()
    files = _files(shared_data / "dcmqi" / "ct-3slice")
    liver = _nrrd_volume(shared_data / "dcmqi" / "liver_seg.nrrd")
    organs = Volume((liver.array > 0).astype(np.uint8) * np.uint8(classes["Liver"].index), liver.affine)
    tumours = Volume(np.zeros_like(organs.array), liver.affine)
    path = tmp_path_factory.mktemp("liver_seg") / "liver.seg.dcm"
    write_dicom_seg(organs, tumours, classes, files, path)
    return {"files": files, "organs": organs, "tumours": tumours, "seg": hd.seg.segread(path), "classes": classes}


@pytest.mark.realdata
def test_liver_seg_matches_dcmqi_seg_and_label_map(liver_seg, shared_data):
    """The same frames as dcmqi's SEG of this liver, with the same pixels, which are the NRRD's."""
    files, seg = liver_seg["files"], liver_seg["seg"]
    uids = [_sop_uid(p) for p in files]
    dcmqi = hd.seg.segread(shared_data / "dcmqi" / "liver.dcm")
    assert sorted(u for *_, u in seg.get_source_image_uids()) == sorted(u for *_, u in dcmqi.get_source_image_uids())
    ours = _segment_pixels(seg, uids)[..., 0]
    theirs = dcmqi.get_pixels_by_source_instance(uids, ignore_spatial_locations=True)[..., 0]
    assert ours.shape == (3, 512, 512) and ours.sum() > 100_000
    np.testing.assert_array_equal(ours, theirs)
    nrrd = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "dcmqi" / "liver_seg.nrrd")))  # (k, row, col)
    z0 = sitk.ReadImage(str(shared_data / "dcmqi" / "liver_seg.nrrd")).GetOrigin()[2]
    for f, path in enumerate(files):
        k = round(float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2]) - z0)
        np.testing.assert_array_equal(ours[f], nrrd[k] > 0, err_msg=path.name)
    (item,) = seg.SegmentSequence
    assert item.SegmentLabel == "Liver"
    assert _code(item.SegmentedPropertyTypeCodeSequence[0])[:2] == ("10200004", "SCT")
    assert _code(dcmqi.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0])[0] == "T-62000"  # SRT for Liver
    # Slicer's liver colour is the class colour: dcmqi's CIELab of it is ours to 0.01 %
    assert np.abs(np.subtract(item.RecommendedDisplayCIELabValue,
                              dcmqi.SegmentSequence[0].RecommendedDisplayCIELabValue)).max() <= 8


@pytest.mark.realdata
def test_liver_seg_references_the_real_series(liver_seg):
    seg, files = liver_seg["seg"], liver_seg["files"]
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == headers[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence} == {
        h.SOPInstanceUID for h in headers}
    assert {i.ReferencedSOPClassUID for i in series.ReferencedInstanceSequence} == {pydicom.uid.CTImageStorage}
    assert seg.StudyInstanceUID == headers[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == headers[0].FrameOfReferenceUID
    assert seg.NumberOfFrames == 3
    assert headers[0].SpecificCharacterSet == "" and seg.SpecificCharacterSet == "ISO_IR 192"  # empty: UTF-8
    assert seg.SeriesDescription == "universal segmentation" and seg.Modality == "SEG"


@pytest.mark.realdata
@pytest.mark.parametrize("variant", ["canonical", "permuted"])
def test_liver_seg_from_reoriented_maps(liver_seg, variant, tmp_path):
    organs, tumours = liver_seg["organs"], liver_seg["tumours"]
    if variant == "canonical":  # RAS+: x and y reversed relative to the DICOM rows and columns
        organs, tumours = _canonical(organs), _canonical(tumours)
        assert not np.allclose(organs.affine, liver_seg["organs"].affine)
    else:
        organs, tumours = _permuted(organs, (1, 2, 0)), _permuted(tumours, (1, 2, 0))
    path = tmp_path / "liver.seg.dcm"
    write_dicom_seg(organs, tumours, liver_seg["classes"], liver_seg["files"], path)
    uids = [_sop_uid(p) for p in liver_seg["files"]]
    np.testing.assert_array_equal(_segment_pixels(hd.seg.segread(path), uids),
                                  _segment_pixels(liver_seg["seg"], uids))


def _totalsegmentator_maps(shared_data: Path, classes) -> tuple[Volume, Volume]:
    """TotalSegmentator's label map of the 20-slice series (stored LAS, y flipped against the DICOM grid) as
    universal organ and tumour maps of the six organs it shows, a Liver Tumor in part of the liver."""
    seg = load_nifti(shared_data / "totalsegmentator" / "example_seg_dicom.nii.gz")
    organs = np.zeros(seg.shape, np.uint8)
    for value, name in ((1, "Spleen"), (5, "Liver"), (6, "Stomach"), (7, "Pancreas"), (8, "Right Adrenal Gland"),
                        (20, "Colon")):
        organs[seg.array == value] = classes[name].index
    tumours = np.zeros_like(organs)
    tumours[(organs == classes["Liver"].index) & (np.arange(seg.shape[2]) < 6)[None, None, :]] = (
        classes["Liver Tumor"].index)
    return Volume(organs, seg.affine), Volume(tumours, seg.affine)


@pytest.mark.realdata
def test_totalsegmentator_series_with_empty_uids(shared_data, tmp_path, caplog):
    """Its files leave Study, Series, SOP Class and SOP Instance UIDs empty: refused unless the study and series
    UIDs may be generated; SOP UIDs come from the file meta. The SEG then matches SimpleITK's resampling of the
    label map onto each file."""
    classes = load_class_table()
    folder = shared_data / "totalsegmentator" / "example_ct_dicom"
    files = _files(folder)
    organs, tumours = _totalsegmentator_maps(shared_data, classes)
    grid = read_dicom_series(folder, with_pixels=False)  # the grid inference reads the CT on, in storage order
    assert grid.shape == organs.shape and not np.allclose(grid.affine, organs.affine)  # RAS maps: axes reversed
    path = tmp_path / "ts.seg.dcm"
    refused = f"{re.escape(str(folder))}/.*: StudyInstanceUID is empty .* fill_missing_uids=True"
    with pytest.raises(DicomSegError, match=refused):
        write_dicom_seg(organs, tumours, classes, files, path)
    assert not path.exists()
    with caplog.at_level(logging.WARNING):
        labels = write_dicom_seg(organs, tumours, classes, files, path, fill_missing_uids=True)
    assert f"{folder}: SOPInstanceUID is empty in 20 of 20 files; taken from MediaStorageSOPInstanceUID" in caplog.text
    assert "no archive knows" in caplog.text
    assert labels == ["Spleen", "Liver", "Stomach", "Pancreas", "Right Adrenal Gland", "Colon", "Liver Tumor"]
    seg = hd.seg.segread(path)
    uids = [_sop_uid(p) for p in files]
    (series,) = seg.ReferencedSeriesSequence
    assert sorted(i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence) == sorted(uids)
    assert {i.ReferencedSOPClassUID for i in series.ReferencedInstanceSequence} == {pydicom.uid.CTImageStorage}
    again = tmp_path / "again.seg.dcm"
    write_dicom_seg(organs, tumours, classes, files, again, fill_missing_uids=True)
    repeat = pydicom.dcmread(again, stop_before_pixels=True)
    assert series.SeriesInstanceUID and repeat.ReferencedSeriesSequence[0].SeriesInstanceUID == series.SeriesInstanceUID
    assert seg.StudyInstanceUID and repeat.StudyInstanceUID == seg.StudyInstanceUID
    assert repeat.SOPInstanceUID != seg.SOPInstanceUID
    pixels = _segment_pixels(seg, uids)
    maps = _expected_maps(organs.array, tumours.array, organs.affine, files, tmp_path)
    for s, name in enumerate(labels):
        for f, uid in enumerate(uids):
            np.testing.assert_array_equal(pixels[f, :, :, s], predicted_mask(*maps[uid], classes[name]),
                                          err_msg=f"{name}, file {f}")
        assert pixels[..., s].sum() == predicted_mask(organs.array, tumours.array, classes[name]).sum() > 0, name


@pytest.mark.realdata
def test_multiframe_source_is_refused(shared_data, tmp_path):
    classes = load_class_table()
    source = shared_data / "pydicom" / "eCT_Supplemental.dcm"
    empty = Volume(np.zeros((2, 2, 2), np.uint8), np.eye(4))
    with pytest.raises(DicomSegError, match=f"{re.escape(str(source))}: a multi-frame image"):
        write_dicom_seg(empty, empty, classes, [source], tmp_path / "a.dcm")
