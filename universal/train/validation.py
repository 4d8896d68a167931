"""Validation during training: Dice per class of held-out store cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from universal.core.classes import ClassTable
from universal.core.volume import Volume
from universal.data.store import StoredCase, list_cases, open_case
from universal.evaluate.metrics import dice
from universal.infer.predict import InferenceSettings, predict_on_grid
from universal.model.network import (
    UniversalModel,
)
from universal.train.checkpoints import rng_state, set_rng_state
from universal.train.config import TrainConfig
from universal.train.targets import multi_hot_targets


def validate(model: UniversalModel, config: TrainConfig, classes: ClassTable, device: torch.device, step: int,
             trained: list[str]) -> list[dict]:
    """Dice per class of the held-out cases (at most ``val_cases`` per store of ``val_stores``), over the classes a
    case annotates and training sees (``trained``: the heads of the other classes get no gradient, their Dice would
    say nothing); rows (step, dataset, case_id, class, dice).

    The prediction is inference's own on the store grid (:func:`universal.infer.predict.predict_on_grid`: the
    training window, the patch size as ROI, ``val_overlap``, post-processing), and the Dice is the evaluation's
    (:func:`universal.evaluate.metrics.dice`) against the multi-hot targets training uses. The model is put in eval
    mode and back (a frozen backbone stays in eval); the RNG states are restored afterwards, so training is
    unaffected."""
    settings = InferenceSettings(window_hu=config.patches.window_hu, roi=config.patches.patch_size,
                                 overlap=config.val_overlap, device=str(device))
    saved_rng = rng_state()
    was_training = model.training
    model.eval()
    rows: list[dict] = []
    try:
        for store in config.val_stores:
            for case_id in list_cases(store)[:config.val_cases]:
                case = open_case(store, case_id)
                names = [n for n in case.annotated if n in trained]
                if case.label is not None and names:
                    rows.extend(_case_rows(model, case, Path(store).stem, names, classes, settings, step))
    finally:
        model.train(was_training)
        if was_training and config.trainable == "heads":
            model.backbone.eval()
        set_rng_state(saved_rng)
    return rows


def _case_rows(model: UniversalModel, case: StoredCase, store_name: str, names: list[str], classes: ClassTable,
               settings: InferenceSettings, step: int) -> list[dict]:
    """Validation rows of one stored case for the classes ``names``."""
    image = Volume(np.asarray(case.image[...], dtype=np.float32), case.affine)
    masks = predict_on_grid(model, image, classes, settings, names).masks
    channels = classes.channels(names)
    label = torch.as_tensor(np.asarray(case.label[...]).astype(np.int64))[None]
    x_mm = torch.as_tensor(case.affine[0, 0] * np.arange(label.shape[1]) + case.affine[0, 3])[None]
    midline = torch.tensor([float(case.attrs["midline_x_mm"])])
    truth = multi_hot_targets(label, classes, x_mm, midline, channels)[0].numpy()
    dataset = case.attrs.get("dataset", store_name)
    return [{"step": step, "dataset": dataset, "case_id": case.case_id, "class": name,
             "dice": dice(masks[i], truth[i])}
            for i, name in enumerate(names)]
