"""Tests of universal.model.network: the dynamic heads, backbones, embeddings loading and checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from universal.model.network import (
    HEAD_SPLITS,
    ModelConfig,
    UniversalModel,
    apply_heads,
    build_model,
    load_checkpoint,
    load_embeddings,
    save_checkpoint,
)

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
TINY_UNET = ModelConfig(backbone="unet", features=(8, 8, 16, 16, 32, 8), embedding_norm="none")


@pytest.fixture
def tiny_model() -> UniversalModel:
    torch.manual_seed(0)
    return build_model(TINY_UNET, torch.randn(5, 512))


def reference_heads(model: UniversalModel, x: torch.Tensor, negative_slope: float = 0.0) -> torch.Tensor:
    """The original's per-sample loop: repeated 8-channel features and grouped 1×1×1 convolutions (its ReLUs
    leaky by ``negative_slope``)."""
    deep, full = model.backbone(x)
    classes = model.organ_embedding.shape[0]
    task = F.relu(model.text_to_vision(model.organ_embedding)).unsqueeze(2).unsqueeze(2).unsqueeze(2)
    x_feat = model.GAP(deep)
    head_in = model.precls_conv(full)
    outputs = []
    for i in range(x.shape[0]):
        condition = torch.cat([x_feat[i].unsqueeze(0).repeat(classes, 1, 1, 1, 1), task], 1)
        params = model.controller(condition).squeeze(-1).squeeze(-1).squeeze(-1)
        w1, w2, w3, b1, b2, b3 = params.split([64, 64, 8, 8, 8, 1], dim=1)
        h = head_in[i:i + 1].repeat(1, classes, 1, 1, 1)
        h = F.leaky_relu(F.conv3d(h, w1.reshape(classes * 8, 8, 1, 1, 1), b1.reshape(-1), groups=classes),
                         negative_slope)
        h = F.leaky_relu(F.conv3d(h, w2.reshape(classes * 8, 8, 1, 1, 1), b2.reshape(-1), groups=classes),
                         negative_slope)
        outputs.append(F.conv3d(h, w3.reshape(classes, 8, 1, 1, 1), b3.reshape(-1), groups=classes))
    return torch.cat(outputs, 0)


def test_output_shape_and_class_subset(tiny_model: UniversalModel) -> None:
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        full = tiny_model(x)
        subset = tiny_model(x, classes=[3, 0])
    assert full.shape == (2, 5, 32, 32, 32)
    torch.testing.assert_close(subset, full[:, [3, 0]], rtol=0, atol=1e-6)


def test_batched_heads_equal_the_original_loop(tiny_model: UniversalModel) -> None:
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(x), reference_heads(tiny_model, x), rtol=0, atol=1e-5)
        model64, x64 = tiny_model.double(), x.double()
        torch.testing.assert_close(model64(x64), reference_heads(model64, x64), rtol=0, atol=1e-12)


def test_leaky_heads_equal_the_loop_with_leaky_activations() -> None:
    torch.manual_seed(0)
    leaky = build_model(ModelConfig(**{**TINY_UNET.to_dict(), "head_negative_slope": 0.1}), torch.randn(5, 512))
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        out = leaky(x)
        torch.testing.assert_close(out, reference_heads(leaky, x, 0.1), rtol=0, atol=1e-5)
        leaky.head_negative_slope = 0.0
        assert (out - leaky(x)).abs().max() > 1e-3


def test_leaky_heads_keep_a_gradient_where_relu_units_are_all_off() -> None:
    features = torch.ones(1, 8, 1, 1, 1)
    params = torch.zeros(1, 1, 153)
    w1, _, w3, _, b2, b3 = params[0, 0].split(HEAD_SPLITS)
    w1.copy_(torch.eye(8).flatten())
    b2.fill_(-1.0)  # every second-layer unit off: under ReLU the logit is b3 whatever w2 is
    w3.fill_(1.0)
    b3.fill_(-2.0)
    gradients = {}
    for slope in (0.0, 0.1):
        trained = params.clone().requires_grad_(True)
        logit = apply_heads(features, trained, slope)
        logit.sum().backward()
        gradients[slope] = trained.grad[0, 0].split(HEAD_SPLITS)
        assert logit.item() == pytest.approx(-2.0 - 8 * slope)  # each unit: slope * (-1)
    assert gradients[0.0][1].abs().max() == 0  # w2: no gradient through dead units
    torch.testing.assert_close(gradients[0.1][1], torch.full((64,), 0.1))  # d logit / d w2[i, j] = 0.1 * h1[j]


def test_centred_embeddings_drop_the_shared_direction() -> None:
    torch.manual_seed(0)
    shared = torch.randn(512) * 10
    embeddings = shared + torch.randn(4, 512)
    model = build_model(ModelConfig(backbone="unet", features=(8, 8, 16, 16, 32, 8)), embeddings)
    assert "embedding_center" in model.state_dict()
    torch.testing.assert_close(model.embedding_center, embeddings.mean(0))
    centred = embeddings - embeddings.mean(0)
    expected_task = torch.relu(model.text_to_vision(torch.nn.functional.normalize(centred, dim=1) * 512 ** 0.5))
    deep = torch.randn(1, 32, 2, 2, 2)
    image = model.GAP(deep).flatten(1)
    condition = torch.cat([image.expand(4, -1), expected_task], dim=1)
    expected = torch.nn.functional.linear(condition, model.controller.weight.flatten(1), model.controller.bias)
    with torch.no_grad():
        torch.testing.assert_close(model.head_parameters(deep)[0], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.head_parameters(deep, [2])[0, 0], expected[2], rtol=0, atol=1e-5)


def test_chunked_heads_without_grad_equal_all_at_once(tiny_model: UniversalModel) -> None:
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        tiny_model.head_chunk_classes = 0
        whole = tiny_model(x)
        tiny_model.head_chunk_classes = 2
        torch.testing.assert_close(tiny_model(x), whole, rtol=0, atol=1e-6)


def test_gradients_reach_heads_and_backbone(tiny_model: UniversalModel) -> None:
    tiny_model(torch.randn(1, 1, 32, 32, 32), classes=[1]).square().mean().backward()
    assert tiny_model.controller.weight.grad.abs().sum() > 0
    assert tiny_model.backbone.conv_0.conv_0.conv.weight.grad.abs().sum() > 0
    assert not tiny_model.organ_embedding.requires_grad


def test_frozen_heads_train_the_features_only(tiny_model: UniversalModel) -> None:
    """A loss on a frozen (sample, class) pair reaches the backbone and precls_conv but not the head generator;
    the logits are those of the unfrozen model, and the other pairs keep their generator gradient."""
    x = torch.randn(2, 1, 32, 32, 32)
    frozen = torch.tensor([[True, False], [False, False]])
    logits = tiny_model(x, classes=[1, 3], frozen_heads=frozen)
    torch.testing.assert_close(logits, tiny_model(x, classes=[1, 3]), rtol=0, atol=0)
    generator = [tiny_model.controller.weight, tiny_model.text_to_vision.weight, tiny_model.GAP[-1].weight]
    features = [tiny_model.backbone.conv_0.conv_0.conv.weight, tiny_model.precls_conv[-1].weight]
    logits[0, 0].square().mean().backward()  # the frozen pair alone
    assert all(p.grad is None or (p.grad == 0).all() for p in generator)
    assert all(p.grad.abs().sum() > 0 for p in features)
    tiny_model.zero_grad()
    tiny_model(x, classes=[1, 3], frozen_heads=frozen)[0, 1].square().mean().backward()  # sample 0's other pair
    assert all(p.grad.abs().sum() > 0 for p in generator)
    with pytest.raises(ValueError, match="frozen_heads"):
        tiny_model(x, classes=[1, 3], frozen_heads=frozen[:, :1])


def _original_keys(backbone: str) -> set[str]:
    path = REFERENCE / f"original_state_dict_{backbone}.tsv"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return {line.split("\t")[0] for line in path.read_text().splitlines() if line and not line.startswith("#")}


def test_head_names_match_the_original(tiny_model: UniversalModel) -> None:
    ours = {k for k in tiny_model.state_dict() if not k.startswith("backbone.")}
    assert ours == {k for k in _original_keys("unet") if not k.startswith("backbone.")}


def test_swinunetr_names_match_the_original() -> None:
    model = build_model(ModelConfig(backbone="swinunetr", feature_size=12, embedding_norm="none"), torch.randn(3, 512))
    assert set(model.state_dict()) == _original_keys("swinunetr")


def test_swinunetr_forward() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="swinunetr", feature_size=12, window_size=4), torch.randn(3, 512))
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64, 64), classes=[2]).shape == (1, 1, 64, 64, 64)


def test_config_round_trip_and_errors() -> None:
    assert ModelConfig.from_dict(TINY_UNET.to_dict()) == TINY_UNET
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="backbone"):
        ModelConfig(backbone="vnet")
    with pytest.raises(ValueError, match="head_negative_slope"):
        ModelConfig(head_negative_slope=1.5)
    with pytest.raises(ValueError, match="embedding_dim"):
        build_model(TINY_UNET, torch.randn(3, 256))


def test_load_embeddings_reorders_and_names_missing(tmp_path: Path) -> None:
    table = torch.arange(6, dtype=torch.float16).reshape(3, 2)
    path = tmp_path / "prompts.pt"
    torch.save({"embeddings": table, "class_names": ["A", "B", "C"], "prompts": [], "encoder": {}}, path)
    rows = load_embeddings(path, ["C", "A"])
    assert rows.dtype == torch.float32
    assert rows.tolist() == [[4.0, 5.0], [0.0, 1.0]]
    with pytest.raises(ValueError, match=r"\['D', 'E'\]"):
        load_embeddings(path, ["A", "D", "E"])


def test_checkpoint_round_trip(tiny_model: UniversalModel, tmp_path: Path) -> None:
    names = ["Spleen", "Liver", "Pancreas", "Liver Tumor", "Aorta"]
    path = tmp_path / "ck" / "model.pt"
    save_checkpoint(path, tiny_model, TINY_UNET, names, {"step": 7, "rng": torch.ones(3)})
    assert not list(path.parent.glob("*.tmp"))
    raw = torch.load(path, weights_only=True)
    assert raw["class_names"] == names and raw["extra"]["step"] == 7
    model, meta = load_checkpoint(path, expected_class_names=names)
    assert meta["model_config"] == TINY_UNET.to_dict() and "model" not in meta
    x = torch.randn(1, 1, 32, 32, 32)
    model.eval()
    tiny_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), tiny_model(x), rtol=0, atol=0)


def test_checkpoint_class_mismatch_names_classes(tiny_model: UniversalModel, tmp_path: Path) -> None:
    names = ["Spleen", "Liver", "Pancreas", "Liver Tumor", "Aorta"]
    path = tmp_path / "model.pt"
    save_checkpoint(path, tiny_model, TINY_UNET, names)
    with pytest.raises(ValueError, match=r"missing from the checkpoint: \['Stomach'\]; not expected: \['Aorta'\]"):
        load_checkpoint(path, expected_class_names=[*names[:4], "Stomach"])
    with pytest.raises(ValueError, match="another order"):
        load_checkpoint(path, expected_class_names=names[::-1])
