import numpy as np
import pandas as pd
import pytest
import torch
from monai.metrics import compute_dice

from universal.core.sides import right_of_midline
from universal.core.volume import Volume
from universal.evaluate.aggregate import aggregate
from universal.evaluate.metrics import class_region, dice, evaluate_case, write_metrics


def test_dice_matches_monai():
    rng = np.random.default_rng(3)
    prediction = rng.random((30, 30, 30)) > 0.6
    truth = rng.random((30, 30, 30)) > 0.5
    reference = compute_dice(torch.from_numpy(prediction)[None, None].float(),
                             torch.from_numpy(truth)[None, None].float(), include_background=True)
    assert dice(prediction, truth) == pytest.approx(float(reference), abs=1e-6)


def test_dice_conventions_for_empty_masks():
    empty = np.zeros((4, 4, 4), bool)
    full = np.ones((4, 4, 4), bool)
    assert np.isnan(dice(empty, empty))
    assert dice(full, empty) == 0.0


def test_organ_region_includes_its_tumours_on_its_side(classes):
    label = np.zeros((10, 2, 2), np.uint8)
    label[0:3] = 3     # left kidney (low x)
    label[3] = 26      # kidney tumour on the left
    label[6] = 26      # kidney tumour on the right
    label[7:10] = 2    # right kidney
    right = right_of_midline(label.shape, np.eye(4), midline_x_mm=4.5)
    left_kidney = class_region(label, classes["Left Kidney"], classes, right)
    right_kidney = class_region(label, classes["Right Kidney"], classes, right)
    assert left_kidney[:, 0, 0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert right_kidney[:, 0, 0].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert class_region(label, classes["Kidney Tumor"], classes, right).sum() == 8


def test_case_table_has_one_row_per_class(classes):
    truth = np.zeros((20, 20, 20), np.uint8)
    truth[2:10, 2:10, 2:10] = 6
    truth[4:6, 4:6, 4:6] = 27
    organs = np.zeros_like(truth)
    organs[2:10, 2:10, 2:9] = 6
    tumours = np.zeros_like(truth)
    tumours[4:6, 4:6, 4:6] = 27
    table = evaluate_case(organs, tumours, Volume(truth, np.diag([2.0, 2.0, 2.0, 1.0])), classes, 20.0, "d", "c",
                          predicted=["Liver", "Liver Tumor"])
    assert len(table) == 31 and table["class"].tolist() == classes.names
    assert table.loc[table["predicted"], "class"].tolist() == ["Liver", "Liver Tumor"]
    row = table.set_index("class")
    assert row.loc["Liver", "dice"] == pytest.approx(2 * 448 / (448 + 512))
    assert row.loc["Liver Tumor", "dice"] == 1.0
    assert row.loc["Liver", "gt_ml"] == pytest.approx(512 * 8 / 1000)
    assert np.isnan(row.loc["Spleen", "dice"])


def test_aggregate_with_dask_matches_pandas(classes, tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for case in range(5):  # case 0 scores 0 everywhere ("0" in the TSV): dtypes must not come from the first file
        rows = [{"dataset": "ext" if case < 3 else "other", "case_id": f"c{case}", "class": c.name, "kind": c.kind,
                 "predicted": c.name != "Colon", "dice": 0.0 if case == 0 else rng.random() if c.index % 7 else np.nan,
                 "gt_ml": 1.0, "pred_ml": 2.0} for c in classes]
        path = tmp_path / "metrics" / f"c{case}.tsv"
        write_metrics(pd.DataFrame(rows), path)
        paths.append(path)
    outputs = aggregate(paths, classes, tmp_path / "out", threads=2)
    per_class = pd.read_csv(outputs["per_class"], sep="\t").set_index("class")
    reference = pd.concat(pd.read_csv(p, sep="\t") for p in paths).groupby("class")["dice"]
    for name in ("Liver", "Spleen", "Colon Tumor"):
        assert per_class.loc[name, "dice_mean"] == pytest.approx(reference.mean()[name], abs=1e-4)
        assert per_class.loc[name, "dice_count"] == reference.count()[name]
    assert list(per_class.index) == classes.names
    assert not per_class.loc["Colon", "predicted"] and per_class.loc["Liver", "predicted"]
    assert per_class.loc["Stomach", "dice_count"] == 1  # index 7: only case 0 has a value
    per_dataset = pd.read_csv(outputs["per_dataset_class"], sep="\t")
    assert set(per_dataset["dataset"]) == {"ext", "other"} and len(per_dataset) == 62
    assert outputs["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
