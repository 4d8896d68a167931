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


def test_probabilities_are_stored_as_uint8_steps_on_the_model_grid(classes, tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    from universal.infer.ome import GridProbabilities, read_probabilities

    rng = np.random.default_rng(2)
    image = np.zeros((12, 10, 8), np.int16)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    affine[:3, 3] = [-5.0, 7.0, 11.0]
    grid = np.diag([3.0, 2.5, 4.0, 1.0])
    grid[:3, 3] = affine[:3, 3]
    values = rng.random((2, 4, 4, 4)).astype(np.float16)
    values[0, 0, 0, :3] = [0.0, 1.0, 0.5]
    names = ["Liver", "Kidney Tumor"]
    path = tmp_path / "case.ome.zarr"
    labels = np.zeros(image.shape, np.uint8)
    write_prediction(path, Volume(image, affine), labels, labels, classes, {"case_id": "case"},
                     GridProbabilities(names, values, grid))
    back = read_probabilities(path)
    assert back.names == names and np.allclose(back.grid, grid)
    assert back.array.dtype == np.uint8 and back.array.shape == (2, 4, 4, 4)
    expected = np.rint(values.astype(np.float64) * 255).astype(np.uint8)
    assert np.array_equal(back.array, expected)
    assert list(back.array[0, 0, 0, :3]) == [0, 255, 128]  # 0.5 is 127.5 steps: rounded half to even
    assert np.abs(back.array / 255 - values.astype(np.float64)).max() <= 1 / 510 + 1e-6
    # an OME-Zarr reader finds a 4-D multiscale image with the model grid's scale and the CT's origin
    nodes = list(Reader(parse_url(str(path / "probabilities")))())
    image_node = next(n for n in nodes if any(isinstance(s, Multiscales) for s in n.specs))
    assert [a["name"] for a in image_node.metadata["axes"]] == ["c", "z", "y", "x"]
    assert image_node.metadata["channel_names"] == names
    multiscale = zarr.open_group(str(path / "probabilities"), mode="r").attrs["ome"]["multiscales"][0]
    transforms = multiscale["datasets"][0]["coordinateTransformations"]
    assert transforms[0]["scale"] == [1.0, 4.0, 2.5, 3.0]
    assert transforms[1]["translation"] == [0.0, 11.0, 7.0, -5.0]


def test_a_prediction_without_probabilities_reads_none(classes, tmp_path):
    from universal.infer.ome import read_probabilities

    path = tmp_path / "case.ome.zarr"
    labels = np.zeros((4, 4, 4), np.uint8)
    write_prediction(path, Volume(labels.astype(np.int16), np.eye(4)), labels, labels, classes, {"case_id": "c"})
    assert read_probabilities(path) is None
