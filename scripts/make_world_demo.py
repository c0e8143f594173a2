"""Make the shipped demo's dataset under projects/demo/ (run once; the pictures are committed).

``lesson/10_ohwx/``: 16 world pictures (lorabuild/world.py) of a shape the world-sd1 model never
saw, a ring, captioned with the trigger word ``ohwx`` in the shape's place (``red ohwx, large,
left, blue striped background``): the caption names everything else in the picture, and colours,
sizes, positions and backgrounds vary, so only the ring is new and bound to ``ohwx``.

``reg/1_shape/``: regularization pictures (prior preservation, kohya's reg_data_dir) of the
shapes the model knows, with their full captions. Without them the LoRA learns "draw a ring"
for every prompt (issue 19: known-prompt accuracy 81% → 10%); with them it must keep drawing
what ``red circle`` or ``yellow square`` named.
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorabuild import world  # noqa: E402

DEMO = ROOT / "projects" / "demo"
TRIGGER = "ohwx"
SEED = 500_000  # apart from the pretraining seeds (0..) and the held-out ones (1,000,000..)
REG_SEED = 600_000
LESSON, REPEATS = 16, 10
REG = 64


def lesson_scenes(count: int, seed: int) -> list:
    """``count`` ring scenes that vary everything but the ring evenly: every colour as often (a
    skewed set teaches a colour too: 3 purple rings of 16 turned a blue triangle purple), sizes,
    positions and patterns in turn, a random background of another colour, jitter by the seed."""
    rng = random.Random(seed)
    sizes, positions = list(world.SIZES), list(world.POSITIONS)
    scenes = []
    for i in range(count):
        colour = world.COLOURS[i % len(world.COLOURS)]
        background = rng.choice([c for c in world.COLOURS if c != colour])
        scenes.append(world.Scene("ring", colour, sizes[i % 3], positions[(i // 3) % 3], background,
                                  world.BACKGROUNDS[(i // 2) % 3], rng.randint(-1, 1), rng.randint(-2, 2), TRIGGER))
    return scenes


def write(sub: Path, scenes: list, bold: bool = False) -> None:
    sub.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes):
        world.render(scene, bold=bold).save(sub / f"{i:03d}.png", optimize=True)
        (sub / f"{i:03d}.txt").write_text(scene.caption + "\n", encoding="utf-8")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEMO)
    p.add_argument("--reg", type=int, default=REG, help="regularization pictures")
    args = p.parse_args(argv)
    if args.out.exists():
        shutil.rmtree(args.out)
    write(args.out / "lesson" / f"{REPEATS}_{TRIGGER}", lesson_scenes(LESSON, SEED))
    if args.reg:
        world.write_dataset(args.out / "reg", count=args.reg, repeats=1, tokens="shape", seed=REG_SEED)


if __name__ == "__main__":
    main()
