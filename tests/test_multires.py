"""Multi-resolution training (issue 24, item 3): ``bucket.resolution`` as a list, a concept's own
``bucket``, kohya's ``min_orig_resolution``; each (image, resolution) cached once, counted by
what the stages recompute; plan, buckets.json and the LoRA's metadata show the resolutions.

A workspace of its own built only up to the latents (the tiny VAE is fast); one short training.
"""
from __future__ import annotations

import json
import math

import pytest
from conftest import init_workspace
from PIL import Image

IMAGES = 16  # the tiny demo's, two concepts of 8


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = init_workspace(tmp_path_factory.mktemp("multires") / "ws")
    ws.doit("latents:demo", build="one")
    return ws


def _counts(ws, stage: str) -> tuple[int, int]:
    r = ws.report(stage)
    return r["computed"], r["reused"]


def _sizes(ws) -> dict[str, tuple[int, int]]:
    return {p.relative_to(ws.root / "projects").as_posix(): Image.open(p).size for p in ws.data.glob("*/*.png")}


def _set_resolution(value):
    return lambda d: d["bucket"].update(resolution=value)


def test_a_second_resolution_encodes_only_its_own_latents_and_the_first_keeps_its_keys(ws):
    one_bucket, one_latents = ws.manifest("bucket"), ws.manifest("latents")
    ws.edit(_set_resolution([128, 192]))
    ws.doit("latents:demo", build="two")
    bucket, latents = ws.manifest("bucket"), ws.manifest("latents")
    assert len(latents["items"]) == 2 * IMAGES
    fresh = {e["hash"] for e in latents["items"]} - {e["hash"] for e in one_latents["items"]}
    assert _counts(ws, "latents") == (len(fresh), IMAGES) and len(fresh) == IMAGES  # every 192 fit differs from its 128 one
    # the first resolution's samples: the image's own id and the very keys a one-resolution build has
    first = {e["id"]: e["hash"] for e in latents["items"] if e.get("resolution") == 128}
    assert first == {e["id"]: e["hash"] for e in one_latents["items"]}
    assert {e["id"]: e["hash"] for e in bucket["items"] if e["resolution"] == 128} == \
        {e["id"]: e["hash"] for e in one_bucket["items"]}
    extra = [e for e in latents["items"] if e.get("resolution") == 192]
    assert all(e["id"] == e["image"] + "@192" for e in extra) and len({e["image"] for e in extra}) == IMAGES
    # each sample's bucket is from its own resolution's ladder: area at most resolution²
    for e in bucket["items"]:
        assert e["bucket"][0] * e["bucket"][1] <= e["resolution"] ** 2 and e["bucket"][0] % 64 == 0
    # buckets.json and the contact sheets per resolution; plan agrees with the stage
    shown = json.loads((ws.root / "output" / "demo" / "buckets" / "buckets.json").read_text())
    assert shown["resolutions"] == bucket["resolutions"] and sum(v["images"] for v in shown["resolutions"].values()) == 32
    sheets = {p.name.split("-")[0] for p in (ws.root / "output" / "demo" / "buckets").glob("*.jpg")}
    assert sheets == {"128", "192"}
    proc = ws.lorabuild("plan", "demo", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["resolutions"] == bucket["resolutions"]
    assert plan["steps"]["samples_per_epoch"] == 2 * IMAGES * 10  # images × repeats × resolutions (kohya's count)
    text = ws.lorabuild("plan", "demo").stdout
    assert "at 128: 16 images" in text and "at 192: 16 images" in text
    # back to one resolution: nothing encoded, the manifests exactly a one-resolution build's
    ws.edit(_set_resolution(128))
    ws.doit("latents:demo", build="back")
    assert _counts(ws, "latents") == (0, IMAGES)
    assert ws.manifest("bucket")["items"] == one_bucket["items"] and ws.manifest("latents")["items"] == one_latents["items"]


def test_min_orig_resolution_keeps_small_images_out_of_the_larger_resolution(ws):
    sizes = _sizes(ws)
    big = {i for i, (w, h) in sizes.items() if math.sqrt(w * h) > 210}
    assert 0 < len(big) < IMAGES
    ws.edit(_set_resolution([128, {"resolution": 192, "min_orig_resolution": 210}]))
    ws.doit("latents:demo", build="orig")
    items = ws.manifest("latents")["items"]
    assert {e["image"] for e in items if e.get("resolution") == 192} == big
    assert len([e for e in items if e.get("resolution") == 128]) == IMAGES
    assert _counts(ws, "latents") == (0, IMAGES + len(big))  # all encoded by the test before (same keys)
    plan = json.loads(ws.lorabuild("plan", "demo", "--json").stdout)
    assert plan["resolutions"]["192"]["images"] == len(big)
    assert plan["steps"]["samples_per_epoch"] == (IMAGES + len(big)) * 10


def test_a_concept_with_its_own_resolution(ws):
    ws.edit(_set_resolution(128))
    ws.edit(lambda d: d["dataset"].update(dirs=[], concepts=[
        {"path": "demo/10_redcircle shape", "repeats": 10, "trigger": "redcircle", "bucket": {"resolution": [128, 192]}},
        {"path": "demo/10_bluesquare shape", "repeats": 10, "trigger": "bluesquare"}]))
    ws.doit("latents:demo", build="concept")
    items = ws.manifest("latents")["items"]
    at_192 = {e["image"] for e in items if e.get("resolution") == 192}
    assert len(at_192) == 8 and all("redcircle" in i for i in at_192)
    computed, reused = _counts(ws, "latents")  # the 192 ones are new unless the first test encoded them
    assert computed + reused == IMAGES + 8 and computed <= 8
    plan = json.loads(ws.lorabuild("plan", "demo", "--json").stdout)
    assert plan["resolutions"] == {"128": {"images": 16, "buckets": plan["resolutions"]["128"]["buckets"]},
                                   "192": {"images": 8, "buckets": plan["resolutions"]["192"]["buckets"]}}
    # a dataset folder's own bucket: every concept under it
    ws.edit(lambda d: d["dataset"].update(dirs=[{"path": "demo", "bucket": {"resolution": [128, 192]}}], concepts=[]))
    ws.doit("latents:demo", build="dirs")
    assert len([e for e in ws.manifest("latents")["items"] if e.get("resolution") == 192]) == IMAGES
    computed, reused = _counts(ws, "latents")  # the redcircle ones at 192 were encoded just above
    assert computed + reused == 2 * IMAGES and computed <= 8


def test_training_at_two_resolutions_writes_kohyas_per_dataset_metadata(ws):
    from safetensors import safe_open

    ws.edit(lambda d: (d["dataset"].update(dirs=["demo"], concepts=[]), d["bucket"].update(resolution=[128, 192]),
                       d["train"].update(epochs=1, max_steps=2, save_every_n_epochs=None)))
    ws.doit("train:demo", build="train")
    with safe_open(str(ws.root / "output" / "demo" / "demo.safetensors"), "pt") as f:
        md = f.metadata()
    datasets = json.loads(md["ss_datasets"])
    assert [d["resolution"] for d in datasets] == [[128, 128], [192, 192]]
    assert [d["num_train_images"] for d in datasets] == [IMAGES, IMAGES]
    assert md["ss_resolution"] == "(192, 192)" and md["ss_num_train_images"] == str(2 * IMAGES * 10)
    # each folder's images counted once (as kohya counts a folder two datasets share), its tags too
    assert {d["img_count"] for d in json.loads(md["ss_dataset_dirs"]).values()} == {IMAGES // 2}
    assert max(n for tags in json.loads(md["ss_tag_frequency"]).values() for n in tags.values()) <= IMAGES // 2
    buckets = {tuple(b["resolution"]) for b in json.loads(md["ss_bucket_info"])["buckets"].values()}
    assert buckets == {tuple(e["bucket"]) for e in ws.manifest("latents")["items"]}


def test_plan_names_working_copies_too_small_for_the_larger_resolution(ws):
    """Issue 24 item 8 per resolution: max_side 200 keeps every pixel the 128 buckets need, not the 192 ones'."""
    def shrunk(resolution):
        ws.edit(lambda d: (d["resize"].update(max_side=200), d["bucket"].update(resolution=resolution)))
        plan = json.loads(ws.lorabuild("plan", "demo", "--json").stdout)
        return [w for w in plan["warnings"] if "shrunk to resize.max_side (200)" in w]

    try:
        assert shrunk(128) == []
        [warning] = shrunk([128, 192])
        assert "@192 (" in warning and "resize.max_side: 256 keeps every pixel" in warning
    finally:
        ws.edit(lambda d: (d["resize"].update(max_side=256), d["bucket"].update(resolution=128)))


@pytest.mark.parametrize("value, message", [
    ("[]", "bucket.resolution: [] should be non-empty"),
    ("[128, 100]", "bucket.resolution.1: 100 is not a multiple of bucket.step (64)"),
    ("[128, 512]", "bucket.resolution.1: 512 is larger than bucket.max_reso (256)"),
    ("[128, 128]", "bucket.resolution.1: 128 is listed twice"),
    ("128\ndataset:\n  dirs: [{path: demo, bucket: {resolution: [128, 320]}}]",
     "dataset.dirs.0.bucket.resolution.1: 320 is larger than bucket.max_reso (256)"),
    ("[128, {resolution: 192, min_orig_resolution: 300, max_orig_resolution: 200}]",
     "bucket.resolution.1: max_orig_resolution (200) is not above min_orig_resolution (300)"),
])
def test_bad_resolution_lists_are_named_by_file_and_line(ws, value, message):
    bad = ws.root / "projects" / "bad.yaml"
    dataset = "" if "dataset:" in value else "dataset:\n  dirs: [demo]\n"
    bad.write_text(f"base_model: builtin:tiny-sd1\n{dataset}bucket:\n  max_reso: 256\n  resolution: {value}\n")
    try:
        proc = ws.lorabuild("validate", str(bad))
    finally:
        text = bad.read_text()
        bad.unlink()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr + proc.stdout
    assert "bad.yaml:6:" in proc.stdout + proc.stderr and message in proc.stdout + proc.stderr, (text, proc.stdout)


def test_sdxl_trains_at_two_resolutions(tmp_path):
    from safetensors import safe_open

    ws = init_workspace(tmp_path / "xl")
    ws.edit(lambda d: (d.update(base_model="builtin:tiny-sdxl"), d["bucket"].update(resolution=[128, 192]),
                       d["train"].update(epochs=1, max_steps=2, save_every_n_epochs=None)))
    ws.doit("train:demo", build="xl")
    with safe_open(str(ws.root / "output" / "demo" / "demo.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["ss_base_model_version"].startswith("sdxl")
    assert [d["resolution"] for d in json.loads(md["ss_datasets"])] == [[128, 128], [192, 192]]
    assert ws.report("latents")["computed"] == 2 * IMAGES
