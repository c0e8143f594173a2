"""FLUX.1 end to end on the built-in tiny models (dev and schnell): ``doit sample:demo`` builds,
caches and retrains incrementally like the SD demo, and the trained file, in kohya/BFL names,
loads into diffusers' FluxPipeline with every key consumed and the same transformer output.

One cold dev build (a small dataset, 2 optimizer steps) shared by the module's tests; the others
work on copies of it."""
from __future__ import annotations

import inspect
import json
import logging
import shutil

import pytest
import torch
import yaml
from conftest import TINY_DEMO, copy_workspace, init_workspace
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorabuild import models
from lorabuild.families import family
from lorabuild.lora.network import LoRANetwork

IMAGES = ("redcircle_00", "redcircle_01", "bluesquare_00", "bluesquare_01")


def _flux_workspace(root, model: str, network: dict | None = None):
    ws = init_workspace(root)
    for concept in ws.data.iterdir():  # a small dataset: two images per concept
        for f in concept.iterdir():
            if f.stem not in IMAGES:
                f.unlink()
    doc = yaml.safe_load(ws.yaml_path.read_text())
    doc["base_model"] = f"builtin:{model}"
    doc["network"].update(network or {})
    doc["bucket"] = {"resolution": 64, "min_reso": 64, "max_reso": 128, "step": 16}
    doc["textemb"] = {"cache": "auto", "t5_max_length": 16}
    doc["train"].update(epochs=1, max_steps=2, save_every_n_epochs=1)
    doc["sample"] = {"baseline": False, "width": 64, "height": 64, "steps": 2,
                     "prompts": ["redcircle, shape --g 3.0"]}
    ws.yaml_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    ws.cold = ws.doit("sample:demo", build="cold")
    return ws


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return _flux_workspace(tmp_path_factory.mktemp("flux") / "ws", "tiny-flux")


def _computed(ws, stage):
    return ws.report(stage)["computed"]


def test_dev_builds_end_to_end_with_flux_latents_and_t5_embeddings(dev):
    assert {s: _computed(dev, s) for s in ("latents", "textemb", "train", "sample")} == \
        {"latents": 4, "textemb": 4, "train": 1, "sample": 1}
    folder = dev.root / "cache" / "models" / "tiny-flux"
    info = models.model_info(folder)
    assert info["arch"] == "flux" and info["latent_channels"] == 16 and info["latent_shift"] == 0.1159
    # latents: the VAE's (mean − shift)·scale at 1/8 size, 16 channels; shift and scale in the key
    entry = dev.manifest("latents")["items"][0]
    side = json.loads((dev.root / "cache" / "objects" / "latents" / entry["hash"][:2] / f"{entry['hash'][2:]}.json")
                      .read_text())
    assert side["key"]["norm"] == {"shift": 0.1159, "scale": 0.3611}
    lat = load_file(str(dev.root / "cache" / "objects" / "latents" / entry["hash"][:2] / f"{entry['hash'][2:]}.safetensors"))
    assert lat["latent"].shape == (16, entry["bucket"][1] // 8, entry["bucket"][0] // 8)
    # text embeddings: T5's sequence at t5_max_length, CLIP's pooled vector; both settings keyed
    emb = dev.manifest("textemb")["items"][0]
    side = json.loads((dev.root / "cache" / "objects" / "textemb" / emb["hash"][:2] / f"{emb['hash'][2:]}.json").read_text())
    assert side["key"]["text"] == {"t5_max_length": 16, "apply_t5_attn_mask": False}
    t = load_file(str(dev.root / "cache" / "objects" / "textemb" / emb["hash"][:2] / f"{emb['hash'][2:]}.safetensors"))
    assert t["hidden"].shape == (16, 32) and t["pooled"].shape == (32,)
    # the objective as trained is in the run key (the family's default sampling filled in)
    run = dev.manifest("train")["items"][0]["hash"]
    key = json.loads((dev.root / "cache" / "objects" / "train" / run[:2] / f"{run[2:]}.json").read_text())["key"]
    assert key["objective"]["timestep_sampling"] == "flux_shift" and key["objective"]["guidance_scale"] == 1.0
    assert (dev.root / "output" / "demo" / "samples" / "grid.png").is_file()
    plan = dev.lorabuild("plan", "demo")
    assert "FLUX.1, trained with rectified flow" in plan.stdout and "timestep_sampling flux_shift" in plan.stdout


def test_adding_an_image_encodes_one_latent_and_one_caption_and_a_train_change_no_cache(dev, tmp_path):
    ws = copy_workspace(dev, tmp_path / "ws")
    src = ws.data / "10_redcircle shape"
    shutil.copy2(TINY_DEMO / "demo" / "10_redcircle shape" / "redcircle_02.png", src / "redcircle_02.png")
    (src / "redcircle_02.txt").write_text("redcircle, shape, a new caption", encoding="utf-8")
    ws.doit("latents:demo", "textemb:demo", build="add")
    assert (_computed(ws, "latents"), _computed(ws, "textemb")) == (1, 1)
    ws.edit(lambda d: d["train"].update(learning_rate=0.0005))
    ws.doit("train:demo", build="lr")  # trains on the five images
    ran = ws.ran("lr")
    assert "train" in ran and _computed(ws, "train") == 1 and len(ws.manifest("latents")["items"]) == 5
    for stage in ("latents", "textemb"):  # up to date, or run and computed nothing
        assert stage not in ran or _computed(ws, stage) == 0


def test_schnell_builds_end_to_end_without_guidance_on_devs_cached_latents_and_embeddings(dev, tmp_path):
    """schnell shares dev's VAE and text encoders (the tiny ones are made alike, as the real ones
    are the same files): switching the project to it trains and samples anew and encodes nothing."""
    ws = copy_workspace(dev, tmp_path / "ws")
    ws.edit(lambda d: (d.update(base_model="builtin:tiny-flux-schnell"), d["sample"].update(steps=4)))
    ws.doit("sample:demo", build="schnell")
    assert {s: _computed(ws, s) for s in ("latents", "textemb", "train", "sample")} == \
        {"latents": 0, "textemb": 0, "train": 1, "sample": 1}
    cfg = json.loads((ws.root / "cache" / "models" / "tiny-flux-schnell" / "transformer" / "config.json").read_text())
    sched = json.loads((ws.root / "cache" / "models" / "tiny-flux-schnell" / "scheduler" / "scheduler_config.json")
                       .read_text())
    assert cfg["guidance_embeds"] is False and sched["use_dynamic_shifting"] is False
    # the default T5 length is schnell's 256 where the project sets none (kohya's)
    assert family("flux").text_options({}, ws.root / "cache" / "models" / "tiny-flux-schnell")["t5_max_length"] == 256
    with safe_open(str(ws.root / "output" / "demo" / "demo.safetensors"), "pt") as fh:
        assert fh.metadata()["modelspec.architecture"] == "flux-1-schnell/lora"  # dev's is flux-1-dev/lora


# ------------------------------------------------------------------ the file in diffusers


def _at_tiny_width(fn, real: str, tiny: str):
    """diffusers' function ``fn`` with the tiny model's width in place of the real FLUX.1's, which
    its FLUX converters hard-code (3072 wide, single blocks' MLP 12288); nothing else changed."""
    src = inspect.getsource(fn)
    assert src.count(real) == 1
    ns: dict = {}
    exec(compile(src.replace(real, tiny), inspect.getsourcefile(fn), "exec"), fn.__globals__, ns)
    return ns[fn.__name__]


def _tiny_width_converter(monkeypatch, inner: int):
    """diffusers' kohya-FLUX LoRA converter, as load_lora_weights calls it, at the tiny width."""
    from diffusers.loaders import lora_conversion_utils as lcu
    from diffusers.loaders import lora_pipeline

    fn = _at_tiny_width(lcu._convert_kohya_flux_lora_to_diffusers, "dims=[3072, 3072, 3072, 12288]",
                        f"dims=[{inner}, {inner}, {inner}, {4 * inner}]")
    monkeypatch.setattr(lora_pipeline, "_convert_kohya_flux_lora_to_diffusers", fn)
    return fn


def _inputs(transformer):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 8, 8, generator=g)
    hidden = torch.randn(2, 16, 32, generator=g)
    added = {"pooled": torch.randn(2, 32, generator=g), "guidance": torch.tensor([1.0, 3.5])}
    return x, torch.tensor([0.3, 0.8]), hidden, added


def _ours(folder, lora, project):
    fam = family("flux")
    unet = models.load_unet(folder)
    net = LoRANetwork(unet, [], dim=project["network"]["dim"], alpha=project["network"]["alpha"],
                      train_text_encoder=False, arch="flux")
    net.load_weights(lora)
    net.eval()
    net.apply()
    with torch.no_grad():
        out = fam.predict(unet, *_inputs(unet))
        net.set_multiplier(0.0)
        plain = fam.predict(unet, *_inputs(unet))
    return out, plain, net


def _theirs(folder, lora):
    pipe = models.load_pipeline(folder)
    pipe.load_lora_weights(str(lora))
    with torch.no_grad():
        return family("flux").predict(pipe.transformer, *_inputs(pipe.transformer))


def test_the_lora_file_has_kohya_names_and_loads_into_diffusers_with_the_same_output(dev, monkeypatch, tmp_path,
                                                                                     caplog):
    lora = dev.root / "output" / "demo" / "demo.safetensors"
    folder = dev.root / "cache" / "models" / "tiny-flux"
    tensors = load_file(str(lora))
    names = {k.split(".")[0] for k in tensors}
    assert "lora_unet_double_blocks_0_img_attn_qkv" in names and "lora_unet_single_blocks_1_linear1" in names
    assert all(n.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for n in names)
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (96, 24)  # q, k, v of 32
    assert tensors["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (32, 32)  # 4 parts × rank 8
    with safe_open(str(lora), "pt") as fh:
        md = fh.metadata()
    assert md["ss_network_module"] == "networks.lora_flux" and md["ss_base_model_version"] == "flux1"
    assert md["modelspec.architecture"] == "flux-1-dev/lora" and md["ss_timestep_sampling"] == "flux_shift"
    convert = _tiny_width_converter(monkeypatch, 32)
    with caplog.at_level(logging.WARNING):
        converted = convert(dict(tensors))  # a key it cannot place raises ("Incompatible keys") or is logged
    assert "Unsupported keys" not in caplog.text
    assert len({k.rsplit(".lora_", 1)[0] for k in converted}) == 2 * 14 + 2 * 6  # every Linear of 2+2 blocks
    project = yaml.safe_load(dev.yaml_path.read_text())
    ours, plain, net = _ours(folder, lora, project)
    # the fused rows went to the right split modules: diffusers' to_k delta is our to_k LoRA's
    k_mod = next(m for m in net.loras if m.lora_name == "lora_unet_transformer_blocks_0_attn_to_k")
    ours_k = (k_mod.lora_up.weight @ k_mod.lora_down.weight) * k_mod.scale
    theirs_k = (converted["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"].float()
                @ converted["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"].float())
    assert ours_k.abs().max() > 0 and torch.allclose(ours_k, theirs_k, atol=1e-6)
    theirs = _theirs(folder, lora)
    assert (ours - plain).abs().max() > 1e-4  # the LoRA changes the output
    assert torch.allclose(ours, theirs, atol=1e-5)
    # the same file with q's and k's rows swapped is another LoRA to diffusers: the check can fail
    swapped = dict(tensors)
    up = swapped["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].clone()
    swapped["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = torch.cat([up[32:64], up[:32], up[64:]])
    bad = tmp_path / "swapped.safetensors"
    save_file(swapped, str(bad))
    assert not torch.allclose(ours, _theirs(folder, bad), atol=1e-5)
    with pytest.raises(ValueError, match="does not split into parts of rank 8"):
        _ours(folder, bad, project)


def _placed(pipe, parts) -> dict:
    """The LoRA weights diffusers put in the pipeline's ``parts``, by the file's key names."""
    placed = {}
    for head in parts:
        part = getattr(pipe, head)
        # the file names CLIP's layers as transformers 4 (and kohya) did, under text_model., which
        # transformers 5 dropped; diffusers places them either way
        level = "text_model." if head.startswith("text_encoder") and not hasattr(part, "text_model") else ""
        for key, value in part.named_parameters():
            if ".lora_A." in key or ".lora_B." in key:
                path, kind, _adapter, last = key.rsplit(".", 3)
                placed[f"{head}.{level}{path}.{kind}.{last}"] = value
    return placed


def test_output_format_diffusers_writes_peft_names_that_load_lora_weights_places_whole(dev, tmp_path):
    """``output.format: diffusers``, an output setting: the saved weights are written again (no step
    trained) as the split modules' PEFT names, which FluxPipeline.load_lora_weights takes with every
    key placed, as written, giving the output our network gives from the kohya file. The sample
    stage reads the PEFT file back."""
    ws = copy_workspace(dev, tmp_path / "ws")
    out = ws.root / "output" / "demo"
    before = (out / "loss.csv").read_text()
    kohya = tmp_path / "kohya.safetensors"
    shutil.copy(out / "demo.safetensors", kohya)
    ws.edit(lambda d: d.setdefault("output", {}).update(format="diffusers"))
    ws.doit("sample:demo", build="peft")
    assert ws.ran("peft") == {"train", "sample"}
    assert "wrote 1 saved file again from the full-precision weights" in " ".join(ws.report("train")["notes"])
    assert (out / "loss.csv").read_text() == before  # no step trained again
    peft = load_file(str(out / "demo.safetensors"))
    assert "transformer.transformer_blocks.0.attn.to_k.lora_A.weight" in peft
    assert "transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight" in peft
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in peft)
    assert len(peft) == 2 * (2 * 14 + 2 * 6)  # every Linear of the 2+2 blocks, split
    folder = ws.root / "cache" / "models" / "tiny-flux"
    ours, plain, _ = _ours(folder, kohya, yaml.safe_load(ws.yaml_path.read_text()))
    pipe = models.load_pipeline(folder)
    pipe.load_lora_weights(str(out / "demo.safetensors"))
    with torch.no_grad():
        theirs = family("flux").predict(pipe.transformer, *_inputs(pipe.transformer))
    assert (ours - plain).abs().max() > 1e-4  # the LoRA changes the output
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    placed = _placed(pipe, ("transformer", "text_encoder"))
    assert placed.keys() == peft.keys() and all(torch.equal(placed[k], peft[k].to(placed[k].dtype)) for k in peft)


def test_the_peft_layout_puts_clips_lora_under_text_encoder_and_refuses_t5(dev, tmp_path):
    """A network with CLIP trained (random ups: a fresh one's are zeros): its PEFT names load into the
    pipeline's text encoder with the same output, and read back to the trained names. T5 has no
    diffusers FLUX loader: its modules are refused by name."""
    from lorabuild.families.flux_names import peft_path

    fam = family("flux")
    folder = dev.root / "cache" / "models" / "tiny-flux"
    unet, clip = models.load_unet(folder), models.load_text_encoder(folder, which="text_encoder")
    net = LoRANetwork(unet, [clip], dim=4, alpha=2, train_text_encoder=True, arch="flux")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in net.loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.1)
    mine = net.state_dict_kohya()
    peft = fam.peft_layout(mine, dict(unet.config))
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in peft
    # alpha/rank (2/4) folded into lora_B, as diffusers scales a PEFT file by 1
    up = "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"
    assert torch.allclose(peft["text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight"], mine[up] * 0.5)
    back = fam.trained_layout(peft, dict(unet.config), {m.lora_name for m in net.loras})
    assert back.keys() == mine.keys()
    path = tmp_path / "clip_peft.safetensors"
    save_file({k: v.contiguous() for k, v in peft.items()}, str(path))
    ids = torch.tensor([[49406, 320, 1000, 49407] + [49407] * 73])
    net.apply()
    with torch.no_grad():
        ours = clip(ids).pooler_output
    pipe = models.load_pipeline(folder)
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        theirs = pipe.text_encoder(ids).pooler_output
        plain = models.load_text_encoder(folder, which="text_encoder")(ids).pooler_output
    assert (ours - plain).abs().max() > 1e-4  # the LoRA changes CLIP's output
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-4)
    placed = _placed(pipe, ("transformer", "text_encoder"))
    assert placed.keys() == peft.keys() and all(torch.equal(placed[k], peft[k]) for k in peft)
    with pytest.raises(ValueError, match="T5 text encoder left untrained"):
        peft_path("lora_te3_encoder_block_0_layer_0_SelfAttention_q")


def test_a_bfl_single_file_written_from_the_tiny_transformer_loads_to_identical_weights(dev, monkeypatch, tmp_path):
    """BFL's layout (flux1-dev.safetensors: fused qkv, linear1, (shift, scale) final modulation),
    read back by diffusers' from_single_file."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders import single_file_model, single_file_utils

    from lorabuild.families.flux_checkpoint import bfl_state_dict

    folder = dev.root / "cache" / "models" / "tiny-flux"
    transformer = models.load_unet(folder)
    sd = bfl_state_dict(transformer)
    assert sd["double_blocks.0.img_attn.qkv.weight"].shape == (96, 32)
    assert sd["single_blocks.0.linear1.weight"].shape == (224, 32) and "guidance_in.in_layer.weight" in sd
    path = tmp_path / "flux1-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    fn = _at_tiny_width(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers, "inner_dim = 3072",
                        "inner_dim = 32")
    monkeypatch.setitem(single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"],
                        "checkpoint_mapping_fn", fn)
    loaded = FluxTransformer2DModel.from_single_file(str(path), config=str(folder), subfolder="transformer",
                                                     local_files_only=True, torch_dtype=torch.float32)
    ours, theirs = transformer.state_dict(), loaded.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # lorabuild's own reader (diffusers' hard-codes the real width) gives the same weights
    from lorabuild.families.flux_checkpoint import from_bfl

    back = from_bfl(load_file(str(path)), dict(transformer.config))
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    with pytest.raises(ValueError, match="no place for"):  # a dev file read with schnell's config
        from_bfl(load_file(str(path)), {**transformer.config, "guidance_embeds": False})
    # as a project's base_model alone it is refused with what it lacks, not converted half-way
    with pytest.raises(models.ModelError, match="text_encoders.clip_l: flux1-tiny.safetensors holds no clip_l"):
        models.resolve_base_model(str(path), tmp_path, tmp_path / "cache", {})


def test_the_g_prompt_flag_is_devs_embedded_guidance_and_only_set_prompts_carry_it(tmp_path):
    from lorabuild import prompts

    assert prompts.parse_line("a cat --g 2.5 --s 4") == {"prompt": "a cat", "guidance": 2.5, "steps": 4}
    cfg = {"prompts": ["a cat --g 2.5", "a dog"], "negative": "", "width": 64, "height": 64, "steps": 4, "cfg": 7.0,
           "seed": 1, "sampler": "euler", "lora_weight": 1.0}
    with_g, without = prompts.resolve(cfg, tmp_path)
    assert with_g["guidance"] == 2.5 and "guidance" not in without  # SD prompts' settings (their keys) unchanged
    flux, sd1 = family("flux"), family("sd1")
    assert flux.guidance_arguments(with_g) == {"guidance_scale": 2.5}
    assert flux.guidance_arguments(without) == {"guidance_scale": 3.5}  # FluxPipeline's own default
    assert sd1.guidance_arguments(with_g) == {"guidance_scale": 7.0}  # CFG, as before


def test_fused_names_round_trip_with_a_part_left_out_and_refuse_unequal_ranks():
    """q and v trained, k excluded: the fused layer's k rows and columns are zeros, and reading the
    file back gives q and v exactly; parts of another rank cannot share one fused layer."""
    from lorabuild.families.flux_names import from_bfl, fused_widths, to_bfl

    g = torch.Generator().manual_seed(0)
    cfg = {"num_attention_heads": 2, "attention_head_dim": 4, "num_layers": 1, "num_single_layers": 0}
    widths = fused_widths(cfg)

    def lora(name, r=2, alpha=1.0):
        return {f"{name}.lora_down.weight": torch.randn(r, 8, generator=g),
                f"{name}.lora_up.weight": torch.randn(8, r, generator=g), f"{name}.alpha": torch.tensor(alpha)}

    ours = {**lora("lora_unet_transformer_blocks_0_attn_to_q"), **lora("lora_unet_transformer_blocks_0_attn_to_v"),
            **lora("lora_unet_transformer_blocks_0_ff_net_2")}
    saved = to_bfl(ours, widths)
    assert set(saved) == {f"lora_unet_double_blocks_0_{m}.{p}" for m in ("img_attn_qkv", "img_mlp_2")
                          for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    up, down = saved["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"], \
        saved["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    assert up.shape == (24, 6) and down.shape == (6, 8) and float(saved["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 3
    assert not up[8:16].any() and not down[2:4].any()  # k: nothing
    # the fused LoRA is the parts' sum: q's rows get q's update, v's rows v's (alpha/rank equal)
    fused = up @ down * (3 / 6)
    q = ours["lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight"] @ ours["lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight"] / 2
    assert torch.allclose(fused[:8], q)
    back = from_bfl(saved, widths, {n.split(".")[0] for n in ours})
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    with pytest.raises(ValueError, match="differ in rank or alpha"):
        to_bfl({**ours, **lora("lora_unet_transformer_blocks_0_attn_to_k", r=4)}, widths)


# ------------------------------------------------------------------ the files people have


def _parts_of(folder):
    pipe = models.load_pipeline(folder)
    return {p: getattr(pipe, p).state_dict() for p in ("transformer", "vae", "text_encoder", "text_encoder_2")}


def _rel(path, ws):
    import os

    return os.path.relpath(path, ws.yaml_path.parent)


def test_bfl_ae_clip_l_and_t5xxl_files_build_as_the_builtin_model_converted_once(dev, tmp_path):
    """flux1-dev.safetensors (BFL's transformer alone) + ae.safetensors + clip_l + t5xxl, named by
    base_model, vae and text_encoders relative to the project file, convert once into one diffusers
    folder with every weight of the built-in model: the latents, embeddings and the trained LoRA
    are the built-in build's, so nothing is computed again; a second build converts nothing."""
    from ldm_layout import flux_files

    ws = copy_workspace(dev, tmp_path / "ws")
    builtin = ws.root / "cache" / "models" / "tiny-flux"
    files = flux_files(builtin, ws.root / "models")
    ws.edit(lambda d: d.update(base_model=_rel(files["transformer"], ws), vae=_rel(files["vae"], ws),
                               base_model_config="../cache/models/tiny-flux",
                               text_encoders={"clip_l": _rel(files["clip_l"], ws), "t5xxl": _rel(files["t5xxl"], ws)}))
    ws.doit("train:demo", build="files")
    assert {s: _computed(ws, s) for s in ("latents", "textemb", "train")} == {"latents": 0, "textemb": 0, "train": 0}
    [folder] = (ws.root / "cache" / "models" / "single-file").iterdir()
    ours, theirs = _parts_of(folder), _parts_of(builtin)
    for part in theirs:
        assert ours[part].keys() == theirs[part].keys() and all(
            torch.equal(ours[part][k], theirs[part][k]) for k in theirs[part]), part
    marker = json.loads((folder / models.BUILTIN_MARKER).read_text())
    assert set(marker["parts"]) == {"vae", "text_encoders.clip_l", "text_encoders.t5xxl"}
    stamp = (folder / models.BUILTIN_MARKER).stat().st_mtime_ns
    ws.edit(lambda d: d["train"].update(learning_rate=0.0005))
    ws.doit("train:demo", build="again")
    assert "train" in ws.ran("again") and _computed(ws, "train") == 1
    assert list((ws.root / "cache" / "models" / "single-file").iterdir()) == [folder]
    assert (folder / models.BUILTIN_MARKER).stat().st_mtime_ns == stamp  # not converted again
    # a wrong or missing encoder file is an error naming the field, before anything is converted
    ws.edit(lambda d: d["text_encoders"].update(clip_l=_rel(files["t5xxl"], ws)))
    bad = ws.doit("train:demo", build="wrong", check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stdout + bad.stderr
    assert "text_encoders.clip_l:" in bad.stdout + bad.stderr and "is a T5 encoder 32 wide" in bad.stdout + bad.stderr
    ws.edit(lambda d: d.update(text_encoders={"clip_l": _rel(files["clip_l"], ws)}))
    bad = ws.doit("train:demo", build="missing", check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stdout + bad.stderr
    assert "text_encoders.t5xxl: flux1-tiny.safetensors holds no t5xxl text encoder" in bad.stdout + bad.stderr
    ws.edit(lambda d: d.update(text_encoders={"clip_l": "nowhere/clip_l.safetensors", "t5xxl": _rel(files["t5xxl"], ws)}))
    val = ws.lorabuild("validate", str(ws.yaml_path))
    assert val.returncode != 0 and "text_encoders.clip_l" in val.stdout + val.stderr and "does not exist" in val.stdout + val.stderr
    assert list((ws.root / "cache" / "models" / "single-file").iterdir()) == [folder]  # nothing else converted


def test_an_fp8_t5xxl_file_is_upcast_to_bf16_exactly_and_a_bf16_transformer_stays_bf16(dev, tmp_path):
    """t5xxl_fp8_e4m3fn.safetensors: each weight read as the bf16 value of its fp8 number (every fp8
    value is one), saved in bf16; a bf16 transformer file (as BFL's) is kept in bf16, the fp32 parts in fp32."""
    from ldm_layout import flux_files

    builtin = dev.root / "cache" / "models" / "tiny-flux"
    files = flux_files(builtin, tmp_path / "models", t5_dtype=torch.float8_e4m3fn, dtype=torch.bfloat16)
    opts = {"vae": str(files["vae"]), "base_model_config": str(builtin),
            "text_encoders": {"clip_l": str(files["clip_l"]), "t5xxl": str(files["t5xxl"])}}
    folder = models.resolve_base_model(str(files["transformer"]), tmp_path, tmp_path / "cache", opts)
    t5 = load_file(str(next((folder / "text_encoder_2").glob("*.safetensors"))))
    ref = load_file(str(next((builtin / "text_encoder_2").glob("*.safetensors"))))
    assert {v.dtype for v in t5.values()} == {torch.bfloat16}
    assert all(torch.equal(t5[k], ref[k].to(torch.float8_e4m3fn).to(torch.bfloat16)) for k in ref if k in t5)
    assert not all(torch.equal(t5[k].float(), ref[k]) for k in ref if k in t5)  # fp8 did round: the check can fail
    part = lambda f, c: load_file(str(next((f / c).glob("*.safetensors"))))  # noqa: E731
    ours, ref = part(folder, "transformer"), part(builtin, "transformer")
    assert {v.dtype for v in ours.values()} == {torch.bfloat16}
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k].to(torch.bfloat16)) for k in ref)
    assert {v.dtype for v in part(folder, "text_encoder").values()} == {torch.float32}
    # with the shipped (real-size) configs T5 v1.1's tokenizer is laid out (tests/test_t5_tokenizer.py), so what
    # refuses these tiny files is their width, before any weights are read
    with pytest.raises(models.ModelError, match=r"text_encoders.clip_l: .* 32 wide, but this model's clip_l is CLIP-L"):
        models.resolve_base_model(str(files["transformer"]), tmp_path, tmp_path / "cache",
                                  {**opts, "base_model_config": None})


def test_comfyuis_bundled_flux_checkpoint_loads_to_identical_weights_without_separate_files(dev, tmp_path):
    """ComfyUI's FLUX.1 "checkpoint" (model.diffusion_model. + vae. + text_encoders.clip_l/t5xxl.transformer.):
    every part read from the one file."""
    from ldm_layout import flux_files

    builtin = dev.root / "cache" / "models" / "tiny-flux"
    files = flux_files(builtin, tmp_path / "models")
    bundled = {"model.diffusion_model." + k: v for k, v in load_file(str(files["transformer"])).items()}
    bundled.update({"vae." + k: v for k, v in load_file(str(files["vae"])).items()})
    for name in ("clip_l", "t5xxl"):
        bundled.update({f"text_encoders.{name}.transformer.{k}": v for k, v in load_file(str(files[name])).items()})
    path = tmp_path / "flux1-dev-checkpoint.safetensors"
    save_file(bundled, str(path))
    folder = models.resolve_base_model(str(path), tmp_path, tmp_path / "cache", {"base_model_config": str(builtin)})
    assert models.source_info(folder)["parts"] == {}
    ours, theirs = _parts_of(folder), _parts_of(builtin)
    for part in theirs:
        assert ours[part].keys() == theirs[part].keys() and all(
            torch.equal(ours[part][k], theirs[part][k]) for k in theirs[part]), part
