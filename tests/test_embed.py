import os
import time

import pytest
import torch

from universal.embed.prompts import EmbedError, EncoderSpec, embed_prompts, import_embeddings, save_embeddings


def test_import_original_table_matches_rows_by_name(classes, shared_data):
    path = shared_data / "clip_universal" / "txt_encoding.pth"
    original = torch.load(path, map_location="cpu", weights_only=True).float()
    record = import_embeddings(path, classes)
    assert record["embeddings"].shape == (31, 512) and record["embeddings"].dtype == torch.float32
    assert torch.equal(record["embeddings"][classes.channel("Celiac Trunk")], original[24])  # "Celiac Truck"
    assert torch.equal(record["embeddings"][classes.channel("Colon Tumor")], original[30])
    assert record["class_names"] == classes.names and record["encoder"]["sha256"].startswith("9de46b0b")


def test_bare_tensor_needs_names(classes, tmp_path):
    torch.save(torch.zeros(5, 8), tmp_path / "t.pt")
    with pytest.raises(EmbedError, match="needs row names"):
        import_embeddings(tmp_path / "t.pt", classes)


def test_missing_classes_are_named(classes, tmp_path):
    names = [n for n in classes.names if n != "Liver Tumor"]
    torch.save(torch.randn(len(names), 8), tmp_path / "t.pt")
    with pytest.raises(EmbedError, match=r"no embedding for classes \['Liver Tumor'\]"):
        import_embeddings(tmp_path / "t.pt", classes, names)


def test_random_text_tower_embeds_every_prompt_and_round_trips(classes, tmp_path):
    record = embed_prompts(classes, EncoderSpec(model="ViT-B-32", pretrained="none"))
    assert record["embeddings"].shape == (31, 512)
    assert record["prompts"][0] == "A computerized tomography of a Spleen"
    assert torch.isfinite(record["embeddings"]).all()
    assert not torch.allclose(record["embeddings"][0], record["embeddings"][1])
    save_embeddings(record, tmp_path / "e.pt")
    back = import_embeddings(tmp_path / "e.pt", classes)
    assert torch.equal(back["embeddings"], record["embeddings"])
    assert back["encoder"]["pretrained"] == "none"
    assert back["encoder"]["init_seed"] == 0


def test_random_text_tower_is_seeded_by_its_spec_alone(classes):
    """Two runs of one spec give one table whatever the global RNG did before (the demo's runs used to diverge);
    another init_seed gives another table; the caller's RNG stream is left as it was."""
    torch.manual_seed(1)
    first = embed_prompts(classes, EncoderSpec(model="ViT-B-32", pretrained="none", init_seed=7))
    after_first = torch.rand(3)
    torch.manual_seed(1)
    torch.rand(100)
    second = embed_prompts(classes, EncoderSpec(model="ViT-B-32", pretrained="none", init_seed=7))
    other = embed_prompts(classes, EncoderSpec(model="ViT-B-32", pretrained="none", init_seed=8))
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after_first)
    assert torch.equal(first["embeddings"], second["embeddings"])
    assert first["encoder"]["init_seed"] == 7
    assert (first["embeddings"] - other["embeddings"]).abs().max() > 1e-2


def test_unreachable_weights_fail_fast_and_clearly(classes, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    start = time.perf_counter()
    with pytest.raises(EmbedError, match="not in the local cache"):
        embed_prompts(classes, EncoderSpec(model="ViT-B-32", pretrained="openai"))
    assert time.perf_counter() - start < 30
    with pytest.raises(EmbedError, match="does not exist"):
        embed_prompts(classes, EncoderSpec(weights_file=str(tmp_path / "nope.bin")))
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_unknown_pretrained_tag(classes):
    with pytest.raises(EmbedError, match="no pretrained tag 'imagenet'"):
        embed_prompts(classes, EncoderSpec(model="ViT-B-32", pretrained="imagenet"))
