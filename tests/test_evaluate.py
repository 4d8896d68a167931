import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from scipy import ndimage

from universal.core.sides import right_of_midline
from universal.core.volume import Volume
from universal.evaluate.aggregate import aggregate
from universal.evaluate.metrics import class_region, dice, evaluate_case, truth_maps, write_metrics
from universal.evaluate.surface import label_boundaries, neighbourhood, surface_metrics


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


def _one_hot(label: np.ndarray, values: list[int]) -> torch.Tensor:
    """(1, C, X, Y, Z) float one-hot of ``values`` in a label map, as MONAI's metrics take it."""
    return torch.from_numpy(np.stack([label == v for v in values])[None].astype(np.float32))


def test_surface_metrics_match_monai_voxel_boundaries():
    """NSD and HD95 against MONAI's compute_surface_dice / compute_hausdorff_distance, anisotropic spacing, per-class
    tolerances: labels that overlap, touch the array's edge, are scattered, missed, or false positives."""
    rng = np.random.default_rng(5)
    shape, spacing = (26, 22, 14), (1.5, 0.8, 2.5)
    blobs = ndimage.gaussian_filter(rng.random((4, *shape)), sigma=(0, 2.5, 2.5, 1.5))
    truth = np.zeros(shape, np.uint8)
    prediction = np.zeros(shape, np.uint8)
    for value, blob in enumerate(blobs, start=1):
        truth[blob > np.quantile(blob, 0.8)] = value
        prediction[np.roll(blob, value - 2, axis=value % 3) > np.quantile(blob, 0.78 + 0.01 * value)] = value
    prediction[rng.random(shape) > 0.995] = 2      # scattered false positives of label 2
    truth[0:3, 0:4, :] = 5                         # label 5 touches three faces of the array
    prediction[0:3, 2:4, :] = 5
    prediction[20:22, 18:20, 5:7] = 6              # label 6: a false positive only (absent from the truth)
    truth[10:12, 2:4, 10:12] = 7                   # label 7: missed
    values = [1, 2, 3, 4, 5, 6, 7, 8]              # label 8: in neither
    tolerances = {v: 1.0 if v % 2 else 2.0 for v in values}
    ours = surface_metrics(prediction, truth, spacing, tolerances)
    y_pred, y = _one_hot(prediction, values), _one_hot(truth, values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about the empty classes
        nsd = compute_surface_dice(y_pred, y, list(tolerances.values()), include_background=True,
                                   spacing=spacing)[0].numpy()
        hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing)[0].numpy()
    for i, v in enumerate(values[:5]):
        assert ours[v][0] == pytest.approx(nsd[i], abs=1e-4) and ours[v][1] == pytest.approx(hd95[i], abs=1e-4)
        assert 0 < ours[v][0] < 1 and ours[v][1] > 0
    # One side empty: NSD 0 in both; HD95 inf here, NaN in MONAI (its percentile interpolates between infinities)
    assert ours[6] == ours[7] == (0.0, np.inf) and nsd[5] == nsd[6] == 0 and np.isnan(hd95[5:7]).all()
    assert np.isnan(ours[8]).all() and np.isnan(nsd[7]) and np.isnan(hd95[7])


def test_surface_metrics_hand_computed():
    one = np.zeros((8, 8, 8), np.uint8)
    one[5, 5, 5] = 1
    moved = np.zeros_like(one)
    moved[5, 5, 7] = 1                              # two voxels of 1.5 mm along z: 3 mm apart
    assert surface_metrics(moved, one, (1.0, 1.0, 1.5), {1: 1.0})[1] == (0.0, 3.0)
    assert surface_metrics(moved, one, (1.0, 1.0, 1.5), {1: 3.0})[1] == (1.0, 3.0)
    far = np.zeros_like(one)
    far[5, 5, 1] = 1                                # 6 mm: beyond the 3 mm neighbourhood, from the k-d tree
    assert surface_metrics(far, one, (1.0, 1.0, 1.5), {1: 1.0})[1] == (0.0, 6.0)
    pair = one.copy()
    pair[6, 5, 5] = 1                               # truth 2 voxels along x (2 mm), prediction 1 of them
    nsd, hd95 = surface_metrics(one, pair, (2.0, 1.0, 1.0), {1: 1.0})[1]
    assert nsd == pytest.approx(2 / 3, abs=1e-4)              # (1 + 1) of 1 + 2 boundary voxels within 1 mm
    assert hd95 == pytest.approx(0.95 * 2.0)        # q95 of [0, 2] by linear interpolation


def test_neighbourhood_holds_every_offset_within_the_radius_nearest_first():
    offsets, lengths = neighbourhood((1.0, 1.0, 2.0), 2.0, (3, 3, 2), (10, 10, 10))
    assert len(offsets) == 13 + 2   # 13 in the plane (dx² + dy² <= 4), and dz = ±1 (2 mm)
    assert offsets[0] == 0 and np.all(np.diff(lengths) >= 0) and lengths[-1] == 2.0
    assert set(offsets[lengths == 1.0]) == {100, -100, 10, -10}   # flat offsets of x, y in a 10³ grid


def test_boundary_counts_outside_the_array_as_outside():
    cube = np.zeros((5, 5, 5), np.uint8)
    cube[1:4, 1:4, 1:4] = 3
    inside, filling = label_boundaries(cube, (1.0, 1.0, 1.0)), label_boundaries(cube[1:4, 1:4, 1:4], (1.0, 1.0, 1.0))
    surface, filled = inside.points[inside.rows(3)], filling.points[filling.rows(3)]
    assert len(surface) == len(filled) == 26   # all but the centre voxel, in both
    np.testing.assert_array_equal(surface - 1.0, filled)
    assert len(inside.points[inside.rows(1)]) == 0 and len(inside.points[inside.rows(200)]) == 0


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
    organs, tumours = truth_maps(label, classes, np.eye(4), midline_x_mm=4.5)
    for cls in classes:
        assert np.array_equal((tumours if cls.is_tumour else organs) == cls.index,
                              class_region(label, cls, classes, right)), cls.name


def test_case_table_has_one_row_per_class(classes):
    truth = np.zeros((20, 20, 20), np.uint8)
    truth[2:10, 2:10, 2:10] = 6
    truth[4:6, 4:6, 4:6] = 27
    organs = np.zeros_like(truth)
    organs[2:10, 2:10, 2:9] = 6
    organs[15:17, 15:17, 15:17] = 7   # stomach, which this dataset does not annotate
    tumours = np.zeros_like(truth)
    tumours[4:6, 4:6, 4:6] = 27
    tumours[12, 12, 12] = 28          # a pancreas tumour the truth does not have
    table = evaluate_case(organs, tumours, Volume(truth, np.diag([2.0, 2.0, 2.0, 1.0])), classes, 20.0, "d", "c",
                          predicted=["Liver", "Liver Tumor"],
                          annotated=["Liver", "Liver Tumor", "Spleen", "Pancreas Tumor"])
    assert len(table) == 31 and table["class"].tolist() == classes.names
    assert table.loc[table["predicted"], "class"].tolist() == ["Liver", "Liver Tumor"]
    assert table.loc[table["annotated"], "class"].tolist() == ["Spleen", "Liver", "Liver Tumor", "Pancreas Tumor"]
    row = table.set_index("class")
    assert row.loc["Liver", "dice"] == pytest.approx(2 * 448 / (448 + 512))
    # Boundaries: prediction 268 voxels, truth 296; 232 of each shared, the rest (36 of the prediction's top face,
    # the truth's 64-voxel top face) one 2 mm voxel away: NSD at 1 mm = 464 / 564, HD95 = 2 mm.
    assert row.loc["Liver", "nsd"] == pytest.approx(464 / 564) and row.loc["Liver", "hd95_mm"] == pytest.approx(2.0)
    assert tuple(row.loc["Liver Tumor", ["dice", "nsd", "hd95_mm"]]) == (1.0, 1.0, 0.0)
    assert tuple(row.loc["Pancreas Tumor", ["dice", "nsd", "hd95_mm", "gt_ml"]]) == (0.0, 0.0, np.inf, 0.0)
    assert row.loc["Pancreas Tumor", "pred_ml"] == pytest.approx(0.008)
    assert row.loc["Liver", "gt_ml"] == pytest.approx(512 * 8 / 1000)
    assert row.loc["Spleen", ["dice", "nsd", "hd95_mm"]].isna().all() and row.loc["Spleen", "gt_ml"] == 0.0
    assert row.loc["Stomach", ["dice", "nsd", "hd95_mm", "gt_ml"]].isna().all()
    assert row.loc["Stomach", "pred_ml"] == pytest.approx(0.064) and (row["nsd_tolerance_mm"] == 1.0).all()


LIVER_TUMOUR = [(1.0, 2.0), (3.0, 0.0), (1.0, 1.0), (1.0, 0.0), (0.0, 0.5)]  # (gt_ml, pred_ml) of cases 0-4


def _case_table(classes, case: int, rng: np.random.Generator) -> pd.DataFrame:
    """A per-case table of case "00<case>" (an id that reads as a number): case 0 scores 0 everywhere ("0" in the
    TSV: dtypes must not come from the first file),
    every 7th class is absent from both sides (NaN), Liver's HD95 is inf in case 1, Colon Tumor is annotated only
    in dataset "ext", and Liver Tumor's volumes (gt_ml, pred_ml) come from LIVER_TUMOUR."""
    rows = []
    for c in classes:
        dataset = "ext" if case < 3 else "other"
        annotated = c.name != "Colon Tumor" or dataset == "ext"
        score = 0.0 if case == 0 else rng.random() if c.index % 7 else np.nan
        hd95 = np.inf if (case, c.name) == (1, "Liver") else score * 10
        gt_ml, pred_ml = LIVER_TUMOUR[case] if c.name == "Liver Tumor" else (1.0, 2.0)
        rows.append({"dataset": dataset, "case_id": f"{case:03d}", "class": c.name, "kind": c.kind,
                     "predicted": c.name != "Colon", "annotated": annotated, "dice": score if annotated else np.nan,
                     "nsd": score / 2 if annotated else np.nan, "nsd_tolerance_mm": 1.0,
                     "hd95_mm": hd95 if annotated else np.nan, "gt_ml": gt_ml if annotated else np.nan,
                     "pred_ml": pred_ml})
    return pd.DataFrame(rows)


def test_aggregate_with_dask_matches_pandas(classes, tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for case in range(5):
        path = tmp_path / "metrics" / f"c{case}.tsv"
        write_metrics(_case_table(classes, case, rng), path)
        paths.append(path)
    outputs = aggregate(paths, classes, tmp_path / "out", threads=2)
    per_class = pd.read_csv(outputs["per_class"], sep="\t").set_index("class")
    reference = pd.concat(pd.read_csv(p, sep="\t") for p in paths).groupby("class")
    for name in ("Liver", "Spleen", "Colon Tumor"):
        for metric in ("dice", "nsd"):
            assert per_class.loc[name, f"{metric}_mean"] == pytest.approx(reference[metric].mean()[name], abs=1e-4)
            assert per_class.loc[name, f"{metric}_count"] == reference[metric].count()[name]
        assert per_class.loc[name, "hd95_mm_median"] == pytest.approx(reference["hd95_mm"].median()[name], abs=1e-4)
    assert per_class.loc["Liver", "hd95_mm_inf"] == 1 and per_class["hd95_mm_inf"].sum() == 1
    assert per_class.loc["Colon Tumor", "annotated_cases"] == per_class.loc["Colon Tumor", "dice_count"] == 3
    assert list(per_class.index) == classes.names and (per_class["nsd_tolerance_mm"] == 1.0).all()
    assert not per_class.loc["Colon", "predicted"] and per_class.loc["Liver", "predicted"]
    assert per_class.loc["Stomach", "dice_count"] == 1  # index 7: only case 0 has a value
    per_dataset = pd.read_csv(outputs["per_dataset_class"], sep="\t")
    assert set(per_dataset["dataset"]) == {"ext", "other"} and len(per_dataset) == 62
    assert pd.read_parquet(outputs["per_case_parquet"])["case_id"].unique().tolist() == ["000", "001", "002", "003",
                                                                                         "004"]
    for key in ("per_case", "per_class", "per_dataset_class", "detection", "detection_per_dataset"):
        tsv = pd.read_csv(outputs[key], sep="\t", dtype={"case_id": str})
        parquet = pd.read_parquet(outputs[f"{key}_parquet"])
        assert list(parquet.columns) == list(tsv.columns) and len(parquet) == len(tsv)
        pd.testing.assert_frame_equal(parquet.select_dtypes("number"), tsv.select_dtypes("number"),
                                      check_dtype=False, atol=1e-4)
    for plot in ("dice_per_class", "nsd_per_class", "hd95_per_class"):
        assert outputs[plot].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_aggregate_names_a_table_of_an_older_version(classes, tmp_path):
    path = tmp_path / "old.tsv"
    write_metrics(_case_table(classes, 0, np.random.default_rng(0)).drop(columns=["nsd", "hd95_mm"]), path)
    with pytest.raises(ValueError, match=r"old.tsv: per-case metric table without columns \['nsd', 'hd95_mm'\]"):
        aggregate([path], classes, tmp_path / "out")


def test_detection_counts_cases_as_table_4_does(classes, tmp_path):
    """Liver Tumor: truth positive in cases 0-3, a tumour left in the prediction in 0, 2, 4; 0-2 are dataset ext.
    Colon Tumor (truth and prediction positive everywhere) counts only in ext, the dataset that annotates it."""
    rng = np.random.default_rng(1)
    paths = []
    for case in range(5):
        path = tmp_path / f"c{case}.tsv"
        write_metrics(_case_table(classes, case, rng), path)
        paths.append(path)
    outputs = aggregate(paths, classes, tmp_path / "out")
    overall = pd.read_csv(outputs["detection"], sep="\t").set_index("class")
    assert list(overall.index) == [c.name for c in classes.tumours()]
    liver = overall.loc["Liver Tumor"]
    counts = ["true_positive", "false_negative", "false_positive", "true_negative", "cases"]
    assert tuple(liver[counts]) == (2, 2, 1, 0, 5)
    assert liver["sensitivity"] == 0.5 and liver["specificity"] == 0.0
    colon = overall.loc["Colon Tumor"]
    assert colon["cases"] == 3 and colon["sensitivity"] == 1.0 and np.isnan(colon["specificity"])
    by_dataset = pd.read_csv(outputs["detection_per_dataset"], sep="\t").set_index(["dataset", "class"])
    assert by_dataset.loc[("ext", "Liver Tumor"), "sensitivity"] == pytest.approx(2 / 3, abs=1e-4)
    assert np.isnan(by_dataset.loc[("ext", "Liver Tumor"), "specificity"])
    assert tuple(by_dataset.loc[("other", "Liver Tumor"), ["sensitivity", "specificity"]]) == (0.0, 0.0)
    assert ("other", "Colon Tumor") not in by_dataset.index
