import json

import numpy as np
import zarr

from universal.core.volume import Volume
from universal.infer.ome import read_prediction, union_label_map, write_prediction


def test_prediction_round_trip_and_metadata(classes, tmp_path):
    rng = np.random.default_rng(1)
    image = rng.integers(-1000, 1000, (20, 30, 40)).astype(np.int16)
    affine = np.diag([1.5, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-10.0, 20.0, 30.0]
    organs = np.zeros(image.shape, np.uint8)
    organs[5:10, 5:10, 5:10] = 6
    tumours = np.zeros(image.shape, np.uint8)
    tumours[6:8, 6:8, 6:8] = 27
    path = tmp_path / "case.ome.zarr"
    write_prediction(path, Volume(image, affine), organs, tumours, classes, {"case_id": "case"})
    back, organs_back, tumours_back, meta = read_prediction(path)
    assert np.array_equal(back.array, image) and np.allclose(back.affine, affine)
    assert np.array_equal(organs_back, organs) and np.array_equal(tumours_back, tumours)
    assert meta["case_id"] == "case" and len(meta["classes"]) == 31
    root = zarr.open_group(str(path), mode="r")
    ome = root.attrs["ome"]
    assert ome["version"] == "0.5"
    assert [a["name"] for a in ome["multiscales"][0]["axes"]] == ["z", "y", "x"]
    transforms = ome["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert transforms[0]["scale"] == [3.0, 2.0, 1.5] and transforms[1]["translation"] == [30.0, 20.0, -10.0]
    assert set(root["labels"].attrs["ome"]["labels"]) == {"organs", "tumours"}
    label_meta = json.loads((path / "labels" / "tumours" / "zarr.json").read_text())["attributes"]["ome"]
    colours = {c["label-value"]: c["rgba"] for c in label_meta["image-label"]["colors"]}
    assert colours[27] == [*classes["Liver Tumor"].colour, 255]
    names = {p["label-value"]: p["class"] for p in label_meta["image-label"]["properties"]}
    assert names[26] == "Kidney Tumor" and len(names) == 6
    union = union_label_map(organs_back, tumours_back)
    assert set(np.unique(union)) == {0, 6, 27}
    assert not (tmp_path / "case.ome.zarr.partial").exists()
