"""Training options on the flow models (issue 25): kohya's FLUX.1 / SD 3.5 block selection and T5
training, LyCORIS on the files' fused layers (full refused with its reason), and what lorabuild has for SD working on tiny-flux too:
extending a run, validation loss, masked loss, EMA and gradient checkpointing.

One cold tiny-flux dev build for the module (tests/test_flux.py's recipe); every test works on a copy
of it and changes training only, so no latent or embedding is encoded again."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import yaml
from conftest import copy_workspace
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_flux import _flux_workspace

from lorabuild import models
from lorabuild.lora.adapter import from_config
from lorabuild.lora.network import NetworkConfigError

DOUBLE = ("img_attn_qkv", "txt_attn_qkv", "img_attn_proj", "txt_attn_proj", "img_mlp_0", "img_mlp_2", "txt_mlp_0",
          "txt_mlp_2", "img_mod_lin", "txt_mod_lin")  # a FLUX double block's LoRA modules in BFL's names


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return _flux_workspace(tmp_path_factory.mktemp("flowtrain") / "ws", "tiny-flux")


def _copy(ws, tmp_path, **train):
    """A copy of the build, each image once per epoch (one step of 4), ``train`` changed."""
    out = copy_workspace(ws, tmp_path / "ws")
    out.shorten()
    out.edit(lambda d: d["train"].update({"max_steps": None, **train}))
    return out


def _names(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {k.split(".")[0] for k in f.keys()}


def _net(**kw) -> dict:
    return {"dim": 4, "alpha": 4, "train_unet": True, "train_text_encoder": False, **kw}


def _loss(ws) -> list[float]:
    with open(ws.root / "output" / "demo" / "loss.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


# ------------------------------------------------------------------ block selection and T5


def test_block_indices_train_exactly_the_selected_blocks_and_an_index_out_of_range_is_named(flux, tmp_path):
    ws = _copy(flux, tmp_path)
    # with kohya's in_dims: img_in and txt_in train too, whatever the block selection (kohya adds them after)
    ws.edit(lambda d: d["network"].update(train_double_block_indices="1", train_single_block_indices="none",
                                          in_dims=[2, 0, 0, 0, 3]))
    ws.doit("train:demo", build="select")
    lora = ws.root / "output" / "demo" / "demo.safetensors"
    assert _names(lora) == {f"lora_unet_double_blocks_1_{m}" for m in DOUBLE} | {"lora_unet_img_in", "lora_unet_txt_in"}
    weights = load_file(str(lora))
    assert weights["lora_unet_txt_in.lora_down.weight"].shape[0] == 3 and weights["lora_unet_img_in.lora_up.weight"].abs().max() > 0
    run = ws.manifest("train")["items"][0]["hash"]
    key = json.loads((ws.root / "cache" / "objects" / "train" / run[:2] / f"{run[2:]}.json").read_text())["key"]
    assert key["params"]["network"]["train_double_block_indices"] == "1"
    assert key["params"]["network"]["in_dims"] == [2, 0, 0, 0, 3]
    assert "train_block_indices" not in key["params"]["network"]  # unset options stay out of the key
    assert "emb_dims" not in key["params"]["network"]
    with safe_open(str(lora), "pt") as f:
        args = json.loads(f.metadata()["ss_network_args"])
    assert args == {"train_double_block_indices": "1", "train_single_block_indices": "none", "in_dims": "[2,0,0,0,3]",
                    "split_qkv": "True"}  # lorabuild's default said: kohya reads a missing one as False
    before = lora.read_bytes()
    ws.edit(lambda d: d["network"].update(train_double_block_indices="0-5"))  # the tiny model has 2
    proc = ws.doit("train:demo", build="bad", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr
    assert "network.train_double_block_indices: block 5 is out of range" in proc.stdout + proc.stderr
    assert lora.read_bytes() == before  # nothing trained is lost


def test_validate_names_a_bad_selection_and_one_for_another_model(flux, tmp_path):
    ws = copy_workspace(flux, tmp_path / "ws")
    ws.edit(lambda d: d["network"].update(train_single_block_indices="3-1", train_block_indices="0"))
    out = ws.lorabuild("validate", "projects/demo.yaml")
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "network.train_single_block_indices" in text and "runs backwards" in text
    assert "network.train_block_indices" in text and "is for SD 3.5" in text
    ws.edit(lambda d: d["network"].update(train_single_block_indices="x", train_block_indices=None))
    out = ws.lorabuild("validate", "projects/demo.yaml")  # not kohya's syntax: the schema names the field
    assert out.returncode != 0 and "network.train_single_block_indices" in out.stdout + out.stderr
    ws.edit(lambda d: d["network"].update(train_single_block_indices=None, train_t5xxl=True))
    out = ws.lorabuild("validate", "projects/demo.yaml")
    assert "network.train_t5xxl" in out.stdout + out.stderr and "needs network.train_text_encoder" in out.stdout + out.stderr


def test_sd3_block_indices_and_t5_training_on_the_tiny_mmdit(tmp_path):
    """SD 3.5's train_block_indices keeps one joint block; train_t5xxl adds T5's attention and gated MLP
    as kohya's lora_te3_ names (diffusers' T5 paths), which the saved and PEFT layouts keep."""
    from lorabuild.families.sd3 import FAMILY as SD3

    folder = models.ensure_builtin("tiny-sd3", tmp_path / "cache")
    transformer = models.load_unet(folder)
    tes = [models.load_text_encoder(folder, which=p) for p in SD3.text_parts]
    net = from_config(_net(train_block_indices="1"), transformer, [], "sd3")
    assert net.loras and all(m.lora_name.startswith("lora_unet_transformer_blocks_1_") for m in net.loras)
    full = from_config(_net(), transformer, [], "sd3")
    assert {m.lora_name for m in net.loras} == {m.lora_name for m in full.loras
                                                if m.lora_name.startswith("lora_unet_transformer_blocks_1_")}
    net = from_config(_net(train_unet=False, train_text_encoder=True, train_t5xxl=True), transformer, tes, "sd3")
    t5 = sorted(m.lora_name for m in net.loras if m.lora_name.startswith("lora_te3_"))
    # two T5 layers: attention q, k, v, o and the gated MLP's wi_0, wi_1, wo
    assert len(t5) == 2 * 7 and "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0" in t5
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in t5
    assert any(m.lora_name.startswith("lora_te1_text_model_") for m in net.loras)
    saved = SD3.saved_layout(net.state_dict_kohya(), dict(transformer.config))
    assert {k.split(".")[0] for k in saved} >= set(t5)
    peft = SD3.peft_layout(net.state_dict_kohya(), dict(transformer.config))
    assert "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight" in peft
    with pytest.raises(NetworkConfigError, match="network.train_block_indices: block 2 is out of range"):
        from_config(_net(train_block_indices="2"), transformer, [], "sd3")
    with pytest.raises(NetworkConfigError, match="network.train_double_block_indices: is for FLUX.1"):
        from_config(_net(train_double_block_indices="0"), transformer, [], "sd3")


def test_train_blocks_single_and_lycoris_on_the_fused_layers(flux):
    folder = flux.root / "cache" / "models" / "tiny-flux"
    transformer = models.load_unet(folder)
    net = from_config(_net(train_blocks="single", train_single_block_indices="0"), transformer, [], "flux")
    assert len(net.loras) == 6 and all(m.lora_name.startswith("lora_unet_single_transformer_blocks_0_") for m in net.loras)
    with pytest.raises(NetworkConfigError, match="the block selection .* leaves no module"):
        from_config(_net(train_blocks="double", train_double_block_indices="none"), transformer, [], "flux")
    # LyCORIS trains the files' fused layers (tests/test_flow_lycoris.py); full is not built that way
    assert "lora_unet_double_blocks_0_img_attn_qkv" in {m.lora_name for m in from_config(_net(type="lokr"), transformer,
                                                                                           [], "flux").loras}
    with pytest.raises(NetworkConfigError, match="network.type: full is not available for FLUX.1"):
        from_config(_net(type="full"), transformer, [], "flux")


def test_train_t5xxl_trains_t5_with_clip_and_the_sample_stage_loads_the_file(flux, tmp_path):
    ws = _copy(flux, tmp_path)
    ws.edit(lambda d: d["network"].update(train_text_encoder=True, train_t5xxl=True))
    ws.doit("sample:demo", build="t5")
    assert {"train", "sample"} <= ws.ran("t5") and ws.report("sample")["computed"] == 1
    names = _names(ws.root / "output" / "demo" / "demo.safetensors")
    t5 = {n for n in names if n.startswith("lora_te3_")}
    assert len(t5) == 2 * 7 and "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in t5
    assert any(n.startswith("lora_te1_text_model_encoder_layers_") for n in names)
    weights = load_file(str(ws.root / "output" / "demo" / "demo.safetensors"))
    assert weights["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"].abs().max() > 0  # it trained


# ------------------------------------------------------------------ lorabuild's other options on FLUX


def test_raising_epochs_continues_the_run_to_the_file_an_uninterrupted_run_saves(flux, tmp_path):
    whole = _copy(flux, tmp_path / "a", epochs=2)
    whole.doit("train:demo", build="whole")
    parts = _copy(flux, tmp_path / "b", epochs=1)
    parts.doit("train:demo", build="first")
    parts.edit(lambda d: d["train"].update(epochs=2))
    parts.doit("train:demo", build="more")
    assert any("continued from the training state after epoch 1" in n for n in parts.report("train")["notes"])
    out = "output/demo/demo.safetensors"
    a, b = load_file(str(parts.root / out)), load_file(str(whole.root / out))  # (the metadata has each run's times)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _loss(parts) == _loss(whole) and len(_loss(whole)) >= 2


def test_validation_loss_is_measured_every_epoch_and_finite(flux, tmp_path):
    ws = _copy(flux, tmp_path, epochs=2, validation_split=0.25)
    ws.doit("train:demo", build="val")
    with open(ws.root / "output" / "demo" / "val_loss.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["val_loss"])) and float(r["val_loss"]) > 0 for r in rows)
    assert rows[0]["val_loss"] != rows[1]["val_loss"]  # the LoRA changed between the measurements


def test_masked_loss_weighs_the_loss_by_the_images_alpha(flux, tmp_path):
    """One image given an alpha channel (its left half transparent): with masked_loss the same run's loss
    differs; its latent is the one encoded again, its mask stored with it at the latents' size."""
    ws = _copy(flux, tmp_path)
    img = ws.data / "10_redcircle shape" / "redcircle_00.png"
    with Image.open(img) as im:
        rgba = im.convert("RGBA")
    alpha = Image.new("L", rgba.size, 255)
    alpha.paste(0, (0, 0, rgba.size[0] // 2, rgba.size[1]))
    rgba.putalpha(alpha)
    rgba.save(img)
    ws.doit("train:demo", build="plain")
    assert ws.report("latents")["computed"] == 1
    plain = _loss(ws)
    ws.edit(lambda d: d["train"].update(masked_loss=True))
    ws.doit("train:demo", build="masked")
    masked = _loss(ws)
    assert ws.report("latents")["computed"] == 1  # the one image with alpha: its mask joins its key
    assert len(masked) == len(plain) and masked != plain
    entry = next(e for e in ws.manifest("latents")["items"] if "redcircle_00" in e["id"])
    stored = load_file(str(ws.root / "cache" / "objects" / "latents" / entry["hash"][:2] / f"{entry['hash'][2:]}.safetensors"))
    assert stored["mask"].shape == stored["latent"].shape[-2:] and stored["mask"].min() == 0 and stored["mask"].max() == 1


def test_ema_saves_averaged_weights_beside_the_live_ones(flux, tmp_path):
    ws = _copy(flux, tmp_path, epochs=2, ema={"decay": 0.5})
    ws.doit("train:demo", build="ema")
    out = ws.root / "output" / "demo"
    live, ema = load_file(str(out / "demo.safetensors")), load_file(str(out / "demo-ema.safetensors"))
    assert live.keys() == ema.keys()
    key = "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"
    assert ema[key].abs().max() > 0 and not torch.equal(live[key], ema[key])
    with safe_open(str(out / "demo-ema.safetensors"), "pt") as f:
        assert f.metadata()["ss_ema_decay"] == "0.5"


def test_gradient_checkpointing_trains_the_same_loss(flux, tmp_path):
    plain = _copy(flux, tmp_path / "a", epochs=2)
    plain.doit("train:demo", build="plain")
    ckpt = _copy(flux, tmp_path / "b", epochs=2, gradient_checkpointing=True)
    ckpt.doit("train:demo", build="ckpt")
    assert len(_loss(plain)) >= 2
    assert _loss(ckpt) == pytest.approx(_loss(plain), rel=1e-5, abs=1e-7)
    a = load_file(str(plain.root / "output" / "demo" / "demo.safetensors"))
    b = load_file(str(ckpt.root / "output" / "demo" / "demo.safetensors"))
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a)
    assert yaml.safe_load(ckpt.yaml_path.read_text())["train"]["gradient_checkpointing"] is True


def test_two_processes_train_what_one_accumulating_twice_trains(flux, tmp_path):
    """DDP (train/dist.py: torchrun, gloo on the CPU) on the FLUX transformer: 2 ranks × 1 batch per step
    train the LoRA one process accumulating 2 batches trains."""
    one = _copy(flux, tmp_path / "one", batch_size=1, gradient_accumulation_steps=2)
    one.doit("train:demo", build="one")
    two = _copy(flux, tmp_path / "two", batch_size=1)
    proc = two.lorabuild("train", "demo", "--nproc", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert any("trained by 2 processes" in n for n in two.report("train")["notes"])
    assert len(_loss(one)) == 2 and _loss(two) == pytest.approx(_loss(one), rel=1e-5)
    a = load_file(str(one.root / "output" / "demo" / "demo.safetensors"))
    b = load_file(str(two.root / "output" / "demo" / "demo.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a)


def test_t5_outputs_come_from_the_cache_while_clip_trains_and_the_loss_is_the_uncached_ones(flux, tmp_path):
    """network.train_text_encoder without train_t5xxl (kohya: CLIP-L trains, T5's outputs cached): textemb
    caches T5's outputs alone, one per caption, and training reads them and never loads T5; the loss
    and the trained file are the uncached run's, which encodes every caption with both encoders."""
    cached = _copy(flux, tmp_path / "a")
    cached.edit(lambda d: d["network"].update(train_text_encoder=True))
    out = cached.doit("train:demo", build="te")
    report = cached.report("textemb")
    assert report["computed"] == report["items"] >= 2 and report["reused"] == 0  # one per distinct caption
    assert any("only the frozen text_encoder_2 is cached" in n for n in report["notes"])
    assert "train: text encoders loaded: text_encoder; text_encoder_2 not loaded" in out.stdout + out.stderr
    live = _copy(flux, tmp_path / "b")
    live.edit(lambda d: (d["network"].update(train_text_encoder=True), d["textemb"].update(cache=False)))
    out = live.doit("train:demo", build="live")
    assert "text encoders loaded" not in out.stdout + out.stderr  # T5 loaded and encoding as CLIP does
    assert live.report("textemb")["computed"] == 0
    a, b = _loss(cached), _loss(live)
    assert len(a) == len(b) >= 1 and all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-7) for x, y in zip(a, b))
    fa = load_file(str(cached.root / "output" / "demo" / "demo.safetensors"))
    fb = load_file(str(live.root / "output" / "demo" / "demo.safetensors"))
    assert fa.keys() == fb.keys() and any(k.startswith("lora_te1_") for k in fa)
    assert all(torch.allclose(fa[k].float(), fb[k].float(), rtol=1e-4, atol=1e-6) for k in fa)
    # a train-only change encodes no caption again; an in-training sample loads T5 for its prompt
    cached.edit(lambda d: (d["train"].update(learning_rate=1e-3), d["sample"].update(every_n_epochs=1)))
    cached.doit("train:demo", build="lr")
    assert "train" in cached.ran("lr") and ("textemb" not in cached.ran("lr") or cached.report("textemb")["computed"] == 0)
    assert any("sampled while training: 1 images rendered" in n for n in cached.report("train")["notes"])


def test_two_processes_cache_each_captions_t5_entry_once_and_train_from_them(flux, tmp_path):
    """The T5-only entries (CLIP trains, T5 frozen) with train.processes 2: textemb shares the captions
    out over 2 ranks (textemb.run_shard → frozen_items), every caption gets exactly one entry, the same
    one a single process caches, and the 2 DDP ranks train from them without loading T5, as one
    process accumulating 2 batches trains."""
    def build(folder, **train):
        ws = _copy(flux, tmp_path / folder, batch_size=1, **train)
        ws.edit(lambda d: d["network"].update(train_text_encoder=True))
        return ws, ws.doit("train:demo", build=folder)

    two, out = build("two", processes=2)
    report = two.report("textemb")
    items = two.manifest("textemb")["items"]
    captions = {e["id"] for e in items}
    assert report["items"] == len(items) == len(captions) >= 2 and report["computed"] == len(items)
    shares = [n for n in report["notes"] if n.startswith("computed by 2 processes: ")]
    assert len(shares) == 1 and sum(map(int, shares[0].split(": ")[1].split(" + "))) == len(items)
    assert any("only the frozen text_encoder_2 is cached" in n for n in report["notes"])
    for e in items:  # each entry whole, holding T5's output alone
        h = e["hash"]
        assert set(load_file(str(two.root / "cache" / "objects" / "textemb" / h[:2] / f"{h[2:]}.safetensors")))
    assert "text_encoder_2 not loaded" in out.stdout + out.stderr
    assert any("trained by 2 processes" in n for n in two.report("train")["notes"])
    one, _ = build("one", gradient_accumulation_steps=2)
    assert {e["hash"] for e in one.manifest("textemb")["items"]} == {e["hash"] for e in items}
    assert one.report("textemb")["computed"] == len(items) and not any("processes" in n for n in one.report("textemb")["notes"])
    assert len(_loss(one)) >= 1 and _loss(two) == pytest.approx(_loss(one), rel=1e-5)


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_condition_with_the_cached_t5_states_is_the_full_encoding(name):
    """What training does with T5's cached outputs (Family.encode_frozen, then condition with the CLIPs
    alone and t5_hidden) gives the conditioning of all encoders at once, with and without T5's mask."""
    from lorabuild.families import builtin_family

    fam = builtin_family(name)
    pipe = fam.build_tiny(name)
    toks, tes = fam.tokenizers_of(pipe), [te.eval() for te in fam.encoders_of(pipe)]  # T5 has dropout
    (i,) = fam.frozen_text_parts({})
    assert fam.frozen_text_parts({"train_t5xxl": True}) == ()
    captions = ["a red circle", "sks, a blue square on white"]
    for mask in (False, True):
        with torch.no_grad():
            full = fam.condition(toks, tes, captions, t5_max_length=16, apply_t5_attn_mask=mask)
            t5 = fam.encode_frozen(toks[i], tes[i], captions, t5_max_length=16, apply_t5_attn_mask=mask)
            part = fam.condition(toks[:i], tes[:i], captions, t5_max_length=16, apply_t5_attn_mask=mask, t5_hidden=t5)
        assert all(torch.equal(a, b) for a, b in zip(full, part))


def test_fp8_base_trains_on_flux_and_the_file_samples(flux, tmp_path):
    """train.base_precision: fp8 (kohya's fp8_base) on FLUX.1: the transformer's Linear weights held in
    float8, the loss finite, the file written and sampled from."""
    ws = _copy(flux, tmp_path, base_precision="fp8")
    out = ws.doit("sample:demo", build="fp8")
    assert {"train", "sample"} <= ws.ran("fp8") and ws.report("sample")["computed"] == 1
    assert all(math.isfinite(x) for x in _loss(ws)) and _loss(ws)
    weights = load_file(str(ws.root / "output" / "demo" / "demo.safetensors"))
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in weights)
    assert all(torch.isfinite(v.float()).all() for v in weights.values())
    assert "Traceback" not in out.stdout + out.stderr


def test_split_qkv_false_trains_one_lora_per_fused_layer_continues_and_writes_again_in_peft(flux, tmp_path):
    """kohya's default: one LoRA of the rank on each fused layer, through the real build: the file's
    qkv and linear1 have rank dim and alpha alpha, the key holds split_qkv, raising epochs continues the
    shared network to what an uninterrupted run saves, and output.format: diffusers writes the same
    weights again split (each part the shared down), which samples. kohya's dropouts train with it, drawn
    once per fused layer, and the continued run still draws what the uninterrupted one drew."""
    shared = {"split_qkv": False, "dropout": 0.1, "rank_dropout": 0.25, "module_dropout": 0.1}
    whole = _copy(flux, tmp_path / "a", epochs=2)
    whole.edit(lambda d: d["network"].update(shared))
    whole.doit("train:demo", build="whole")
    parts = _copy(flux, tmp_path / "b", epochs=1)
    parts.edit(lambda d: d["network"].update(shared))
    parts.doit("train:demo", build="first")
    parts.edit(lambda d: d["train"].update(epochs=2))
    parts.doit("train:demo", build="more")
    assert any("continued from the training state after epoch 1" in n for n in parts.report("train")["notes"])
    out = "output/demo/demo.safetensors"
    a, b = load_file(str(parts.root / out)), load_file(str(whole.root / out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    net = yaml.safe_load(parts.yaml_path.read_text())["network"]
    qkv, lin1 = "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1"
    assert a[f"{qkv}.lora_down.weight"].shape == (net["dim"], 32) and a[f"{qkv}.lora_up.weight"].shape == (96, net["dim"])
    assert a[f"{lin1}.lora_up.weight"].shape == (3 * 32 + 128, net["dim"]) and float(a[f"{lin1}.alpha"]) == net["alpha"]
    assert a[f"{qkv}.lora_up.weight"].abs().max() > 0  # trained
    run = parts.manifest("train")["items"][0]["hash"]
    key = json.loads((parts.root / "cache" / "objects" / "train" / run[:2] / f"{run[2:]}.json").read_text())["key"]
    assert key["params"]["network"]["split_qkv"] is False and key["params"]["network"]["rank_dropout"] == 0.25
    parts.edit(lambda d: d.setdefault("output", {}).update(format="diffusers"))
    parts.doit("sample:demo", build="peft")  # the sample stage reads the PEFT file into the shared network
    assert parts.ran("peft") == {"train", "sample"}
    assert "wrote 2 saved files again from the full-precision weights" in " ".join(parts.report("train")["notes"])
    peft = load_file(str(parts.root / out))
    q, k = (peft[f"transformer.transformer_blocks.0.attn.to_{p}.lora_A.weight"] for p in "qk")
    assert torch.equal(q, k) and torch.equal(q, a[f"{qkv}.lora_down.weight"])
