from pathlib import Path

import numpy as np
import pytest
import yaml

from universal.core.classes import ClassTableError, default_class_table_path, load_class_table

PAPER_ORDER = [
    "Spleen", "Right Kidney", "Left Kidney", "Gall Bladder", "Esophagus", "Liver", "Stomach", "Aorta", "Postcava",
    "Portal Vein and Splenic Vein", "Pancreas", "Right Adrenal Gland", "Left Adrenal Gland", "Duodenum",
    "Hepatic Vessel", "Right Lung", "Left Lung", "Colon", "Intestine", "Rectum", "Bladder", "Prostate",
    "Left Head of Femur", "Right Head of Femur", "Celiac Trunk", "Kidney Tumor", "Liver Tumor", "Pancreas Tumor",
    "Hepatic Vessel Tumor", "Lung Tumor", "Colon Tumor",
]


def test_default_table_is_the_papers_31_classes(classes):
    assert classes.names == PAPER_ORDER
    assert [c.index for c in classes] == list(range(1, 32))
    assert len(classes.organs()) == 25 and len(classes.tumours()) == 6
    assert classes["Liver"].prompt == "A computerized tomography of a Liver"
    assert classes["Kidney Tumor"].parents == ("Right Kidney", "Left Kidney")
    assert classes["Right Kidney"].side == "right" and classes["Left Lung"].side == "left"


def test_kidney_cyst_is_optional():
    with_cyst = load_class_table(include=["Kidney Cyst"])
    assert with_cyst.names[-1] == "Kidney Cyst" and len(with_cyst) == 32
    assert with_cyst.channel("Kidney Cyst") == 31


def test_index_to_channel_lookup(classes):
    lut = classes.index_to_channel()
    assert lut[0] == -1 and lut[1] == 0 and lut[31] == 30
    assert np.all(lut[1:32] == np.arange(31))


def _write(tmp_path: Path, mutate) -> Path:
    doc = yaml.safe_load(default_class_table_path().read_text())
    mutate(doc)
    path = tmp_path / "classes.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_nsd_tolerance_defaults_to_1_mm_and_can_be_set_per_class(tmp_path, classes):
    assert {c.nsd_tolerance_mm for c in classes} == {1.0}
    path = _write(tmp_path, lambda d: d["classes"][26].update(nsd_tolerance_mm=2.5))
    table = load_class_table(path)
    assert table["Liver Tumor"].nsd_tolerance_mm == 2.5 and table["Liver"].nsd_tolerance_mm == 1.0


def test_prompt_override(tmp_path):
    path = _write(tmp_path, lambda d: d["classes"][5].update(prompt="An abdominal CT showing the liver"))
    assert load_class_table(path)["Liver"].prompt == "An abdominal CT showing the liver"


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d["classes"][1].update(index=1), "duplicate class index 1"),
    (lambda d: d["classes"][26].update(parents=["Liverr"]), "unknown parent 'Liverr'"),
    (lambda d: d["classes"][0].update(colour=[300, 0, 0]), "class 'Spleen': colour"),
    (lambda d: d["classes"][0].update(kind="bone"), "class 'Spleen': kind"),
    (lambda d: d["classes"][25].pop("parents"), "a tumour needs at least one parent"),
    (lambda d: d["classes"][2].update(postprocess="largest_component"),
     "largest_component_per_side needs one 'Right Kidney'.*'Left Kidney'"),
    (lambda d: d["classes"][16].update(side="right"), "lung_pair needs one 'Right Lung'"),
    (lambda d: d["classes"][0].update(nsd_tolerance_mm=-1), "class 'Spleen': nsd_tolerance_mm"),
    (lambda d: d["classes"][0].update(nsd_tolerance_mm="2 mm"), "class 'Spleen': nsd_tolerance_mm"),
    (lambda d: d["classes"][0].update(nsd_tolerance_mm=float("inf")), "class 'Spleen': nsd_tolerance_mm"),
])
def test_malformed_table_names_file_and_problem(tmp_path, mutate, message):
    path = _write(tmp_path, mutate)
    with pytest.raises(ClassTableError, match=message) as info:
        load_class_table(path)
    assert str(path) in str(info.value)


def test_unknown_class_lookup_lists_known(classes):
    with pytest.raises(KeyError, match="Celiac Truck"):
        classes["Celiac Truck"]
