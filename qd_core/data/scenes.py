"""Procedural street scenes over the 19 Cityscapes classes, drawn at once into an RGB image and a train-id label.

A scene is a one-point perspective street: sky, a backdrop of buildings and trees, a road converging on a
vanishing point with sidewalks and terrain beside it, walls and fences along the sidewalk, poles with traffic
signs and lights, then vehicles, cyclists and pedestrians from far to near. Every shape is painted with the same
geometry into both images, so the label is exact. Colours are drawn per instance from a palette family of its
class (jittered, under a global exposure and white-balance jitter) and each class gets its own grain; thin
things (poles, fences, bicycles) are drawn at least two pixels wide. Version 1 of the generator drew overlapping
palettes (a grey car beside a grey wall, a yellow car beside a yellow bus) and one-pixel poles: beyond what the
CPU default (a 64-wide ViT at patch 16, trained for minutes) could separate, which left every class but the large
stuff and car at zero IoU. The target domains' shifts (fog, night, art palettes...) blur the families, so the
source-to-target gap still measures robustness. Everything random comes from the ``numpy.random.Generator``
passed in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from qd_core.data.labels import IGNORE_INDEX, NUM_CLASSES

(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON, RIDER, CAR, TRUCK, BUS,
 TRAIN, MOTORCYCLE, BICYCLE) = range(NUM_CLASSES)

RGB = tuple[int, int, int]
Point = tuple[float, float]

MIN_SIZE = 32

# Base colours per class; an instance picks one and jitters it. Each class has its own colour family, so that a
# 16-pixel patch of it is recognisable by a small model trained for minutes; shape and context still separate the
# classes whose families are close (person/rider, the vehicles), and the target domains' shifts blur the families.
_PALETTES: dict[int, Sequence[RGB]] = {
    ROAD: [(78, 78, 82), (92, 90, 90), (68, 70, 76)],
    SIDEWALK: [(178, 168, 160), (190, 178, 170), (165, 158, 160)],
    BUILDING: [(168, 98, 70), (140, 84, 64), (150, 120, 150), (110, 110, 150), (190, 150, 100)],
    WALL: [(150, 160, 178), (135, 145, 165), (165, 172, 188)],
    FENCE: [(120, 80, 45), (100, 65, 35), (140, 95, 55)],
    POLE: [(90, 105, 135), (110, 125, 150), (75, 90, 115)],
    VEGETATION: [(50, 105, 40), (40, 85, 35), (65, 120, 45)],
    TERRAIN: [(150, 165, 70), (165, 170, 85), (135, 155, 60)],
    PERSON: [(150, 40, 130), (120, 30, 110), (170, 70, 150), (100, 40, 120)],
    RIDER: [(235, 100, 40), (215, 80, 30), (240, 130, 60)],
    CAR: [(20, 30, 90), (30, 70, 140), (60, 40, 110)],
    TRUCK: [(225, 225, 215), (240, 238, 228), (205, 205, 195)],
    BUS: [(230, 190, 30), (240, 170, 20), (220, 200, 50)],
    TRAIN: [(40, 150, 150), (30, 130, 140), (60, 170, 165)],
    MOTORCYCLE: [(200, 30, 30), (170, 20, 40), (220, 60, 40)],
    BICYCLE: [(60, 200, 90), (40, 170, 70), (90, 220, 110)],
}

# Grain amplitudes (per-pixel, blotchy) per class in 0..255 units; index 19 is used for ignored pixels.
_GRAIN_FINE = np.array([7, 6, 5, 6, 3, 2, 2, 2, 16, 12, 1.5, 3, 3, 3, 3, 3, 3, 3, 3, 5], dtype=np.float32)
_GRAIN_BLOTCH = np.array([10, 8, 9, 10, 4, 3, 2, 2, 22, 18, 7, 3, 3, 4, 4, 4, 4, 3, 3, 6], dtype=np.float32)


class Painter:
    """Paints each shape into the RGB image and, with its class id, into the label image."""

    def __init__(self, height: int, width: int, rng: np.random.Generator) -> None:
        self.h, self.w, self.rng = height, width, rng
        self.image = Image.new("RGB", (width, height))
        self.label = Image.new("L", (width, height), SKY)
        self._img = ImageDraw.Draw(self.image)
        self._lbl = ImageDraw.Draw(self.label)

    def color(self, cls: int, spread: float = 14.0) -> RGB:
        palette = _PALETTES[cls]
        return jitter(self.rng, palette[int(self.rng.integers(len(palette)))], spread)

    def polygon(self, points: Sequence[Point], cls: int, fill: RGB) -> None:
        pts = [(float(x), float(y)) for x, y in points]
        self._img.polygon(pts, fill=fill)
        self._lbl.polygon(pts, fill=cls)

    def rect(self, x0: float, y0: float, x1: float, y1: float, cls: int, fill: RGB) -> None:
        box = (float(min(x0, x1)), float(min(y0, y1)), float(max(x0, x1)), float(max(y0, y1)))
        self._img.rectangle(box, fill=fill)
        self._lbl.rectangle(box, fill=cls)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, cls: int, fill: RGB | None,
                outline: RGB | None = None, width: int = 1) -> None:
        box = (float(cx - rx), float(cy - ry), float(cx + rx), float(cy + ry))
        if fill is not None:
            self._img.ellipse(box, fill=fill)
            self._lbl.ellipse(box, fill=cls)
        if outline is not None:
            self._img.ellipse(box, outline=outline, width=width)
            self._lbl.ellipse(box, outline=cls, width=width)

    def line(self, points: Sequence[Point], cls: int, fill: RGB, width: float) -> None:
        pts = [(float(x), float(y)) for x, y in points]
        wd = max(1, int(round(width)))
        self._img.line(pts, fill=fill, width=wd)
        self._lbl.line(pts, fill=cls, width=wd)


def jitter(rng: np.random.Generator, color: RGB, spread: float) -> RGB:
    """The colour shifted by a common brightness offset and a smaller per-channel offset, clipped to 0..255."""
    shift = rng.normal(0.0, spread) + rng.normal(0.0, spread / 3, size=3)
    r, g, b = np.clip(np.asarray(color, dtype=np.float64) + shift, 0, 255)
    return int(r), int(g), int(b)


@dataclass
class Street:
    """One-point perspective: the horizon row, the vanishing point's column and the ground's edge slopes."""

    h: int
    w: int
    horizon: float
    vanish_x: float
    road_left: float   # slope dx/dy of the road's left edge below the vanishing point
    road_right: float
    walk_left: float   # slope of the sidewalk's outer edges
    walk_right: float

    def depth(self, y: float) -> float:
        """0 at the horizon, 1 at the bottom row: the size factor of an object standing at row ``y``."""
        return max(0.0, (y - self.horizon) / (self.h - self.horizon))

    def x_at(self, slope: float, y: float) -> float:
        return self.vanish_x + slope * (y - self.horizon)


def draw_scene(height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scene: RGB uint8 (H, W, 3) and its train-id label uint8 (H, W) with values in 0..18 ∪ {255}."""
    if height < MIN_SIZE or width < MIN_SIZE:
        raise ValueError(f"scene size must be at least {MIN_SIZE}x{MIN_SIZE} pixels, got {height}x{width}")
    p = Painter(height, width, rng)
    urban = rng.random() < 0.6
    street = _layout(height, width, rng)
    _sky(p, street)
    _backdrop(p, street, urban)
    _ground(p, street, urban)
    _roadside(p, street, urban)
    _traffic(p, street)
    if rng.random() < 0.15:
        _ego_hood(p)
    image = _texture(np.asarray(p.image, dtype=np.float32), np.asarray(p.label), rng)
    return image, np.array(p.label, dtype=np.uint8)


def _layout(h: int, w: int, rng: np.random.Generator) -> Street:
    horizon = h * rng.uniform(0.36, 0.5)
    vanish_x = w * rng.uniform(0.35, 0.65)
    span = h - horizon
    # Edge slopes from where each edge meets the bottom row, relative to the vanishing point.
    left_bottom = vanish_x - w * rng.uniform(0.35, 0.7)
    right_bottom = vanish_x + w * rng.uniform(0.35, 0.7)
    walk = w * rng.uniform(0.25, 0.6)
    return Street(h, w, horizon, vanish_x, (left_bottom - vanish_x) / span, (right_bottom - vanish_x) / span,
                  (left_bottom - walk - vanish_x) / span, (right_bottom + walk - vanish_x) / span)


def _sky(p: Painter, s: Street) -> None:
    overcast = p.rng.random() < 0.35
    top = jitter(p.rng, (150, 155, 160) if overcast else (60, 120, 200), 12)
    bottom = jitter(p.rng, (200, 200, 205) if overcast else (170, 200, 235), 10)
    rows = max(1, int(s.horizon) + 2)
    t = np.linspace(0.0, 1.0, rows)[:, None]
    grad = (1 - t) * np.asarray(top, dtype=np.float64) + t * np.asarray(bottom, dtype=np.float64)
    strip = np.repeat(grad[:, None, :], s.w, axis=1).astype(np.uint8)
    p.image.paste(Image.fromarray(strip), (0, 0))
    for _ in range(int(p.rng.integers(0, 4))):
        cx, cy = p.rng.uniform(0, s.w), p.rng.uniform(0, s.horizon * 0.6)
        rx, ry = s.w * p.rng.uniform(0.04, 0.12), s.h * p.rng.uniform(0.02, 0.05)
        p.ellipse(cx, cy, rx, ry, SKY, jitter(p.rng, (228, 230, 235), 8))


def _backdrop(p: Painter, s: Street, urban: bool) -> None:
    """Buildings with windows, and trees between them, standing on the horizon."""
    base = s.horizon + s.h * 0.02
    x = -s.w * p.rng.uniform(0, 0.1)
    while x < s.w:
        bw = s.w * p.rng.uniform(0.07, 0.22)
        if p.rng.random() < (0.85 if urban else 0.45):
            top = s.horizon * (p.rng.uniform(0.05, 0.75) if urban else p.rng.uniform(0.45, 0.85))
            _building(p, x, top, x + bw, base)
        elif p.rng.random() < 0.7:
            _tree(p, x + bw / 2, base, s.horizon * p.rng.uniform(0.35, 0.8), bw * 0.6)
        x += bw + (0 if urban and p.rng.random() < 0.7 else s.w * p.rng.uniform(0.0, 0.08))


def _building(p: Painter, x0: float, y0: float, x1: float, y1: float) -> None:
    p.rect(x0, y0, x1, y1, BUILDING, p.color(BUILDING, 12))
    if p.rng.random() < 0.3:  # a flat roof ledge
        p.rect(x0 - 1, y0, x1 + 1, y0 + max(1.0, (y1 - y0) * 0.03), BUILDING, p.color(BUILDING, 8))
    if p.rng.random() < 0.85:
        glass = jitter(p.rng, (60, 75, 95) if p.rng.random() < 0.7 else (190, 200, 210), 12)
        cols = int(p.rng.integers(2, 7))
        rows = int(p.rng.integers(2, 9))
        cw, rh = (x1 - x0) / cols, (y1 - y0) / rows
        if cw < 3 or rh < 3:
            return
        for r in range(rows - 1):
            for c in range(cols):
                wx, wy = x0 + c * cw + cw * 0.25, y0 + r * rh + rh * 0.25
                p.rect(wx, wy, wx + cw * 0.5, wy + rh * 0.5, BUILDING, glass)


def _tree(p: Painter, x: float, base: float, height: float, crown: float) -> None:
    trunk = jitter(p.rng, (90, 65, 45), 10)
    tw = max(1.0, crown * 0.12)
    p.rect(x - tw / 2, base - height * 0.45, x + tw / 2, base, VEGETATION, trunk)
    green = p.color(VEGETATION, 10)
    for _ in range(int(p.rng.integers(2, 5))):
        cx = x + p.rng.uniform(-0.3, 0.3) * crown
        cy = base - height * p.rng.uniform(0.55, 0.85)
        p.ellipse(cx, cy, crown * p.rng.uniform(0.35, 0.6), height * p.rng.uniform(0.2, 0.35), VEGETATION,
                  jitter(p.rng, green, 8))


def _ground(p: Painter, s: Street, urban: bool) -> None:
    """Terrain or sidewalk below the horizon, the two sidewalks, the road, its curbs and lane marks."""
    top, bottom = s.horizon, float(s.h)
    far = (TERRAIN if p.rng.random() < 0.7 else SIDEWALK) if not urban else (
        SIDEWALK if p.rng.random() < 0.6 else TERRAIN)
    p.rect(0, top, s.w, bottom, far, p.color(far))
    vp = (s.vanish_x, top)

    def wedge(a: float, b: float, cls: int, fill: RGB) -> None:
        p.polygon([vp, (s.x_at(a, bottom), bottom), (s.x_at(b, bottom), bottom)], cls, fill)

    walk_left = SIDEWALK if urban or p.rng.random() < 0.6 else TERRAIN
    walk_right = SIDEWALK if urban or p.rng.random() < 0.6 else TERRAIN
    wedge(s.walk_left, s.road_left, walk_left, p.color(walk_left))
    wedge(s.road_right, s.walk_right, walk_right, p.color(walk_right))
    if walk_left == SIDEWALK or walk_right == SIDEWALK:  # paving joints across the sidewalks
        joint = jitter(p.rng, (125, 120, 115), 8)
        for t in np.geomspace(0.04, 1.0, 9):
            y = top + t * (bottom - top)
            if walk_left == SIDEWALK:
                p.line([(s.x_at(s.walk_left, y), y), (s.x_at(s.road_left, y), y)], SIDEWALK, joint, 1)
            if walk_right == SIDEWALK:
                p.line([(s.x_at(s.road_right, y), y), (s.x_at(s.walk_right, y), y)], SIDEWALK, joint, 1)
    wedge(s.road_left, s.road_right, ROAD, p.color(ROAD, 8))
    curb = jitter(p.rng, (185, 185, 180), 8)
    for slope in (s.road_left, s.road_right):
        p.line([vp, (s.x_at(slope, bottom), bottom)], SIDEWALK, curb, max(1.0, s.w * 0.006))
    mark = (235, 235, 230) if p.rng.random() < 0.75 else (225, 190, 40)
    centre = s.road_left + (s.road_right - s.road_left) * p.rng.uniform(0.4, 0.6)
    edges = np.geomspace(0.02, 1.0, 14)
    for t0, t1 in zip(edges[::2], edges[1::2]):
        y0, y1 = top + t0 * (bottom - top), top + t1 * (bottom - top)
        p.line([(s.x_at(centre, y0), y0), (s.x_at(centre, y1), y1)], ROAD, jitter(p.rng, mark, 5),
               max(1.0, s.w * 0.012 * t1))


def _roadside(p: Painter, s: Street, urban: bool) -> None:
    """Walls, fences, hedges and trees along the sidewalks' outer edges; poles with signs and lights on them."""
    for slope in (s.walk_left, s.walk_right):
        kind = p.rng.choice(4, p=[0.3, 0.3, 0.2, 0.2])  # wall, fence, hedge, or an open edge (3)
        t0, t1 = sorted(p.rng.uniform(0.05, 1.0, size=2))
        y0, y1 = s.horizon + t0 * (s.h - s.horizon), s.horizon + t1 * (s.h - s.horizon)
        height = s.h * p.rng.uniform(0.15, 0.35)
        if kind == 0:
            _wall(p, s, slope, y0, y1, height, WALL, p.color(WALL))
        elif kind == 1:
            _fence(p, s, slope, y0, y1, height * 0.8)
        elif kind == 2:
            _wall(p, s, slope, y0, y1, height * 0.7, VEGETATION, p.color(VEGETATION))  # a hedge
    trees = int(p.rng.integers(0, 3 if urban else 5))
    for _ in range(trees):
        y = s.horizon + (s.h - s.horizon) * p.rng.uniform(0.08, 0.7)
        side = s.walk_left if p.rng.random() < 0.5 else s.walk_right
        d = s.depth(y)
        _tree(p, s.x_at(side, y), y, s.h * 0.9 * d + 4, s.w * 0.25 * d + 3)
    for _ in range(int(p.rng.integers(1, 5))):
        y = s.horizon + (s.h - s.horizon) * p.rng.uniform(0.05, 0.9)
        left = p.rng.random() < 0.5
        a, b = (s.walk_left, s.road_left) if left else (s.road_right, s.walk_right)
        x = s.x_at(a + (b - a) * p.rng.uniform(0.3, 0.8), y)
        _pole(p, s, x, y)
    if p.rng.random() < 0.4:  # unlabelled street furniture (bins, boxes) exercises the ignore index
        y = s.horizon + (s.h - s.horizon) * p.rng.uniform(0.1, 0.8)
        d = s.depth(y)
        side = s.walk_left if p.rng.random() < 0.5 else s.walk_right
        x = s.x_at(side * p.rng.uniform(0.6, 0.9), y)
        bw, bh = s.w * 0.05 * d + 2, s.h * 0.12 * d + 2
        p.rect(x - bw / 2, y - bh, x + bw / 2, y, IGNORE_INDEX, jitter(p.rng, (70, 90, 80), 20))


def _wall(p: Painter, s: Street, slope: float, y0: float, y1: float, height: float, cls: int, fill: RGB) -> None:
    d0, d1 = s.depth(y0), s.depth(y1)
    x0, x1 = s.x_at(slope, y0), s.x_at(slope, y1)
    p.polygon([(x0, y0), (x1, y1), (x1, y1 - height * d1), (x0, y0 - height * d0)], cls, fill)
    if cls == WALL:  # courses of the masonry
        line = jitter(p.rng, fill, 10)
        for f in (0.33, 0.66):
            p.line([(x0, y0 - height * d0 * f), (x1, y1 - height * d1 * f)], WALL, line, 1)


def _fence(p: Painter, s: Street, slope: float, y0: float, y1: float, height: float) -> None:
    fill = p.color(FENCE)
    d0, d1 = s.depth(y0), s.depth(y1)
    x0, x1 = s.x_at(slope, y0), s.x_at(slope, y1)
    for f in (0.2, 0.85):
        p.line([(x0, y0 - height * d0 * f), (x1, y1 - height * d1 * f)], FENCE, fill, max(2.0, 4 * d1))
    for t in np.linspace(0, 1, int(p.rng.integers(6, 16))):
        x, y = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
        d = s.depth(y)
        p.line([(x, y), (x, y - height * d)], FENCE, fill, max(2.0, 5 * d))


def _pole(p: Painter, s: Street, x: float, y: float) -> None:
    d = s.depth(y)
    height = s.h * 1.1 * d + 6
    pw = max(2.0, s.w * 0.014 * d)
    p.rect(x - pw / 2, y - height, x + pw / 2, y, POLE, p.color(POLE, 10))
    top = y - height
    kind = p.rng.choice(3, p=[0.4, 0.35, 0.25])
    size = max(4.0, s.w * 0.05 * d)
    if kind == 0:
        _sign(p, x, top + size * 1.2, size)
    elif kind == 1:
        _traffic_light(p, x, top, size)
    else:  # a street lamp: the arm is part of the pole
        arm = size * 2 * (1 if p.rng.random() < 0.5 else -1)
        p.line([(x, top + 1), (x + arm, top + 1)], POLE, p.color(POLE, 10), pw * 0.8)


def _sign(p: Painter, x: float, y: float, size: float) -> None:
    shape = int(p.rng.integers(3))
    if shape == 0:  # round prohibition sign
        p.ellipse(x, y, size, size, SIGN, jitter(p.rng, (200, 30, 35), 10))
        p.ellipse(x, y, size * 0.7, size * 0.7, SIGN, jitter(p.rng, (235, 235, 235), 8))
    elif shape == 1:  # warning triangle
        p.polygon([(x, y - size), (x + size, y + size * 0.8), (x - size, y + size * 0.8)], SIGN,
                  jitter(p.rng, (210, 40, 40), 10))
        p.polygon([(x, y - size * 0.45), (x + size * 0.55, y + size * 0.5), (x - size * 0.55, y + size * 0.5)], SIGN,
                  jitter(p.rng, (240, 235, 220), 8))
    else:  # direction board
        p.rect(x - size * 1.4, y - size * 0.7, x + size * 1.4, y + size * 0.7, SIGN,
               jitter(p.rng, (30, 80, 170) if p.rng.random() < 0.6 else (30, 130, 60), 10))


def _traffic_light(p: Painter, x: float, top: float, size: float) -> None:
    w, h = size * 0.9, size * 2.4
    p.rect(x - w / 2, top, x + w / 2, top + h, LIGHT, jitter(p.rng, (35, 35, 30), 8))
    lit = int(p.rng.integers(3))
    lamps: tuple[RGB, ...] = ((220, 40, 30), (230, 180, 30), (40, 200, 90))
    for i, (r, g, b) in enumerate(lamps):
        # Only one lamp is lit; the others are a dim version of their colour.
        colour = (r, g, b) if i == lit else (r // 4, g // 4, b // 4)
        p.ellipse(x, top + h * (i + 0.5) / 3, w * 0.3, w * 0.3, LIGHT, colour)


def _traffic(p: Painter, s: Street) -> None:
    """Vehicles on the road and people on the sidewalks, drawn far to near so near objects occlude far ones."""
    items: list[tuple[float, int, float]] = []  # (row of the ground contact, kind, column)
    for _ in range(int(p.rng.integers(1, 7))):
        y = s.horizon + (s.h - s.horizon) * p.rng.uniform(0.1, 1.05)
        lane = p.rng.uniform(0.15, 0.85)
        x = s.x_at(s.road_left + (s.road_right - s.road_left) * lane, y)
        items.append((y, int(p.rng.choice(5, p=[0.52, 0.12, 0.09, 0.07, 0.2])), x))
    for _ in range(int(p.rng.integers(0, 6))):
        y = s.horizon + (s.h - s.horizon) * p.rng.uniform(0.1, 1.0)
        a, b = (s.walk_left, s.road_left) if p.rng.random() < 0.5 else (s.road_right, s.walk_right)
        x = s.x_at(a + (b - a) * p.rng.uniform(0.2, 0.9), y)
        items.append((y, int(p.rng.choice([5, 6], p=[0.8, 0.2])), x))
    for y, kind, x in sorted(items):
        d = s.depth(y)
        if d < 0.05:
            continue
        if kind == 0:
            _car(p, x, y, s.w * 0.3 * d, side=p.rng.random() < 0.4)
        elif kind == 1:
            _truck(p, x, y, s.w * 0.34 * d)
        elif kind == 2:
            _bus(p, x, y, s.w * 0.6 * d, BUS)
        elif kind == 3:
            _bus(p, x, y, s.w * 0.9 * d, TRAIN)
        elif kind == 4:
            _two_wheeler(p, x, y, s.h * 0.36 * d, motor=p.rng.random() < 0.5, rider=p.rng.random() < 0.75)
        elif kind == 5:
            _person(p, x, y, s.h * 0.5 * d, PERSON)
        else:
            _two_wheeler(p, x, y, s.h * 0.36 * d, motor=False, rider=False)


def _wheel(p: Painter, x: float, y: float, r: float, cls: int) -> None:
    p.ellipse(x, y, r, r, cls, jitter(p.rng, (25, 25, 25), 5))
    p.ellipse(x, y, r * 0.45, r * 0.45, cls, jitter(p.rng, (130, 130, 135), 10))


def _car(p: Painter, x: float, y: float, width: float, side: bool) -> None:
    body = p.color(CAR, 10)
    glass = jitter(p.rng, (50, 60, 75), 10)
    if side:  # side view: longer, two visible wheels
        length, h = width * 1.6, width * 0.32
        x0 = x - length / 2
        p.polygon([(x0 + length * 0.2, y - h), (x0 + length * 0.3, y - h * 1.8), (x0 + length * 0.7, y - h * 1.8),
                   (x0 + length * 0.82, y - h)], CAR, body)
        p.polygon([(x0 + length * 0.26, y - h * 1.05), (x0 + length * 0.33, y - h * 1.65),
                   (x0 + length * 0.67, y - h * 1.65), (x0 + length * 0.76, y - h * 1.05)], CAR, glass)
        p.rect(x0, y - h * 1.1, x0 + length, y - h * 0.25, CAR, body)
        for fx in (0.2, 0.8):
            _wheel(p, x0 + length * fx, y - h * 0.25, h * 0.45, CAR)
        return
    h = width * 0.5
    x0, x1 = x - width / 2, x + width / 2
    for fx in (0.08, 0.78):
        p.rect(x0 + width * fx, y - h * 0.25, x0 + width * (fx + 0.14), y, CAR, jitter(p.rng, (25, 25, 25), 5))
    p.polygon([(x0 + width * 0.12, y - h * 1.0), (x0 + width * 0.22, y - h * 1.5), (x1 - width * 0.22, y - h * 1.5),
               (x1 - width * 0.12, y - h * 1.0)], CAR, body)
    p.polygon([(x0 + width * 0.17, y - h * 1.02), (x0 + width * 0.25, y - h * 1.42), (x1 - width * 0.25, y - h * 1.42),
               (x1 - width * 0.17, y - h * 1.02)], CAR, glass)
    p.rect(x0, y - h * 1.05, x1, y - h * 0.2, CAR, body)
    lamp = jitter(p.rng, (200, 30, 30), 10)
    for fx in (0.04, 0.84):
        p.rect(x0 + width * fx, y - h * 0.85, x0 + width * (fx + 0.12), y - h * 0.7, CAR, lamp)


def _truck(p: Painter, x: float, y: float, width: float) -> None:
    body, cab = p.color(TRUCK, 10), p.color(TRUCK, 10)
    length, h = width * 1.7, width * 0.75
    x0 = x - length / 2
    flip = p.rng.random() < 0.5
    cab_x = (x0 + length * 0.75, x0 + length) if not flip else (x0, x0 + length * 0.25)
    box_x = (x0, x0 + length * 0.73) if not flip else (x0 + length * 0.27, x0 + length)
    p.rect(box_x[0], y - h * 1.25, box_x[1], y - h * 0.2, TRUCK, body)
    p.rect(cab_x[0], y - h * 0.95, cab_x[1], y - h * 0.2, TRUCK, cab)
    win = (cab_x[0] + (cab_x[1] - cab_x[0]) * 0.2, cab_x[1] - (cab_x[1] - cab_x[0]) * 0.2)
    p.rect(win[0], y - h * 0.88, win[1], y - h * 0.6, TRUCK, jitter(p.rng, (50, 60, 75), 10))
    for fx in (0.15, 0.4, 0.87):
        _wheel(p, x0 + length * fx, y - h * 0.15, h * 0.17, TRUCK)


def _bus(p: Painter, x: float, y: float, length: float, cls: int) -> None:
    body = p.color(cls, 10)
    h = length * (0.3 if cls == BUS else 0.22)
    x0, x1 = x - length / 2, x + length / 2
    p.rect(x0, y - h * 1.15, x1, y - h * 0.12, cls, body)
    glass = jitter(p.rng, (45, 55, 70), 10)
    n = int(p.rng.integers(5, 10))
    for i in range(n):
        wx = x0 + length * (0.04 + 0.92 * i / n)
        p.rect(wx, y - h * 1.0, wx + length * 0.92 / n * 0.8, y - h * 0.6, cls, glass)
    if cls == BUS:
        for fx in (0.15, 0.82):
            _wheel(p, x0 + length * fx, y - h * 0.12, h * 0.14, cls)
    else:  # a tram: pantograph on the roof, bogies instead of visible wheels
        p.line([(x, y - h * 1.15), (x - h * 0.3, y - h * 1.45), (x + h * 0.2, y - h * 1.6)], cls, body, 1)
        for fx in (0.2, 0.8):
            p.rect(x0 + length * (fx - 0.06), y - h * 0.14, x0 + length * (fx + 0.06), y, cls,
                   jitter(p.rng, (40, 40, 40), 5))


def _person(p: Painter, x: float, y: float, height: float, cls: int, legs: bool = True) -> None:
    shirt, pants = p.color(cls, 12), p.color(cls, 12)
    skin = jitter(p.rng, (200, 160, 130) if p.rng.random() < 0.6 else (120, 85, 60), 12)
    w = height * 0.3
    head = height * 0.07
    if legs:
        step = w * p.rng.uniform(0.0, 0.3)
        p.line([(x, y - height * 0.48), (x - step, y)], cls, pants, w * 0.35)
        p.line([(x, y - height * 0.48), (x + step, y)], cls, pants, w * 0.35)
    p.rect(x - w / 2, y - height * 0.82, x + w / 2, y - height * 0.45, cls, shirt)
    p.line([(x - w / 2, y - height * 0.8), (x - w * 0.7, y - height * 0.5)], cls, shirt, w * 0.2)
    p.line([(x + w / 2, y - height * 0.8), (x + w * 0.7, y - height * 0.5)], cls, shirt, w * 0.2)
    p.ellipse(x, y - height * 0.82 - head, head, head * 1.15, cls, skin)


def _two_wheeler(p: Painter, x: float, y: float, size: float, motor: bool, rider: bool) -> None:
    cls = MOTORCYCLE if motor else BICYCLE
    frame = p.color(cls, 10)
    r = size * (0.22 if motor else 0.25)
    gap = size * 0.75
    xa, xb, yc = x - gap / 2, x + gap / 2, y - r
    if motor:
        _wheel(p, xa, yc, r, cls)
        _wheel(p, xb, yc, r, cls)
        p.polygon([(xa, yc - r * 0.2), (x - gap * 0.1, yc - r * 1.6), (xb, yc - r * 1.1), (xb - r * 0.3, yc)], cls,
                  frame)
    else:
        tyre = jitter(p.rng, (25, 25, 25), 5)
        wd = max(2, int(round(r * 0.3)))
        p.ellipse(xa, yc, r, r, cls, None, outline=tyre, width=wd)
        p.ellipse(xb, yc, r, r, cls, None, outline=tyre, width=wd)
        seat, bar = (x - gap * 0.15, yc - r * 1.3), (xb - gap * 0.1, yc - r * 1.5)
        p.line([(xa, yc), (x, yc), seat, (xa, yc)], cls, frame, max(2.0, r * 0.25))
        p.line([(x, yc), bar, (xb, yc)], cls, frame, max(2.0, r * 0.25))
    if rider:
        _person(p, x - gap * 0.1, yc - r * 0.2, size * 1.2, RIDER, legs=True)


def _ego_hood(p: Painter) -> None:
    """The bonnet of the recording car along the bottom edge, unlabelled as in Cityscapes."""
    h, w = p.h, p.w
    top = h * (1 - p.rng.uniform(0.06, 0.12))
    p.polygon([(0, h), (w * 0.08, top), (w * 0.92, top), (w, h)], IGNORE_INDEX, jitter(p.rng, (40, 40, 45), 15))


def _texture(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Class-dependent grain, a global exposure/white-balance jitter, then quantise to uint8 (H, W, 3)."""
    h, w = label.shape
    cls = np.where(label == IGNORE_INDEX, NUM_CLASSES, label).astype(np.intp)
    fine = rng.normal(0.0, 1.0, size=(h, w)).astype(np.float32)
    coarse = rng.normal(0.0, 1.0, size=(max(2, h // 12), max(2, w // 12))).astype(np.float32)
    # Blotches: bilinear upsampling of a coarse field gives a smooth, low-frequency pattern.
    blotch = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.float32)
    grain = _GRAIN_FINE[cls] * fine + _GRAIN_BLOTCH[cls] * blotch
    chroma = rng.normal(0.0, 2.0, size=(h, w, 3)).astype(np.float32)
    gain = rng.uniform(0.85, 1.15) * (1 + rng.normal(0.0, 0.04, size=3))
    out = (image + grain[..., None] + chroma) * gain.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
