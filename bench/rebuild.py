"""No-op rebuild and incremental add on large synthetic projects (issue 10, items 1 and 2).

For each project size: a cold ``doit train:bench`` (tiny model, one epoch), then the same
command with nothing changed (median of 3 runs, wall clock, a fresh process each time, as a
user runs it), then one image added: per stage, items computed / reused and seconds, against
the cold build. ``--quick`` uses 200 and 1,000 images instead of 1,000 and 5,000.

    python bench/rebuild.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import publish, run, table  # noqa: E402

CACHE_STAGES = ("resize", "bucket", "latents", "textemb")
SIZES = [(128, 128), (96, 160), (160, 96), (112, 144)]


def make_image(path: Path, i: int) -> None:
    rng = random.Random(i)
    w, h = SIZES[i % len(SIZES)]
    img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(3):
        x, y = rng.randrange(w), rng.randrange(h)
        d.ellipse([x - 20, y - 20, x + 20, y + 20], fill=tuple(rng.randrange(256) for _ in range(3)))
    img.save(path)
    path.with_suffix(".txt").write_text(f"blob, color {i % 7}, shape {i % 5}")


def workspace(root: Path, n: int) -> Path:
    run([sys.executable, "-m", "lorabuild", "init", str(root)], cwd=root.parent)
    concept = root / "projects" / "bench" / "1_blob"
    concept.mkdir(parents=True)
    for i in range(n):
        make_image(concept / f"img{i:05d}.png", i)
    doc = yaml.safe_load((root / "projects" / "demo.yaml").read_text())
    doc["dataset"] = {"dirs": ["bench"]}
    doc["bucket"] = {"resolution": 128, "min_reso": 64, "max_reso": 256, "step": 64}
    doc["resize"] = {"max_side": 256}
    doc["train"].update(epochs=1, batch_size=16, save_every_n_epochs=None)
    doc.pop("sample", None)
    (root / "projects" / "bench.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return concept


def build(root: Path, label: str) -> tuple[float, dict]:
    t = time.perf_counter()
    run([sys.executable, "-m", "doit", "train:bench"], cwd=root, env={"LORABUILD_BUILD": label})
    wall = time.perf_counter() - t
    reports = {}
    for stage in CACHE_STAGES + ("train",):
        f = root / "cache" / "reports" / "bench" / f"{stage}.json"
        if f.exists():
            r = json.loads(f.read_text())
            if r["build"] == label:
                reports[stage] = r
    return wall, reports


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 and 1,000 images (under 10 minutes on 2 cores)")
    args = ap.parse_args()
    sizes = (200, 1000) if args.quick else (1000, 5000)
    noop_rows, add_rows = [], []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "ws"
            concept = workspace(root, n)
            cold_wall, cold = build(root, "cold")
            noops = [build(root, f"noop{i}") for i in range(3)]
            ran = sorted({s for _, r in noops for s in r})
            noop_rows.append([n, f"{cold_wall:.1f}", f"{statistics.median(w for w, _ in noops):.2f}",
                              ", ".join(ran) or "none"])
            make_image(concept / f"img{n:05d}.png", n)
            add_wall, add = build(root, "add")
            cold_cache = sum(cold[s]["seconds"] for s in CACHE_STAGES if s in cold)
            add_cache = sum(add[s]["seconds"] for s in CACHE_STAGES if s in add)
            for s in CACHE_STAGES + ("train",):
                c, a = cold.get(s), add.get(s)
                add_rows.append([n, s, f"{c['computed']} / {c['reused']}" if c else "-", f"{c['seconds']:.2f}" if c else "-",
                                 f"{a['computed']} / {a['reused']}" if a else "not run",
                                 f"{a['seconds']:.2f}" if a else "-"])
            add_rows.append([n, "**cache stages**", "", f"{cold_cache:.2f}", "",
                             f"{add_cache:.2f} ({100 * add_cache / cold_cache:.1f}% of cold)"])
            add_rows.append([n, "whole build (wall)", "", f"{cold_wall:.1f}", "", f"{add_wall:.1f}"])
    text = ("### No-op rebuild: `doit train:bench` with nothing changed (median of 3, wall, new process)\n\n"
            + table(["images", "cold build s", "no-op s", "stages that ran"], noop_rows)
            + "\n\n### One image added: per stage, computed / reused and seconds (stage time, models loaded inside)\n\n"
            + table(["images", "stage", "cold computed / reused", "cold s", "add computed / reused", "add s"], add_rows))
    publish("Rebuilds" + (" (--quick)" if args.quick else ""), text)


if __name__ == "__main__":
    main()
