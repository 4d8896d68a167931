"""Tests of universal.train.loop: a few steps on a tiny synthetic store, checkpoints and exact resumption."""

from __future__ import annotations

import csv
import errno
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from synthetic import write_sphere_case

import universal.train.loop as train_module
from universal.core.atomic import DiskFullError
from universal.core.classes import default_class_table_path, load_class_table
from universal.data.store import StoreError
from universal.model.network import ModelConfig, UniversalModel, build_model, load_checkpoint
from universal.train.checkpoints import latest_checkpoint, parameter_groups, rng_state, set_rng_state
from universal.train.config import TrainConfig, lr_at_step, train_config_from_options
from universal.train.cpu_bf16 import convolution_cases, weight_gradient_error
from universal.train.loop import train
from universal.train.patches import PatchConfig

SHAPE = (40, 40, 40)
TINY_UNET = ModelConfig(backbone="unet", features=(8, 8, 16, 16, 32, 8))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """Two one-case stores (kidneys with a tumour; liver) and an embeddings file for the default class table."""
    root = tmp_path_factory.mktemp("train_inputs")
    classes = load_class_table()
    rng = np.random.default_rng(0)
    stores = []
    for name, spheres in {"kidney": [("Right Kidney", (28, 20, 20), 6, 80), ("Left Kidney", (11, 20, 20), 6, 80),
                                     ("Kidney Tumor", (11, 20, 20), 3, 80)],
                          "liver": [("Liver", (24, 18, 20), 6, 80)]}.items():
        write_sphere_case(root / f"{name}.zarr", f"{name}_0", classes, spheres, rng, name)
        stores.append(str(root / f"{name}.zarr"))
    embeddings = root / "prompts.pt"
    fixed = torch.Generator().manual_seed(0)  # the same embeddings whichever tests ran before
    torch.save({"embeddings": torch.randn(len(classes), 512, generator=fixed), "class_names": classes.names,
                "prompts": classes.prompts, "encoder": {"model": "random"}}, embeddings)
    return {"stores": stores, "embeddings": str(embeddings)}


def _config(inputs: dict, out_dir: Path, **changes) -> TrainConfig:
    options = {"stores": inputs["stores"], "embeddings": inputs["embeddings"], "out_dir": str(out_dir),
               "model": TINY_UNET,
               "patches": PatchConfig(patch_size=(32, 32, 32)), "batch_size": 2, "steps": 6, "warmup_steps": 2,
               "lr": 1e-3, "checkpoint_every": 3, "num_workers": 0, "amp": "off", "device": "cpu"}
    return TrainConfig(**{**options, **changes})


def _losses(out_dir: Path) -> list[tuple[int, str]]:
    with (out_dir / "train_log.csv").open() as f:
        return [(int(row["step"]), row["loss"]) for row in csv.DictReader(f)]


def test_train_writes_log_and_checkpoints(inputs: dict, tmp_path: Path) -> None:
    final = train(_config(inputs, tmp_path))
    assert final == tmp_path / "final.pt"
    assert [step for step, _ in _losses(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(float(loss)) for _, loss in _losses(tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000003.pt", "step_00000006.pt"]
    record = torch.load(latest_checkpoint(tmp_path), weights_only=True)
    assert record["extra"]["step"] == 6 and "optimizer" in record["extra"] and "rng" in record["extra"]
    model, meta = load_checkpoint(final, expected_class_names=load_class_table().names)
    assert meta["extra"]["step"] == 6 and model.num_classes == 31
    assert meta["extra"]["trained_classes"] == ["Right Kidney", "Left Kidney", "Liver", "Kidney Tumor"]
    assert list((tmp_path / "tensorboard").iterdir())


def test_resumed_run_repeats_the_uninterrupted_losses(inputs: dict, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # The head generator at its own learning rate: the resumed optimizer keeps both groups' scales.
    whole = tmp_path / "whole"
    train(_config(inputs, whole, generator_lr_scale=0.5))

    broken = tmp_path / "broken"
    real_step = train_module.train_step
    calls = []

    def crash_on_fifth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated kill")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        train(_config(inputs, broken, generator_lr_scale=0.5))
    monkeypatch.setattr(train_module, "train_step", real_step)
    assert [step for step, _ in _losses(broken)] == [1, 2, 3, 4]
    assert latest_checkpoint(broken).name == "step_00000003.pt"

    train(_config(inputs, broken, generator_lr_scale=0.5))  # resumes at step 3, redoes step 4
    assert _losses(broken) == _losses(whole)


def test_head_generator_trains_at_its_own_learning_rate(inputs: dict, tmp_path: Path) -> None:
    train(_config(inputs, tmp_path, generator_lr_scale=0.1, steps=4, checkpoint_every=4))
    record = torch.load(latest_checkpoint(tmp_path), weights_only=True)
    rest, generator = record["extra"]["optimizer"]["param_groups"]
    assert rest["lr"] == pytest.approx(lr_at_step(3, _config(inputs, tmp_path, steps=4)))
    assert generator["lr"] == pytest.approx(0.1 * rest["lr"])
    model, _ = load_checkpoint(tmp_path / "final.pt")
    groups = parameter_groups(model, 0.1)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    assert [names[id(p)] for p in groups[1]["params"]] == ["text_to_vision.weight", "text_to_vision.bias",
                                                           "controller.weight", "controller.bias"]
    assert len(generator["params"]) == 4 and len(rest["params"]) == len(names) - 4


def test_training_manifest_lists_every_case_with_its_probability(inputs: dict, tmp_path: Path) -> None:
    train(_config(inputs, tmp_path, steps=1, weights=[1.0, 3.0]))
    with (tmp_path / "training_manifest.tsv").open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [(r["dataset"], r["case_id"], float(r["case_probability"])) for r in rows] == [
        ("kidney", "kidney_0", 0.25), ("liver", "liver_0", 0.75)]


def test_validation_dice_is_logged(inputs: dict, tmp_path: Path) -> None:
    liver = inputs["stores"][1]
    train(_config(inputs, tmp_path, steps=4, val_stores=[Path(liver)], val_every=2))
    with (tmp_path / "val_log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["step"]), r["dataset"], r["case_id"], r["class"]) for r in rows] == [
        (2, "liver", "liver_0", "Liver"), (4, "liver", "liver_0", "Liver")]
    for row in rows:
        dice = float(row["dice"])
        assert np.isnan(dice) or 0.0 <= dice <= 1.0


def test_validation_skips_classes_training_never_sees(inputs: dict, tmp_path: Path) -> None:
    held_out = tmp_path / "held_out.zarr"
    write_sphere_case(held_out, "ext_0", load_class_table(),
                      [("Liver", (24, 18, 20), 6, 80), ("Spleen", (10, 28, 20), 5, 90)], np.random.default_rng(1),
                      "external")
    train(_config(inputs, tmp_path / "run", steps=2, val_stores=[held_out], val_every=2))
    with (tmp_path / "run" / "val_log.csv").open() as f:
        assert [(r["case_id"], r["class"]) for r in csv.DictReader(f)] == [("ext_0", "Liver")]


def test_validation_keeps_resumed_losses(inputs: dict, tmp_path: Path) -> None:
    train(_config(inputs, tmp_path / "plain", steps=4))
    train(_config(inputs, tmp_path / "val", steps=4, val_stores=[inputs["stores"][1]], val_every=1))
    assert _losses(tmp_path / "val") == _losses(tmp_path / "plain")


def test_bf16_autocast_on_cpu_runs(inputs: dict, tmp_path: Path) -> None:
    # 48-voxel patches: the U-Net's levels are 48, 24, 12, 6 and 3 voxels deep, none of them 2 (see below)
    train(_config(inputs, tmp_path, steps=2, amp="auto", bf16_on_cpu=True, patches=PatchConfig(patch_size=(48,) * 3)))
    assert all(np.isfinite(float(loss)) for _, loss in _losses(tmp_path))
    weights = torch.load(tmp_path / "final.pt", weights_only=True)["model"]
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def _convolutions_at_32() -> dict:
    """The convolutions of the tests' U-Net on a batch of two 32³ patches, by module name."""
    model = build_model(TINY_UNET, torch.zeros(3, 512))
    return {case.name: case for case in convolution_cases(model, (2, 1, 32, 32, 32))}


def test_bf16_check_finds_the_convolutions_of_a_training_batch() -> None:
    cases = _convolutions_at_32()
    assert cases["backbone.conv_0.conv_0.conv"].input_shape == (2, 1, 32, 32, 32)
    assert cases["backbone.down_4.convs.conv_0.conv"].input_shape == (2, 16, 2, 2, 2)
    assert cases["backbone.down_4.convs.conv_0.conv"].weight_shape == (32, 16, 3, 3, 3)
    assert cases["backbone.upcat_4.upsample.deconv"].transposed
    assert weight_gradient_error(cases["backbone.conv_0.conv_0.conv"]) < 0.01  # bf16 rounding, about 0.003


def test_bf16_on_cpu_refuses_a_patch_whose_gradients_the_cpu_gets_wrong(inputs: dict, tmp_path: Path) -> None:
    if weight_gradient_error(_convolutions_at_32()["backbone.down_4.convs.conv_0.conv"]) < 0.05:
        pytest.skip("this CPU's bf16 convolutions get the 2-voxel-deep U-Net level right")
    with pytest.raises(ValueError, match=r"for batches of \[2, 1, 32, 32, 32\]: .*backbone\.down_4\.convs\.conv_0"
                                         r"\.conv on \[2, 16, 2, 2, 2\]"):
        train(_config(inputs, tmp_path / "run", steps=2, amp="auto", bf16_on_cpu=True))
    assert not (tmp_path / "run").exists()


def test_diverging_run_skips_nonfinite_steps_then_stops(inputs: dict, tmp_path: Path) -> None:
    # lr 1e30: step 1 throws every weight to ~1e29, and from step 2 on the forward pass overflows to NaN
    with pytest.raises(RuntimeError, match=r"step 4: 3 steps in a row \(from step 2\).*max_nonfinite_steps = 2"):
        train(_config(inputs, tmp_path, steps=8, lr=1e30, max_nonfinite_steps=2))
    assert [step for step, _ in _losses(tmp_path)] == [1, 2, 3, 4]
    assert np.isfinite(float(_losses(tmp_path)[0][1])) and all(loss == "nan" for _, loss in _losses(tmp_path)[1:])
    after_step_1 = torch.load(tmp_path / "checkpoints" / "step_00000003.pt", weights_only=True)["model"]
    assert all(torch.isfinite(tensor).all() for tensor in after_step_1.values())  # clipping by NaN never applied


def test_max_nonfinite_steps_must_not_be_negative(inputs: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_nonfinite_steps must be >= 0, got -1"):
        _config(inputs, tmp_path, max_nonfinite_steps=-1)


def test_generator_lr_scale_must_be_positive(inputs: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="generator_lr_scale"):
        _config(inputs, tmp_path, generator_lr_scale=0.0)


def test_loss_options_are_checked(inputs: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="loss_average must be one of"):
        _config(inputs, tmp_path, loss_average="class")
    with pytest.raises(ValueError, match="missed_weight must be >= 1"):
        _config(inputs, tmp_path, missed_weight=0.0)
    with pytest.raises(ValueError, match="missed_classes must be one of"):
        _config(inputs, tmp_path, missed_classes="organs")
    for below in (0.0, 0.6):
        with pytest.raises(ValueError, match="missed_below must be in"):
            _config(inputs, tmp_path, missed_below=below)
    for exclusion in (True, "organs"):  # True: a config written when the option was a boolean
        with pytest.raises(ValueError, match=r"exclusion_negatives must be one of \('none', 'all', 'tumours'\)"):
            _config(inputs, tmp_path, exclusion_negatives=exclusion)


def test_missed_weight_for_tumours_weighs_the_tumour_channels_only(inputs: dict, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``missed_classes: tumours`` the loss gets the batch's channels with the kidney tumour's alone marked;
    with ``all``, no restriction; ``missed_below`` reaches the loss as set."""
    real_loss = train_module.masked_bce_dice_loss
    seen = []

    def recording_loss(logits, targets, mask, smooth, average, missed_weight, missed_channels, missed_below,
                       negatives):
        seen.append((logits.shape[1], missed_weight, missed_channels, missed_below))
        return real_loss(logits, targets, mask, smooth, average, missed_weight, missed_channels, missed_below,
                         negatives)

    monkeypatch.setattr(train_module, "masked_bce_dice_loss", recording_loss)
    kidney = inputs["stores"][:1]
    train(_config(inputs, tmp_path / "tumours", steps=1, missed_weight=50.0, missed_classes="tumours",
                  missed_below=0.2, stores=kidney))
    train(_config(inputs, tmp_path / "all", steps=1, missed_weight=50.0, stores=kidney))
    (channels, weight, tumours, below), (_, _, every, default_below) = seen
    assert channels == 3 and weight == 50.0 and every is None  # kidney store: right, left kidney, kidney tumour
    assert tumours.tolist() == [False, False, True]
    assert below == 0.2 and default_below == 0.01


@pytest.mark.parametrize("exclusion", ["none", "all", "tumours"])
def test_exclusion_negatives_run_the_heads_with_known_voxels(inputs: dict, tmp_path: Path, exclusion: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``exclusion_negatives`` a step also runs the heads of the trained classes its batch does not annotate
    but has known negatives of: a class a sample does not annotate gets as known negatives the voxels of the
    classes it does (in these stores each excludes the other store's), with ``"tumours"`` those of its tumours
    only, and the heads of the pairs a sample does not annotate are frozen (the negatives train the features).
    With ``"none"`` only the batch's annotated heads run, none frozen, and the loss gets no negatives."""
    real_loss, real_forward = train_module.masked_bce_dice_loss, UniversalModel.forward
    seen, frozen = [], []

    def recording_loss(logits, targets, mask, *options):
        seen.append((logits.shape[1], targets, mask, options[3], options[-1]))
        return real_loss(logits, targets, mask, *options)

    def recording_forward(self, x, classes=None, frozen_heads=None):
        frozen.append(frozen_heads)
        return real_forward(self, x, classes, frozen_heads)

    monkeypatch.setattr(train_module, "masked_bce_dice_loss", recording_loss)
    monkeypatch.setattr(UniversalModel, "forward", recording_forward)
    train(_config(inputs, tmp_path, steps=3, exclusion_negatives=exclusion, missed_classes="tumours"))
    assert len(seen) == 3 and len(frozen) == 3
    for (channels, targets, mask, tumour, negatives), frozen_heads in zip(seen, frozen, strict=True):
        if exclusion == "none":
            assert negatives is None and frozen_heads is None and channels == int(mask.any(dim=0).sum())
            continue
        assert torch.equal(frozen_heads, ~mask)
        with_known = negatives.flatten(2).any(dim=2).any(dim=0)
        assert (mask.any(dim=0) | with_known).all()  # every head that runs is annotated or has known negatives
        assert channels == 4 or exclusion == "tumours"  # right kidney, left kidney, liver, kidney tumour
        sources = tumour if exclusion == "tumours" else torch.ones_like(tumour)
        for sample in range(mask.shape[0]):
            labelled = targets[sample][mask[sample] & sources].any(dim=0)
            for channel in range(channels):
                expected = torch.zeros_like(labelled) if mask[sample, channel] else labelled
                assert torch.equal(negatives[sample, channel], expected)
    if exclusion != "none":
        assert any(negatives.any() for *_, negatives in seen)


def test_learning_rate_schedule(inputs: dict, tmp_path: Path) -> None:
    config = _config(inputs, tmp_path, steps=110, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    assert lr_at_step(0, config) == pytest.approx(1e-4)
    assert lr_at_step(9, config) == pytest.approx(1e-3)
    assert lr_at_step(60, config) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert lr_at_step(110, config) == pytest.approx(1e-5)


def test_rng_state_survives_weights_only_load(tmp_path: Path) -> None:
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(2), np.random.rand(2), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(2), expected[0])
    assert np.array_equal(np.random.rand(2), expected[1]) and random.random() == expected[2]


def test_config_from_flat_options(inputs: dict, tmp_path: Path) -> None:
    options = {"backbone": "unet", "features": [16, 16, 32, 64, 128, 16], "patch_size": [64, 64, 64],
               "batch_size": 2, "steps": 500, "bf16_on_cpu": True, "device": "cpu",
               "val_stores": [Path(inputs["stores"][1])], "val_every": 100, "val_cases": 2, "val_overlap": 0.5}
    config = train_config_from_options(options, stores=inputs["stores"], weights=[1.0, 2.0],
                                       embeddings=inputs["embeddings"], classes=None, include_classes=[],
                                       out_dir=tmp_path)
    assert config.model.features == (16, 16, 32, 64, 128, 16) and config.patches.patch_size == (64, 64, 64)
    assert config.steps == 500 and config.bf16_on_cpu and config.weights == [1.0, 2.0]
    assert config.val_stores == [inputs["stores"][1]] and config.val_every == 100
    assert config.val_cases == 2 and config.val_overlap == 0.5
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="bogus"):
        train_config_from_options({"bogus": 1}, stores=[], weights=None, embeddings="e", classes=None,
                                  include_classes=[], out_dir=tmp_path)


def test_checkpoints_record_the_grid_window_and_roi_inference_needs(inputs: dict, tmp_path: Path) -> None:
    train(_config(inputs, tmp_path, steps=3, checkpoint_every=3))
    for path in (tmp_path / "final.pt", latest_checkpoint(tmp_path)):
        record = torch.load(path, weights_only=True)
        assert record["preprocessing"] == {"spacing_mm": [2.0, 2.0, 2.0], "window_hu": [-175.0, 250.0],
                                           "roi": [32, 32, 32], "orientation": "RAS"}


def _swapped_table(tmp_path: Path) -> Path:
    """The default class table with the indices of Liver and Spleen swapped, as an edit after harmonization."""
    doc = yaml.safe_load(default_class_table_path().read_text())
    rows = {row["name"]: row for row in doc["classes"]}
    rows["Liver"]["index"], rows["Spleen"]["index"] = rows["Spleen"]["index"], rows["Liver"]["index"]
    path = tmp_path / "classes.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_store_harmonized_with_another_class_table_is_refused(inputs: dict, tmp_path: Path) -> None:
    table = _swapped_table(tmp_path)
    built, now = load_class_table().digest(), load_class_table(table).digest()
    with pytest.raises(StoreError, match=rf"kidney\.zarr: harmonized with the class table of digest {built}, but "
                                         rf"training uses .*classes\.yaml of digest {now} \(class by class, built "
                                         r"with -> now: Spleen -> Liver, Liver -> Spleen\).*Re-run harmonize"):
        train(_config(inputs, tmp_path / "out", steps=1, class_table=str(table)))
    assert not (tmp_path / "out").exists()


def test_a_validation_store_without_a_digest_is_refused(inputs: dict, tmp_path: Path) -> None:
    from universal.core.volume import Volume
    from universal.data.store import write_case

    bare = tmp_path / "bare.zarr"
    case = Volume(np.zeros((8, 8, 8), np.int16), np.eye(4))
    write_case(bare, "c0", case, Volume(np.zeros((8, 8, 8), np.uint8), np.eye(4)), {"midline_x_mm": 0.0})
    with pytest.raises(StoreError, match=r"bare\.zarr: the store records no class_table_digest.*re-run harmonize"):
        train(_config(inputs, tmp_path / "out", steps=1, val_stores=[str(bare)], val_every=1))


@pytest.mark.parametrize(("backbone", "size"), [("unet", (16, 16, 16)), ("unet", (32, 32, 8)), ("unet", (24, 24, 24)),
                                                ("swinunetr", (32, 32, 32)), ("swinunetr", (48, 48, 48))])
def test_a_patch_size_the_backbone_cannot_take_is_refused_at_config_time(inputs: dict, tmp_path: Path, backbone: str,
                                                                         size: tuple) -> None:
    model = TINY_UNET if backbone == "unet" else ModelConfig(backbone="swinunetr", feature_size=12)
    with pytest.raises(ValueError, match=rf"patch_size \[{size[0]}, .*too small for the {backbone} backbone"):
        _config(inputs, tmp_path, model=model, patches=PatchConfig(patch_size=size, rotate90_prob=0.0))


@pytest.mark.parametrize(("backbone", "size"), [("unet", (32, 32, 32)), ("unet", (32, 32, 16)),
                                                ("swinunetr", (64, 64, 32)), ("swinunetr", (96, 96, 96))])
def test_patch_sizes_the_backbone_takes_pass(inputs: dict, tmp_path: Path, backbone: str, size: tuple) -> None:
    model = TINY_UNET if backbone == "unet" else ModelConfig(backbone="swinunetr", feature_size=12)
    assert _config(inputs, tmp_path, model=model, patches=PatchConfig(patch_size=size)).patches.patch_size == size


def test_a_full_disk_while_logging_is_named(inputs: dict, tmp_path: Path, monkeypatch) -> None:
    def full(self, row: dict) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_module.TrainLog, "write", full)
    with pytest.raises(DiskFullError, match=r"train_log\.csv: cannot write it, the disk \(or the quota\) is full.*"
                                            r"a rerun resumes from the newest"):
        train(_config(inputs, tmp_path, steps=1))
