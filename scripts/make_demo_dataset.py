"""Make the demo dataset under projects/demo/ (run once; the images are committed).

Two concepts in kohya folders: red circles and blue squares on plain and striped
backgrounds, in three aspect ratios so that bucketing has work to do, with tag
captions in ``.txt`` files. One image per concept has no caption file, so its
caption is the folder name's tokens, as kohya does.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent / "projects" / "demo"
SIZES = [(192, 192), (160, 240), (240, 160), (200, 200), (176, 256), (256, 176), (224, 224), (192, 256)]
BACKGROUNDS = {
    "white background": (245, 245, 245),
    "yellow background": (235, 220, 120),
    "green background": (120, 190, 120),
    "grey background": (150, 150, 150),
}


def draw(kind: str, size: tuple[int, int], bg_name: str, striped: bool, rng: random.Random) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size, BACKGROUNDS[bg_name])
    d = ImageDraw.Draw(img)
    if striped:
        for x in range(0, w, 24):
            d.rectangle([x, 0, x + 8, h], fill=tuple(max(0, c - 40) for c in BACKGROUNDS[bg_name]))
    r = int(min(w, h) * rng.uniform(0.25, 0.38))
    cx = int(w / 2 + rng.uniform(-0.1, 0.1) * w)
    cy = int(h / 2 + rng.uniform(-0.1, 0.1) * h)
    box = [cx - r, cy - r, cx + r, cy + r]
    if kind == "redcircle":
        d.ellipse(box, fill=(210, 30, 30), outline=(90, 0, 0), width=3)
    else:
        d.rectangle(box, fill=(30, 60, 210), outline=(0, 0, 90), width=3)
    return img


def main() -> None:
    rng = random.Random(1234)
    if ROOT.exists():
        shutil.rmtree(ROOT)
    for kind in ("redcircle", "bluesquare"):
        folder = ROOT / f"10_{kind} shape"
        folder.mkdir(parents=True)
        for i, size in enumerate(SIZES):
            bg = list(BACKGROUNDS)[i % len(BACKGROUNDS)]
            striped = i % 3 == 2
            draw(kind, size, bg, striped, rng).save(folder / f"{kind}_{i:02d}.png", optimize=True)
            if i == len(SIZES) - 1:
                continue  # no caption file: the folder name's tokens are its caption
            tags = [kind, "shape", bg, "striped background" if striped else "plain background"]
            tags.append("portrait" if size[1] > size[0] else "landscape" if size[0] > size[1] else "square")
            (folder / f"{kind}_{i:02d}.txt").write_text(", ".join(tags) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
