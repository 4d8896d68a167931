"""Prompt embeddings: one CLIP text embedding per class, computed with open-clip-torch or imported.

Output file (``torch.save``, loadable with ``weights_only=True``)::

    {"embeddings": FloatTensor[C, D], "class_names": [...], "prompts": [...],
     "encoder": {"model": ..., "pretrained": ..., "weights_file": ..., "source": ...}}

Like the original (``pretrained_weights/clip_embedding.py``), features are ``encode_text`` outputs without L2
normalisation. ``pretrained: none`` gives a randomly initialised text tower: it runs offline and exercises the
whole path, but its embeddings carry no language knowledge, so it is for demos and tests only. Its initialisation
is seeded (``EncoderSpec.init_seed``, recorded in the output), so the same spec gives the same table in every run.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from universal.core.atomic import atomic_output
from universal.core.classes import ClassTable
from universal.core.torch_files import TorchFileError, load_torch_file

# The original's class order in txt_encoding.pth (utils/utils.py ORGAN_NAME), with its spellings.
ORIGINAL_CLASS_ORDER = (
    "Spleen", "Right Kidney", "Left Kidney", "Gall Bladder", "Esophagus", "Liver", "Stomach", "Aorta", "Postcava",
    "Portal Vein and Splenic Vein", "Pancreas", "Right Adrenal Gland", "Left Adrenal Gland", "Duodenum",
    "Hepatic Vessel", "Right Lung", "Left Lung", "Colon", "Intestine", "Rectum", "Bladder", "Prostate",
    "Left Head of Femur", "Right Head of Femur", "Celiac Truck", "Kidney Tumor", "Liver Tumor", "Pancreas Tumor",
    "Hepatic Vessel Tumor", "Lung Tumor", "Colon Tumor", "Kidney Cyst",
)
# Misspellings of the original code -> our class names.
ORIGINAL_ALIASES = {"Celiac Truck": "Celiac Trunk", "Arota": "Aorta"}


class EmbedError(RuntimeError):
    """Embeddings cannot be made or imported; the message says why and what to do."""


@dataclass(frozen=True)
class EncoderSpec:
    """Which text encoder to use: an open_clip model name, a pretrained tag (or "none"), or a local weights file.

    ``init_seed`` seeds the random initialisation of a text tower that loads no weights (``pretrained: none``).
    """

    model: str = "ViT-B-32"
    pretrained: str = "openai"
    weights_file: str | None = None
    init_seed: int = 0


def embed_prompts(classes: ClassTable, spec: EncoderSpec, batch_size: int = 64) -> dict:
    """Encode every class's prompt with the text tower of ``spec``; returns the embeddings record."""
    import open_clip

    pretrained = _resolve_pretrained(spec)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.init_seed)
            model = open_clip.create_model(spec.model, pretrained=pretrained, device="cpu")
        tokenizer = open_clip.get_tokenizer(spec.model)
    except Exception as err:  # open_clip raises RuntimeError, OSError and hub errors alike
        raise EmbedError(f"cannot load text encoder {spec.model!r} with pretrained={pretrained!r}: {err}. "
                         "On an offline cluster, download the weights once and pass them with "
                         "`weights_file` (config: embed.weights_file; CLI: --weights-file).") from err
    model.eval()
    rows = []
    with torch.no_grad():
        for start in range(0, len(classes), batch_size):
            tokens = tokenizer(classes.prompts[start:start + batch_size])
            rows.append(model.encode_text(tokens).float())
    encoder = {"model": spec.model, "pretrained": spec.pretrained, "weights_file": spec.weights_file,
               "weights_sha256": _sha256(spec.weights_file) if spec.weights_file else None,
               "init_seed": spec.init_seed if pretrained is None else None,
               "source": "open_clip", "open_clip_version": open_clip.__version__}
    return {"embeddings": torch.cat(rows).contiguous(), "class_names": classes.names, "prompts": classes.prompts,
            "encoder": encoder}


def _resolve_pretrained(spec: EncoderSpec) -> str | None:
    """The ``pretrained`` argument for open_clip: a local file, a tag, or None (random init). Fails fast offline."""
    if spec.weights_file:
        path = Path(spec.weights_file)
        if not path.is_file():
            raise EmbedError(f"text encoder weights file {path} does not exist")
        return str(path)
    if spec.pretrained.lower() in ("none", ""):
        return None
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(spec.model)
    if spec.model.startswith("hf-hub:"):
        tags = [spec.pretrained]
    if spec.pretrained not in tags:
        raise EmbedError(f"open_clip has no pretrained tag {spec.pretrained!r} for {spec.model!r}; known: {tags}")
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not _cached(spec):
        raise EmbedError(f"weights {spec.model}/{spec.pretrained} are not in the local cache and HF_HUB_OFFLINE=1: "
                         "download them where there is internet, or pass a local file as weights_file")
    return spec.pretrained


def _cached(spec: EncoderSpec) -> bool:
    """True when open_clip's pretrained weights for ``spec`` are already in the Hugging Face cache."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    hub = open_clip.get_pretrained_cfg(spec.model, spec.pretrained).get("hf_hub", "")
    repo_id = "/".join(hub.rstrip("/").split("/")[:2])
    if not repo_id:
        return False
    return any(isinstance(try_to_load_from_cache(repo_id, name), str)
               for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))


def import_embeddings(path: str | Path, classes: ClassTable, names: list[str] | None = None) -> dict:
    """Import a precomputed embedding table (e.g. the original's ``txt_encoding.pth``), matching rows by name.

    A bare tensor needs row names: ``names``, or by default the original's 32-class order when it has 32 rows.
    A record written by :func:`embed_prompts` carries its own names. Raises naming every class without a row.
    """
    path = Path(path)
    try:
        data = load_torch_file(path, "embedding table")
    except TorchFileError as err:
        raise EmbedError(str(err)) from err
    if isinstance(data, dict):
        if "embeddings" not in data or "class_names" not in data:
            raise EmbedError(f"{path}: a dict without 'embeddings' and 'class_names' (it has "
                             f"{sorted(map(str, data))}); import a bare (classes x dim) tensor or a file written by "
                             "universal embed")
        table, row_names, encoder = data["embeddings"], list(data["class_names"]), data.get("encoder", {})
    else:
        table, encoder = data, {"model": "unknown", "pretrained": "unknown", "source": str(path)}
        if names is None and table.shape[0] == len(ORIGINAL_CLASS_ORDER):
            names = list(ORIGINAL_CLASS_ORDER)
            encoder = {"model": "ViT-B/32 (OpenAI clip)", "pretrained": "openai",
                       "source": f"{path} (CLIP-Driven Universal Model txt_encoding.pth order)"}
        if names is None:
            raise EmbedError(f"{path}: a bare tensor of {table.shape[0]} rows needs row names (--names)")
        row_names = [ORIGINAL_ALIASES.get(n, n) for n in names]
    if table.ndim != 2 or table.shape[0] != len(row_names):
        raise EmbedError(f"{path}: expected a (classes x dim) table for {len(row_names)} names, "
                         f"got {tuple(table.shape)}")
    row_of = {name: i for i, name in enumerate(row_names)}
    missing = [n for n in classes.names if n not in row_of]
    if missing:
        raise EmbedError(f"{path}: no embedding for classes {missing}")
    rows = torch.stack([table[row_of[n]] for n in classes.names]).float().contiguous()
    return {"embeddings": rows, "class_names": classes.names, "prompts": classes.prompts,
            "encoder": {**encoder, "imported_from": str(path), "sha256": _sha256(path)}}


def save_embeddings(record: dict, path: str | Path) -> None:
    """Save an embeddings record under a temporary name, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        torch.save(record, tmp)


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
