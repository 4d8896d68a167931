"""User-given torch files (checkpoints, embeddings) that are truncated, foreign or need code to unpickle."""

from pathlib import Path

import pytest
import torch

from universal.core.classes import load_class_table
from universal.core.torch_files import TorchFileError, load_torch_file
from universal.embed.prompts import EmbedError, import_embeddings
from universal.model.network import ModelConfig, build_model, load_checkpoint, save_checkpoint
from universal.train.checkpoints import init_from_checkpoint


class Payload:
    """A class of this test module: unpickling it needs code, as a malicious or foreign pickle does."""


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    config = ModelConfig(backbone="unet", features=(8, 8, 16, 16, 32, 8))
    good = tmp_path / "good.pt"
    save_checkpoint(good, build_model(config, torch.randn(2, 512)), config, ["Liver", "Spleen"])
    data = good.read_bytes()
    paths = {"good": good, "truncated": tmp_path / "truncated.pt", "empty": tmp_path / "empty.pt",
             "html": tmp_path / "html.pt", "code": tmp_path / "code.pt"}
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["empty"].write_bytes(b"")
    paths["html"].write_bytes(b"<!DOCTYPE html><html><body>Please log in</body></html>")
    torch.save({"format": "universal-checkpoint", "payload": Payload()}, paths["code"])
    return paths


@pytest.mark.parametrize("kind", ["truncated", "empty", "html"])
def test_a_truncated_or_foreign_checkpoint_is_named(files: dict, kind: str) -> None:
    with pytest.raises(TorchFileError, match=rf"{kind}\.pt: not a complete torch file .*download the model "
                                             r"checkpoint again") as caught:
        load_checkpoint(files[kind])
    assert "weights_only" not in str(caught.value)


def test_a_checkpoint_that_needs_code_is_refused_without_suggesting_to_run_it(files: dict) -> None:
    with pytest.raises(TorchFileError, match=r"code\.pt: the model checkpoint holds Python objects that only code "
                                             r"can rebuild.*never unpickles code") as caught:
        load_checkpoint(files["code"])
    assert "weights_only" not in str(caught.value)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(TorchFileError, match=r"absent\.pt: cannot read the embedding table"):
        load_torch_file(tmp_path / "absent.pt", "embedding table")


def test_init_checkpoint_and_embeddings_import_say_the_same(files: dict) -> None:
    classes = load_class_table()
    config = ModelConfig(backbone="unet", features=(8, 8, 16, 16, 32, 8))
    model = build_model(config, torch.randn(len(classes), 512))
    with pytest.raises(TorchFileError, match=r"code\.pt: the init_checkpoint holds Python objects"):
        init_from_checkpoint(model, files["code"], config, classes, verbose=False)
    with pytest.raises(EmbedError, match=r"truncated\.pt: not a complete torch file") as caught:
        import_embeddings(files["truncated"], classes)
    assert "weights_only" not in str(caught.value)


def test_an_embeddings_dict_without_its_keys_is_named(tmp_path: Path) -> None:
    path = tmp_path / "table.pt"
    torch.save({"rows": torch.zeros(2, 4)}, path)
    with pytest.raises(EmbedError, match=r"table\.pt: a dict without 'embeddings' and 'class_names' \(it has "
                                         r"\['rows'\]\)"):
        import_embeddings(path, load_class_table())
