"""The anatomy of the phantoms: tissue intensity models and the painters of body wall, bones, vessels and organs.

Everything is drawn in *patient coordinates* (mm, RAS+: +x toward the patient's right, +y anterior, +z superior,
origin near the centre of the body) on a :class:`~universal.synthetic.shapes.Canvas`. Each case varies organ
shape (random radii and smooth bumps), size (organ volume within +-15 %) and position (+-10 mm).

Structures are painted in priority order into space that is still free, so organs abut rather than overlap:
vessels first, then solid organs (the liver wraps the gall bladder, the IVC and the portal vein), then hollow
organs, small bowel last.

Intensities are Hounsfield units of a portal-venous CT (liver ~100, spleen ~110, kidney ~170, vessels
~150-180, fat -100, lung -850, bone 250-700). All class values come from the universal class table
(``config/classes.yaml``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from statistics import NormalDist

import numpy as np

from universal.core.classes import load_class_table
from universal.synthetic.shapes import (
    AIR_HU,
    Block,
    Bumps,
    Canvas,
    Ellipsoid,
    HUFunction,
    Union,
    Waves,
    bbox,
    rotation_matrix,
    tube,
)

FAT_HU = -100.0
VISCERAL_FAT_HU = -90.0
MUSCLE_HU = 50.0
GAS_HU = -950.0


@cache
def _class_values() -> dict[str, int]:
    return {c.name: c.index for c in load_class_table()}


def label_value(name: str) -> int:
    """Universal label value of a class."""
    return _class_values()[name]


def _tissue(rng: np.random.Generator, base: float, rim_hu: float | None = None, rim: float = 0.2,
            texture: float = 4.0, wavelength_mm: float = 30.0) -> HUFunction:
    """A solid tissue: ``base`` HU (+-5 % per case) with a smooth texture of ``texture`` HU (std) and an
    optional rim (wall, cortex) of ``rim_hu`` in the outer ``rim`` fraction of the normalised radius."""
    base = base * rng.uniform(0.95, 1.05)
    waves = Waves(rng, wavelength_mm)

    def hu(block: Block, level: np.ndarray) -> np.ndarray:
        field = texture * waves(block)
        if rim_hu is None:
            return base + field
        return np.where(level > 1 - rim, rim_hu + 0.5 * field, base + field)

    return hu


def _lumen(rng: np.random.Generator, content: float, wall: float, gas_fraction: float,
           wall_rim: float = 0.25, wavelength_mm: float = 35.0) -> HUFunction:
    """A hollow organ: ``content`` HU with gas pockets (about ``gas_fraction`` of the lumen) and a ``wall``."""
    waves = Waves(rng, wavelength_mm)
    texture = Waves(rng, 12.0)
    threshold = NormalDist().inv_cdf(1 - gas_fraction) if gas_fraction > 0 else np.inf

    def hu(block: Block, level: np.ndarray) -> np.ndarray:
        field = waves(block)
        out = np.where(field > threshold, GAS_HU, content + 12.0 * texture(block))
        return np.where(level > 1 - wall_rim, wall, out)

    return hu


def _bone(cancellous: float = 250.0, cortical: float = 650.0, rim: float = 0.3) -> HUFunction:
    """Bone: cancellous interior with a cortical shell in the outer ``rim`` of the normalised radius."""

    def hu(block: Block, level: np.ndarray) -> np.ndarray:
        return np.where(level > 1 - rim, cortical, cancellous).astype(np.float32)

    return hu


def _offset(rng: np.random.Generator, sd_mm: float = 4.0, limit_mm: float = 10.0) -> np.ndarray:
    """A random displacement (mm), each component within +-``limit_mm``."""
    return np.clip(rng.normal(0.0, sd_mm, 3), -limit_mm, limit_mm)


def _size(rng: np.random.Generator) -> float:
    """A linear scale factor that changes a volume by -13 % to +15 %."""
    return float(rng.uniform(0.87, 1.15) ** (1 / 3))


def _organ(rng: np.random.Generator, center: Sequence[float], radii: Sequence[float],
           rotation: np.ndarray | None = None, bumps: float = 0.1) -> Ellipsoid:
    """A per-case variant of a nominal ellipsoid: shifted, resized, reshaped (radii +-8 %) and deformed."""
    aspect = rng.uniform(0.92, 1.08, 3)
    radii = np.asarray(radii, dtype=float) * _size(rng) * aspect / np.prod(aspect) ** (1 / 3)
    return Ellipsoid(np.asarray(center, dtype=float) + _offset(rng), radii,
                     np.eye(3) if rotation is None else rotation, Bumps.random(rng, bumps))


def _moved(rng: np.random.Generator, points: Sequence[Sequence[float]], jitter_mm: float = 3.0) -> np.ndarray:
    """Control points shifted together (+-10 mm) and each by a little (``jitter_mm`` std)."""
    pts = np.asarray(points, dtype=float)
    return pts + _offset(rng) + rng.normal(0.0, jitter_mm, pts.shape)


def paint_body(canvas: Canvas, rng: np.random.Generator) -> float:
    """Skin outline, subcutaneous fat, muscle wall, ribs, the diaphragm and the inner (visceral) cavity.

    Returns the height (z, mm) of the right diaphragmatic dome.
    """
    b = canvas.full_block()
    half_x, half_y = rng.uniform(152, 170), rng.uniform(112, 124)
    fat, muscle = rng.uniform(12, 26), rng.uniform(8, 12)
    taper = (1 + 0.03 * np.sin(b.pz / 90 + rng.uniform(0, 2 * np.pi))).astype(np.float32)
    y_scale = np.where(b.py < 0, 0.94 * half_y, half_y)
    e = (np.abs(b.px / half_x) ** 2.4 + np.abs(b.py / y_scale) ** 2.4) ** (1 / 2.4) / taper
    mean_radius = (half_x + half_y) / 2
    fat_in, wall_in = 1 - fat / mean_radius, 1 - (fat + muscle) / mean_radius
    canvas.hu[:] = np.select([e > 1, e > fat_in, e > wall_in], [AIR_HU, FAT_HU, MUSCLE_HU], VISCERAL_FAT_HU)
    canvas.inner[:] = e <= wall_in
    canvas.occupied[:] = ~canvas.inner
    right_apex = 148 + rng.uniform(-8, 8)
    dome = _diaphragm_height(b, right_apex, right_apex - rng.uniform(6, 14))
    canvas.thorax[:] = canvas.inner & (b.pz > dome)
    diaphragm = canvas.inner & (np.abs(b.pz - dome) < 3.5)
    canvas.put(b.slices, diaphragm, np.full(canvas.shape, MUSCLE_HU - 10, dtype=np.float32))
    ribs = (e > wall_in - 0.05) & (e <= fat_in) & (b.pz + 0.35 * b.py > 0)
    ribs &= np.sin(2 * np.pi * (b.pz + 0.3 * b.py) / 30.0) > 0.45
    canvas.put(b.slices, ribs, np.full(canvas.shape, 450.0, dtype=np.float32))
    return right_apex


def _diaphragm_height(b: Block, right_apex: float, left_apex: float) -> np.ndarray:
    """Height (z, mm) of the diaphragm at each (x, y): two domes meeting lower at the midline."""
    right = right_apex - 55 * (((b.px - 60) / 100) ** 2 + (b.py / 110) ** 2)
    left = left_apex - 55 * (((b.px + 60) / 100) ** 2 + ((b.py + 5) / 110) ** 2)
    return np.maximum(right, left)


def paint_spine_and_muscles(canvas: Canvas, rng: np.random.Generator) -> None:
    """Paraspinal and psoas muscles, the lumbar and lower thoracic spine (vertebrae, discs, canal), sacrum."""
    body = canvas.in_body()
    muscle = _tissue(rng, MUSCLE_HU, texture=5.0)
    for side in (1, -1):
        canvas.paint(tube([[35 * side, -80, 200], [36 * side, -82, 0], [32 * side, -85, -90]], [22, 22, 14]),
                     0, muscle, body)
        canvas.paint(tube(_moved(rng, [[30 * side, -38, 75], [40 * side, -35, 0], [55 * side, -25, -60],
                                       [75 * side, -5, -125]], 1.0), [7, 15, 21, 17]), 0, muscle, body)
    block = canvas.block(np.array([-60.0, -115.0, -75.0]), np.array([60.0, -10.0, 400.0]))
    if block is not None:
        _paint_vertebrae(canvas, block, rng.uniform(0, 34))
    sacrum = Union((*tube([[0, -45, -55], [0, -70, -120], [0, -90, -170]], [18, 14, 8]).members,
                    *tube([[30, -48, -65], [14, -75, -140]], [14, 8]).members,
                    *tube([[-30, -48, -65], [-14, -75, -140]], [14, 8]).members))
    canvas.paint(sacrum, 0, _bone(), body)


def _paint_vertebrae(canvas: Canvas, b: Block, phase_mm: float) -> None:
    """Vertebral bodies (centre y = -35 mm) with discs every 34 mm, arches, processes and the spinal canal."""
    level_mm = np.mod(b.pz - phase_mm, 34.0)
    disc = level_mm < 8.0
    vb = np.sqrt((b.px / 21) ** 2 + ((b.py + 35) / 17) ** 2)
    canal = np.sqrt((b.px / 9) ** 2 + ((b.py + 61) / 8) ** 2)
    arch = (canal > 1) & (np.sqrt((b.px / 16) ** 2 + ((b.py + 63) / 14) ** 2) <= 1)
    spinous = (np.abs(b.px) < 4) & (b.py < -70) & (b.py > -103) & ~disc
    transverse = (np.abs(b.px) < 45) & (np.abs(b.py + 58) < 5) & (level_mm > 12) & (level_mm < 24)
    above_sacrum = b.pz > -60
    inside_vb = vb <= 1
    hu = np.select([inside_vb & disc, inside_vb & (vb > 0.8), inside_vb, canal <= 1], [90.0, 650.0, 250.0, 20.0],
                   550.0).astype(np.float32)
    spine = (inside_vb | (canal <= 1) | arch | spinous | transverse) & above_sacrum
    canvas.put(b.slices, np.broadcast_to(spine, b.shape), np.broadcast_to(hu, b.shape))


def paint_pelvic_bones(canvas: Canvas, rng: np.random.Generator) -> None:
    """Iliac wings, pubic and ischial rami, acetabula, femoral necks and shafts (label 0), femoral heads."""
    body = canvas.in_body()
    bone = _bone()
    for side, name in ((1, "Right Head of Femur"), (-1, "Left Head of Femur")):
        mirror = np.array([side, 1, 1])
        wing = Union((*tube(mirror * [[40, -68, -60], [85, -55, -40], [122, -22, -50], [118, 0, -85],
                                      [100, -5, -125]], [9, 8, 8, 9, 11]).members,
                      *tube(mirror * [[55, -62, -50], [108, -30, -62], [95, -12, -112]], [7, 7, 9]).members))
        canvas.paint(wing, 0, bone, body)
        canvas.paint(tube(mirror * [[95, 0, -150], [70, 35, -165], [18, 52, -168]], [10, 9, 9]), 0, bone, body)
        canvas.paint(tube(mirror * [[85, -25, -160], [72, -32, -195]], [12, 10]), 0, bone, body)
        head = _organ(rng, mirror * [92, -5, -150], [23, 23, 23], bumps=0.02)
        canvas.paint(Ellipsoid(head.center + mirror * [-7, 0, 5], np.full(3, 31.0), np.eye(3)), 0, bone, body)
        neck = tube([head.center, head.center + mirror * [28, 8, -32], head.center + mirror * [34, 14, -120]],
                    [14, 14, 13])
        canvas.paint(neck, 0, bone, body)
        canvas.paint(Ellipsoid(head.center + mirror * [36, -2, -26], np.full(3, 17.0), np.eye(3)), 0, bone, body)
        canvas.paint(head, label_value(name), _bone(300.0, 700.0, 0.15), body)


def paint_vessels(canvas: Canvas, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Aorta with celiac trunk, SMA and iliac arteries; IVC with iliac veins; portal, splenic and SMV veins.

    Returns landmarks (patient mm) the liver's vessels start from: ``porta`` (hepatis) and ``ivc_top``.
    """
    cavity = canvas.free_in(canvas.inner)
    artery, vein, portal = _tissue(rng, 175, texture=3), _tissue(rng, 150, texture=3), _tissue(rng, 170, texture=3)
    aorta = _moved(rng, [[-20, -10, 240], [-17, -6, 120], [-14, -3, 40], [-10, -3, -50]], 1.0)
    canvas.paint(tube(aorta, [12, 12, 11, 9]), label_value("Aorta"), artery, cavity)
    for side in (1, -1):
        canvas.paint(tube([aorta[-1], [45 * side, -8, -100], [70 * side, 2, -140]], [6, 6, 5]), 0, artery, cavity)
    celiac = _point_at_height(aorta, 85.0 + rng.uniform(-5, 5)) + np.array([0, 8, 0])
    canvas.paint(tube(celiac + np.array([[0, 0, 0], [2, 12, 2], [4, 22, 4]]), [3.8, 3.6, 3.4]),
                 label_value("Celiac Trunk"), artery, cavity)
    sma = _point_at_height(aorta, 70.0) + np.array([0, 8, 0])
    canvas.paint(tube(sma + np.array([[0, 0, 0], [8, 20, -25], [12, 30, -110]]), [4.5, 4.5, 3.5]), 0, artery, cavity)
    ivc = _moved(rng, [[22, -5, -55], [24, -2, 60], [24, -6, 120], [18, 2, 240]], 1.0)
    canvas.paint(tube(ivc, [10, 11, 12, 13]), label_value("Postcava"), vein, cavity)
    for side in (1, -1):
        canvas.paint(tube([ivc[0], [55 * side, -16, -105], [72 * side, -6, -140]], [8, 8, 7]), 0, vein, cavity)
    confluence = np.array([5.0, 24.0, 45.0]) + _offset(rng, 2.0, 5.0)
    porta = np.array([45.0, 15.0, 85.0]) + _offset(rng, 3.0, 8.0)
    canvas.paint(tube([confluence, (confluence + porta) / 2 + [0, 3, 0], porta], [7.5, 7.5, 7]),
                 label_value("Portal Vein and Splenic Vein"), portal, cavity)
    splenic = _moved(rng, [[-28, 8, 55], [-58, -8, 65], [-80, -20, 75]], 1.5)
    canvas.paint(tube([confluence, *splenic], [5, 5, 5, 5.5]), label_value("Portal Vein and Splenic Vein"), portal,
                 cavity)
    canvas.paint(tube([[12, 36, -45], [9, 32, 10], confluence], [5, 5.5, 6]), 0, portal, cavity)
    return {"porta": porta, "ivc_top": _point_at_height(ivc, 140.0)}


def _point_at_height(points: np.ndarray, z: float) -> np.ndarray:
    """The point (mm) at height ``z`` of a roughly vertical polyline through ``points`` (K, 3)."""
    order = np.argsort(points[:, 2])
    return np.array([np.interp(z, points[order, 2], points[order, i]) for i in range(3)])


def paint_thorax(canvas: Canvas, rng: np.random.Generator, dome_mm: float) -> None:
    """Esophagus, heart, mediastinal fat and both lung bases (with vessel texture) above the diaphragm."""
    esophagus = _moved(rng, [[-5, 2, 240], [-10, 8, 165], [-25, 18, 142], [-40, 24, 133]], 1.0)
    canvas.paint(tube(esophagus, [9, 9, 9, 10]), label_value("Esophagus"), _lumen(rng, 40, 55, 0.12, 0.4),
                 canvas.free_in(canvas.inner))
    heart = _organ(rng, [-25, 38, dome_mm + 45], [72, 55, 60], rotation_matrix(yaw=30), 0.05)
    canvas.paint(heart, 0, _tissue(rng, 150, rim_hu=110, rim=0.2), canvas.free_in(canvas.thorax))
    b = canvas.block(np.array([-33.0, -30.0, 0.0]), np.array([23.0, 30.0, 400.0]))
    if b is not None:
        mediastinum = canvas.thorax[b.slices] & ~canvas.occupied[b.slices]
        canvas.put(b.slices, mediastinum, np.full(b.shape, -80.0, dtype=np.float32))
    sl = bbox(canvas.thorax & ~canvas.occupied)
    if sl is None:
        return
    b = canvas.block_at(sl)
    free = canvas.thorax[sl] & ~canvas.occupied[sl]
    hu = np.where(Waves(rng, 9.0, 8)(b) > 1.6, 20.0, -860.0 + 20.0 * Waves(rng, 40.0)(b))
    right = free & (b.px > 0)
    canvas.put(sl, right, hu, label_value("Right Lung"))
    canvas.put(sl, free & ~right, hu, label_value("Left Lung"))


def paint_retroperitoneum(canvas: Canvas, rng: np.random.Generator) -> None:
    """Kidneys (the right one lower), adrenal glands above them, pancreas and duodenum."""
    free = canvas.free_in(canvas.abdomen)
    for side, name, z in ((1, "Right Kidney", 8), (-1, "Left Kidney", 24)):
        rotation = rotation_matrix(yaw=-25 * side, pitch=-15 * side, roll=10)
        kidney = _organ(rng, [76 * side, -30, z], [27.5, 25, 57], rotation, 0.06)
        canvas.paint(kidney, label_value(name), _tissue(rng, 170, rim_hu=185, rim=0.3), free)
    for side, name, center in ((1, "Right Adrenal Gland", [38, -27, 88]), (-1, "Left Adrenal Gland", [-40, -20, 84])):
        adrenal = _organ(rng, center, [5, 11, 15], rotation_matrix(yaw=30 * side, roll=15), 0.1)
        canvas.paint(adrenal, label_value(name), _tissue(rng, 60), free)
    pancreas = _moved(rng, [[30, 14, 18], [28, 22, 38], [5, 34, 50], [-30, 22, 58], [-60, 2, 66], [-80, -14, 72]])
    canvas.paint(tube(pancreas, [16, 17, 12, 12, 11, 10]), label_value("Pancreas"),
                 _tissue(rng, 90, texture=8.0, wavelength_mm=9.0), free)
    duodenum = _moved(rng, [[12, 46, 68], [35, 32, 66], [50, 16, 55], [54, 12, 25], [48, 12, 0], [25, 14, -10],
                            [-5, 16, -12], [-25, 10, 0], [-32, 6, 16]], 2.0)
    canvas.paint(tube(duodenum, [10, 12, 12, 12, 12, 11, 11, 11, 10]), label_value("Duodenum"),
                 _lumen(rng, 30, 90, 0.15), free)


def paint_liver_and_upper_organs(canvas: Canvas, rng: np.random.Generator, landmarks: dict[str, np.ndarray]) -> None:
    """Gall bladder, liver (two lobes wrapping the IVC and portal vein) with its vessels, spleen, stomach."""
    free = canvas.free_in(canvas.abdomen)
    gall = _organ(rng, [50, 48, 52], [15, 15, 33], rotation_matrix(yaw=20, pitch=10, roll=30), 0.06)
    canvas.paint(gall, label_value("Gall Bladder"), _tissue(rng, 10, rim_hu=40, rim=0.12, texture=2.0), free)
    right_lobe = _organ(rng, [58, 10, 90], [80, 86, 70], rotation_matrix(yaw=rng.uniform(-10, 10)), 0.08)
    left_lobe = _organ(rng, [-18, 42, 104], [64, 32, 38], rotation_matrix(yaw=-15), 0.1)
    canvas.paint(Union((right_lobe, left_lobe)), label_value("Liver"), _tissue(rng, 100), free)
    _paint_hepatic_vessels(canvas, rng, landmarks)
    spleen = _organ(rng, [-85, -35, 92], [24, 52, 42], rotation_matrix(yaw=35), 0.08)
    canvas.paint(spleen, label_value("Spleen"), _tissue(rng, 110), free)
    stomach = _moved(rng, [[-40, 24, 133], [-60, 20, 128], [-55, 45, 100], [-35, 60, 78], [-5, 60, 70],
                           [12, 46, 68]], 2.0)
    canvas.paint(tube(stomach, [14, 34, 33, 27, 18, 11]), label_value("Stomach"), _stomach_hu(rng), free)


def _paint_hepatic_vessels(canvas: Canvas, rng: np.random.Generator, landmarks: dict[str, np.ndarray]) -> None:
    """Hepatic veins from the IVC and portal branches from the porta hepatis, inside the liver only."""
    vessel = _tissue(rng, 165, texture=3)
    liver = canvas.within(label_value("Liver"))
    top, porta = landmarks["ivc_top"], landmarks["porta"]
    for end in ([100, -10, 125], [60, 45, 120], [-10, 50, 125]):
        canvas.paint(tube([top, _moved(rng, [end], 4.0)[0]], [5.0, 3.2]), label_value("Hepatic Vessel"), vessel, liver)
    for path in ([[85, 2, 92], [112, 10, 70]], [[15, 38, 100], [-30, 45, 105]], [[70, 30, 110], [95, 45, 135]]):
        points = [porta, *_moved(rng, path, 4.0)]
        canvas.paint(tube(points, [5.0, 4.0, 3.2]), label_value("Hepatic Vessel"), vessel, liver)


def _stomach_hu(rng: np.random.Generator) -> HUFunction:
    """Gastric fluid (~25 HU) with an enhancing wall and gas collected anteriorly (the patient lies supine)."""
    fluid = _lumen(rng, 25, 100, 0.05, 0.15)
    gas_level = 55 + rng.uniform(-10, 15)

    def hu(block: Block, level: np.ndarray) -> np.ndarray:
        return np.where((block.py > gas_level) & (level <= 0.85), GAS_HU, fluid(block, level))

    return hu


def paint_pelvis_and_bowel(canvas: Canvas, rng: np.random.Generator) -> None:
    """Bladder, prostate, rectum, the colon frame (with haustra and stool) and the small bowel loops."""
    free = canvas.free_in(canvas.abdomen)
    bladder = _organ(rng, [0, 45, -122], [42, 32, 28], bumps=0.06)
    canvas.paint(bladder, label_value("Bladder"), _tissue(rng, 10, rim_hu=35, rim=0.1, texture=2.0), free)
    prostate = _organ(rng, [0, 22, -167], [20, 15, 17], bumps=0.06)
    canvas.paint(prostate, label_value("Prostate"), _tissue(rng, 40, texture=6.0, wavelength_mm=10.0), free)
    rectum = _moved(rng, [[0, -30, -116], [0, -40, -140], [0, -38, -165], [0, -25, -192]], 2.0)
    canvas.paint(tube(rectum, [16, 19, 16, 12]), label_value("Rectum"), _lumen(rng, 20, 60, 0.2), free)
    colon = _moved(rng, [[80, 15, -75], [88, 15, -20], [88, 15, 25], [72, 30, 42], [40, 58, 25], [0, 66, 15],
                         [-40, 60, 25], [-80, 25, 55], [-95, 5, 20], [-95, 5, -45], [-75, 18, -85], [-35, 25, -100],
                         [-5, 10, -110], [0, -30, -116]], 3.0)
    canvas.paint(tube(colon, [26, 24, 22, 22, 20, 18, 18, 18, 18, 18, 17, 16, 15, 15], ripple=0.1),
                 label_value("Colon"), _lumen(rng, 15, 70, 0.3, 0.2), free)
    path = _small_bowel_path(rng, start=np.array([-32.0, 6.0, 16.0]), end=np.array([75.0, 12.0, -70.0]))
    canvas.paint(tube(path, np.full(len(path), 13.0) * rng.uniform(0.9, 1.1, len(path))), label_value("Intestine"),
                 _lumen(rng, 30, 110, 0.1, 0.25), free)


def _small_bowel_path(rng: np.random.Generator, start: np.ndarray, end: np.ndarray, count: int = 28) -> np.ndarray:
    """Control points of the small bowel: random points in the mid/lower abdomen chained nearest-first."""
    direction = rng.normal(size=(count, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    points = np.array([5.0, 28.0, -45.0]) + direction * rng.random((count, 1)) ** (1 / 3) * [75, 35, 55]
    path = [start]
    remaining = list(points)
    while remaining:
        nearest = int(np.argmin([np.linalg.norm(p - path[-1]) for p in remaining]))
        path.append(remaining.pop(nearest))
    return np.array([*path, end])
