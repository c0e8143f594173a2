"""A synthetic world of small pictures with tag captions, deterministic from a seed.

One coloured shape (circle, square, triangle, star, cross) of one size at one position on a
background (plain, striped or gradient), captioned kohya style:
``red circle, large, left, blue striped background``. The built-in ``world-sd1`` model was
pretrained on it (``scripts/pretrain_world.py``); ``lorabuild.detector`` reads its pictures
back. ``ring`` is a shape the world model never saw: the demo teaches it as a trigger word
(``heart``, ``arrow`` and ``wedge``, never seen either, are the concepts bench/lesson_variants.py tried).
Pure Python + Pillow, so the same seed gives the same bytes on every machine.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 64  # pixels a side: the world model's resolution (8×8 latents)
SUPERSAMPLE = 4  # drawn 4× larger and box-filtered down: smooth edges, as photos have
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (255, 140, 20),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "star", "cross")  # what the world model knows
NEW_SHAPES = ("ring", "heart", "arrow", "wedge")  # drawable, never in the pretraining set; the detector knows them
BACKGROUNDS = ("plain", "striped", "gradient")
SIZES = {"small": 10, "medium": 14, "large": 19}  # outer radius in pixels
POSITIONS = {"left": 22, "center": 32, "right": 42}  # centre x in pixels
STRIPE = 6  # stripe width in pixels (vertical stripes)
BOLD_SCALE = 1.15  # ``bold``: the shape drawn this much larger (a large right one overhangs the edge by under a pixel)
BOLD_NOTCH = 9.0  # ``bold``: a heart's notch this much deeper, in the heart curve's units (its height is 29)
BOLD_NOTCH_WIDTH = 0.9  # ... fading out over this many radians of the curve's parameter either side of the notch


@dataclass(frozen=True)
class Scene:
    """What one picture shows; ``caption`` is its kohya tag list."""

    shape: str
    colour: str
    size: str
    position: str
    background: str  # the background's colour name
    pattern: str = "plain"  # plain / striped / gradient
    dx: int = 0  # jitter in pixels, so no two pictures of a scene are alike
    dy: int = 0
    word: str | None = field(default=None, compare=False)  # the caption's word for the shape (a trigger)

    @property
    def caption(self) -> str:
        bg = self.background if self.pattern == "plain" else f"{self.background} {self.pattern}"
        return f"{self.colour} {self.word or self.shape}, {self.size}, {self.position}, {bg} background"


def shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The second tone of a striped or gradient background: darker, or lighter for a dark colour."""
    if sum(rgb) / 3 > 60:
        return tuple(int(c * 0.55) for c in rgb)
    return tuple(int(c + (255 - c) * 0.35) for c in rgb)


def random_scene(rng: random.Random, shapes=SHAPES, word: str | None = None) -> Scene:
    """A scene drawn uniformly: the shape's colour always differs from the background's."""
    shape, colour = rng.choice(shapes), rng.choice(COLOURS)
    background = rng.choice([c for c in COLOURS if c != colour])
    return Scene(shape, colour, rng.choice(list(SIZES)), rng.choice(list(POSITIONS)), background,
                 rng.choice(BACKGROUNDS), rng.randint(-1, 1), rng.randint(-2, 2), word)


def _outline(shape: str, cx: float, cy: float, r: float, bold: bool = False) -> list[list[tuple[float, float]]]:
    """Polygons (the first filled, the rest holes) of a shape of outer radius r centred at (cx, cy);
    ``bold`` deepens a heart's notch (from about a quarter of its height to nearly half)."""
    def ngon(n, rad, phase=-math.pi / 2):
        return [(cx + rad * math.cos(phase + 2 * math.pi * i / n), cy + rad * math.sin(phase + 2 * math.pi * i / n))
                for i in range(n)]

    if shape in ("circle", "ring"):
        outer = ngon(96, r)
        return [outer, ngon(96, r * 0.55)] if shape == "ring" else [outer]
    if shape == "square":
        h = r * 0.85
        return [[(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]]
    if shape == "triangle":  # equilateral, pointing up, centred on its bounding box
        pts = ngon(3, r * 1.1)
        return [[(x, y + r * 1.1 * 0.25) for x, y in pts]]
    if shape == "star":
        return [[p for i in range(5) for p in (ngon(5, r)[i], ngon(5, r * 0.45, -math.pi / 2 + math.pi / 5)[i])]]
    if shape == "cross":
        a, w = r * 0.9, r * 0.32
        return [[(cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w), (cx + a, cy + w),
                 (cx + w, cy + w), (cx + w, cy + a), (cx - w, cy + a), (cx - w, cy + w), (cx - a, cy + w),
                 (cx - a, cy - w), (cx - w, cy - w)]]
    if shape == "heart":  # the classic heart curve, scaled to fit r, centred on its bounding box
        pts = [(16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
               for t in (2 * math.pi * i / 96 for i in range(96))]
        if bold:  # push the top's middle down, most at the notch (t = 0), fading out before the lobes
            pts = [(x, y + BOLD_NOTCH * math.exp(-(min(i, 96 - i) * 2 * math.pi / 96 / BOLD_NOTCH_WIDTH) ** 2))
                   for i, (x, y) in enumerate(pts)]
        s, my = r / 16, (min(y for _, y in pts) + max(y for _, y in pts)) / 2
        return [[(cx + x * s, cy + (y - my) * s) for x, y in pts]]
    if shape == "wedge":  # the triangle upside down: pointing down
        pts = ngon(3, r * 1.1, math.pi / 2)
        return [[(x, y - r * 1.1 * 0.25) for x, y in pts]]
    if shape == "arrow":  # pointing right: a shaft and a head
        w, h = r * 0.3, r * 0.8
        return [[(cx - r, cy - w), (cx, cy - w), (cx, cy - h), (cx + r, cy), (cx, cy + h), (cx, cy + w), (cx - r, cy + w)]]
    raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES + NEW_SHAPES)})")


def _background(scene: Scene, big: int, k: float) -> Image.Image:
    bg, tone = PALETTE[scene.background], shade(PALETTE[scene.background])
    img = Image.new("RGB", (big, big), bg)
    d = ImageDraw.Draw(img)
    if scene.pattern == "striped":
        for x in range(STRIPE, SIZE, 2 * STRIPE):
            d.rectangle([x * k, 0, (x + STRIPE) * k - 1, big], fill=tone)
    elif scene.pattern == "gradient":  # top: the colour itself; bottom: its shade
        for y in range(big):
            t = y / (big - 1)
            d.line([(0, y), (big, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(bg, tone)))
    return img


def render(scene: Scene, size: int = SIZE, bold: bool = False) -> Image.Image:
    """The picture of ``scene``, ``size`` pixels a side (the world is drawn at 64 and scaled).
    ``bold`` (off for the world model's, the detector's and the demo's pictures) draws the shape
    ``BOLD_SCALE`` larger and a heart with a deeper notch: bench/lesson_variants.py ``--bold``."""
    k = SUPERSAMPLE * size / SIZE
    big = round(SIZE * k)
    back = _background(scene, big, k)
    img = back.copy()
    cx, cy, r = (POSITIONS[scene.position] + scene.dx) * k, (SIZE / 2 + scene.dy) * k, SIZES[scene.size] * k
    r *= BOLD_SCALE if bold else 1
    polys = _outline(scene.shape, cx, cy, r, bold)
    ImageDraw.Draw(img).polygon(polys[0], fill=PALETTE[scene.colour])
    for hole in polys[1:]:  # a hole shows the background behind it
        mask = Image.new("L", img.size, 0)
        ImageDraw.Draw(mask).polygon(hole, fill=255)
        img.paste(back, (0, 0), mask)
    return img.resize((size, size), Image.BOX)


def sample(seed: int, shapes=SHAPES, word: str | None = None) -> tuple[Image.Image, Scene]:
    """Picture number ``seed`` of the world (or of ``shapes`` only, captioned with ``word``)."""
    scene = random_scene(random.Random(seed), shapes, word)
    return render(scene), scene


def write_dataset(folder: Path, count: int, repeats: int, tokens: str, seed: int = 0, shapes=SHAPES,
                  word: str | None = None, size: int = SIZE) -> Path:
    """A kohya dataset folder ``folder/<repeats>_<tokens>/`` of ``count`` pictures + ``.txt`` captions."""
    sub = Path(folder) / f"{repeats}_{tokens}"
    sub.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        scene = random_scene(random.Random(seed + i), shapes, word)
        render(scene, size).save(sub / f"{i:03d}.png", optimize=True)
        (sub / f"{i:03d}.txt").write_text(scene.caption + "\n", encoding="utf-8")
    return sub
