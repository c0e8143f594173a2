"""End to end: the demo project through all six stages with the real ``doit`` CLI.

Incrementality is checked by what each stage reports it computed, reused and removed,
and by which stages ran at all in an invocation (each report names its build).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import STAGES

N_IMAGES = 16
ROOT = Path(__file__).resolve().parent.parent


def test_cold_build_runs_every_stage_and_writes_outputs(built_demo):
    ws = built_demo
    assert ws.ran("cold") == set(STAGES)
    assert ws.report("resize")["computed"] == N_IMAGES
    assert ws.report("latents")["computed"] == N_IMAGES
    # 14 captioned images with distinct captions + 2 default captions from the folder names
    assert ws.report("textemb")["computed"] == 16
    assert ws.report("train")["computed"] == 1
    assert ws.report("sample")["computed"] == 8  # (base model + epochs 2, 4, 6) × 2 prompts
    out = ws.root / "output" / "demo"
    assert (out / "demo.safetensors").is_file()
    grid = Image.open(out / "samples" / "grid.png")
    # row labels + 2 prompts; the column labels' band + 4 rows. The demo's prompts are wider than a
    # 128 px column, so the band holds each on two lines (gallery.wrap), not one cut short
    from PIL import ImageDraw

    from lorabuild import gallery

    font = ImageDraw.Draw(Image.new("RGB", (1, 1))).getfont()
    assert grid.size == (72 + 2 * 128, 16 + gallery.line_height(font) + 4 * 128)
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == sorted(
        [f"{row}-00-redcircle-shape-white-background.png" for row in ("base", "e000002", "e000004", "e000006")]
        + [f"{row}-01-bluesquare-shape-yellow-background.png" for row in ("base", "e000002", "e000004", "e000006")]
        + ["grid.png"])
    assert [p.name for p in sorted(out.glob("*.safetensors"))] == ["demo-000002.safetensors",
                                                                    "demo-000004.safetensors", "demo.safetensors"]
    buckets = json.loads((out / "buckets" / "buckets.json").read_text())
    assert sum(buckets["buckets"].values()) == N_IMAGES and len(buckets["images"]) == N_IMAGES
    for label in buckets["buckets"]:
        assert (out / "buckets" / f"{label}.jpg").is_file()
    portrait = next(e for e in buckets["images"] if e["id"].endswith("redcircle_01.png"))  # 160×240
    assert portrait["orig_size"] == [160, 240] and portrait["cropped_share"] > 0
    for line in ("resize:demo: 16 items: computed 16, reused 0, removed 0", "train:demo: 1 items: computed 1"):
        assert line in ws.cold.stdout


def test_second_build_runs_nothing(demo):
    demo.doit("sample:demo", build="again")
    assert demo.ran("again") == set()


def test_noop_build_and_list_import_no_torch(demo):
    script = (
        "import sys\n"
        "from doit.doit_cmd import DoitMain\n"
        "from doit.cmd_base import DodoTaskLoader\n"
        "rc = DoitMain(DodoTaskLoader()).run(sys.argv[1:])\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
        "print('HEAVY:' + ','.join(heavy))\n"
        "sys.exit(rc)\n"
    )
    for args in (["list"], ["train:demo"]):
        proc = subprocess.run([sys.executable, "-c", script, *args], cwd=demo.root, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "HEAVY:\n" in proc.stdout, proc.stdout
    listing = subprocess.run([sys.executable, "-m", "doit", "list"], cwd=demo.root, capture_output=True, text=True).stdout
    for stage in STAGES:
        assert stage in listing


def test_adding_one_image_computes_one_item_per_stage(demo):
    src = demo.data / "10_redcircle shape" / "redcircle_00.png"
    img = Image.open(src).convert("RGB")
    img.putpixel((5, 5), (1, 2, 3))  # new content, same size
    img.save(demo.data / "10_redcircle shape" / "redcircle_new.png")
    (demo.data / "10_redcircle shape" / "redcircle_new.txt").write_text("redcircle, shape, new one\n")
    sheets = {p.name: p.stat().st_mtime_ns for p in (demo.root / "output" / "demo" / "buckets").glob("*.jpg")}
    demo.doit("train:demo", build="add")
    bucket_of = {e["id"]: e["bucket"] for e in demo.manifest("bucket")["items"]}
    new_sheet = "{}x{}.jpg".format(*bucket_of["demo/10_redcircle shape/redcircle_new.png"])
    redrawn = {p.name for p in (demo.root / "output" / "demo" / "buckets").glob("*.jpg")
               if p.stat().st_mtime_ns != sheets.get(p.name)}
    assert redrawn == {new_sheet}  # only the contact sheet the new image is on is drawn again
    assert demo.ran("add") == {"resize", "bucket", "latents", "textemb", "train"}
    r = demo.report("resize")
    assert (r["computed"], r["reused"], r["removed"]) == (1, N_IMAGES, 0)
    lat = demo.report("latents")
    assert (lat["computed"], lat["reused"]) == (1, N_IMAGES)
    assert demo.report("textemb")["computed"] <= 1
    assert demo.report("train")["computed"] == 1


def test_editing_one_caption_recomputes_only_its_embedding(demo):
    cap = demo.data / "10_bluesquare shape" / "bluesquare_03.txt"
    cap.write_text("bluesquare, shape, edited caption\n")
    demo.doit("train:demo", build="cap")
    assert demo.ran("cap") == {"textemb", "train"}
    t = demo.report("textemb")
    assert (t["computed"], t["reused"], t["removed"]) == (1, 15, 1)


def test_changing_learning_rate_runs_no_cache_stage(demo):
    demo.edit(lambda d: d["train"].update(learning_rate=0.001))
    demo.doit("train:demo", build="lr")
    assert demo.ran("lr") == {"train"}
    assert demo.report("train")["computed"] == 1


def test_reverting_a_change_restores_the_trained_lora(demo):
    lora = demo.root / "output" / "demo" / "demo.safetensors"
    before = _tensors(lora)
    original = demo.yaml_path.read_text()
    demo.edit(lambda d: d["train"].update(epochs=2))
    demo.doit("train:demo", build="one-epoch")
    assert demo.report("train")["computed"] == 1
    demo.yaml_path.write_text(original)
    demo.doit("train:demo", build="back")
    assert (demo.report("train")["computed"], demo.report("train")["reused"]) == (0, 1)
    after = _tensors(lora)
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)


def test_changing_bucket_resolution_reuses_resize(demo):
    demo.edit(lambda d: d["bucket"].update(resolution=192))
    demo.doit("train:demo", build="reso")
    assert demo.ran("reso") == {"bucket", "latents", "train"}
    assert demo.report("latents")["computed"] > 0
    assert demo.report("bucket")["computed"] > 0


def test_changing_resize_max_side_reencodes_only_the_working_copies_that_changed(demo):
    """Latents are keyed on the working copy's pixels, not on the resize key (issue 24, item 7)."""
    sizes = {e["id"]: max(e["orig_size"]) for e in demo.manifest("resize")["items"]}
    shrunk = {i for i, side in sizes.items() if side > 224}
    assert 0 < len(shrunk) < N_IMAGES  # the demo has images on both sides of 224 px
    before = {e["id"]: e["hash"] for e in demo.manifest("latents")["items"]}
    demo.edit(lambda d: d["resize"].update(max_side=224))
    demo.doit("train:demo", build="side")
    r = demo.report("resize")
    assert (r["computed"], r["reused"]) == (N_IMAGES, 0)  # every working copy is made again under its new key
    lat = demo.report("latents")
    assert (lat["computed"], lat["reused"]) == (len(shrunk), N_IMAGES - len(shrunk))
    after = {e["id"]: e["hash"] for e in demo.manifest("latents")["items"]}
    assert {i for i in after if after[i] != before[i]} == shrunk
    assert demo.report("train")["computed"] == 1
    # no image is larger than 256 px: at 512 every working copy is the original again, so every
    # latent is the one encoded at 256 and the LoRA trained then is restored
    demo.edit(lambda d: d["resize"].update(max_side=512))
    demo.doit("train:demo", build="side-up")
    assert (demo.report("latents")["computed"], demo.report("latents")["reused"]) == (0, N_IMAGES)
    assert {e["id"]: e["hash"] for e in demo.manifest("latents")["items"]} == before
    assert (demo.report("train")["computed"], demo.report("train")["reused"]) == (0, 1)
    # and from 512 to 1024 nothing downstream of the working copies changes: train does not even run
    demo.edit(lambda d: d["resize"].update(max_side=1024))
    demo.doit("train:demo", build="side-up2")
    assert demo.ran("side-up2") == {"resize", "bucket", "latents", "textemb"}
    assert demo.report("resize")["computed"] == N_IMAGES
    for stage in ("bucket", "latents", "textemb"):
        assert demo.report(stage)["computed"] == 0, stage


def test_deleting_an_image_removes_it_downstream(demo):
    (demo.data / "10_redcircle shape" / "redcircle_01.png").unlink()
    (demo.data / "10_redcircle shape" / "redcircle_01.txt").unlink()
    demo.doit("train:demo", build="del")
    assert "train" in demo.ran("del")
    for stage in ("resize", "bucket", "latents"):
        r = demo.report(stage)
        assert (r["computed"], r["removed"], r["items"]) == (0, 1, N_IMAGES - 1), (stage, r)


def test_lost_doit_database_recomputes_nothing(demo):
    """doit forgets a killed run; the stages' own caches must not."""
    (demo.root / "cache" / "doit.sqlite3").unlink()
    demo.doit("sample:demo", build="nodb")
    assert demo.ran("nodb") == set(STAGES)
    for stage in STAGES:
        assert demo.report(stage)["computed"] == 0, stage


def test_invalid_project_is_refused_and_valid_ones_still_build(demo):
    shutil.copy(demo.yaml_path, demo.root / "projects" / "broken.yaml")
    text = (demo.root / "projects" / "broken.yaml").read_text().replace("batch_size: 4", "batch_size: -1")
    (demo.root / "projects" / "broken.yaml").write_text(text)
    bad = demo.doit("train:broken", build="bad", check=False)
    assert bad.returncode != 0
    assert "train.batch_size: -1 is less than the minimum of 1" in bad.stdout + bad.stderr
    demo.doit("train:demo", build="good")


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_saved_lora_has_kohya_layout_and_metadata(built_demo):
    path = built_demo.root / "output" / "demo" / "demo.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        dtypes = {str(f.get_tensor(k).dtype) for k in keys}
    assert keys and all(k.startswith("lora_unet_") for k in keys)  # the demo freezes the text encoder
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert dtypes == {"torch.float16"}
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "8")
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_num_train_images"] == str(N_IMAGES * 10)
    assert meta["ss_num_epochs"] == "6"
    assert meta["ss_output_name"] == "demo"
    freq = json.loads(meta["ss_tag_frequency"])
    # 7 captioned images per concept; the 8th has no caption file, so its caption is the folder's tokens
    assert freq["10_redcircle shape"]["redcircle"] == 7
    assert freq["10_redcircle shape"]["redcircle shape"] == 1
    assert freq["10_bluesquare shape"]["shape"] == 7


def test_trained_text_encoder_skips_the_embedding_cache_and_shares_images(demo):
    """A second project on the same images reuses the first one's cache entries."""
    doc = demo.yaml_path.read_text().replace("train_text_encoder: false", "train_text_encoder: true")
    (demo.root / "projects" / "te.yaml").write_text(doc)
    demo.doit("train:te", build="te")
    assert demo.ran("te", project="te") == {"resize", "bucket", "latents", "textemb", "train"}
    for stage in ("resize", "latents"):
        r = demo.report(stage, project="te")
        assert (r["computed"], r["reused"]) == (0, N_IMAGES), stage
    t = demo.report("textemb", project="te")
    assert (t["computed"], t["items"]) == (0, 0)
    assert "the text encoder trains" in " ".join(t["notes"])
    keys = _tensors(demo.root / "output" / "te" / "te.safetensors").keys()
    te_keys = {k for k in keys if k.startswith("lora_te_")}
    # 5 CLIP layers × (q, k, v, out_proj, fc1, fc2), three tensors each
    assert len(te_keys) == 5 * 6 * 3
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in te_keys
    _assert_diffusers_text_encoder_matches(demo.root / "cache" / "models" / "tiny-sd1", demo.root / "output" / "te" / "te.safetensors")


def _assert_diffusers_text_encoder_matches(folder, lora):
    import torch

    from lorabuild import models
    from lorabuild.lora.network import LoRANetwork

    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
    unet, te = models.load_unet(folder), models.load_text_encoder(folder)
    net = LoRANetwork(unet, [te], dim=8, alpha=8, arch="sd1")
    net.load_weights(lora)
    net.apply()
    with torch.no_grad():
        ours = te(ids)[0]
        net.set_multiplier(0.0)
        plain = te(ids)[0]
    pipe = models.load_pipeline(folder)
    pipe.load_lora_weights(str(lora))
    with torch.no_grad():
        theirs = pipe.text_encoder(ids)[0]
    assert (ours - plain).abs().max() > 1e-4
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_gc_deletes_only_entries_no_manifest_uses(demo):
    demo.edit(lambda d: d["bucket"].update(resolution=192))
    demo.doit("train:demo", build="reso")
    dry = demo.lorabuild("gc", "--dry-run")
    assert dry.returncode == 0 and "would remove" in dry.stdout
    gc = demo.lorabuild("gc")
    assert gc.returncode == 0, gc.stderr
    removed = int(gc.stdout.split("removed ")[1].split()[0])
    assert removed > 0
    # Everything the project uses now survived: with doit's memory gone, nothing is recomputed.
    (demo.root / "cache" / "doit.sqlite3").unlink()
    demo.doit("train:demo", build="after-gc")
    for stage in ("resize", "bucket", "latents", "textemb", "train"):
        assert demo.report(stage)["computed"] == 0, stage
    assert demo.lorabuild("gc").stdout.startswith("gc: removed 0 files")


def test_init_refuses_an_existing_workspace(demo):
    proc = demo.lorabuild("init", str(demo.root))
    assert proc.returncode == 1
    assert "already holds a workspace" in proc.stderr


def test_every_shipped_project_validates():
    proc = subprocess.run([sys.executable, "-m", "lorabuild", "validate"], cwd=ROOT, capture_output=True, text=True)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_changing_a_caption_option_reencodes_captions_only(demo):
    demo.edit(lambda d: d["captions"].update(prepend=["demo style"]))
    demo.doit("train:demo", build="prepend")
    assert demo.ran("prepend") == {"textemb", "train"}
    t = demo.report("textemb")
    assert (t["computed"], t["reused"], t["removed"]) == (N_IMAGES, 0, N_IMAGES)


def test_flip_stores_both_latents(demo):
    demo.edit(lambda d: d["latents"].update(flip=True))
    demo.doit("train:demo", build="flip")
    assert demo.ran("flip") == {"latents", "train"}
    assert demo.report("latents")["computed"] == N_IMAGES
    h = json.loads((demo.root / "cache" / "manifests" / "demo" / "latents.json").read_text())["items"][0]["hash"]
    with safe_open(str(demo.root / "cache" / "objects" / "latents" / h[:2] / f"{h[2:]}.safetensors"), "pt") as f:
        assert set(f.keys()) == {"latent", "latent_flip"}


def test_random_crop_turns_the_latent_cache_off_and_trains(demo):
    demo.edit(lambda d: d["latents"].update(random_crop=True))
    plan = demo.lorabuild("plan", "demo").stdout
    assert "latents.random_crop is on: the latent cache is off" in plan
    demo.doit("train:demo", build="crop")
    lat = demo.report("latents")
    assert (lat["computed"], lat["reused"]) == (0, 0)
    assert "random_crop" in " ".join(lat["notes"])
    assert demo.report("train")["computed"] == 1
    with safe_open(str(demo.root / "output" / "demo" / "demo.safetensors"), "pt") as f:
        assert f.metadata()["ss_cache_latents"] == "False"


def test_two_builds_of_one_project_at_once_wait_for_each_other(demo):
    demo.edit(lambda d: d["train"].update(learning_rate=0.003))
    env = {**os.environ, "LORABUILD_BUILD": "both"}
    procs = [subprocess.Popen([sys.executable, "-m", "doit", "train:demo"], cwd=demo.root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert any("another build of 'demo' is running; waiting" in o for o in outs)
    # one of them trained; the other found that LoRA in the cache
    trained = [o for o in outs if "train:demo: 1 items: computed 1" in o]
    reused = [o for o in outs if "train:demo: 1 items: computed 0, reused 1" in o]
    assert len(trained) == 1 and len(reused) == 1, outs


def test_a_corrupt_cache_entry_is_reported_removed_and_recomputed(demo):
    item = json.loads((demo.root / "cache" / "manifests" / "demo" / "latents.json").read_text())["items"][3]
    entry = demo.root / "cache" / "objects" / "latents" / item["hash"][:2] / f"{item['hash'][2:]}.safetensors"
    entry.write_bytes(entry.read_bytes()[:40])  # truncated on disk
    demo.edit(lambda d: d["train"].update(learning_rate=0.001))
    proc = demo.doit("train:demo", build="corrupt")  # doit: latents up to date; train checks what it reads
    out = proc.stdout + proc.stderr
    assert out.count(f"latents cache entry {entry} is unreadable (checksum mismatch") == 1, out[-3000:]
    assert "latents:demo: re-encoding 1 missing or damaged entries" in out
    assert demo.ran("corrupt") == {"train"} and demo.report("train")["computed"] == 1
    assert set(load_file(str(entry))) == {"latent"}  # whole again


def test_noise_and_loss_options_train_and_are_recorded(demo):
    demo.edit(lambda d: d["train"].update(noise_offset=0.05, min_snr_gamma=5, loss_type="huber",
                                          lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2))
    demo.doit("train:demo", build="opts")
    assert demo.ran("opts") == {"train"}
    with safe_open(str(demo.root / "output" / "demo" / "demo.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_noise_offset"], meta["ss_min_snr_gamma"], meta["ss_loss_type"]) == ("0.05", "5", "huber")
    assert meta["ss_lr_scheduler"] == "cosine_with_restarts"
    lrs = [float(line.split(",")[3]) for line in (demo.root / "output" / "demo" / "loss.csv").read_text().splitlines()[1:]]
    assert lrs[0] > lrs[len(lrs) // 2 - 1] and lrs[len(lrs) // 2] > lrs[len(lrs) // 2 - 1]  # two cosine cycles
