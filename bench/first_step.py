"""Time to the first training step (issue 10, item 5): process start → first optimizer step done.

Through the real CLI (``doit train:bench`` in a fresh process) on the full-size SD 1.5
architecture with random weights, 8 images, batch 1, LoRA dim 32 with the text encoder
trained (kohya's reference settings). Warm: latents and embeddings already cached, so no
caching is repeated; the process is stopped once the first step is done. Cold: a new
workspace, so the time includes hashing the model and caching the 8 latents (kohya's
reference figure is cold). Split into: process start → models loaded and the LoRA built
(the "LoRA modules" banner) → first step done.

    python bench/first_step.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load, median, publish, sd15_project, table, watch  # noqa: E402
from train_step import measure  # noqa: E402

TRAIN = [sys.executable, "-m", "doit", "train:bench"]


def row(size: int, kind: str, ws: list) -> list:
    first = median([w.steps[0] for w in ws])
    loaded = median([w.banner for w in ws])
    return [size, kind, f"{loaded:.1f}", f"{first - loaded:.1f}", f"{first:.1f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 px, one warm and one cold run")
    ap.add_argument("--rounds", type=int, default=None, help="warm runs per size (default 3, quick 1)")
    args = ap.parse_args()
    sizes = [256] if args.quick else [256, 512]
    rounds = args.rounds or (1 if args.quick else 3)
    loads, rows = [load()], []
    with tempfile.TemporaryDirectory(dir=os.environ.get("LORABUILD_BENCH_TMP")) as tmp:
        for size in sizes:
            cold_root = Path(tmp) / f"cold{size}"
            sd15_project(cold_root, 8, size)
            cold = watch(TRAIN, cold_root, stop_after=1)  # the cold build also warms this workspace
            warm = [measure(cold_root, {}, 1) for _ in range(rounds)]
            rows.append(row(size, f"warm (median of {rounds})", warm))
            rows.append(row(size, "cold (new workspace)", [cold]))
            shutil.rmtree(cold_root, ignore_errors=True)
    loads.append(load())
    text = ("### Process start → first optimizer step done, `doit train:bench`, SD 1.5 architecture (random weights, "
            "fp32), 8 images, batch 1, LoRA dim 32, UNet + text encoder trained\n\n"
            + table(["px", "caches", "start → models loaded s", "→ first step done s", "start → first step s"], rows)
            + "\n\nAgainst kohya: bench/kohya_side.py, both tools in one run.")
    publish("Time to first step" + (" (--quick)" if args.quick else ""), text, loads)


if __name__ == "__main__":
    main()
