"""Tests of universal.infer.sliding: MONAI's Gaussian sliding window, in float16, over the body only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from universal.core.classes import load_class_table
from universal.infer.sliding import body_box, predict_logits, window_starts


class ConvHeads(torch.nn.Module):
    """A real (if small) network with the universal model's call: one random 3×3×3 convolution per class,
    asymmetric in x, so a left-right mirror changes its output. Counts the windows it sees."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, classes, 3, padding=1)
        self.windows = 0

    def forward(self, x: torch.Tensor, classes: list[int]) -> torch.Tensor:
        self.windows += x.shape[0]
        return 4.0 * self.conv(x)[:, classes]


def test_the_windows_cover_an_axis_flush_with_its_end() -> None:
    assert window_starts(100, 32, 0.5) == [0, 16, 32, 48, 64, 68]
    assert window_starts(32, 32, 0.5) == [0]


def test_probabilities_equal_monai_sliding_window_inference_where_all_is_body() -> None:
    rng = np.random.default_rng(0)
    hu = rng.normal(40, 300, (40, 36, 30)).clip(-400, 1000).astype(np.float32)
    inputs = ((hu.clip(-175, 250) + 175) / 425).astype(np.float32)
    model = ConvHeads(5)
    ours = predict_logits(model, hu, inputs, [0, 2, 4], (16, 16, 16), 0.5, 3, "cpu")
    with torch.no_grad():
        logits = sliding_window_inference(torch.from_numpy(inputs)[None, None], (16, 16, 16), 3,
                                          lambda x: model(x, [0, 2, 4]), overlap=0.5, mode="gaussian")
    assert ours.dtype == np.float16 and ours.shape == (3, 40, 36, 30)
    np.testing.assert_allclose(ours.astype(np.float32), torch.sigmoid(logits[0]).numpy(), atol=2e-3)


def test_air_outside_the_body_is_empty_and_air_windows_are_not_run() -> None:
    hu = np.full((64, 64, 64), -1000.0, np.float32)
    hu[20:30, 22:34, 10:20] = 50.0
    assert body_box(hu) == (slice(16, 34), slice(18, 38), slice(6, 24))
    inputs = ((hu.clip(-175, 250) + 175) / 425).astype(np.float32)
    model = ConvHeads(2)
    probabilities = predict_logits(model, hu, inputs, [0, 1], (16, 16, 16), 0.5, 4, "cpu")
    assert model.windows < 3 * 3 * 3  # the body's box holds fewer windows than the whole grid (7³ at 16³, 0.5)
    outside = np.ones(hu.shape, bool)
    outside[16:34, 18:38, 6:24] = False
    assert not probabilities[:, outside].any() and probabilities[:, 20:30, 22:34, 10:20].all()
    assert not predict_logits(model, np.full((8, 8, 8), -1000.0, np.float32), inputs[:8, :8, :8], [0], (8, 8, 8),
                              0.5, 1, "cpu").any()


def test_mirror_averages_with_the_mirrored_pass_and_swaps_sides() -> None:
    classes = load_class_table()
    channels = classes.channels(["Spleen", "Right Kidney", "Left Kidney"])
    partners = classes.mirror_channels()
    mirror = [channels.index(partners[c]) for c in channels]
    assert mirror == [0, 2, 1]
    rng = np.random.default_rng(1)
    hu = rng.normal(40, 300, (16, 16, 16)).astype(np.float32)
    inputs = ((hu.clip(-175, 250) + 175) / 425).astype(np.float32)
    model = ConvHeads(len(classes))
    mirrored = predict_logits(model, hu, inputs, channels, (16, 16, 16), 0.5, 1, "cpu", mirror)
    with torch.no_grad():
        x = torch.from_numpy(inputs)[None, None]
        plain, flipped = model(x, channels), model(x.flip(2), channels).flip(2)
    expected = torch.sigmoid(0.5 * (plain + flipped[:, mirror]))[0].numpy()
    np.testing.assert_allclose(mirrored.astype(np.float32), expected, atol=2e-3)
    assert not np.allclose(mirrored.astype(np.float32), torch.sigmoid(plain)[0].numpy(), atol=1e-2)


@pytest.mark.parametrize("threshold", [0.0, 1.0, True])
def test_a_class_threshold_outside_0_1_is_refused(tmp_path, threshold) -> None:
    from universal.core.classes import ClassTableError

    table = tmp_path / "classes.yaml"
    table.write_text("classes:\n  - {index: 1, name: Spleen, kind: organ, colour: [1, 2, 3], postprocess: none, "
                     f"threshold: {str(threshold).lower()}}}\n")
    with pytest.raises(ClassTableError, match="threshold must be a probability"):
        load_class_table(table)
