import json
from pathlib import Path

import pytest
import yaml

from universal.data.catalog import (
    CatalogError,
    default_catalog_path,
    find_cases,
    load_catalog,
    read_manifest,
    write_manifest,
)
from universal.data.download.datasets import download_dataset
from universal.data.download.errors import DownloadError


def test_demo_entries_parse(catalog):
    assert {"demo_msd_liver", "demo_btcv", "demo_kits", "demo_external"} <= set(catalog)
    kits = catalog["demo_kits"]
    kidney = next(r for r in kits.labels if r.raw == 1)
    assert kidney.split and kidney.classes == ("Right Kidney", "Left Kidney")
    assert kits.annotated == ("Right Kidney", "Left Kidney", "Kidney Tumor")
    assert catalog["demo_external"].role == "external"


def test_btcv_cases_from_60_annotate_eight_organs(catalog):
    btcv = catalog["demo_btcv"]
    assert len(btcv.annotated_for("0001")) == 14
    late = btcv.annotated_for("0061")
    assert len(late) == 8 and "Right Kidney" not in late and "Left Kidney" in late


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_pattern_layout_and_manifest_round_trip(catalog, tmp_path):
    for case in ("00000", "00001"):
        _touch(tmp_path / f"case_{case}" / "imaging.nii.gz")
        _touch(tmp_path / f"case_{case}" / "segmentation.nii.gz")
    cases = find_cases(catalog["demo_kits"], tmp_path)
    assert [c.case_id for c in cases] == ["00000", "00001"]
    assert cases[1].label == tmp_path / "case_00001" / "segmentation.nii.gz"
    write_manifest(cases, tmp_path / "m.tsv")
    assert read_manifest(tmp_path / "m.tsv") == cases


def test_msd_layout_reads_dataset_json(catalog, tmp_path):
    task = tmp_path / "Task03_Liver"
    _touch(task / "imagesTr" / "liver_0.nii.gz")
    _touch(task / "labelsTr" / "liver_0.nii.gz")
    (task / "dataset.json").write_text(json.dumps(
        {"training": [{"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"}]}))
    cases = find_cases(catalog["demo_msd_liver"], tmp_path)
    assert [c.case_id for c in cases] == ["liver_0"]


def test_missing_label_file_is_reported(catalog, tmp_path):
    _touch(tmp_path / "case_00000" / "imaging.nii.gz")
    with pytest.raises(CatalogError, match="missing"):
        find_cases(catalog["demo_kits"], tmp_path)


def test_empty_folder_is_reported(catalog, tmp_path):
    with pytest.raises(CatalogError, match="no cases found"):
        find_cases(catalog["demo_btcv"], tmp_path)


def test_private_dataset_is_one_entry(classes, tmp_path):
    doc = yaml.safe_load(default_catalog_path().read_text())
    doc["datasets"]["felix"] = {
        "name": "FELIX (private)", "licence": "private", "source": {"kind": "manual", "instructions": "ask JHH"},
        "layout": {"kind": "pattern", "image": "img/{case}.nii.gz", "label": "lbl/{case}.nii.gz"},
        "labels": {1: "Pancreas", 2: "Pancreas", 3: "Pancreas Tumor"}, "role": "train"}
    path = tmp_path / "datasets.yaml"
    path.write_text(yaml.safe_dump(doc))
    felix = load_catalog(path, classes)["felix"]
    assert felix.annotated == ("Pancreas", "Pancreas Tumor")


def _local_entry(classes, tmp_path, layout: dict, role: str):
    doc = {"datasets": {"mine": {"name": "Ours", "licence": "private", "source": {"kind": "local"},
                                 "layout": layout, "labels": {1: "Liver"}, "role": role}}}
    path = tmp_path / "datasets.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_catalog(path, classes)["mine"]


def test_a_local_external_dataset_lists_unlabelled_cts(classes, tmp_path):
    entry = _local_entry(classes, tmp_path, {"kind": "pattern", "image": "ct/{case}.nii.gz"}, "external")
    root = tmp_path / "mine"
    with pytest.raises(DownloadError, match="local dataset and is not complete"):
        download_dataset(entry, root)
    for case in ("p01", "p02"):
        (root / "ct").mkdir(parents=True, exist_ok=True)
        (root / "ct" / f"{case}.nii.gz").write_bytes(b"")
    assert download_dataset(entry, root) == root
    cases = find_cases(entry, root)
    assert [(c.case_id, c.label) for c in cases] == [("p01", None), ("p02", None)] and not entry.labelled


def test_a_training_dataset_without_labels_is_refused(classes, tmp_path):
    with pytest.raises(CatalogError, match=r"a training dataset needs labels: give layout\.label"):
        _local_entry(classes, tmp_path, {"kind": "pattern", "image": "ct/{case}.nii.gz"}, "train")


@pytest.mark.parametrize(("labels", "message"), [
    ({1: "Livr"}, "'Livr', which is not in the class table"),
    ({1: ["Left Kidney", "Right Kidney"]}, "must be \\(right, left\\)"),
    ({0: "Liver"}, "must be a positive integer"),
])
def test_bad_label_maps_name_the_dataset(classes, tmp_path, labels, message):
    doc = {"datasets": {"bad": {"name": "x", "licence": "x", "source": {"kind": "manual"}, "role": "train",
                                "layout": {"kind": "pattern", "image": "{case}.nii", "label": "{case}_l.nii"},
                                "labels": labels}}}
    path = tmp_path / "datasets.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(CatalogError, match=message) as info:
        load_catalog(path, classes)
    assert "dataset 'bad'" in str(info.value)


def _msd_task(tmp_path: Path, training: object) -> Path:
    task = tmp_path / "Task03_Liver"
    task.mkdir(parents=True, exist_ok=True)
    (task / "dataset.json").write_text(json.dumps({"name": "Liver", "training": training}))
    return task


def test_msd_entries_sharing_a_file_stem_are_refused(catalog, tmp_path):
    task = _msd_task(tmp_path, [{"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"},
                                {"image": "./imagesTs/liver_0.nii", "label": "./labelsTs/liver_0.nii"}])
    for folder, name in (("imagesTr", "liver_0.nii.gz"), ("labelsTr", "liver_0.nii.gz"), ("imagesTs", "liver_0.nii"),
                         ("labelsTs", "liver_0.nii")):
        _touch(task / folder / name)
    with pytest.raises(CatalogError, match=r"imagesTr/liver_0\.nii\.gz and .*imagesTs/liver_0\.nii share the case id "
                                           r"'liver_0'.*rename one"):
        find_cases(catalog["demo_msd_liver"], tmp_path)


@pytest.mark.parametrize("image", ["../../outside/liver_0.nii.gz", "/etc/liver_0.nii.gz"])
def test_msd_paths_leaving_the_task_folder_are_refused(catalog, tmp_path, image):
    _msd_task(tmp_path, [{"image": image, "label": "./labelsTr/liver_0.nii.gz"}])
    with pytest.raises(CatalogError, match=r"dataset\.json: training\[0\]\.image .* would leave"):
        find_cases(catalog["demo_msd_liver"], tmp_path)


@pytest.mark.parametrize(("document", "message"), [
    ("{not json", "cannot read"),
    ("[1, 2]", "expected a JSON object with a 'training' list"),
    ('{"training": [{"image": "./imagesTr/liver_0.nii.gz"}]}', r"training\[0\] must have 'image' and 'label'"),
    ('{"numTraining": 1}', "expected a JSON object with a 'training' list"),
])
def test_malformed_msd_dataset_json_names_the_file_and_key(catalog, tmp_path, document, message):
    task = tmp_path / "Task03_Liver"
    task.mkdir()
    (task / "dataset.json").write_text(document)
    with pytest.raises(CatalogError, match=message) as info:
        find_cases(catalog["demo_msd_liver"], tmp_path)
    assert "Task03_Liver/dataset.json" in str(info.value)


def _one_entry(tmp_path: Path, **changes) -> Path:
    body = {"name": "x", "licence": "x", "source": {"kind": "manual"}, "role": "train",
            "layout": {"kind": "pattern", "image": "{case}.nii", "label": "{case}_l.nii"}, "labels": {1: "Liver"}}
    path = tmp_path / "datasets.yaml"
    path.write_text(yaml.safe_dump({"datasets": {"bad": {**body, **changes}}}))
    return path


@pytest.mark.parametrize("changes", [{"annotated": ["Liver", "Spleen"]},
                                     {"annotated_overrides": [{"cases_from": 5, "annotated": ["Spleen"]}]}])
def test_an_annotated_class_no_value_maps_to_is_refused(classes, tmp_path, changes):
    with pytest.raises(CatalogError, match=r"dataset 'bad': annotated class 'Spleen' is the class of no raw label"):
        load_catalog(_one_entry(tmp_path, **changes), classes)


@pytest.mark.parametrize("layout", [{"kind": "pattern", "image": "../{case}.nii", "label": "{case}_l.nii"},
                                    {"kind": "pattern", "image": "{case}.nii", "label": "/data/{case}_l.nii"},
                                    {"kind": "msd", "root": "../Task03_Liver"}])
def test_catalog_paths_leaving_the_dataset_folder_are_refused(classes, tmp_path, layout):
    with pytest.raises(CatalogError, match=r"must be a (path|folder) inside the dataset folder"):
        load_catalog(_one_entry(tmp_path, layout=layout), classes)
