"""Make the shipped demo's dataset under projects/demo/ (run once; the pictures are committed).

16 world pictures (lorabuild/world.py) of a shape the world-sd1 model never saw, a ring,
captioned with the trigger word ``ohwx`` in the shape's place: ``red ohwx, large, left,
blue striped background``. Colours, sizes, positions and backgrounds vary, so the LoRA
binds ``ohwx`` to the ring and nothing else.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorabuild import world  # noqa: E402

DEMO = ROOT / "projects" / "demo"
TRIGGER = "ohwx"
SEED = 500_000  # apart from the pretraining seeds (0..) and the held-out ones (1,000,000..)


def main() -> None:
    if DEMO.exists():
        shutil.rmtree(DEMO)
    world.write_dataset(DEMO, count=16, repeats=10, tokens=TRIGGER, seed=SEED, shapes=("ring",), word=TRIGGER)


if __name__ == "__main__":
    main()
