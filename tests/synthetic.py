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
