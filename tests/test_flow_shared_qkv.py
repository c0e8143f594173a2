"""``network.split_qkv: false`` (kohya's default for FLUX.1 and SD 3.5): one LoRA on each fused layer
(FLUX's img/txt qkv and single blocks' linear1, SD 3.5's joint qkv): the split modules share one
lora_down and their ups are the fused up's row blocks. The file holds rank r (not the block-diagonal
n·r), our forward is the fused-Linear LoRA computed by hand from the file, it reads back exactly, and
diffusers' load_lora_weights (kohya FLUX through its converter; PEFT for both) reproduces our output."""
import logging

import pytest
import torch
from safetensors.torch import load_file
from test_flux import _inputs as flux_inputs
from test_flux import _tiny_width_converter

from lorabuild import models
from lorabuild.families import family
from lorabuild.lora.adapter import from_config
from lorabuild.lora.blocks import keyed
from lorabuild.lora.network import LoRANetwork, write_kohya

NET = {"dim": 4, "alpha": 2.0, "train_unet": True, "train_text_encoder": False, "split_qkv": False}


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return models.ensure_builtin("tiny-flux", tmp_path_factory.mktemp("sharedqkv"))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return models.ensure_builtin("tiny-sd3", tmp_path_factory.mktemp("sharedqkv3"))


def _shared(folder, arch, seed=3):
    """The split_qkv-false network on the tiny model, its ups random (a fresh one's are zeros)."""
    unet = models.load_unet(folder)
    net = from_config(dict(NET), unet, [], arch)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.1)
    return net, unet


def _by_name(net):
    return {m.lora_name: m for m in net.loras}


def _fused_by_hand(tensors, name, linears, x):
    """A plain LoRA on one fused Linear (the parts' weights stacked by rows), from the file's tensors."""
    w = torch.cat([lin.weight for lin in linears])
    b = torch.cat([lin.bias for lin in linears])
    down, up = tensors[f"{name}.lora_down.weight"].float(), tensors[f"{name}.lora_up.weight"].float()
    scale = float(tensors[f"{name}.alpha"]) / down.shape[0]
    return x @ w.T + b + (x @ down.T @ up.T) * scale


def _ours_split(net, linears, x):
    net.apply()
    try:
        with torch.no_grad():
            return torch.cat([lin(x) for lin in linears], dim=-1)
    finally:
        net.restore()


def test_flux_shares_one_down_per_fused_layer_saved_at_rank_r_and_equal_to_a_fused_lora(flux, tmp_path):
    net, unet = _shared(flux, "flux")
    mods = _by_name(net)
    q, k, v = (mods[f"lora_unet_transformer_blocks_0_attn_to_{p}"] for p in "qkv")
    assert q.lora_down is k.lora_down is v.lora_down and q.lora_up is not k.lora_up
    single = [mods[f"lora_unet_single_transformer_blocks_1_{p}"] for p in ("attn_to_q", "attn_to_k", "attn_to_v",
                                                                           "proj_mlp")]
    assert all(m.lora_down is single[0].lora_down for m in single)
    assert mods["lora_unet_transformer_blocks_0_attn_add_q_proj"].lora_down is not q.lora_down  # txt qkv: its own
    # 2 double blocks × 2 qkv + 2 single blocks' linear1 = 6 fused layers, each down trained once
    ids = [id(p) for g in net.param_groups(1e-4, 1e-5) for p in g["params"]]
    assert len(ids) == len(set(ids)) == 2 * len(net.loras) - (2 * 2 * 2 + 2 * 3)
    path = tmp_path / "shared.safetensors"
    net.save(path, dtype=torch.float32)
    t = load_file(str(path))
    qkv, lin1 = "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1"
    assert t[f"{qkv}.lora_down.weight"].shape == (4, 32) and t[f"{qkv}.lora_up.weight"].shape == (96, 4)
    assert t[f"{lin1}.lora_down.weight"].shape == (4, 32) and t[f"{lin1}.lora_up.weight"].shape == (3 * 32 + 128, 4)
    assert float(t[f"{qkv}.alpha"]) == 2.0 and float(t[f"{lin1}.alpha"]) == 2.0  # kohya's alpha, not 3α
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    blk, sblk = unet.transformer_blocks[0].attn, unet.single_transformer_blocks[1]
    for name, linears in ((qkv, [blk.to_q, blk.to_k, blk.to_v]),
                          (lin1, [sblk.attn.to_q, sblk.attn.to_k, sblk.attn.to_v, sblk.proj_mlp])):
        ours = _ours_split(net, linears, x)
        by_hand = _fused_by_hand(t, name, linears, x)
        plain = torch.cat([lin(x) for lin in linears], dim=-1)
        assert (ours - plain).abs().max() > 1e-3  # the LoRA changes the output
        torch.testing.assert_close(ours, by_hand, atol=1e-5, rtol=1e-5)
    # q's and k's rows swapped in the file: no longer our forward (the check can fail)
    swapped = dict(t)
    up = swapped[f"{qkv}.lora_up.weight"]
    swapped[f"{qkv}.lora_up.weight"] = torch.cat([up[32:64], up[:32], up[64:]])
    linears = [blk.to_q, blk.to_k, blk.to_v]
    assert not torch.allclose(_ours_split(net, linears, x), _fused_by_hand(swapped, qkv, linears, x), atol=1e-4)
    # read back (resume, network.weights, re-export): every module's weights exactly, the down still shared
    again, _ = _shared(flux, "flux", seed=9)
    again.load_weights(path)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), net.state_dict().values()))
    assert _by_name(again)["lora_unet_transformer_blocks_0_attn_to_k"].lora_down is \
        _by_name(again)["lora_unet_transformer_blocks_0_attn_to_q"].lora_down
    # a split_qkv-true file (each part its own down) has no place in a shared down: refused, named
    split_unet = models.load_unet(flux)
    split = LoRANetwork(split_unet, [], dim=4, alpha=2.0, train_text_encoder=False, arch="flux")
    split.save(tmp_path / "split.safetensors", dtype=torch.float32)
    with pytest.raises(ValueError, match="does not split into parts of rank 4|separate LoRAs"):
        again.load_weights(tmp_path / "split.safetensors")
    # and a kohya split_qkv=False file read by a split_qkv-true network of the same rank: exact too
    split.load_weights(path)
    blk = split_unet.transformer_blocks[0].attn
    linears = [blk.to_q, blk.to_k, blk.to_v]
    ours = _ours_split(split, linears, x)
    torch.testing.assert_close(ours, _fused_by_hand(t, qkv, linears, x), atol=1e-5, rtol=1e-5)


def _predict(fam, transformer):
    with torch.no_grad():
        return fam.predict(transformer, *flux_inputs(transformer))


def test_flux_shared_file_loads_into_diffusers_whole_in_both_formats_with_our_output(flux, monkeypatch, tmp_path,
                                                                                      caplog):
    fam = family("flux")
    net, unet = _shared(flux, "flux")
    net.apply()
    ours = _predict(fam, unet)
    net.set_multiplier(0.0)
    plain = _predict(fam, unet)
    assert (ours - plain).abs().max() > 1e-4
    kohya = tmp_path / "kohya.safetensors"
    net.save(kohya, dtype=torch.float32)
    convert = _tiny_width_converter(monkeypatch, 32)
    with caplog.at_level(logging.WARNING):
        converted = convert(load_file(str(kohya)))
    assert "Unsupported keys" not in caplog.text
    assert len({k.rsplit(".lora_", 1)[0] for k in converted}) == 2 * 14 + 2 * 6  # every Linear of 2+2 blocks
    # diffusers gives to_k the shared down and k's rows: our to_k module's update
    k_mod = _by_name(net)["lora_unet_transformer_blocks_0_attn_to_k"]
    ours_k = (k_mod.lora_up.weight @ k_mod.lora_down.weight) * k_mod.scale
    theirs_k = (converted["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"].float()
                @ converted["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"].float())
    assert torch.allclose(ours_k.detach(), theirs_k, atol=1e-6)
    pipe = models.load_pipeline(flux)
    pipe.load_lora_weights(str(kohya))
    torch.testing.assert_close(_predict(fam, pipe.transformer), ours, atol=1e-5, rtol=1e-4)
    # output.format: diffusers: each split module its PEFT keys (the shared down, its up rows)
    peft = tmp_path / "peft.safetensors"
    write_kohya(fam.peft_layout(net.state_dict_kohya(), net.denoiser_config), peft, torch.float32)
    written = load_file(str(peft))
    assert torch.equal(written["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"],
                       written["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"])
    pipe = models.load_pipeline(flux)
    pipe.load_lora_weights(str(peft))
    placed = {n for n, _ in pipe.transformer.named_parameters() if ".lora_A." in n}
    assert len(placed) == len({k for k in written if ".lora_A." in k})  # every key consumed
    torch.testing.assert_close(_predict(fam, pipe.transformer), ours, atol=1e-5, rtol=1e-4)
    again, _ = _shared(flux, "flux", seed=9)
    again.load_weights(peft)  # the PEFT file (its scale in lora_B) reads back into the shared network
    for a, b in zip(again.loras, net.loras):
        torch.testing.assert_close(a.lora_up.weight @ a.lora_down.weight * a.scale,
                                   b.lora_up.weight @ b.lora_down.weight * b.scale, atol=1e-6, rtol=1e-5)
    assert _by_name(again)["lora_unet_single_transformer_blocks_0_proj_mlp"].lora_down is \
        _by_name(again)["lora_unet_single_transformer_blocks_0_attn_to_q"].lora_down


def test_sd3_shares_qkv_saved_at_rank_r_equal_to_a_fused_lora_and_peft_loads_with_our_output(sd3, tmp_path):
    fam = family("sd3")
    net, unet = _shared(sd3, "sd3")
    path = tmp_path / "sd3.safetensors"
    net.save(path, dtype=torch.float32)
    t = load_file(str(path))
    qkv = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    assert t[f"{qkv}.lora_down.weight"].shape == (4, 32) and t[f"{qkv}.lora_up.weight"].shape == (96, 4)
    assert float(t[f"{qkv}.alpha"]) == 2.0
    attn = unet.transformer_blocks[0].attn
    linears = [attn.to_q, attn.to_k, attn.to_v]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_ours_split(net, linears, x), _fused_by_hand(t, qkv, linears, x), atol=1e-5, rtol=1e-5)
    swapped = dict(t)
    up = swapped[f"{qkv}.lora_up.weight"]
    swapped[f"{qkv}.lora_up.weight"] = torch.cat([up[:32], up[64:], up[32:64]])  # k and v rows swapped
    assert not torch.allclose(_ours_split(net, linears, x), _fused_by_hand(swapped, qkv, linears, x), atol=1e-4)
    again, _ = _shared(sd3, "sd3", seed=9)
    again.load_weights(path)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), net.state_dict().values()))
    from test_sd3_lora import _forward, _inputs

    net.apply()
    ours = _forward(unet, _inputs())
    net.restore()
    assert (ours - _forward(unet, _inputs())).abs().max() > 1e-4
    peft = tmp_path / "peft.safetensors"
    tensors = fam.peft_layout(net.state_dict_kohya(), net.denoiser_config)
    write_kohya(tensors, peft, torch.float32)
    pipe = models.load_pipeline(sd3)
    pipe.load_lora_weights(str(peft))
    placed = {n for n, _ in pipe.transformer.named_parameters() if ".lora_A." in n}
    assert len(placed) == len({k for k in tensors if ".lora_A." in k})
    torch.testing.assert_close(_forward(pipe.transformer, _inputs()), ours, atol=1e-5, rtol=1e-4)


def test_split_qkv_is_keyed_only_when_false_and_refused_where_it_cannot_apply():
    assert "split_qkv" not in keyed({"dim": 4, "split_qkv": True})  # the default: existing keys unchanged
    assert keyed({"dim": 4, "split_qkv": False})["split_qkv"] is False
    from lorabuild.lora.flow_select import problems

    assert problems({"split_qkv": False}, "flux") == []
    assert problems({"split_qkv": False}, "sd1") == [
        ("split_qkv", "false is for FLUX.1 and SD 3.5 (the models whose files fuse q, k and v)")]
    # kohya's dropouts with it: drawn once per fused layer (FusedDraw), so no longer refused
    assert problems({"split_qkv": False, "dropout": 0.1, "rank_dropout": 0.1, "module_dropout": 0.1}, "sd3") == []
    from lorabuild.lora.lyco_options import option_problems

    assert [k for _, k, _ in option_problems({"split_qkv": False}, {"scale_weight_norms": 1.0})] == ["scale_weight_norms"]
    assert option_problems({"split_qkv": True}, {"scale_weight_norms": 1.0}) == []
    from lorabuild.lora.metadata import network_args

    assert network_args({"split_qkv": False})["split_qkv"] == "False"  # kohya's ss_network_args, as it writes it
    # kohya reads a missing split_qkv as False: a flow model's file says True for lorabuild's default; SD's say nothing
    assert network_args({"split_qkv": True}, "flux") == {"split_qkv": "True"}
    assert network_args({"split_qkv": True}, "sd3")["split_qkv"] == "True"
    assert network_args({"split_qkv": False}, "sd3")["split_qkv"] == "False"
    assert "split_qkv" not in network_args({"split_qkv": True}, "sdxl") and network_args({"split_qkv": True}) == {}


# ------------------------------------------------------------------ kohya's dropouts, drawn once per fused layer

DROPS = {"dropout": 0.3, "rank_dropout": 0.5, "module_dropout": 0.4}


def _dropping(folder, arch, **drops):
    net, unet = _shared(folder, arch)
    for m in net.loras:
        m.dropout, m.rank_dropout, m.module_dropout = drops.get("dropout", 0.0), drops.get("rank_dropout", 0.0), \
            drops.get("module_dropout", 0.0)
    return net.train(), unet


def _kohya_fused_training(tensors, name, linears, x, drops):
    """kohya's LoRAModule.forward on the fused Linear while training (networks/lora_flux.py, split_dims None):
    module dropout drawn once, dropout on lora_down's output, one (batch, rank) mask, scale / (1 − p)."""
    w = torch.cat([lin.weight for lin in linears])
    b = torch.cat([lin.bias for lin in linears])
    base = x @ w.T + b
    if drops["module_dropout"] and torch.rand(1) < drops["module_dropout"]:
        return base, True
    down, up = tensors[f"{name}.lora_down.weight"].float(), tensors[f"{name}.lora_up.weight"].float()
    lx = torch.nn.functional.dropout(x @ down.T, p=drops["dropout"])
    mask = torch.rand((lx.size(0), down.shape[0])) > drops["rank_dropout"]
    scale = float(tensors[f"{name}.alpha"]) / down.shape[0] / (1.0 - drops["rank_dropout"])
    return base + ((lx * mask.unsqueeze(1)) @ up.T) * scale, False


def test_dropouts_are_drawn_once_per_fused_layer_as_kohyas_fused_lora(flux, tmp_path):
    """split_qkv false with network.dropout, rank_dropout and module_dropout: the parts, called one after
    another on the same input, are kohya's one fused LoRA with one set of masks (seeded by hand); parts
    called on equal but separate inputs draw their own masks, which is no longer kohya's result."""
    net, unet = _dropping(flux, "flux", **DROPS)
    path = tmp_path / "drops.safetensors"
    net.save(path, dtype=torch.float32)
    t = load_file(str(path))
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    blk, sblk = unet.transformer_blocks[0].attn, unet.single_transformer_blocks[1]
    layers = (("lora_unet_double_blocks_0_img_attn_qkv", [blk.to_q, blk.to_k, blk.to_v]),
              ("lora_unet_single_blocks_1_linear1", [sblk.attn.to_q, sblk.attn.to_k, sblk.attn.to_v, sblk.proj_mlp]))
    skipped = set()
    net.apply()
    try:
        for seed in range(6):
            for name, linears in layers:
                torch.manual_seed(seed)
                with torch.no_grad():
                    ours = torch.cat([lin(x) for lin in linears], dim=-1)
                torch.manual_seed(seed)
                with torch.no_grad():
                    by_hand, skip = _kohya_fused_training(t, name, linears, x, DROPS)
                skipped.add(skip)
                torch.testing.assert_close(ours, by_hand, atol=1e-5, rtol=1e-5)
        assert skipped == {True, False}  # both outcomes of the module dropout were drawn
        name, linears = layers[0]
        for seed in range(6):  # equal inputs that are separate tensors: each part draws again
            torch.manual_seed(seed)
            with torch.no_grad():
                apart = torch.cat([lin(x.clone()) for lin in linears], dim=-1)
            torch.manual_seed(seed)
            with torch.no_grad():
                by_hand, skip = _kohya_fused_training(t, name, linears, x, DROPS)
            if not skip:
                assert not torch.allclose(apart, by_hand, atol=1e-4)
                break
        else:
            pytest.fail("every seed skipped the module")
    finally:
        net.restore()


def test_in_the_real_transformer_each_fused_layer_draws_once_and_checkpointing_replays_it(flux):
    """Through diffusers' FLUX transformer while training: every part of one fused layer gets the same
    lora_up input (the same dropout and rank masks), a layer's parts all sit out together under module
    dropout, and gradient checkpointing's recompute draws the same masks (the gradients are the ones
    without it)."""
    fam = family("flux")
    net, unet = _dropping(flux, "flux", **DROPS)
    groups = fam.fused_parts(net.denoiser_config)
    seen: dict[str, list] = {}
    hooks = [m.lora_up.register_forward_pre_hook(lambda mod, args, n=m.lora_name: seen.setdefault(n, []).append(args[0]))
             for m in net.loras]
    net.apply()
    try:
        torch.manual_seed(11)
        with torch.no_grad():
            fam.predict(unet, *flux_inputs(unet))
        for h in hooks:
            h.remove()
        by_layer: dict[str, list] = {}
        for name, layer in groups.items():
            by_layer.setdefault(layer, []).append(seen.get(name, []))
        counts = set()
        for layer, parts in by_layer.items():
            assert {len(p) for p in parts} in ({0}, {1}), layer  # all the parts ran, or none did
            counts.add(len(parts[0]))
            if parts[0]:
                assert all(torch.equal(p[0], parts[0][0]) for p in parts), layer
                assert (parts[0][0] == 0).any()  # dropped entries
        assert counts == {0, 1}

        def grads(checkpointing: bool):
            if checkpointing:
                unet.enable_gradient_checkpointing()
            else:
                unet.disable_gradient_checkpointing()
            net.zero_grad()
            unet.train()
            torch.manual_seed(5)
            fam.predict(unet, *flux_inputs(unet)).square().mean().backward()
            return [p.grad.clone() if p.grad is not None else None for p in net.parameters()]

        plain, replayed = grads(False), grads(True)
        assert any(g is not None and g.abs().max() > 0 for g in plain)
        for a, b in zip(plain, replayed):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    finally:
        net.restore()
        unet.disable_gradient_checkpointing()
