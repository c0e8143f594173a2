"""Peak RSS against dataset size (issue 10, item 6): flat, because training streams cached
latents from disk instead of holding them all.

One workspace per model grows by adding images (10 → 100 → 1,000), caches warmed
beforehand (``doit latents:bench textemb:bench``), then a fresh ``doit train:bench`` whose
own peak RSS is read with ``os.wait4``. The tiny built-in model trains a whole epoch
(batch 1, every latent read once); the full-size SD 1.5 architecture at 256 px (random
weights, UNet + text encoder trained) is stopped after its first step, since its set-up and
first step (when the optimizer's state is made) are where memory peaks. The latents' size on disk is listed: holding them all
would add about that much.

    python bench/memory.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load, make_image, publish, run, sd15_project, table, watch, workspace  # noqa: E402

TRAIN = [sys.executable, "-m", "doit", "train:bench"]


def grow(concept: Path, n: int, **image) -> None:
    for i in range(len(list(concept.glob("*.png"))), n):
        make_image(concept / f"img{i:05d}.png", i, **image)


def latent_mib(root: Path) -> float:
    return sum(f.stat().st_size for f in (root / "cache" / "objects" / "latents").rglob("*.safetensors")) / 2**20


def series(label: str, root: Path, concept: Path, sizes, stop_after, **image) -> list[list]:
    rows = []
    for n in sizes:
        grow(concept, n, **image)
        run([sys.executable, "-m", "doit", "latents:bench", "textemb:bench"], cwd=root)
        w = watch(TRAIN, root, stop_after=stop_after)
        steps = f"{len(w.steps)} (stopped)" if stop_after else f"{len(w.steps)} (one epoch)"
        rows.append([label, n, steps, f"{latent_mib(root):.1f}", f"{w.rss_gib:.2f}"])
        print(f"bench: {label} {n} images: peak RSS {w.rss_gib:.2f} GiB", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="SD 1.5 at 10 images only")
    args = ap.parse_args()
    loads, rows = [load()], []
    with tempfile.TemporaryDirectory(dir=os.environ.get("LORABUILD_BENCH_TMP")) as tmp:
        tiny = Path(tmp) / "tiny"
        concept = workspace(tiny, 0, settings={"train": {"batch_size": 1, "epochs": 1}})
        rows += series("tiny-sd1, 128 px buckets", tiny, concept, (10, 100, 1000), None)
        sd = Path(tmp) / "sd15"
        concept = sd15_project(sd, 0, 256)
        # stopped after the first step: the optimizer's state exists from then on
        rows += series("SD 1.5 arch, 256 px", sd, concept, (10,) if args.quick else (10, 100), 1,
                       scale=2, square=True)
    loads.append(load())
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    text = (f"### Peak RSS of `doit train:bench` against the number of images (fresh process, caches warm, "
            f"OMP_NUM_THREADS={threads})\n\n"
            + table(["model", "images", "optimizer steps", "cached latents on disk MiB", "peak RSS GiB"], rows))
    publish("Memory against dataset size" + (" (--quick)" if args.quick else ""), text, loads)


if __name__ == "__main__":
    main()
