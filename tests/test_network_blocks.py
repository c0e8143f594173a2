"""Which modules a LoRA trains (target classes, include/exclude patterns) and block-wise ranks,
alphas and learning rates, at parity with kohya's networks/lora.py network_args."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorabuild import config
from lorabuild.lora import blocks
from lorabuild.lora import metadata
from lorabuild.importers.convert import convert
from lorabuild.lora.adapter import from_config
from lorabuild.lora.network import LoRANetwork, NetworkConfigError
from lora_check import unet_outputs
from conftest import init_workspace



def _net(**over) -> dict:
    """A ``network`` section with the schema's defaults, as a validated project holds it."""
    net = config.apply_defaults({"network": dict(dim=4, alpha=2, **over)}, config.schema())["network"]
    return net


def _build(models, arch="sd1", **over):
    unet, te = models
    return from_config(_net(**over), unet, [te], arch)


def _names(net) -> set[str]:
    return {m.lora_name for m in net.loras}


def _rank(net) -> dict[str, int]:
    return {m.lora_name: m.lora_down.weight.shape[0] for m in net.loras}


def test_defaults_are_kohyas_modules(tiny_unet_te):
    unet, te = tiny_unet_te
    net = _build(tiny_unet_te)
    plain = LoRANetwork(unet, [te], dim=4, alpha=2)
    assert [m.lora_name for m in net.loras] == [m.lora_name for m in plain.loras]
    assert net.module_count() == (48, 12)  # 4 Transformer2D × 12; 2 layers × 6
    assert blocks.keyed(_net()) == {k: v for k, v in _net().items() if k not in blocks.KEY_DEFAULTS}
    assert "block_dims" not in metadata.network_args(_net())


def test_target_module_classes(tiny_unet_te):
    net = _build(tiny_unet_te, unet_target_modules=["ResnetBlock2D"], text_encoder_target_modules=["CLIPMLP"])
    names = _names(net)
    assert "lora_unet_down_blocks_0_resnets_0_time_emb_proj" in names
    assert "lora_unet_down_blocks_0_resnets_0_conv1" not in names  # a 3×3 conv: only with LoCon
    assert not any("attentions" in n for n in names)
    assert {n.rsplit("_", 1)[1] for n in names if n.startswith("lora_te")} == {"fc1", "fc2"}
    with_conv = _build(tiny_unet_te, unet_target_modules=["ResnetBlock2D"], conv_dim=2)
    assert _rank(with_conv)["lora_unet_down_blocks_0_resnets_0_conv1"] == 2
    # CLIPAttention names transformers' SDPA class too; an unknown class is an error naming the field
    assert len(_names(_build(tiny_unet_te, text_encoder_target_modules=["CLIPAttention"]))) == 48 + 8
    with pytest.raises(NetworkConfigError, match=r"network\.unet_target_modules: no module of class 'Transformer3D'"):
        _build(tiny_unet_te, unet_target_modules=["Transformer3D"])


def test_exclude_and_include_patterns(tiny_unet_te):
    full = _names(_build(tiny_unet_te))
    no_cross = _names(_build(tiny_unet_te, exclude_patterns=["lora_unet_.*attn2.*"]))
    assert full - no_cross == {n for n in full if n.startswith("lora_unet") and "attn2" in n}
    assert len(full - no_cross) == 4 * 4
    kept = _names(_build(tiny_unet_te, exclude_patterns=["lora_unet_.*attn2.*", "lora_te_.*"],
                         include_patterns=[".*attn2_to_k"]))
    assert not any(n.startswith("lora_te") for n in kept)
    assert {n for n in kept if "attn2" in n} == {n for n in full if n.endswith("attn2_to_k")}
    with pytest.raises(NetworkConfigError, match=r"network\.exclude_patterns: 'attn2' matches none"):
        _build(tiny_unet_te, exclude_patterns=["attn2"])  # the whole name must match
    with pytest.raises(NetworkConfigError, match=r"network\.include_patterns: '.*attn3.*' matches none"):
        _build(tiny_unet_te, exclude_patterns=[".*attn2.*"], include_patterns=[".*attn3.*"])
    with pytest.raises(NetworkConfigError, match=r"network\.exclude_patterns: every module is excluded"):
        _build(tiny_unet_te, exclude_patterns=["lora_.*"])
    with pytest.raises(NetworkConfigError, match=r"network\.exclude_patterns: '\(' is not a regular expression"):
        _build(tiny_unet_te, exclude_patterns=["("])


def test_block_index_is_kohyas():
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in": 1, "lora_unet_down_blocks_1_resnets_1_conv1": 5,
          "lora_unet_down_blocks_2_downsamplers_0_conv": 9, "lora_unet_mid_block_attentions_0_proj_out": 12,
          "lora_unet_up_blocks_0_resnets_2_conv2": 15, "lora_unet_up_blocks_2_upsamplers_0_conv": 21,
          "lora_unet_up_blocks_3_attentions_2_proj_out": 24, "lora_unet_conv_in": -1}
    assert {n: blocks.block_index(n, "sd1") for n in sd} == sd
    xl = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": 5, "lora_unet_input_blocks_8_0_in_layers_2": 9,
          "lora_unet_middle_block_1_proj_in": 11, "lora_unet_output_blocks_2_2_conv": 15,
          "lora_unet_output_blocks_8_1_proj_out": 21, "lora_unet_time_embed_0": 0, "lora_unet_out_2": 22}
    assert {n: blocks.block_index(n, "sdxl") for n in xl} == xl


def test_block_dims_and_alphas_set_each_modules_rank(tiny_unet_te):
    dims = [8] * 25
    dims[12] = 0  # the mid block: no modules
    dims[16], dims[17] = 2, 6  # up_blocks_1 attentions 0 and 1
    alphas = [1.0] * 25
    alphas[1] = 4.0
    net = _build(tiny_unet_te, block_dims=dims, block_alphas=alphas)
    rank = _rank(net)
    assert not any("mid_block" in n for n in rank)
    for name, r in rank.items():
        if name.startswith("lora_unet"):
            assert r == dims[blocks.block_index(name, "sd1")], name
        else:
            assert r == 4  # the text encoder keeps network.dim
    scale = {m.lora_name: m.scale for m in net.loras}
    assert scale["lora_unet_down_blocks_0_attentions_0_proj_in"] == 4.0 / 8
    assert scale["lora_unet_up_blocks_1_attentions_0_proj_in"] == 1.0 / 2
    # conv_block_dims turns LoCon on, block by block (their alpha: the block's conv dim)
    conv = [3] * 25
    conv[4] = 0  # down_blocks_1_resnets_0
    loc = _rank(_build(tiny_unet_te, conv_block_dims=conv))
    assert loc["lora_unet_down_blocks_0_resnets_0_conv1"] == 3
    assert "lora_unet_down_blocks_1_resnets_0_conv1" not in loc
    assert loc["lora_unet_down_blocks_1_resnets_0_time_emb_proj"] == 4  # a Linear in a ResNet: block_dims/dim


def test_presets_are_kohyas():
    assert blocks.preset("sine", 12) == pytest.approx([math.sin(math.pi * i / 11 / 2) for i in range(12)])
    assert blocks.preset("cosine", 12) == pytest.approx([math.sin(math.pi * i / 11 / 2) for i in reversed(range(12))])
    assert blocks.preset("linear", 9) == pytest.approx([i / 8 for i in range(9)])
    assert blocks.preset("reverse_linear+.5", 9) == pytest.approx([i / 8 + 0.5 for i in reversed(range(9))])
    assert blocks.preset("zeros+0.25", 12) == [0.25] * 12
    with pytest.raises(ValueError, match="unknown preset 'sin'"):
        blocks.preset("sin", 12)
    w = blocks.lr_weights({"down_lr_weight": "sine", "up_lr_weight": [0.5] * 9, "mid_lr_weight": None}, "sdxl")
    assert len(w) == 23 and w[0] == w[22] == 1.0 and w[1] == 0.0 and w[10:13] == [1.0] * 3 and w[13:22] == [0.5] * 9
    # kohya: a given weight at or below the threshold is 0; an unset list is all 1
    w = blocks.lr_weights({"down_lr_weight": "linear", "block_lr_zero_threshold": 0.2}, "sd1")
    assert w[:4] == [0.0, 0.0, 0.0, pytest.approx(3 / 11)] and w[12:] == [1.0] * 13


def test_block_lr_weights_make_groups_and_zero_drops_modules(tiny_unet_te):
    down = [1.0] * 12
    down[1] = 0.5
    up = [1.0] * 12
    up[3] = 0.0  # up_blocks_1_attentions_0 (block 16): not created at all
    up[4] = 0.25  # up_blocks_1_attentions_1 (block 17)
    net = _build(tiny_unet_te, down_lr_weight=down, mid_lr_weight=[2.0], up_lr_weight=up)
    assert not any(n.startswith("lora_unet_up_blocks_1_attentions_0") for n in _names(net))
    groups = net.param_groups(1e-4, 5e-5)
    assert [g["lr"] for g in groups] == pytest.approx([0.5e-4, 0.25e-4, 2e-4, 5e-5])  # module order
    assert [g.get("lr_weight") for g in groups] == [0.5, 0.25, 2.0, None]
    assert [len(g["params"]) for g in groups] == [2 * 12] * 4
    plus = net.param_groups(1e-4, 5e-5, loraplus_ratio=16)  # LoRA+ splits each block's group
    assert [g["lr"] for g in plus] == pytest.approx([0.5e-4, 8e-4, 0.25e-4, 4e-4, 2e-4, 32e-4, 5e-5, 8e-4])
    # the optimizer takes the groups (and keeps lr_weight for the log)
    opt = torch.optim.AdamW(groups, lr=1e-4)
    assert opt.param_groups[0]["lr_weight"] == 0.5
    with pytest.raises(NetworkConfigError, match=r"network\.block_dims: every remaining module"):
        _build(tiny_unet_te, train_text_encoder=False, down_lr_weight="zeros", up_lr_weight="zeros", mid_lr_weight=[0])


def test_wrong_lengths_are_clear_errors(tiny_unet_te, tmp_path):
    with pytest.raises(NetworkConfigError, match=r"network\.block_dims: has 23 entries; it needs 25 for SD 1\.x/2\.x"):
        _build(tiny_unet_te, block_dims=[4] * 23)
    with pytest.raises(NetworkConfigError, match=r"network\.up_lr_weight: has 12 entries; it needs 9 for SDXL"):
        _build(tiny_unet_te, arch="sdxl", up_lr_weight=[1] * 12)  # checked before the model is looked at
    (tmp_path / "data").mkdir()
    p = tmp_path / "p.yaml"
    p.write_text("base_model: builtin:tiny-sd1\ndataset:\n  dirs: [data]\nnetwork:\n  down_lr_weight: [1, 1, 1]\n"
                 "  mid_lr_weight: [1, 1, 1]\n  up_lr_weight: sin\n  exclude_patterns: ['(']\n"
                 "  conv_block_alphas: [" + ", ".join(["1"] * 25) + "]\n")
    _, problems = config.check(p)
    assert [(pr.line, pr.field) for pr in problems] == [(7, "network.up_lr_weight")]  # the schema first
    p.write_text(p.read_text().replace("sin\n", "sine+.5\n"))
    _, problems = config.check(p)
    assert [(pr.line, pr.field, pr.message) for pr in problems] == [
        (5, "network.down_lr_weight", "has 3 entries; it needs 12 for SD 1.x/2.x"),
        (6, "network.mid_lr_weight", "has 3 entries; it needs 1 for SD 1.x/2.x"),
        (8, "network.exclude_patterns.0", "'(' is not a regular expression (missing ), unterminated subpattern at position 0)"),
        (9, "network.conv_block_alphas", "is set but network.conv_dim is not (LoCon is off)")]


def test_metadata_records_them_as_kohya_network_args():
    net = _net(block_dims=[2] * 25, block_alphas=[1.5] * 25, down_lr_weight="sine+.5", mid_lr_weight=[0.5],
               block_lr_zero_threshold=0.1, exclude_patterns=["lora_te_.*"], unet_target_modules=["Transformer2DModel"])
    args = metadata.network_args(net)
    assert args == {"block_dims": ",".join(["2"] * 25), "block_alphas": ",".join(["1.5"] * 25),
                    "down_lr_weight": "sine+.5", "mid_lr_weight": "0.5", "block_lr_zero_threshold": "0.1",
                    "exclude_patterns": "['lora_te_.*']"}
    assert json.loads(json.dumps(args)) == args
    keyed = blocks.keyed(net)
    assert keyed["block_dims"] == [2] * 25 and "unet_target_modules" not in keyed and "include_patterns" not in keyed


def test_import_kohya_maps_block_args():
    cfg = {"network_dim": 8, "network_args": [
        "block_dims=" + ",".join(["4"] * 25), "block_alphas=" + ",".join(["2"] * 25),
        "conv_block_dims=" + ",".join(["1"] * 25), "conv_block_alphas=" + ",".join(["1"] * 25),
        "down_lr_weight=sine+.5", "mid_lr_weight=2", "up_lr_weight=1,1,,0.5,1,1,1,1,1,1,1,1",
        "block_lr_zero_threshold=0.1", "exclude_patterns=['lora_unet_.*attn2.*', 'lora_te_.*']",
        "include_patterns=.*attn2_to_k"]}
    doc, unmapped, notes = convert(cfg, None)
    assert not [u for u in unmapped if "network_args" in u]
    net = doc["network"]
    assert net["block_dims"] == [4] * 25 and net["block_alphas"] == [2.0] * 25
    assert net["conv_block_dims"] == [1] * 25 and net["conv_block_alphas"] == [1.0] * 25
    assert net["down_lr_weight"] == "sine+.5" and net["mid_lr_weight"] == [2.0]
    assert net["up_lr_weight"] == [1.0, 1.0, 0.0, 0.5] + [1.0] * 8  # kohya reads an empty entry as 0
    assert net["block_lr_zero_threshold"] == 0.1
    assert net["exclude_patterns"] == ["lora_unet_.*attn2.*", "lora_te_.*"]
    assert net["include_patterns"] == [".*attn2_to_k"]
    assert any("exclude_patterns" in n for n in notes)


@pytest.fixture
def ws(tmp_path):
    """A fresh demo workspace trained for two steps (its caches built)."""
    ws = init_workspace(tmp_path / "ws")
    ws.edit(lambda d: (d["train"].update(epochs=1, max_steps=2, save_every_n_epochs=None), d.pop("sample")))
    ws.doit("train:demo", build="first")
    return ws


def test_block_options_through_the_cli_give_a_kohya_file(ws):
    dims = [4] * 25
    dims[2], dims[12], dims[16] = 0, 2, 6  # down_blocks_0_attentions_1: none; mid: rank 2; up_blocks_1_attentions_0: 6
    up = [1.0] * 12
    up[5] = 0  # up_blocks_1_attentions_2 (block 18): none
    net = {"block_dims": dims, "up_lr_weight": up, "exclude_patterns": [".*attn1.*"], "include_patterns": [".*attn1_to_q"]}
    ws.edit(lambda d: d["network"].update(net))
    ws.doit("train:demo", build="blocks")
    assert ws.ran("blocks") == {"train"}  # latents and text embeddings are not keyed on the network
    lora = ws.root / "output" / "demo" / "demo.safetensors"
    weights = load_file(str(lora))
    rank = {k.split(".")[0]: v.shape[0] for k, v in weights.items() if k.endswith("lora_down.weight")}
    idx = {n: blocks.block_index(n, "sd1") for n in rank}
    assert set(idx.values()) == {1, 4, 5, 12, 13, 14, 15, 16, 17}
    assert all(r == dims[idx[n]] for n, r in rank.items())
    assert not any("attn1" in n and not n.endswith("attn1_to_q") for n in rank)
    assert len(rank) == 9 * 9  # 9 blocks × (proj_in, proj_out, attn1 to_q, attn2 × 4, ff × 2)
    with safe_open(str(lora), "pt") as fh:
        args = json.loads(fh.metadata()["ss_network_args"])
    assert args["block_dims"] == ",".join(map(str, dims)) and args["exclude_patterns"] == "['.*attn1.*']"
    # it loads in our loader from the same settings, and diffusers applies it as we do
    doc = config.load_project(ws.yaml_path).section("network")
    ours, plain, theirs = unet_outputs(ws.root / "cache" / "models" / "tiny-sd1", lora, "sd1", 32, net_cfg=doc)
    torch.testing.assert_close(theirs, ours, atol=2e-3, rtol=2e-3)
    # a wrong length for this model's architecture: the field, the length it needs
    ws.edit(lambda d: d["network"].update(block_dims=[4] * 23))
    proc = ws.doit("train:demo", build="bad", check=False)
    assert proc.returncode != 0
    assert "network.block_dims: has 23 entries; it needs 25 for SD 1.x/2.x" in proc.stdout + proc.stderr


def test_sdxl_blocks_follow_the_original_layout(tmp_path):
    from lorabuild import models

    folder = models.ensure_builtin("tiny-sdxl", tmp_path / "cache")
    unet = models.load_unet(folder)
    dims = [4] * 23
    dims[11] = 2  # middle_block_1, the middle Transformer2D
    net = from_config(_net(block_dims=dims, mid_lr_weight=[1, 0.5, 1], down_lr_weight="zeros+1", up_lr_weight="linear",
                           train_text_encoder=False), unet, [], "sdxl")
    rank = _rank(net)
    idx = {n: blocks.block_index(n, "sdxl") for n in rank}
    assert all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")) for n in rank)
    assert all(r == dims[idx[n]] for n, r in rank.items()) and 2 in rank.values()
    assert 13 not in idx.values()  # linear: output_blocks_0 has weight 0, so no modules
    groups = {g.get("lr_weight"): g["lr"] for g in net.param_groups(1e-4, 1e-5)}
    assert groups[0.5] == pytest.approx(0.5e-4) and 0.0 not in groups
    with pytest.raises(NetworkConfigError, match=r"network\.mid_lr_weight: has 1 entries; it needs 3 for SDXL"):
        from_config(_net(mid_lr_weight=[1]), unet, [], "sdxl")
