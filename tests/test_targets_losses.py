"""Tests of universal.train.targets (multi-hot targets, side rule, annotated mask, exclusion negatives) and
universal.train.losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from universal.core.classes import load_class_table
from universal.train.losses import MISSED_PROBABILITY, masked_bce_dice_loss
from universal.train.targets import annotated_mask, exclusion_tables, known_negatives, multi_hot_targets


@pytest.fixture(scope="module")
def classes():
    return load_class_table()


def _value(classes, name: str) -> int:
    return classes[name].index


def test_tumour_counts_for_its_organ(classes) -> None:
    label = torch.zeros(1, 4, 2, 2, dtype=torch.uint8)
    label[0, 0] = _value(classes, "Liver")
    label[0, 1] = _value(classes, "Liver Tumor")
    label[0, 2] = _value(classes, "Spleen")
    targets = multi_hot_targets(label, classes, torch.zeros(1, 4), torch.zeros(1))
    liver, tumour, spleen = (targets[0, classes.channel(n)] for n in ("Liver", "Liver Tumor", "Spleen"))
    assert targets.shape == (1, len(classes), 4, 2, 2) and targets.dtype == torch.bool
    assert liver[0].all() and liver[1].all() and not liver[2:].any()
    assert tumour[1].all() and not tumour[0].any()
    assert spleen[2].all() and not spleen[[0, 1, 3]].any()
    assert targets[0, :, 3].sum() == 0  # background counts for nothing
    assert int(targets.sum()) == 4 * 4  # liver 4+4, tumour 4, spleen 4


@pytest.mark.parametrize("per_column", [False, True])
def test_bilateral_tumour_goes_to_the_side_of_the_midline(classes, per_column: bool) -> None:
    label = torch.full((2, 4, 3, 1), _value(classes, "Kidney Tumor"), dtype=torch.uint8)
    x_mm = torch.tensor([[-15.0, -5.0, 5.0, 15.0], [-15.0, -5.0, 5.0, 15.0]])
    midline = torch.tensor([0.0, 10.0])
    if per_column:
        x_mm = x_mm[:, :, None].expand(2, 4, 3)
    targets = multi_hot_targets(label, classes, x_mm, midline)
    right = targets[:, classes.channel("Right Kidney"), :, 0, 0]
    left = targets[:, classes.channel("Left Kidney"), :, 0, 0]
    # RAS: x greater than the midline is the patient's right
    assert right.tolist() == [[False, False, True, True], [False, False, False, True]]
    assert left.tolist() == [[True, True, False, False], [True, True, True, False]]
    assert targets[:, classes.channel("Kidney Tumor")].all()


def test_channel_subset_equals_those_rows_of_all_channels(classes) -> None:
    label = torch.zeros(2, 6, 3, 2, dtype=torch.uint8)
    label[:, :2] = _value(classes, "Kidney Tumor")
    label[:, 2:4] = _value(classes, "Right Kidney")
    label[1, 4:] = _value(classes, "Liver Tumor")
    x_mm = torch.tensor([[-10.0, 10.0, -10.0, 10.0, 0.0, 0.0]] * 2)
    midline = torch.zeros(2)
    channels = [classes.channel(n) for n in ("Liver", "Left Kidney", "Kidney Tumor", "Right Kidney")]
    subset = multi_hot_targets(label, classes, x_mm, midline, channels=channels)
    assert subset.shape == (2, 4, 6, 3, 2)
    assert torch.equal(subset, multi_hot_targets(label, classes, x_mm, midline)[:, channels])
    assert subset[1, 0, 4:].all() and not subset[0, 0].any()  # liver tumour counts for the liver
    assert subset[:, 1, 0].all() and not subset[:, 1, 1].any()  # x = -10 is left of the midline


def test_rejects_bad_coordinate_shape(classes) -> None:
    with pytest.raises(ValueError, match="x_mm"):
        multi_hot_targets(torch.zeros(1, 4, 2, 2, dtype=torch.long), classes, torch.zeros(1, 3), torch.zeros(1))


def test_annotated_mask(classes) -> None:
    mask = annotated_mask([["Liver", "Liver Tumor"], ["Spleen", "Kidney Cyst"]], classes)
    assert mask.shape == (2, len(classes)) and mask.dtype == torch.bool
    assert mask[0].nonzero().flatten().tolist() == [classes.channel("Liver"), classes.channel("Liver Tumor")]
    assert mask[1].nonzero().flatten().tolist() == [classes.channel("Spleen")]  # disabled rows are ignored


def test_exclusion_tables_know_which_classes_a_voxel_is_not(classes) -> None:
    right, left = exclusion_tables(classes, classes.max_index + 1)

    def excludes(value: str, channel: str, table=right) -> bool:
        return bool(table[classes.channel(channel), _value(classes, value)])

    assert right.shape == (len(classes), classes.max_index + 1)
    assert excludes("Liver", "Stomach") and excludes("Liver Tumor", "Stomach") and excludes("Liver", "Kidney Tumor")
    assert not excludes("Liver", "Liver") and not excludes("Liver Tumor", "Liver")  # itself, its parent
    assert not excludes("Liver", "Liver Tumor")  # an organ-only label may hide a tumour
    assert excludes("Liver Tumor", "Hepatic Vessel Tumor")  # one voxel, one tumour
    assert not excludes("Right Kidney", "Kidney Tumor") and not excludes("Left Kidney", "Kidney Tumor", left)
    # a kidney tumour's voxel is its side's kidney, not the other one
    assert excludes("Kidney Tumor", "Left Kidney", right) and not excludes("Kidney Tumor", "Right Kidney", right)
    assert excludes("Kidney Tumor", "Right Kidney", left) and not excludes("Kidney Tumor", "Left Kidney", left)
    assert not right[:, 0].any() and not left[:, 0].any()  # background says nothing


def test_known_negatives_of_a_liver_sample_and_a_btcv_like_sample(classes) -> None:
    label = torch.zeros(2, 4, 2, 1, dtype=torch.uint8)
    label[0, 0] = _value(classes, "Liver")
    label[0, 1] = _value(classes, "Liver Tumor")
    label[1, 0] = _value(classes, "Liver")
    label[1, 1] = _value(classes, "Stomach")
    label[1, 2] = _value(classes, "Spleen")  # a spleen voxel in a sample that does not annotate the spleen
    annotated = annotated_mask([["Liver", "Liver Tumor"], ["Liver", "Stomach"]], classes)
    names = ["Liver", "Liver Tumor", "Stomach", "Spleen"]
    known = known_negatives(label, classes, torch.zeros(2, 4), torch.zeros(2), annotated, classes.channels(names))
    assert known.shape == (2, 4, 4, 2, 1) and known.dtype == torch.bool
    per_row = known[:, :, :, 0, 0].tolist()  # (sample, channel, x)
    # sample 0 annotates liver and liver tumour: its liver and tumour voxels are neither stomach nor spleen
    assert per_row[0] == [[False] * 4, [False] * 4, [True, True, False, False], [True, True, False, False]]
    # sample 1: stomach voxels are not a liver tumour, liver voxels may be one; the spleen voxel is not labelled
    # by a class the sample annotates, so it excludes nothing (and background never does)
    assert per_row[1] == [[False] * 4, [False, True, False, False], [False] * 4, [True, True, False, False]]
    # tumour voxels only: sample 0's tumour voxel alone; sample 1 annotates no tumour, so it knows nothing
    known = known_negatives(label, classes, torch.zeros(2, 4), torch.zeros(2), annotated, classes.channels(names),
                            tumour_voxels_only=True)
    per_row = known[:, :, :, 0, 0].tolist()
    assert per_row[0] == [[False] * 4, [False] * 4, [False, True, False, False], [False, True, False, False]]
    assert per_row[1] == [[False] * 4] * 4


def _random_case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 6, 5, 4, generator=generator)
    targets = torch.rand(2, 3, 6, 5, 4, generator=generator) > 0.6
    mask = torch.tensor([[True, False, True], [False, True, True]])
    return logits, targets, mask


def test_loss_equals_hand_computed_reference() -> None:
    logits, targets, mask = _random_case()
    total, parts = masked_bce_dice_loss(logits, targets, mask, smooth=1.0)
    bce_terms, dice_terms = [], []
    for b in range(2):
        for k in range(3):
            if not mask[b, k]:
                continue
            x, t = logits[b, k].double(), targets[b, k].double()
            p = 1.0 / (1.0 + torch.exp(-x))
            bce_terms.append((-(t * torch.log(p) + (1 - t) * torch.log(1 - p))).mean())
            dice_terms.append(1 - (2 * (p * t).sum() + 1.0) / (p.sum() + t.sum() + 1.0))
    bce, dice = torch.stack(bce_terms).mean(), torch.stack(dice_terms).mean()
    assert parts["bce"].item() == pytest.approx(bce.item(), rel=1e-5)
    assert parts["dice"].item() == pytest.approx(dice.item(), rel=1e-5)
    assert total.item() == pytest.approx((bce + dice).item(), rel=1e-5)


def test_sample_average_weighs_each_sample_alike() -> None:
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 4, 6, 5, 4, generator=generator)
    targets = torch.rand(2, 4, 6, 5, 4, generator=generator) > 0.6
    targets[0, 3] = False  # annotated but absent from the patch: BCE only
    mask = torch.tensor([[True, True, True, True], [False, True, False, False]])  # 4 pairs against 1
    monai = DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0, reduction="none")(logits, targets.float())
    dice = monai.reshape(2, 4)
    bce = F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none").mean(dim=(2, 3, 4))
    _, by_sample = masked_bce_dice_loss(logits, targets, mask, smooth=1.0, average="sample")
    _, by_pair = masked_bce_dice_loss(logits, targets, mask, smooth=1.0, average="pair")
    assert by_sample["bce"].item() == pytest.approx(((bce[0].mean() + bce[1, 1]) / 2).item(), rel=1e-6)
    assert by_sample["dice"].item() == pytest.approx(((dice[0, :3].mean() + dice[1, 1]) / 2).item(), rel=1e-6)
    assert by_pair["bce"].item() == pytest.approx(bce[mask].mean().item(), rel=1e-6)
    assert by_pair["dice"].item() == pytest.approx(dice[mask & targets.flatten(2).any(dim=2)].mean().item(),
                                                   rel=1e-6)
    assert abs(by_sample["bce"].item() - by_pair["bce"].item()) > 1e-3


def test_averages_agree_when_every_sample_annotates_the_same_classes() -> None:
    logits, targets, _ = _random_case(7)
    mask = torch.tensor([[True, False, True], [True, False, True]])
    total_sample, _ = masked_bce_dice_loss(logits, targets, mask, average="sample")
    total_pair, _ = masked_bce_dice_loss(logits, targets, mask, average="pair")
    assert total_sample.item() == pytest.approx(total_pair.item(), rel=1e-6)
    with pytest.raises(ValueError, match="average"):
        masked_bce_dice_loss(logits, targets, mask, average="class")


def _missed_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two pairs of 4 x 4 x 4 voxels: positives at logit -8 (p = 3e-4, missed), -2 (p = 0.12) and +3; negatives
    anywhere."""
    generator = torch.Generator().manual_seed(8)
    targets = torch.rand(1, 2, 4, 4, 4, generator=generator) > 0.5
    logits = torch.randn(1, 2, 4, 4, 4, generator=generator) * 3
    level = torch.tensor([-8.0, -2.0, 3.0])[torch.randint(0, 3, (1, 2, 4, 4, 4), generator=generator)]
    logits = torch.where(targets, level, logits)
    return logits, targets, torch.ones(1, 2, dtype=torch.bool)


def test_missed_positives_weigh_missed_weight_in_the_bce() -> None:
    logits, targets, mask = _missed_case()
    missed = targets & (torch.sigmoid(logits) < MISSED_PROBABILITY)
    assert missed.sum() > 5 and (targets & ~missed).sum() > 5
    _, parts = masked_bce_dice_loss(logits, targets, mask, missed_weight=50.0)
    p, t = torch.sigmoid(logits.double()), targets.double()
    per_voxel = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)) * (1 + 49 * missed.double())
    assert parts["bce"].item() == pytest.approx(per_voxel.mean().item(), rel=1e-5)
    _, plain = masked_bce_dice_loss(logits, targets, mask)
    assert parts["dice"].item() == plain["dice"].item()


@pytest.mark.parametrize("below", [MISSED_PROBABILITY, 0.3])
def test_missed_weight_changes_the_gradient_at_missed_positives_only(below: float) -> None:
    """Against the original's loss the gradient differs by (w - 1) (p - 1) / (voxels * pairs) at the positives
    predicted below ``missed_below`` and nowhere else: confident and near-miss positives and all negatives are left
    as they were. At 1 % the positives at logit -2 (p = 0.12) are near misses; at 0.3 they are missed."""
    logits, targets, mask = _missed_case()
    grads = []
    for weight in (1.0, 50.0):
        x = logits.clone().requires_grad_(True)
        masked_bce_dice_loss(x, targets, mask, missed_weight=weight, missed_below=below)[0].backward()
        grads.append(x.grad)
    missed = targets & (torch.sigmoid(logits) < below)
    assert (missed & (logits == -2.0)).any() == (below > 0.12)
    expected = 49 * (torch.sigmoid(logits) - 1) / (logits[0, 0].numel() * 2) * missed
    torch.testing.assert_close(grads[1] - grads[0], expected, rtol=1e-4, atol=1e-9)
    assert (grads[1] - grads[0])[~missed].abs().max() < 1e-9
    with pytest.raises(ValueError, match="missed_weight"):
        masked_bce_dice_loss(logits, targets, mask, missed_weight=0.5)
    with pytest.raises(ValueError, match="missed_below"):
        masked_bce_dice_loss(logits, targets, mask, missed_weight=50.0, missed_below=0.0)


def test_missed_channels_restrict_the_weight_to_those_classes() -> None:
    """With the weight for channel 1 only (say, the tumours), channel 0's gradient is the original loss's and
    channel 1's differs by (w - 1) (p - 1) / (voxels * pairs) at its missed positives."""
    logits, targets, mask = _missed_case()
    only_second = torch.tensor([False, True])
    grads = []
    for weight, channels in ((1.0, None), (50.0, only_second)):
        x = logits.clone().requires_grad_(True)
        masked_bce_dice_loss(x, targets, mask, missed_weight=weight, missed_channels=channels)[0].backward()
        grads.append(x.grad)
    missed = targets & (torch.sigmoid(logits) < MISSED_PROBABILITY)
    assert missed[:, 0].sum() > 5 and missed[:, 1].sum() > 5
    expected = 49 * (torch.sigmoid(logits) - 1) / (logits[0, 0].numel() * 2) * missed
    expected[:, 0] = 0.0
    torch.testing.assert_close(grads[1] - grads[0], expected, rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="missed_channels must be"):
        masked_bce_dice_loss(logits, targets, mask, missed_weight=50.0, missed_channels=torch.tensor([True]))


def test_dice_part_equals_monai_dice_loss() -> None:
    logits, targets, mask = _random_case(1)
    _, parts = masked_bce_dice_loss(logits, targets, mask, smooth=1.0)
    monai = DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0, reduction="none")(logits, targets.float())
    assert parts["dice"].item() == pytest.approx(monai.reshape(2, 3)[mask].mean().item(), rel=1e-6)
    bce = F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none").mean(dim=(2, 3, 4))
    assert parts["bce"].item() == pytest.approx(bce[mask].mean().item(), rel=1e-6)


def test_empty_targets_get_bce_only() -> None:
    logits, targets, mask = _random_case(4)
    targets[0, 2] = False  # an annotated pair whose class is absent from the patch
    _, parts = masked_bce_dice_loss(logits, targets, mask, smooth=1.0)
    monai = DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0, reduction="none")(logits, targets.float())
    present = mask & targets.flatten(2).any(dim=2)
    assert present.sum() == mask.sum() - 1
    assert parts["dice"].item() == pytest.approx(monai.reshape(2, 3)[present].mean().item(), rel=1e-6)

    logits.requires_grad_(True)
    masked_bce_dice_loss(logits, targets, mask)[0].backward()
    count = int(mask.sum())  # the empty pair's gradient is that of its BCE term alone: sigmoid(x) / (voxels * pairs)
    expected = torch.sigmoid(logits[0, 2].detach()) / (logits[0, 2].numel() * count)
    torch.testing.assert_close(logits.grad[0, 2], expected, rtol=1e-5, atol=1e-9)


def test_only_empty_targets_give_a_zero_dice_part() -> None:
    logits, _, mask = _random_case(5)
    total, parts = masked_bce_dice_loss(logits, torch.zeros_like(logits, dtype=torch.bool), mask)
    assert parts["dice"].item() == 0.0 and total.item() == pytest.approx(parts["bce"].item())


def test_unannotated_classes_get_exactly_zero_gradient() -> None:
    logits, targets, mask = _random_case(2)
    logits.requires_grad_(True)
    total, _ = masked_bce_dice_loss(logits, targets, mask)
    total.backward()
    grad = logits.grad.flatten(2).abs().sum(dim=2)
    assert (grad[~mask] == 0).all()
    assert (grad[mask] > 0).all()


@pytest.mark.parametrize("average", ["pair", "sample"])
def test_known_negatives_add_bce_pairs_on_their_voxels_only(average: str) -> None:
    logits, targets, mask = _random_case(4)
    negatives = torch.zeros_like(targets)
    negatives[0, 1, :3] = True  # sample 0 does not annotate class 1: half its x range is known not to be it
    negatives[0, 0] = True  # annotated pairs ignore their negatives: their targets say it all
    logits.requires_grad_(True)
    total, parts = masked_bce_dice_loss(logits, targets, mask, average=average, negatives=negatives)
    total.backward()
    grad = logits.grad
    assert (grad[0, 1, :3] > 0).all()  # pushed towards 0
    assert (grad[0, 1, 3:] == 0).all() and (grad[1, 0] == 0).all()  # unknown voxels, untouched pair
    _, plain_parts = masked_bce_dice_loss(logits.detach(), targets, mask, average=average)
    assert parts["dice"].item() == pytest.approx(plain_parts["dice"].item())
    voxels = logits[0, 1].numel()
    extra = (F.softplus(logits[0, 1, :3].detach().double())).sum().item() / voxels
    annotated = [F.binary_cross_entropy_with_logits(logits[b, k].detach(), targets[b, k].float()).item()
                 for b, k in mask.nonzero().tolist()]
    # the negatives add to the sum of the four annotated pairs (by sample: of sample 0's two) and are not counted
    if average == "pair":
        expected = (sum(annotated) + extra) / 4
    else:
        expected = ((annotated[0] + annotated[1] + extra) / 2 + (annotated[2] + annotated[3]) / 2) / 2
    assert parts["bce"].item() == pytest.approx(expected, rel=1e-5)


def test_known_negatives_alone_give_a_loss() -> None:
    logits, targets, _ = _random_case(5)
    negatives = torch.zeros_like(targets)
    negatives[1, 2, 0, 0, 0] = True
    total, parts = masked_bce_dice_loss(logits, targets, torch.zeros(2, 3, dtype=torch.bool), negatives=negatives)
    expected = F.softplus(logits[1, 2, 0, 0, 0]).item() / logits[1, 2].numel()
    assert total.item() == pytest.approx(expected, rel=1e-5) and parts["dice"].item() == 0.0
    with pytest.raises(ValueError, match="negatives"):
        masked_bce_dice_loss(logits, targets, torch.zeros(2, 3, dtype=torch.bool), negatives=negatives[:, :2])


def test_no_annotated_class_gives_zero_loss() -> None:
    logits, targets, _ = _random_case(3)
    logits.requires_grad_(True)
    total, parts = masked_bce_dice_loss(logits, targets, torch.zeros(2, 3, dtype=torch.bool))
    total.backward()
    assert total.item() == 0.0 and parts["dice"].item() == 0.0
    assert (logits.grad == 0).all()


def test_loss_rejects_mismatched_shapes() -> None:
    logits, targets, mask = _random_case()
    with pytest.raises(ValueError, match="mask"):
        masked_bce_dice_loss(logits, targets, mask[:, :2])
    with pytest.raises(ValueError, match="shape"):
        masked_bce_dice_loss(logits, targets[:, :2], mask)
