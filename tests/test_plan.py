"""``lorabuild plan``: concepts, buckets, kohya's step arithmetic, tags and warnings, without a model."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

from PIL import Image
from conftest import init_workspace


def _init(tmp_path):
    ws = tmp_path / "ws"
    init_workspace(ws)
    return ws


def _plan(ws, *args):
    return subprocess.run([sys.executable, "-m", "lorabuild", "plan", "demo", *args], cwd=ws, capture_output=True, text=True)


def test_plan_counts_and_steps(tmp_path):
    ws = _init(tmp_path)
    proc = _plan(ws, "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert [(c["images"], c["repeats"], c["captions_found"], c["captions_defaulted"]) for c in plan["concepts"]] == [
        (8, 10, 7, 1), (8, 10, 7, 1)
    ]
    assert [c["share_of_epoch"] for c in plan["concepts"]] == [0.5, 0.5]
    assert sum(plan["buckets"].values()) == 16
    s = plan["steps"]
    # kohya: 16 images × 10 repeats = 160 samples; batch 4 → 40 steps per epoch; × 6 epochs
    assert (s["samples_per_epoch"], s["steps_per_epoch"], s["total_steps"]) == (160, 40, 240)
    assert dict(plan["top_tags"])["shape"] == 14
    assert not (ws / "cache" / "models").exists()  # no model was loaded or written
    text = _plan(ws).stdout
    assert "8 images × 10 repeats = 50% of an epoch" in text
    assert "repeats × epochs = 60" in text


def test_plan_warns_about_duplicates_orphans_and_tiny_images(tmp_path):
    ws = _init(tmp_path)
    concept = ws / "projects" / "demo" / "10_redcircle shape"
    shutil.copy(concept / "redcircle_00.png", concept / "copy_of_00.png")
    (concept / "lonely.txt").write_text("a caption without an image")
    Image.new("RGB", (40, 30), "red").save(concept / "tiny.png")
    warnings = "\n".join(json.loads(_plan(ws, "--json").stdout)["warnings"])
    assert "duplicate image(s) by content: demo/10_redcircle shape/redcircle_00.png = demo/10_redcircle shape/copy_of_00.png" in warnings
    assert "caption file(s) without an image: lonely.txt" in warnings
    assert "tiny.png (40x30)" in warnings


def test_plan_names_a_dataset_mistake(tmp_path):
    ws = _init(tmp_path)
    yaml_path = ws / "projects" / "demo.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("dirs: [demo]", "dirs: [demo/10_redcircle shape]"))
    proc = _plan(ws)
    assert proc.returncode == 1
    assert "looks like a concept folder" in proc.stderr and "dataset.dirs must name its parent" in proc.stderr


def test_plan_and_the_bucket_stage_put_every_image_in_the_same_bucket(tmp_path):
    """One bucket decision (issue 24, item 7): plan calls the stage's, on the working copy's size.
    With resize.max_side below the images and no_upscale, deciding on the originals, as plan used
    to, gives other buckets."""
    from lorabuild import buckets

    ws = init_workspace(tmp_path / "ws")
    ws.edit(lambda d: (d["resize"].update(max_side=160), d["bucket"].update(no_upscale=True, resolution=160),
                       d["train"].update(validation_split=0.25, validation_seed=5)))
    plan = json.loads(_plan(ws.root, "--json").stdout)
    ws.doit("bucket:demo", build="buckets")
    stage = ws.manifest("bucket")
    assert plan["buckets"] == stage["buckets"] and sum(plan["buckets"].values()) == 16
    old = {}
    for e in stage["items"]:
        f = buckets.no_upscale_fit(*e["orig_size"], 160 ** 2, 64)
        label = f"{f.crop[2] - f.crop[0]}x{f.crop[3] - f.crop[1]}"
        old[label] = old.get(label, 0) + 1
    assert old != stage["buckets"]
    assert plan["validation"]["held_out"] == 4
