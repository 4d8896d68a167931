"""Every catalog entry against a synthetic mirror of its dataset: native layout in, phantom ground truth out.

For each dataset a mirror is written in its own layout and numbering (tests/mirrors.py), its cases are found
with the catalog layout, harmonized, and the universal label map is compared class by class with the phantom:
exactly the annotated classes appear, an unannotated tumour counts as its organ, dropped values are gone and
bilateral organs come out on their anatomical side. The catalog's mappings are also checked against the
original's template (../shared/reference/original_template.json) where it is present.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from mirrors import MIRRORS, mirror_phantom, write_mirror

from universal.core.classes import load_class_table
from universal.core.volume import Volume, load_nifti, save_nifti
from universal.data.catalog import CatalogError, find_cases, load_catalog
from universal.data.harmonize import harmonize_case
from universal.data.layouts import LayoutError, annotated_classes, read_image, read_raw_label
from universal.train.targets import annotated_mask, multi_hot_targets

CLASSES = load_class_table()
CATALOG = load_catalog(None, CLASSES)
SEED = 0
CASES = {"btcv": 2, "ircadb": 2, "word": 2, "lits2017": 2}
TEMPLATE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "original_template.json"
ORIGINAL_KEYS = {"01": "btcv", "02": "tcia_pancreas_ct", "03": "chaos_ct", "04": "lits2017", "05": "kits19",
                 "06": "ircadb", "07": "word", "08": "abdomenct_1k", "09": "amos22_ct", "10_03": "msd_task03_liver",
                 "10_06": "msd_task06_lung", "10_07": "msd_task07_pancreas", "10_08": "msd_task08_hepatic_vessel",
                 "10_09": "msd_task09_spleen", "10_10": "msd_task10_colon", "12": "ct_org", "13": "abdomenct_12organ",
                 "15": "totalsegmentator"}


@pytest.fixture(scope="module")
def mirrors(tmp_path_factory):
    """Write each dataset's mirror once (lazily) and harmonize its cases: key -> list of checked cases."""
    out = tmp_path_factory.mktemp("mirrors")
    done: dict[str, list[dict]] = {}

    def get(key: str) -> list[dict]:
        if key not in done:
            done[key] = _mirror_and_harmonize(CATALOG[key], out)
        return done[key]

    return get


def _mirror_and_harmonize(entry, out: Path) -> list[dict]:
    root = write_mirror(entry, out, cases=CASES.get(entry.key, 1), seed=SEED, classes=CLASSES)
    record = json.loads((root / "MIRROR.json").read_text())
    cases = find_cases(entry, root)
    assert [c.case_id for c in cases] == [info["case_id"] for info in record["cases"]]
    checked = []
    for case, info in zip(cases, record["cases"], strict=True):
        phantom = mirror_phantom(entry, info["phantom_seed"], tuple(record["shape"]), tuple(record["spacing"]),
                                 CLASSES)
        checked.append({"case": case, "info": info, "phantom": phantom, "raw": read_raw_label(case, entry),
                        "result": harmonize_case(case, entry, CLASSES, None)})
    return checked


def expected_labels(phantom, annotated) -> np.ndarray:
    """The universal label map a dataset annotating ``annotated`` should yield: annotated classes keep their
    value, an unannotated tumour counts as its organ, everything else is background."""
    truth = phantom.label.copy()
    tumours = np.isin(truth, [c.index for c in CLASSES.tumours() if c.name not in annotated])
    truth[tumours] = phantom.organ_label[tumours]
    truth[~np.isin(truth, [CLASSES[name].index for name in annotated])] = 0
    return truth


def centroid_x_mm(volume: Volume, mask: np.ndarray) -> float:
    return float(volume.world(np.argwhere(mask).mean(axis=0))[0])


@pytest.mark.parametrize("key", sorted(CATALOG))
def test_mirror_harmonizes_to_the_phantom_truth(mirrors, key):
    entry = CATALOG[key]
    for item in mirrors(key):
        case, phantom, result, raw = item["case"], item["phantom"], item["result"], item["raw"]
        name = f"{key}/{case.case_id}"
        annotated = annotated_classes(case, entry)
        # per case (universal.data.layouts.annotated_classes) once harmonize_case reads per-structure layouts itself
        assert result.attrs["annotated"] in (list(entry.annotated_for(case.case_id)), list(annotated))
        label = result.label.array
        assert label.shape == phantom.label.shape and label.dtype == np.uint8
        truth = expected_labels(phantom, annotated)
        for cls in CLASSES:
            got, want = label == cls.index, truth == cls.index
            assert np.array_equal(got, want), (f"{name}: {cls.name}: {int(got.sum())} voxels, expected "
                                               f"{int(want.sum())}, {int((got != want).sum())} differ")
        present = set(np.unique(label).tolist()) - {0}
        assert present <= {CLASSES[n].index for n in annotated}, f"{name}: unannotated classes appear"
        assert {CLASSES[n].index for n in annotated if (truth == CLASSES[n].index).any()} <= present
        for rule in entry.labels:
            if rule.dropped:
                assert (raw.array == rule.raw).any(), f"{name}: the mirror lacks dropped value {rule.raw}"
                assert not label[raw.array == rule.raw].any(), f"{name}: dropped value {rule.raw} survived"


@pytest.mark.parametrize("key", sorted(k for k, e in CATALOG.items() if any(r.split for r in e.labels)))
def test_side_split_follows_anatomy(mirrors, key):
    entry = CATALOG[key]
    for item in mirrors(key):
        result, annotated = item["result"], annotated_classes(item["case"], entry)
        for rule in entry.labels:
            if not rule.split or rule.classes[0] not in annotated:
                continue
            right, left = (result.label.array == CLASSES[n].index for n in rule.classes)
            assert right.any() and left.any()
            assert centroid_x_mm(result.label, right) > result.attrs["midline_x_mm"] > centroid_x_mm(result.label, left)


def test_annotated_lists(mirrors):
    eight = ["Spleen", "Left Kidney", "Gall Bladder", "Esophagus", "Liver", "Stomach", "Pancreas", "Duodenum"]
    early, late = mirrors("btcv")
    assert early["case"].case_id == "0001" and len(early["result"].attrs["annotated"]) == 14
    assert late["case"].case_id == "0061" and late["result"].attrs["annotated"] == eight
    assert not (late["result"].label.array == CLASSES["Right Kidney"].index).any()
    assert list(CATALOG["tcia_pancreas_ct"].annotated) == eight
    first, second = mirrors("ircadb")
    assert "Stomach" in annotated_classes(first["case"], CATALOG["ircadb"])
    assert second["info"]["missing_structures"] == ["stomach"]
    assert annotated_classes(second["case"], CATALOG["ircadb"]) == tuple(
        n for n in CATALOG["ircadb"].annotated if n != "Stomach")
    ts = set(CATALOG["totalsegmentator"].annotated)
    assert not ts & {"Left Head of Femur", "Right Head of Femur", "Hepatic Vessel", "Celiac Trunk", "Rectum"}
    assert {"Right Lung", "Left Lung", "Intestine", "Postcava", "Portal Vein and Splenic Vein", "Bladder"} <= ts


def _targets(result, annotated) -> tuple[torch.Tensor, torch.Tensor]:
    label = torch.from_numpy(result.label.array.astype(np.int64))[None]
    nx = label.shape[1]
    x_mm = torch.from_numpy(result.label.world(np.stack([np.arange(nx), np.zeros(nx), np.zeros(nx)], 1))[:, 0])
    targets = multi_hot_targets(label, CLASSES, x_mm[None], torch.tensor([result.attrs["midline_x_mm"]]))
    return targets[0], annotated_mask([annotated], CLASSES)[0]


@pytest.mark.parametrize(("key", "organ", "tumour"), [
    ("lits2017", "Liver", "Liver Tumor"), ("msd_task03_liver", "Liver", "Liver Tumor"),
    ("msd_task07_pancreas", "Pancreas", "Pancreas Tumor"), ("kits19", "Right Kidney", "Kidney Tumor")])
def test_tumour_counts_as_its_annotated_organ(mirrors, key, organ, tumour):
    for item in mirrors(key):
        targets, annotated = _targets(item["result"], item["result"].attrs["annotated"])
        tumour_voxels = targets[CLASSES.channel(tumour)]
        kidneys = targets[CLASSES.channel("Right Kidney")] | targets[CLASSES.channel("Left Kidney")]
        organ_channel = kidneys if organ == "Right Kidney" else targets[CLASSES.channel(organ)]
        assert tumour_voxels.any() and bool((organ_channel >= tumour_voxels).all())
        assert annotated[CLASSES.channel(organ)] and annotated[CLASSES.channel(tumour)]


def test_hepatic_vessel_channel_excludes_its_tumour(mirrors):
    assert CLASSES["Hepatic Vessel Tumor"].parents == ("Liver",)
    (item,) = mirrors("msd_task08_hepatic_vessel")
    targets, annotated = _targets(item["result"], item["result"].attrs["annotated"])
    tumour = targets[CLASSES.channel("Hepatic Vessel Tumor")]
    assert tumour.any() and targets[CLASSES.channel("Hepatic Vessel")].any()
    assert not (targets[CLASSES.channel("Hepatic Vessel")] & tumour).any()
    assert not annotated[CLASSES.channel("Liver")]  # the tumour counts as liver, which this set does not label
    assert annotated[CLASSES.channel("Hepatic Vessel")] and annotated[CLASSES.channel("Hepatic Vessel Tumor")]


def test_values_sharing_a_class_all_occur(mirrors):
    (kits,) = mirrors("kits19")
    assert {1, 2, 3} <= set(np.unique(kits["raw"].array).tolist())
    (ts,) = mirrors("totalsegmentator")
    values = set(np.unique(ts["raw"].array).tolist())
    assert {10, 11, 12, 13, 14, 2, 24, 3, 23, 75, 76} <= values  # lobes, kidney cysts, femurs


def test_native_storage_details(mirrors):
    (ct_org,) = mirrors("ct_org")
    assert np.asarray(nib.load(ct_org["case"].label).dataobj).dtype == np.float32
    (kits,) = mirrors("kits19")
    assert nib.aff2axcodes(nib.load(kits["case"].image).affine) == ("I", "P", "L")
    (chaos,) = mirrors("chaos_ct")
    assert chaos["case"].image.is_dir() and len(list((chaos["case"].label / "Ground").glob("*.png"))) == 64
    amos = mirrors("amos22_ct")
    assert [item["case"].case_id for item in amos] == ["0001"]  # the MRI-numbered decoy 0507 is skipped
    assert (amos[0]["case"].image.parent / "amos_0507.nii.gz").exists()
    btcv = mirrors("btcv")
    assert "Testing" in str(btcv[1]["case"].image) and "Training" in str(btcv[0]["case"].image)


def test_dicom_image_reads_back_the_phantom(mirrors):
    for key in ("chaos_ct", "ircadb"):
        item = mirrors(key)[0]
        image = read_image(item["case"], CATALOG[key])
        assert image.array.dtype == np.int16 and np.array_equal(image.array, item["phantom"].image)
        np.testing.assert_allclose(image.affine, item["phantom"].affine, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Catalog: sources, layouts, and the original's template
# ---------------------------------------------------------------------------------------------------------


def test_every_source_says_how_to_get_the_data():
    for key, entry in CATALOG.items():
        source = entry.source
        assert entry.licence and entry.name and entry.citation, key
        if source["kind"] == "url":
            assert source["url"].startswith("https://") and (source.get("md5") or source.get("sha256")), key
        elif source["kind"] == "zenodo":
            assert isinstance(source["record"], int) and all(f["name"] for f in source["files"]), key
        elif source["kind"] == "idc":
            assert source["collection"], key
        elif source["kind"] == "manual":
            assert len(source["instructions"]) > 40, key
    assert {e.role for k, e in CATALOG.items() if k in ("ircadb", "totalsegmentator")} == {"external"}


@pytest.mark.skipif(not TEMPLATE.exists(), reason=f"the original's template is not at {TEMPLATE}")
def test_mappings_match_the_original_template():
    template = json.loads(TEMPLATE.read_text())["datasets"]
    by_index = {c.index: c.name for c in CLASSES}
    for original, key in ORIGINAL_KEYS.items():
        entry, spec = CATALOG[key], template[original]
        annotated = {CLASSES[n].index for n in entry.annotated}
        if key == "kits19":  # the cyst (32) counts as kidney here: Kidney Cyst is a disabled class
            assert annotated == set(spec["classes"]) - {32}
        elif key == "totalsegmentator":  # v2 numbering mapped by name; see docs/datasets.md
            assert {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 18} <= annotated
        else:
            assert annotated == set(spec["classes"]), key
        for raw, universal in (spec["raw_label_value_to_universal_index"] or {}).items():
            rule = next(r for r in entry.labels if r.raw == int(raw))
            if key == "kits19" and universal == 32:
                assert rule.classes == ("Right Kidney", "Left Kidney")
            elif universal == 0:
                assert rule.dropped, (key, raw)
            else:
                assert rule.classes[0] == by_index[universal], (key, raw)
                assert rule.split == (universal in (spec["rl_split_organs"] or [])), (key, raw)
    late = template["01_2"]["classes"]
    assert {CLASSES[n].index for n in CATALOG["btcv"].annotated_for("0061")} == set(late)
    assert {5, 6} == {r.raw for r in CATALOG["ct_org"].labels if r.dropped}


def test_layout_extensions_are_validated(tmp_path):
    doc = {"datasets": {"x": {"name": "x", "licence": "x", "source": {"kind": "manual"}, "role": "train",
                              "layout": {"kind": "per_structure", "image": "{case}/ct.nii.gz",
                                         "label": "{case}/masks", "structures": {"liver": 2}},
                              "labels": {1: "Liver"}}}}
    path = tmp_path / "datasets.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(CatalogError, match="structure 'liver' has raw value 2"):
        load_catalog(path, CLASSES)
    doc["datasets"]["x"]["layout"] = {"kind": "pattern", "image": "a/{case}.nii", "label": "b/{case}.nii",
                                      "case_numbers": [5, 1]}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(CatalogError, match="case_numbers"):
        load_catalog(path, CLASSES)
    doc["datasets"]["x"]["layout"] = {"kind": "pattern", "image": "a/{case}.nii", "label": "b/{case}.nii",
                                      "extra": [{"image": "c/{case}.nii", "label": "d/{case}.nii"}]}
    path.write_text(yaml.safe_dump(doc))
    entry = load_catalog(path, CLASSES)["x"]
    for folder in "abcd":
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "7.nii").write_bytes(b"")
    with pytest.raises(CatalogError, match="case '7' is found twice"):
        find_cases(entry, tmp_path)


def test_missing_structure_is_an_error_unless_allowed(tmp_path):
    entry = CATALOG["totalsegmentator"]
    image = np.zeros((4, 4, 4), np.int16)
    save_nifti(Volume(image, np.eye(4)), tmp_path / "s1" / "ct.nii.gz")
    (tmp_path / "s1" / "segmentations").mkdir()
    (case,) = find_cases(entry, tmp_path)
    with pytest.raises(LayoutError, match=r"no mask 'spleen\.nii\.gz'"):
        read_raw_label(case, entry)
    masks = tmp_path / "s1" / "segmentations"
    for name in entry.layout["structures"]:
        save_nifti(Volume(np.zeros((4, 4, 4), np.uint8), np.eye(4)), masks / f"{name}.nii.gz")
    save_nifti(Volume(np.ones((4, 4, 5), np.uint8), np.eye(4)), masks / "liver.nii.gz")
    with pytest.raises(LayoutError, match="does not share the grid"):
        read_raw_label(case, entry)
    assert load_nifti(case.image).shape == (4, 4, 4)


def test_every_catalog_entry_has_a_mirror_spec():
    assert set(CATALOG) <= set(MIRRORS)
