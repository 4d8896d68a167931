"""Small synthetic inputs shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPHERE_SHAPE = (40, 40, 40)


def write_sphere_case(store: Path, case_id: str, classes, spheres, rng, dataset: str, annotated=None) -> None:
    """A synthetic store case: air-like noise (-900 ± 20 HU) with balls of given classes, on a 2 mm grid centred at 0.

    ``spheres``: (class name, centre voxel, radius in voxels, HU) tuples, painted in order; ``annotated`` defaults
    to the classes painted. The store records the digest of ``classes``, as harmonization does.
    """
    from universal.core.volume import Volume
    from universal.data.store import open_store, write_case

    grid = np.indices(SPHERE_SHAPE)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -39.0
    image = rng.normal(-900, 20, SPHERE_SHAPE).astype(np.int16)
    label = np.zeros(SPHERE_SHAPE, dtype=np.uint8)
    for name, centre, radius, hu in spheres:
        inside = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius ** 2
        label[inside], image[inside] = classes[name].index, hu
    attrs = {"dataset": dataset, "annotated": list(annotated or [s[0] for s in spheres]), "midline_x_mm": 0.0}
    write_case(store, case_id, Volume(image, affine), Volume(label, affine), attrs)
    open_store(store, mode="a").attrs.update({"class_table_digest": classes.digest(), "class_names": classes.names})


def write_tiny_checkpoint(path: Path, spacing_mm: float, trained: list[str] | None = None) -> Path:
    """A checkpoint of a tiny random U-Net (seed 0) for every class of the default table, recording an isotropic
    grid of ``spacing_mm``, the -175..250 HU window and 32³ windows; ``trained`` (default all) are predicted."""
    import torch

    from universal.core.classes import load_class_table
    from universal.model.network import ModelConfig, build_model, save_checkpoint
    from universal.model.preprocessing import Preprocessing

    classes = load_class_table()
    config = ModelConfig(backbone="unet", features=(8, 8, 16, 16, 32, 8))
    torch.manual_seed(0)
    model = build_model(config, torch.randn(len(classes), 512))
    preprocessing = Preprocessing((spacing_mm,) * 3, (-175.0, 250.0), (32, 32, 32)).to_dict()
    save_checkpoint(path, model, config, classes.names, {"trained_classes": trained or classes.names}, preprocessing)
    return path
