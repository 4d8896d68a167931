"""Transfer: fine-tune a trained model on a class table that adds a novel class (heads only, frozen backbone)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from synthetic import write_sphere_case

from universal import cli
from universal.core.classes import load_class_table
from universal.model.network import HEAD_MODULES, ModelConfig, build_model, load_checkpoint, save_checkpoint
from universal.train.config import train_config_from_options
from universal.train.loop import train

SHAPE = (40, 40, 40)
NOVEL = "Novel Structure"
TABLE = f"""prompt_template: "A computerized tomography of a {{name}}"
classes:
  - {{index: 1, name: Liver, kind: organ, colour: [221, 130, 101], postprocess: largest_component}}
  - {{index: 2, name: Spleen, kind: organ, colour: [157, 108, 162], postprocess: largest_component}}
  - {{index: 3, name: {NOVEL}, kind: organ, colour: [20, 200, 20], postprocess: none, enabled: false}}
"""
OPTIONS = {"backbone": "unet", "features": [8, 8, 16, 16, 32, 8], "patch_size": [32, 32, 32], "batch_size": 1,
           "steps": 3, "warmup_steps": 1, "lr": 1e-3, "checkpoint_every": 2, "num_workers": 0, "amp": "off",
           "device": "cpu"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """A class table with a disabled novel organ, a store annotating all three classes (harmonized with the novel
    class included) and one annotating the two base classes (harmonized without it), embeddings files with two
    rows (base) and three rows (the same two plus the novel class), and a base model trained 3 steps."""
    root = tmp_path_factory.mktemp("transfer")
    table = root / "classes.yaml"
    table.write_text(TABLE)
    classes = load_class_table(table, include=[NOVEL])
    spheres = [("Liver", (12, 20, 20), 6, 80), ("Spleen", (28, 20, 20), 6, 60), (NOVEL, (20, 30, 20), 6, 300)]
    write_sphere_case(root / "abdomen.zarr", "abdomen_0", classes, spheres, np.random.default_rng(2), "abdomen",
                      annotated=classes.names)
    write_sphere_case(root / "abdomen_base.zarr", "abdomen_0", load_class_table(table), spheres[:2],
                      np.random.default_rng(2), "abdomen")
    rows = torch.randn(3, 512)
    paths = {}
    for key, count in (("base", 2), ("novel", 3)):
        paths[key] = root / f"prompts_{key}.pt"
        torch.save({"embeddings": rows[:count].clone(), "class_names": classes.names[:count],
                    "prompts": classes.prompts[:count], "encoder": {"model": "random"}}, paths[key])
    base = train(train_config_from_options(OPTIONS, stores=[root / "abdomen_base.zarr"], weights=None,
                                           embeddings=paths["base"], classes=table, include_classes=[],
                                           out_dir=root / "base"))
    return {"root": root, "table": table, "store": root / "abdomen.zarr", "base_store": root / "abdomen_base.zarr",
            "base": base, "rows": rows,
            "base_embeddings": paths["base"], "novel_embeddings": paths["novel"]}


def _finetune_args(inputs: dict, out_dir: Path, options: dict) -> list[str]:
    settings = out_dir.with_name(out_dir.name + "_settings.yaml")
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(yaml.safe_dump(options))
    return ["train", "--classes", str(inputs["table"]), "--include-class", NOVEL, "--stores", str(inputs["store"]),
            "--embeddings", str(inputs["novel_embeddings"]), "--out-dir", str(out_dir), "--settings", str(settings)]


def _changed(before: dict, after: dict, prefix: str) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))


def test_heads_only_finetune_adds_a_class_and_keeps_the_backbone(inputs: dict, tmp_path: Path) -> None:
    base = torch.load(inputs["base"], weights_only=True)
    assert base["class_names"] == ["Liver", "Spleen"]
    options = {**OPTIONS, "init_checkpoint": str(inputs["base"]), "trainable": "heads"}
    assert cli.main(_finetune_args(inputs, tmp_path, options)) == 0

    final = torch.load(tmp_path / "final.pt", weights_only=True)
    assert final["class_names"] == ["Liver", "Spleen", NOVEL]
    assert final["extra"]["init"]["novel_classes"] == [NOVEL]
    assert final["extra"]["train_config"]["trainable"] == "heads"
    before, after = base["model"], final["model"]
    backbone = [k for k in before if k.startswith("backbone.")]
    assert backbone and all(torch.equal(before[k], after[k]) for k in backbone)
    assert all(_changed(before, after, f"{m}.") for m in HEAD_MODULES)
    # The class embeddings come from the new file; the centre stays the one the heads were trained with.
    assert torch.equal(after["organ_embedding"], inputs["rows"])
    assert torch.equal(after["embedding_center"], before["embedding_center"])
    assert not torch.allclose(after["embedding_center"], inputs["rows"].mean(dim=0))
    # A fresh run: steps 1.. with a new optimizer that holds the head parameters only.
    with (tmp_path / "train_log.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3]
    resumable = torch.load(tmp_path / "checkpoints" / "step_00000003.pt", weights_only=True)
    model, _ = load_checkpoint(tmp_path / "final.pt", expected_class_names=["Liver", "Spleen", NOVEL])
    heads = [p for name, p in model.named_parameters() if not name.startswith("backbone.")]
    groups = resumable["extra"]["optimizer"]["param_groups"]
    assert sum(len(group["params"]) for group in groups) == len(heads)

    # Resuming the fine-tune (one more step) keeps the backbone frozen and the optimizer loads.
    assert cli.main(_finetune_args(inputs, tmp_path, {**options, "steps": 4})) == 0
    resumed = torch.load(tmp_path / "final.pt", weights_only=True)
    assert resumed["extra"]["step"] == 4 and resumed["extra"]["init"]["checkpoint"] == str(inputs["base"])
    assert all(torch.equal(before[k], resumed["model"][k]) for k in backbone)


def test_full_finetune_trains_the_backbone(inputs: dict, tmp_path: Path) -> None:
    config = train_config_from_options({**OPTIONS, "steps": 1, "init_checkpoint": str(inputs["base"])},
                                       stores=[inputs["store"]], weights=None, embeddings=inputs["novel_embeddings"],
                                       classes=inputs["table"], include_classes=[NOVEL], out_dir=tmp_path)
    assert config.trainable == "all"
    before = torch.load(inputs["base"], weights_only=True)["model"]
    after = torch.load(train(config), weights_only=True)["model"]
    assert _changed(before, after, "backbone.") and _changed(before, after, "controller.")


def test_init_checkpoint_classes_missing_from_the_table(inputs: dict, tmp_path: Path) -> None:
    """An init checkpoint with the novel class, fine-tuned with the table that lacks it: a clear error."""
    novel_model = tmp_path / "novel.pt"
    config = ModelConfig.from_dict(torch.load(inputs["base"], weights_only=True)["model_config"])
    save_checkpoint(novel_model, build_model(config, inputs["rows"]), config, ["Liver", "Spleen", NOVEL])
    options = {**OPTIONS, "init_checkpoint": str(novel_model), "trainable": "heads"}
    finetune = train_config_from_options(options, stores=[inputs["base_store"]], weights=None,
                                         embeddings=inputs["base_embeddings"], classes=inputs["table"],
                                         include_classes=[], out_dir=tmp_path / "out")
    with pytest.raises(ValueError, match=rf"has classes \['{NOVEL}'\] that the class table .* lacks"):
        train(finetune)
    assert not (tmp_path / "out" / "checkpoints").exists()
    with pytest.raises(ValueError, match="needs an init_checkpoint"):
        train_config_from_options({"trainable": "heads"}, stores=[inputs["store"]], weights=None,
                                  embeddings=inputs["base_embeddings"], classes=None, include_classes=[],
                                  out_dir=tmp_path)
