"""A messy project through the real doit build: explicit concepts, regularization, a corrupt image
skipped, a tiny image rejected, and captions longer than CLIP's 75 tokens."""
from __future__ import annotations

import json

import torch
from PIL import Image
from safetensors import safe_open

from conftest import WS, init_workspace

MIX = """\
base_model: builtin:tiny-sd1
dataset:
  concepts:
    - {path: mine, repeats: 3, trigger: sks, class: shape}
  reg_dirs: [reg]
  on_bad_image: skip
resize: {max_side: 256}
bucket: {resolution: 128, min_reso: 64, max_reso: 256, step: 64, small_images: reject}
textemb: {max_token_length: 150}
network: {dim: 4, alpha: 4, train_text_encoder: false}
train: {epochs: 1, batch_size: 2, prior_loss_weight: 0.5}
"""


def test_messy_dataset_builds(tmp_path):
    root = tmp_path / "ws"
    init_workspace(root)
    ws = WS(root)
    proj = root / "projects"
    (proj / "mine").mkdir()
    for i in range(3):
        Image.new("RGB", (96 + 32 * i, 128), (40 * i, 100, 200)).save(proj / "mine" / f"m{i}.png")
    long_caption = ", ".join(f"tag{i} word{i}" for i in range(40))  # well over 75 CLIP tokens
    (proj / "mine" / "m0.txt").write_text(long_caption)
    (proj / "mine" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("RGB", (20, 20), "white").save(proj / "mine" / "tiny.png")
    (proj / "reg" / "1_shape").mkdir(parents=True)
    Image.new("RGB", (128, 128), (90, 90, 90)).save(proj / "reg" / "1_shape" / "r0.png")
    (proj / "mix.yaml").write_text(MIX)

    ws.doit("train:mix", build="mix")
    resize = ws.report("resize", "mix")
    assert (resize["computed"], resize["items"]) == (5, 5)  # 3 + tiny + reg; broken skipped
    assert any("broken.png" in n for n in resize["notes"])
    bucket = ws.report("bucket", "mix")
    assert bucket["items"] == 4 and any("tiny.png" in n and "rejected" in n for n in bucket["notes"])
    assert ws.report("latents", "mix")["items"] == 4

    # The long caption is encoded in two 75-token chunks: 1 + 150 + 1 states.
    items = json.loads((root / "cache" / "manifests" / "mix" / "textemb.json").read_text())["items"]
    long_item = next(e for e in items if e["id"].startswith("sks, shape, tag0") or "tag39" in e["id"])
    h = long_item["hash"]
    with safe_open(str(root / "cache" / "objects" / "textemb" / h[:2] / f"{h[2:]}.safetensors"), "pt") as f:
        assert f.get_tensor("hidden").shape == (152, 32)

    with safe_open(str(root / "output" / "mix" / "mix.safetensors"), "pt") as f:
        meta = f.metadata()
    # 3 training images × 3 repeats; the one reg image is repeated up to the same count (kohya)
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"]) == ("9", "9")
    assert meta["ss_prior_loss_weight"] == "0.5" and meta["ss_max_token_length"] == "150"


def test_long_captions_are_encoded_in_chunks_not_cut(built_demo):
    from lorabuild import models
    from lorabuild.textenc import encode

    folder = built_demo.root / "cache" / "models" / "tiny-sd1"
    tok, te = models.load_tokenizer(folder), models.load_text_encoder(folder)
    head = ", ".join(f"tag{i}" for i in range(30))
    assert 75 < len(tok(head + ", red").input_ids) - 2 < 150  # the last word sits in the second chunk
    with torch.no_grad():
        a = encode(tok, te, [head + ", red"], 1, 150)
        b = encode(tok, te, [head + ", blue"], 1, 150)
        short_a = encode(tok, te, [head + ", red"], 1, 75)
        short_b = encode(tok, te, [head + ", blue"], 1, 75)
    assert a.shape == (1, 152, 32) and short_a.shape == (1, 77, 32)
    assert not torch.allclose(a, b)  # the words past token 75 reach the embedding
    torch.testing.assert_close(short_a, short_b)  # ... and at 75 they are cut, as CLIP does
