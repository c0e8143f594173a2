"""LyCORIS types on FLUX.1 and SD 3.5 (issue 25): one LyCORIS module per layer of BFL's/SAI's model, as
kohya's ``lycoris.kohya`` trains sd-scripts' fused models (lora/lyco_fused.py). The file has kohya's fused
names with LyCORIS' suffixes; merging it into the BFL/SAI-layout weights with lorabuild's reading of
ComfyUI's arithmetic (lyco.merged_weight) and reading those back gives our forward, which swapping two
parts' rows breaks; the merge equals the lycoris library's own module on the fused layer; real builds
train, sample, continue bit for bit and keep their caches; validate names what stays refused."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import copy_workspace, init_workspace
from safetensors import safe_open
from safetensors.torch import load_file
from test_flux import _flux_workspace
from test_flux import _inputs as flux_inputs

from lorabuild import models
from lorabuild.families import family
from lorabuild.lora.adapter import from_config
from lorabuild.lora.lyco import merged_weight, module_maker
from lorabuild.lora.network import NetworkConfigError

TYPES = ("loha", "lokr", "dora", "ia3", "diag-oft")


def _net(kind, **kw) -> dict:
    return {"dim": 4, "alpha": 2.0, "train_unet": True, "train_text_encoder": False, "type": kind, **kw}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lycoflow")
    return {"flux": models.ensure_builtin("tiny-flux", root), "sd3": models.ensure_builtin("tiny-sd3", root)}


def _trained(folder, arch, kind, seed=5, **kw):
    """The network on the tiny model with every tensor moved off its initialisation (a fresh LoHa's
    delta is zero)."""
    unet = models.load_unet(folder)
    torch.manual_seed(seed)  # LyCORIS initialises from the global generator
    net = from_config(_net(kind, **kw), unet, [], arch)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.loras:
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return net, unet


def _file(net, tmp_path):
    path = tmp_path / "lyco.safetensors"
    net.save(path, dtype=torch.float32)
    return load_file(str(path))


def _modules(tensors) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for k, v in tensors.items():
        name, _, rest = k.partition(".")
        out.setdefault(name, {})[rest] = v
    return out


def _merge(original: dict, tensors: dict, prefix: str = "") -> dict:
    """ComfyUI's load of the file into the original-layout model: each module merged into the weight
    kohya's name (``lora_unet_`` + the path, ``.`` → ``_``) names."""
    mods = _modules(tensors)
    out, used = dict(original), set()
    for key, w in original.items():
        if not key.endswith(".weight"):
            continue
        name = "lora_unet_" + key[len(prefix):-len(".weight")].replace(".", "_")
        if name in mods:
            out[key] = merged_weight(mods[name], w).to(w.dtype)
            used.add(name)
    assert used == set(mods), f"modules with no weight in the original layout: {sorted(set(mods) - used)[:3]}"
    return out


def _flux_predict(unet):
    with torch.no_grad():
        return family("flux").predict(unet, *flux_inputs(unet))


def _flux_merged_output(folder, tensors):
    from lorabuild.families.flux_checkpoint import bfl_state_dict, from_bfl

    base = models.load_unet(folder)
    merged = _merge(bfl_state_dict(base), tensors)
    base.load_state_dict(from_bfl(merged, dict(base.config)))
    return _flux_predict(base)


@pytest.mark.parametrize("kind", TYPES)
def test_flux_file_merged_into_bfl_weights_is_our_forward_and_swapped_rows_are_not(tiny, tmp_path, kind):
    net, unet = _trained(tiny["flux"], "flux", kind)
    names = {m.lora_name for m in net.loras}
    # every Linear of the 2 double and 2 single blocks as BFL has them: 10 and 3 a block
    assert len(names) == 2 * 10 + 2 * 3 and "lora_unet_single_blocks_1_linear1" in names
    t = _file(net, tmp_path)
    plain = _flux_predict(unet)
    net.apply()
    ours = _flux_predict(unet)
    net.restore()
    assert (ours - plain).abs().max() > 1e-3  # the network changes the output
    torch.testing.assert_close(_flux_merged_output(tiny["flux"], t), ours, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(_flux_predict(unet), plain)  # restored
    # q's and k's rows of img_attn_qkv swapped in the merged weight: no longer our forward
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    from lorabuild.families.flux_checkpoint import bfl_state_dict, from_bfl

    base = models.load_unet(tiny["flux"])
    merged = _merge(bfl_state_dict(base), t)
    w = merged["double_blocks.0.img_attn.qkv.weight"]
    delta = w - bfl_state_dict(base)["double_blocks.0.img_attn.qkv.weight"]
    assert delta.abs().max() > 0, qkv
    merged["double_blocks.0.img_attn.qkv.weight"] = w - delta + torch.cat([delta[32:64], delta[:32], delta[64:]])
    base.load_state_dict(from_bfl(merged, dict(base.config)))
    assert not torch.allclose(_flux_predict(base), ours, atol=1e-4)


def test_schnell_takes_the_same_fused_modules_and_its_merge_is_our_forward(tiny, tmp_path):
    folder = models.ensure_builtin("tiny-flux-schnell", tmp_path)
    net, unet = _trained(folder, "flux", "lokr", factor=4)
    assert not unet.config.guidance_embeds and len(net.loras) == 2 * 10 + 2 * 3
    t = _file(net, tmp_path)
    net.apply()
    ours = _flux_predict(unet)
    net.restore()
    assert (ours - _flux_predict(unet)).abs().max() > 1e-3
    torch.testing.assert_close(_flux_merged_output(folder, t), ours, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ("loha", "lokr", "dora"))
def test_sd3_file_merged_into_sai_weights_is_our_forward_with_the_last_blocks_swapped_halves(tiny, tmp_path, kind):
    from ldm_layout import mmdit_to_sai
    from test_sd3_lora import _forward, _inputs

    from lorabuild.families.sd3_names import mmdit_layout, swap_halves

    net, unet = _trained(tiny["sd3"], "sd3", kind)
    cfg = dict(unet.config)
    last = f"lora_unet_joint_blocks_{cfg['num_layers'] - 1}_context_block_adaLN_modulation_1"
    assert {f"lora_unet_joint_blocks_0_{s}_attn_qkv" for s in ("x_block", "context_block")} | {last} <= \
        {m.lora_name for m in net.loras}
    t = _file(net, tmp_path)
    plain = _forward(unet, _inputs())
    net.apply()
    ours = _forward(unet, _inputs())
    net.restore()
    assert (ours - plain).abs().max() > 1e-3

    def merged_output(tensors):
        base = models.load_unet(tiny["sd3"])
        merged = _merge(mmdit_to_sai(base.state_dict(), cfg), tensors, "model.diffusion_model.")
        back = {"pos_embed.pos_embed": merged.pop("model.diffusion_model.pos_embed")}
        for sai, (parts, swapped) in mmdit_layout(cfg["num_layers"], cfg.get("dual_attention_layers") or ()).items():
            for kind_ in ("weight", "bias"):
                key = f"model.diffusion_model.{sai}.{kind_}"
                if key in merged:
                    rows = merged[key]
                    rows = swap_halves(rows) if swapped else rows
                    back.update({f"{p}.{kind_}": r for p, r in zip(parts, rows.chunk(len(parts), dim=0))})
        base.load_state_dict(back)
        return _forward(base, _inputs())

    torch.testing.assert_close(merged_output(t), ours, atol=2e-5, rtol=1e-4)
    # the last block's context adaLN rows read in diffusers' order instead of SAI's: not our forward
    wrong = dict(t)
    for k in [k for k in t if k.startswith(last + ".") and t[k].dim() == 2 and t[k].shape[0] == 2 * 32]:
        wrong[k] = swap_halves(t[k])
    if kind != "lokr":  # a Kronecker factor's rows are not the layer's: its file is left as it is
        assert not torch.allclose(merged_output(wrong), ours, atol=1e-4)


@pytest.mark.parametrize("kind", TYPES)
def test_merged_weight_is_the_lycoris_librarys_module_on_the_fused_layer(tiny, kind):
    """The fused module's saved tensors, merged by lorabuild's reading, equal the library's own module
    of that type built on a real fused Linear with the same tensors (its forward on the identity)."""
    net, unet = _trained(tiny["flux"], "flux", kind)
    mod = next(m for m in net.loras if m.lora_name == "lora_unet_single_blocks_0_linear1")
    fused = torch.nn.Linear(32, mod.shape[0], bias=False)
    with torch.no_grad():
        fused.weight.copy_(mod.fused_weight())
    make = module_maker(_net(kind))
    lib = make("ref", fused, 4, 2.0)
    with torch.no_grad():
        own = dict(mod.named_parameters())
        for n, p in lib.named_parameters():
            p.copy_(own[n])
    lib.apply_to()
    with torch.no_grad():
        theirs = lib(torch.eye(32)).T
    ours = merged_weight({k: v.detach() for k, v in mod.state_dict().items()}, fused.weight.detach())
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (ours - fused.weight).abs().max() > 1e-3
    # training: q, k, v and the MLP input of one input, through our parts, are the library's fused layer,
    # gradients included, with the delta computed once for the four
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    r = torch.randn(2, 5, mod.shape[0], generator=torch.Generator().manual_seed(2))
    calls, delta = [], mod._delta
    mod._delta = lambda inp: (calls.append(1), delta(inp))[1]
    net.apply()
    try:
        split = torch.cat([p(x) for p in mod._parts], dim=-1)
    finally:
        net.restore()
    assert len(calls) == 1
    with torch.no_grad():
        fused.weight.copy_(mod.fused_weight())
    bias = torch.cat([p.bias for p in mod._parts]).detach()
    whole = lib(x) + bias
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)
    (split * r).sum().backward()
    (whole * r).sum().backward()
    theirs_grads = dict(lib.named_parameters())
    for n, p in mod.named_parameters():
        torch.testing.assert_close(p.grad, theirs_grads[n].grad, atol=1e-4, rtol=1e-4)
    assert any(p.grad.abs().max() > 0 for p in mod.parameters())


def test_gradient_checkpointing_gives_the_fused_modules_the_same_gradients(tiny):
    """Recomputed in the backward pass, the parts get a new input: the delta is computed again for it."""
    grads = []
    for checkpointing in (False, True):
        net, unet = _trained(tiny["flux"], "flux", "loha")
        unet.train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        net.apply()
        family("flux").predict(unet, *flux_inputs(unet)).square().mean().backward()
        net.restore()
        grads.append([p.grad.clone() for p in net.parameters()])
    assert all(g.abs().max() > 0 for g in grads[0][:4])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_refused_combinations_are_named(tiny):
    unet = models.load_unet(tiny["flux"])
    with pytest.raises(NetworkConfigError, match="network.type: full is not available for FLUX.1"):
        from_config(_net("full"), unet, [], "flux")
    with pytest.raises(NetworkConfigError, match="network.train_norm: is not available for FLUX.1"):
        from_config(_net("loha", train_norm=True), unet, [], "flux")
    with pytest.raises(NetworkConfigError, match="network.in_dims: is kohya's LoRA option"):
        from_config(_net("loha", in_dims=[4, 0, 0, 0, 0]), unet, [], "flux")
    with pytest.raises(NetworkConfigError, match="lora_unet_double_blocks_0_img_attn_qkv is one layer in the file"):
        from_config(_net("loha", exclude_patterns=[".*blocks_0_attn_to_k"]), unet, [], "flux")
    # split_qkv does not apply: the same fused modules either way
    a = from_config(_net("lokr", split_qkv=False), unet, [], "flux")
    b = from_config(_net("lokr"), unet, [], "flux")
    assert [m.lora_name for m in a.loras] == [m.lora_name for m in b.loras]


# ------------------------------------------------------------------ real builds


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One cold tiny-flux dev build with ``network.type: loha`` (tests/test_flux.py's recipe)."""
    return _flux_workspace(tmp_path_factory.mktemp("lycoflowws") / "ws", "tiny-flux", network={"type": "loha"})


def test_loha_builds_on_flux_end_to_end_and_the_file_has_bfls_fused_names(built):
    ws = built
    assert {s: ws.report(s)["computed"] for s in ("latents", "textemb", "train", "sample")} == \
        {"latents": 4, "textemb": 4, "train": 1, "sample": 1}
    path = ws.root / "output" / "demo" / "demo.safetensors"
    t = load_file(str(path))
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert t[f"{qkv}.hada_w1_a"].shape[0] == 96 and t["lora_unet_single_blocks_1_linear1.hada_w2_a"].shape[0] == 224
    assert t[f"{qkv}.hada_w2_a"].abs().max() > 0  # trained off its zero start
    assert not any(k.startswith("lora_unet_transformer_blocks") for k in t)
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    assert md["ss_network_module"] == "lycoris.kohya" and json.loads(md["ss_network_args"])["algo"] == "loha"


def test_lokr_is_a_train_only_change_and_continues_bit_for_bit_when_epochs_rise(built, tmp_path):
    def copy(name):
        out = copy_workspace(built, tmp_path / name)
        out.shorten()
        out.edit(lambda d: (d["network"].update(type="lokr", factor=4), d["train"].update(max_steps=None)))
        return out

    files = {}
    for name, epochs in (("whole", (2,)), ("parts", (1, 2))):  # two epochs at once; one, then raised to two
        w = copy(name)
        for i, n in enumerate(epochs):
            w.edit(lambda d, n=n: d["train"].update(epochs=n))
            w.doit("train:demo", build=f"{name}{i}")
            assert "latents" not in w.ran(f"{name}{i}") and w.report("textemb")["computed"] == 0  # no cache again
        files[name] = load_file(str(w.root / "output" / "demo" / "demo.safetensors"))
    assert any("continued from the training state after epoch 1" in n for n in w.report("train")["notes"])
    a, b = files["parts"], files["whole"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith(".lokr_w1") for k in a) and "lora_unet_double_blocks_1_txt_attn_qkv.alpha" in a


def test_validate_names_full_train_norm_and_the_diffusers_format(built, tmp_path):
    ws = copy_workspace(built, tmp_path / "ws")
    ws.edit(lambda d: (d["network"].update(type="full"), d.setdefault("output", {}).update(format="diffusers")))
    out = ws.lorabuild("validate", "projects/demo.yaml")
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "network.type" in text and "full is not available for FLUX.1" in text
    assert "output.format" in text and "diffusers loads LoRA files only" in text
    ws.edit(lambda d: (d["network"].update(type="loha", train_norm=True), d["output"].update(format="kohya")))
    out = ws.lorabuild("validate", "projects/demo.yaml")
    assert out.returncode != 0 and "network.train_norm" in out.stdout + out.stderr


def test_sd3_loha_builds_samples_and_the_file_has_sais_fused_names(tmp_path):
    from test_flux import IMAGES
    from test_sd3_build import _tiny_sd3

    ws = init_workspace(tmp_path / "ws")
    for concept in ws.data.iterdir():  # two images per concept, as the FLUX builds
        for f in concept.iterdir():
            if f.stem not in IMAGES:
                f.unlink()
    ws.edit(lambda d: (_tiny_sd3(d), d["network"].update(type="loha"), d["sample"].update(baseline=False)))
    ws.doit("sample:demo", build="loha")
    assert ws.ran("loha") >= {"latents", "textemb", "train", "sample"} and ws.report("sample")["computed"] >= 1
    t = load_file(str(ws.root / "output" / "demo" / "demo.safetensors"))
    names = {k.split(".")[0] for k in t}
    assert {"lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_x_block_attn2_qkv",
            "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1"} <= names and len(names) == 19
    assert t["lora_unet_joint_blocks_0_x_block_attn_qkv.hada_w1_a"].shape[0] == 96
    assert t["lora_unet_joint_blocks_0_x_block_attn_qkv.hada_w2_a"].abs().max() > 0
