"""The original's checkpoints: its backbones layer for layer, the import of its three key layouts, the
preprocessing that travels with the weights, and a converted model's inference on the demo's external set.

Checkpoints are built here with random weights from the original's state-dict listings (every key, shape and dtype;
../shared/reference/original_state_dict_{swinunetr,unet}.tsv): the released files cannot be downloaded offline.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from universal.cli import main
from universal.core.classes import ClassTable, UniversalClass, load_class_table
from universal.data.catalog import find_cases
from universal.embed.prompts import ORIGINAL_CLASS_ORDER
from universal.infer.batch import infer_cases, load_run
from universal.infer.ome import read_prediction
from universal.infer.settings import InferenceSettings, settings_from_checkpoint, windows_per_pass
from universal.model.import_original import (
    CheckpointImportError,
    build_original_model,
    import_original_checkpoint,
    map_embedding_rows,
)
from universal.model.network import ModelConfig, build_model, load_checkpoint, save_checkpoint
from universal.model.original_swin import OriginalPatchMerging
from universal.model.original_unet import BatchStatisticsNorm3d
from universal.model.preprocessing import ORIGINAL_PREPROCESSING, Preprocessing
from universal.synthetic.demo_data import write_demo_data

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
# The original's sub-grid order as the issue states it, (x, y, z) offsets: slices 5 and 6 repeat 2 and 3.
ISSUE_MERGE_ORDER = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))
LAYOUT_BACKBONE = {"swinunetr-released": "swinunetr", "swinunetr": "swinunetr", "unet": "unet"}
DTYPES = {"torch.float32": torch.float32, "torch.int64": torch.int64}
# Scales of the layer, group and batch norms (GroupNorms are "precls_conv.0" and "GAP.0"), and batch-norm variances.
SCALES = ("norm1.weight", "norm2.weight", "norm.weight", "bn1.weight", "0.weight", "running_var")


def original_listing(backbone: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key → (shape, dtype) of the original's state dict, from the reference listing."""
    path = REFERENCE / f"original_state_dict_{backbone}.tsv"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    listing = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, dtype = line.split("\t")
            listing[key] = (tuple(int(n) for n in shape.strip("()").split(",") if n.strip()), DTYPES[dtype])
    return listing


def random_state(backbone: str, seed: int) -> dict[str, Tensor]:
    """Random weights for every key of the original's listing, scaled so that activations stay finite."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, (shape, dtype) in original_listing(backbone).items():
        if dtype == torch.int64:
            high = 2197 if key.endswith("relative_position_index") else 100
            state[key] = torch.randint(0, high, shape, generator=generator)
        elif key.endswith(SCALES) and len(shape) == 1:
            state[key] = 1.0 + 0.1 * torch.rand(shape, generator=generator)
        else:
            state[key] = 0.05 * torch.randn(shape, generator=generator)
    return state


def write_original(path: Path, state: dict[str, Tensor], layout: str) -> Path:
    """Save ``state`` as the original's training script does, in one of its three key layouts."""
    backbone_modules = ("swinViT.", "encoder", "decoder")
    net = {}
    for key, value in state.items():
        name = key
        if layout == "swinunetr-released" and key.startswith("backbone."):
            name = key.removeprefix("backbone.")
            assert name.startswith(backbone_modules)
        net[f"module.{name}"] = value
    torch.save({"net": net, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
                "scheduler": {"last_epoch": 450, "base_lrs": [1e-4]}, "epoch": 450}, path)
    return path


@pytest.fixture(scope="module")
def states() -> dict[str, dict[str, Tensor]]:
    return {"unet": random_state("unet", 1), "swinunetr": random_state("swinunetr", 2)}


@pytest.fixture(scope="module")
def converted(states, tmp_path_factory) -> dict[str, Path]:
    """Each layout written as the original would and converted with the default class table (31 classes)."""
    folder = tmp_path_factory.mktemp("original")
    classes = load_class_table()
    out = {}
    for layout, backbone in LAYOUT_BACKBONE.items():
        source = write_original(folder / f"{layout}.pth", states[backbone], layout)
        imported = import_original_checkpoint(source, folder / f"{layout}.pt", classes)
        assert (imported.layout, imported.backbone, imported.epoch) == (layout, backbone, 450)
        out[layout] = folder / f"{layout}.pt"
        out[f"{layout}-source"] = source
    return out


@pytest.mark.parametrize("layout", list(LAYOUT_BACKBONE))
def test_every_layout_converts_and_loads_strictly(layout, states, converted, classes) -> None:
    backbone = LAYOUT_BACKBONE[layout]
    model, meta = load_checkpoint(converted[layout], expected_class_names=classes.names)
    ours = model.state_dict()
    original = states[backbone]
    assert set(ours) == set(original)
    for key, value in original.items():
        if key != "organ_embedding":
            assert torch.equal(ours[key], value), key
    rows = ours["organ_embedding"]
    assert rows.shape == (31, 512)
    assert torch.equal(rows[classes.channel("Celiac Trunk")], original["organ_embedding"][24])  # "Celiac Truck"
    assert torch.equal(rows[classes.channel("Colon Tumor")], original["organ_embedding"][30])
    config = ModelConfig.from_dict(meta["model_config"])
    assert (config.backbone, config.backbone_variant, config.embedding_norm, config.head_negative_slope) == \
        (backbone, "original", "none", 0.0)
    assert meta["preprocessing"] == ORIGINAL_PREPROCESSING.to_dict()
    assert meta["extra"]["imported_from"]["layout"] == layout and meta["extra"]["trained_classes"] == classes.names


def test_swin_patch_merging_reads_the_original_sub_grids(converted) -> None:
    """Every patch merging of the converted Swin UNETR equals LayerNorm + reduction of the sub-grids in the
    original's order, read here independently, and never reads the (1,1,0) and (0,1,1) sub-grids."""
    model, _ = load_checkpoint(converted["swinunetr-released"])
    model.eval()
    seen: list[tuple[torch.nn.Module, Tensor, Tensor]] = []
    hooks = [module.register_forward_hook(lambda m, args, out: seen.append((m, args[0], out)))
             for module in model.modules() if isinstance(module, OriginalPatchMerging)]
    with torch.no_grad():
        model.backbone.swinViT(torch.randn(1, 1, 32, 32, 32))  # the Swin encoder: all four mergings
    for hook in hooks:
        hook.remove()
    assert len(seen) == 4
    with torch.no_grad():
        for module, x, out in seen:
            slices = [x[:, i::2, j::2, k::2, :] for i, j, k in ISSUE_MERGE_ORDER]
            merged = torch.cat(slices, dim=-1)
            normed = torch.nn.functional.layer_norm(merged, merged.shape[-1:], module.norm.weight, module.norm.bias)
            expected = normed @ module.reduction.weight.T
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
            unread = x.clone()
            unread[:, 1::2, 1::2, 0::2] += 5.0
            unread[:, 0::2, 1::2, 1::2] -= 5.0
            torch.testing.assert_close(module(unread), out, rtol=0, atol=0)
            monai_order = torch.cat([x[:, i::2, j::2, k::2, :] for i in (0, 1) for j in (0, 1) for k in (0, 1)], -1)
            other = torch.nn.functional.layer_norm(monai_order, merged.shape[-1:], module.norm.weight,
                                                   module.norm.bias) @ module.reduction.weight.T
            assert (other - out).abs().max() > 1e-2


def test_unet_normalises_with_the_batch_also_in_eval(converted) -> None:
    """The original U-Net's logits for a window depend on the other windows of the forward pass, in eval too, and
    never on the running statistics."""
    model, _ = load_checkpoint(converted["unet"])
    model.eval()
    a, b = torch.randn(1, 1, 16, 16, 16), 2.0 + torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        alone = model(a, classes=[0, 5])
        paired = model(torch.cat([a, b]), classes=[0, 5])[:1]
        assert (alone - paired).abs().max() > 1e-2
        for module in model.modules():
            if isinstance(module, BatchStatisticsNorm3d):
                module.running_mean.fill_(100.0)
                module.running_var.fill_(1e-3)
        torch.testing.assert_close(model(a, classes=[0, 5]), alone, rtol=0, atol=0)


def test_unet_running_statistics_are_an_explicit_other_function(converted) -> None:
    model, meta = load_checkpoint(converted["unet"])
    config = ModelConfig.from_dict({**meta["model_config"], "norm_statistics": "running"})
    assert config.batch_dependent is False and ModelConfig.from_dict(meta["model_config"]).batch_dependent
    running = build_model(config, model.organ_embedding)
    running.load_state_dict(model.state_dict())
    model.eval()
    running.eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        assert (model(x, classes=[0]) - running(x, classes=[0])).abs().max() > 1e-2
        torch.testing.assert_close(running(x[:1], classes=[0]), running(x, classes=[0])[:1], rtol=0, atol=1e-5)


def test_txt_encoding_imports_by_class_name_and_drives_the_heads(converted, shared_data, tmp_path) -> None:
    classes = load_class_table(include=["Kidney Cyst"])
    table_path = shared_data / "clip_universal" / "txt_encoding.pth"
    table = torch.load(table_path, map_location="cpu", weights_only=True).float()
    out = tmp_path / "unet_txt.pt"
    import_original_checkpoint(converted["unet-source"], out, classes, embeddings_path=table_path)
    model, meta = load_checkpoint(out, expected_class_names=classes.names)
    rows = model.organ_embedding
    assert rows.shape == (32, 512)
    for name, original_row in (("Celiac Trunk", 24), ("Aorta", 7), ("Kidney Cyst", 31), ("Spleen", 0)):
        assert torch.equal(rows[classes.channel(name)], table[original_row]), name
    assert meta["extra"]["imported_from"]["embeddings"] == str(table_path)
    own, _ = load_checkpoint(converted["unet"])
    x = torch.randn(1, 1, 16, 16, 16)
    model.eval()
    own.eval()
    with torch.no_grad():
        assert (model(x, classes=[0]) - own(x, classes=[0])).abs().max() > 1e-3


def test_cli_converts_with_the_optional_kidney_cyst_row(converted, states, tmp_path) -> None:
    out = tmp_path / "unet_cyst.pt"
    assert main(["import-checkpoint", "--source", str(converted["unet-source"]), "--out", str(out),
                 "--include-class", "Kidney Cyst"]) == 0
    names = load_class_table(include=["Kidney Cyst"]).names
    model, _ = load_checkpoint(out, expected_class_names=names)
    assert names[-1] == "Kidney Cyst"
    assert torch.equal(model.organ_embedding[-1], states["unet"]["organ_embedding"][31])


def test_unreadable_and_code_needing_files_are_refused(tmp_path, capsys) -> None:
    classes = load_class_table()
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointImportError, match=r"notes\.pth: not a torch checkpoint"):
        import_original_checkpoint(text, tmp_path / "out.pt", classes)
    code = tmp_path / "code.pth"
    torch.save({"net": {"organ_embedding": torch.zeros(32, 512)}, "args": argparse.Namespace(lr=1e-4)}, code)
    with pytest.raises(CheckpointImportError, match=r"code\.pth: refused: .*need code to load \(argparse\.Namespace\)"):
        import_original_checkpoint(code, tmp_path / "out.pt", classes)
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {"module.patch_embed.proj.weight": torch.zeros(2)}, "epoch": 3}, other)
    with pytest.raises(CheckpointImportError, match=r"expected a dict with 'net'.*keys \[state_dict, epoch\]"):
        import_original_checkpoint(other, tmp_path / "out.pt", classes)
    monai = tmp_path / "monai.pth"
    torch.save({"net": {"module.patch_embed.proj.weight": torch.zeros(2)}}, monai)
    with pytest.raises(CheckpointImportError, match=r"no swinViT or down_tr64 keys.*module\.patch_embed"):
        import_original_checkpoint(monai, tmp_path / "out.pt", classes)
    assert main(["import-checkpoint", "--source", str(code), "--out", str(tmp_path / "out.pt")]) == 2
    assert "code.pth: refused" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()


def test_wrong_keys_and_shapes_are_named(states, tmp_path) -> None:
    classes = load_class_table()
    state = dict(states["unet"])
    state["controller.weight"] = torch.zeros(153, 256, 1, 1, 1)
    del state["backbone.up_tr64.ops.1.bn1.running_var"]
    state["GAP.3.bias"] = torch.full((256,), float("nan"))
    state["backbone.out_tr.final_conv.weight"] = torch.zeros(32, 64, 1, 1, 1)
    source = write_original(tmp_path / "broken.pth", state, "unet")
    with pytest.raises(CheckpointImportError) as raised:
        import_original_checkpoint(source, tmp_path / "out.pt", classes)
    message = str(raised.value)
    assert "broken.pth" in message
    assert "missing keys: [backbone.up_tr64.ops.1.bn1.running_var]" in message
    assert "unexpected keys: [backbone.out_tr.final_conv.weight]" in message
    assert "wrong shapes: [controller.weight (153, 256, 1, 1, 1) (expected (153, 512, 1, 1, 1))]" in message
    assert "non-finite values: [GAP.3.bias]" in message
    half = {k: v for k, v in states["unet"].items()}
    half["organ_embedding"] = torch.zeros(31, 512)
    with pytest.raises(CheckpointImportError, match=r"organ_embedding has shape \(31, 512\), expected \(32, 512\)"):
        build_original_model(half, "unet", classes, "half.pth")


def test_classes_the_original_lacks_are_named(classes) -> None:
    thyroid = UniversalClass(40, "Thyroid", "A computerized tomography of a Thyroid", "organ", (1, 2, 3), "none")
    table = ClassTable((*classes.classes, thyroid), source="extended.yaml")
    with pytest.raises(CheckpointImportError, match=r"x\.pth: the original model has no class \['Thyroid'\]"):
        map_embedding_rows(torch.zeros(len(ORIGINAL_CLASS_ORDER), 512), table, "x.pth")


def test_preprocessing_records_are_checked() -> None:
    assert Preprocessing.from_dict(ORIGINAL_PREPROCESSING.to_dict(), "ck.pt") == ORIGINAL_PREPROCESSING
    cases = [({"spacing_mm": [1.5, 1.5], "window_hu": [0, 1], "roi": [96] * 3}, "spacing_mm must be 3 numbers"),
             ({"spacing_mm": [1.5] * 3, "window_hu": [250, -175], "roi": [96] * 3}, "high > low"),
             ({"spacing_mm": [1.5] * 3, "window_hu": [0, 1], "roi": [96.5] * 3}, "roi must be 3 int"),
             ({"spacing_mm": [1.5] * 3, "window_hu": [0, 1], "roi": [96] * 3, "orientation": "LPS"}, "'LPS'"),
             ({"spacing_mm": [1.5] * 3, "roi": [96] * 3, "grid": 1}, r"missing \['window_hu'\], unknown \['grid'\]")]
    for record, problem in cases:
        with pytest.raises(ValueError, match=rf"ck\.pt: preprocessing.*{problem}"):
            Preprocessing.from_dict(record, "ck.pt")


def test_bad_preprocessing_is_refused_before_a_checkpoint_is_written(tmp_path) -> None:
    config = ModelConfig(backbone="unet", features=(8, 8, 8, 8, 8, 8), embedding_norm="none")
    model = build_model(config, torch.randn(2, 512))
    path = tmp_path / "tiny.pt"
    with pytest.raises(ValueError, match=r"tiny\.pt: preprocessing roi must be 3 numbers"):
        save_checkpoint(path, model, config, ["Spleen", "Liver"], preprocessing={**ORIGINAL_PREPROCESSING.to_dict(),
                                                                                 "roi": [96, 96]})
    assert not path.exists()
    save_checkpoint(path, model, config, ["Spleen", "Liver"], preprocessing=ORIGINAL_PREPROCESSING.to_dict())
    assert load_checkpoint(path)[1]["preprocessing"] == ORIGINAL_PREPROCESSING.to_dict()


def test_model_config_variants_are_checked_and_default_to_ours() -> None:
    with pytest.raises(ValueError, match="backbone_variant"):
        ModelConfig(backbone_variant="genesis")
    with pytest.raises(ValueError, match="norm_statistics"):
        ModelConfig(norm_statistics="instance")
    older = {k: v for k, v in ModelConfig().to_dict().items() if k not in ("backbone_variant", "norm_statistics")}
    assert ModelConfig.from_dict(older).backbone_variant == "monai"
    assert not ModelConfig(backbone="unet", backbone_variant="monai").batch_dependent


def test_inference_takes_the_checkpoints_preprocessing(caplog) -> None:
    requested = InferenceSettings(spacing=(4.0, 4.0, 4.0), window_hu=(-100.0, 200.0), roi=(64, 64, 64),
                                  sw_batch_size=4)
    given = {"spacing": requested.spacing, "window_hu": requested.window_hu, "roi": requested.roi}
    ours = {"model_config": ModelConfig().to_dict()}
    assert windows_per_pass("ours.pt", ours, settings_from_checkpoint("ours.pt", ours, requested, **given)) == \
        requested
    original = {"model_config": ModelConfig(backbone="unet", backbone_variant="original").to_dict(),
                "preprocessing": ORIGINAL_PREPROCESSING.to_dict()}
    with caplog.at_level(logging.WARNING):
        chosen = windows_per_pass("unet.pt", original, settings_from_checkpoint("unet.pt", original, requested))
    assert (chosen.spacing, chosen.window_hu, chosen.roi, chosen.sw_batch_size) == \
        ((1.5, 1.5, 1.5), (-175.0, 250.0), (96, 96, 96), 1)
    assert "one sliding window per forward pass" in caplog.text
    swin = {**original, "model_config": ModelConfig(backbone="swinunetr", backbone_variant="original").to_dict()}
    assert windows_per_pass("swin.pt", swin, requested).sw_batch_size == 4


def test_a_converted_model_segments_the_demo_external_set(converted, catalog, tmp_path) -> None:
    """End to end: the converted U-Net predicts the demo's external CT into OME-Zarr, on the grid its checkpoint
    names (coarsened here to 12 mm and 32³ windows to fit a CPU test). The converted Swin UNETR goes through the
    same code; it needs windows of 64³ or more (its deepest instance norm needs more than one voxel), 12 s each on
    two CPU cores, so its conversion and layers are tested above instead."""
    classes = load_class_table()
    roots = write_demo_data(tmp_path / "demo", cases_per_dataset=1, external_cases=1)
    cases = find_cases(catalog["demo_external"], roots["demo_external"])
    record = torch.load(converted["unet"], map_location="cpu", weights_only=True)
    record["preprocessing"] = Preprocessing((12.0, 12.0, 12.0), (-175.0, 250.0), (32, 32, 32)).to_dict()
    checkpoint = tmp_path / "unet_coarse.pt"
    torch.save(record, checkpoint)
    out = tmp_path / "predictions"
    run = load_run(checkpoint, classes, InferenceSettings())
    assert [o.status for o in infer_cases(cases, run, classes, out, out / "batch_0.tsv")] == ["ok"]
    image, organs, _, attrs = read_prediction(out / f"{cases[0].case_id}.ome.zarr")
    assert attrs["spacing_model_mm"] == [12.0, 12.0, 12.0]
    assert attrs["predicted_classes"] == classes.names
    assert organs.shape == image.shape and organs.dtype == np.uint8
