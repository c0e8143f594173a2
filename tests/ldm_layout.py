"""Write a diffusers model as a single-file checkpoint in the original (CompVis LDM) key layout,
the way SD 1.x/2.x .safetensors files on disk are laid out, so the tests can load such a
file through lorabuild's real single-file path. Our own mapping, written from the layout's
facts; loading it back goes through diffusers' converter, an independent implementation,
so a round trip that reproduces every tensor checks both directions."""
from __future__ import annotations

import torch

from lorabuild.lora.layout import to_original, unet_block_map

VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(sd: dict, blocks: dict, inner) -> dict:
    """Each key's longest block prefix renamed by ``blocks``, its remainder by ``inner(block, rest)``."""
    out = {}
    for key, value in sd.items():
        prefix = max((p for p in blocks if key.startswith(p + ".")), key=len, default=None)
        if prefix is None:
            out[key] = value
            continue
        rest, value2 = inner(prefix, key[len(prefix) + 1:], value)
        out[blocks[prefix] + "." + rest] = value2
    return out


def unet_to_ldm(sd: dict, cfg: dict) -> dict:
    blocks = unet_block_map(cfg)
    return {"model.diffusion_model." + to_original(k, blocks): v for k, v in sd.items()}


def vae_to_ldm(sd: dict, cfg: dict) -> dict:
    n, per = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    blocks = {}
    for i in range(n):
        for j in range(per):
            blocks[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        blocks[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        for j in range(per + 1):
            blocks[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{n - 1 - i}.block.{j}"
        blocks[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{n - 1 - i}.upsample.conv"
    for part in ("encoder", "decoder"):
        blocks.update({f"{part}.mid_block.resnets.0": f"{part}.mid.block_1",
                       f"{part}.mid_block.resnets.1": f"{part}.mid.block_2",
                       f"{part}.mid_block.attentions.0": f"{part}.mid.attn_1",
                       f"{part}.conv_norm_out": f"{part}.norm_out"})

    def inner(prefix, rest, value):
        if ".resnets." in prefix:
            return rest.replace("conv_shortcut", "nin_shortcut"), value
        if prefix.endswith("attentions.0"):
            head, _, tail = rest.rpartition(".")
            if value.ndim == 2:  # LDM's attention projections are 1×1 convolutions
                value = value[:, :, None, None]
            return VAE_ATTN[head] + "." + tail, value
        return rest, value

    return {"first_stage_model." + k: v for k, v in _rename(sd, blocks, inner).items()}


def _flat(sd: dict) -> dict:
    # transformers ≥5.6 flattened CLIPTextModel (no "text_model." prefix); the file layout has it
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in sd.items()}


def clip_to_ldm(sd: dict, prefix: str = "cond_stage_model.transformer.") -> dict:
    return {prefix + k: v for k, v in _flat(sd).items() if not k.endswith("position_ids")}


def open_clip_to_ldm(sd: dict, prefix: str = "cond_stage_model.model.") -> dict:
    sd = {k.removeprefix("text_model."): v for k, v in _flat(sd).items() if not k.endswith("position_ids")}
    out = {"token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": sd.pop("final_layer_norm.weight"), "ln_final.bias": sd.pop("final_layer_norm.bias")}
    if "text_projection.weight" in sd:
        out["text_projection"] = sd.pop("text_projection.weight").T.contiguous()
    names = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv)
            for a, b in names.items():
                out[f"{dst}{b}.{kind}"] = sd.pop(f"{src}{a}.{kind}")
    assert not sd, f"unmapped text encoder keys: {sorted(sd)[:5]}"
    return {prefix + k: v for k, v in out.items()}


def pipeline_to_ldm(folder) -> dict:
    """The single-file state dict of an SD1/SD2/SDXL diffusers folder (fp32, as saved); SDXL's
    text encoders go under ``conditioner.embedders.0`` (CLIP) and ``.1`` (OpenCLIP, with its projection)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = lambda c: json.loads((folder / c / "config.json").read_text())  # noqa: E731
    weights = lambda c: load_file(str(next((folder / c).glob("*.safetensors"))))  # noqa: E731
    if (folder / "text_encoder_2").is_dir():
        te = {**clip_to_ldm(weights("text_encoder"), "conditioner.embedders.0.transformer."),
              **open_clip_to_ldm(weights("text_encoder_2"), "conditioner.embedders.1.model.")}
    else:
        te_cfg = cfg("text_encoder")
        te = (open_clip_to_ldm if te_cfg["hidden_act"] == "gelu" else clip_to_ldm)(weights("text_encoder"))
    return {**unet_to_ldm(weights("unet"), cfg("unet")), **vae_to_ldm(weights("vae"), cfg("vae")), **te}


def mmdit_to_sai(sd: dict, cfg: dict) -> dict:
    """An SD3 transformer's diffusers state dict in SAI's MMDiT layout (``model.diffusion_model.``,
    q/k/v fused into ``qkv``), through lorabuild's own table (families/sd3_names.mmdit_layout); every key is used."""
    from lorabuild.families.sd3_names import mmdit_layout, swap_halves

    sd = dict(sd)
    out = {"pos_embed": sd.pop("pos_embed.pos_embed")}
    for sai, (parts, swapped) in mmdit_layout(cfg["num_layers"], cfg.get("dual_attention_layers") or ()).items():
        for kind in ("weight", "bias"):
            if f"{parts[0]}.{kind}" in sd:
                rows = torch.cat([sd.pop(f"{p}.{kind}") for p in parts])
                out[f"{sai}.{kind}"] = swap_halves(rows) if swapped else rows
    assert not sd, f"unmapped transformer keys: {sorted(sd)[:5]}"
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def sd3_to_sai(folder, encoders: bool = True) -> dict:
    """An SD 3.5 diffusers folder as one SAI single file (sd3.5_large.safetensors' layout): the MMDiT,
    ``first_stage_model`` (LDM VAE), and with ``encoders`` ``text_encoders.clip_l`` / ``clip_g``
    (transformers' layout under ``.transformer.``) and ``text_encoders.t5xxl.transformer``."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = lambda c: json.loads((folder / c / "config.json").read_text())  # noqa: E731
    weights = lambda c: load_file(str(next((folder / c).glob("*.safetensors"))))  # noqa: E731
    out = {**mmdit_to_sai(weights("transformer"), cfg("transformer")), **vae_to_ldm(weights("vae"), cfg("vae"))}
    if encoders:
        out.update(clip_to_ldm(weights("text_encoder"), "text_encoders.clip_l.transformer."))
        out.update(clip_to_ldm(weights("text_encoder_2"), "text_encoders.clip_g.transformer."))
        t5 = weights("text_encoder_3")
        t5.setdefault("encoder.embed_tokens.weight", t5["shared.weight"].clone())  # tied: SAI files hold both
        out.update({"text_encoders.t5xxl.transformer." + k: v for k, v in t5.items()})
    return out


def _weights(folder, part: str) -> dict:
    from pathlib import Path

    from safetensors.torch import load_file

    return load_file(str(next((Path(folder) / part).glob("*.safetensors"))))


def encoder_files(folder, out, names: dict, t5_dtype=None) -> dict:
    """A model's text encoders as the separate files ComfyUI keeps in models/text_encoders/:
    {name: part} (``{"clip_l": "text_encoder", "t5xxl": "text_encoder_2"}``) → {name: path}. CLIP
    in transformers' layout (``text_model.…``, a CLIP-L file with a ``text_projection`` its model
    does not use, as ComfyUI's clip_l.safetensors has), T5 without the tied ``encoder.embed_tokens``
    (as t5xxl_fp16.safetensors), in ``t5_dtype`` when given (fp8: t5xxl_fp8_e4m3fn)."""
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, part in names.items():
        sd = _weights(folder, part)
        if name == "t5xxl":
            sd = {k: (v.to(t5_dtype) if t5_dtype else v) for k, v in sd.items() if k != "encoder.embed_tokens.weight"}
        else:
            sd = clip_to_ldm(sd, "")
            width = sd["text_model.embeddings.token_embedding.weight"].shape[1]
            sd.setdefault("text_projection.weight", torch.eye(width))
        paths[name] = out / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(paths[name]))
    return paths


def flux_files(folder, out, t5_dtype=None, dtype=None) -> dict:
    """A FLUX.1 diffusers folder as the files people have: BFL's transformer file
    (flux1-dev.safetensors), the VAE in its original layout without a prefix (ae.safetensors),
    clip_l and t5xxl (:func:`encoder_files`) → {"transformer", "vae", "clip_l", "t5xxl": path}; the
    transformer in ``dtype`` when given (BFL's flux1-dev.safetensors is bf16)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from lorabuild import models
    from lorabuild.families.flux_checkpoint import bfl_state_dict

    out = Path(out)
    paths = encoder_files(folder, out, {"clip_l": "text_encoder", "t5xxl": "text_encoder_2"}, t5_dtype)
    paths["transformer"] = out / "flux1-tiny.safetensors"
    save_file({k: (v.to(dtype) if dtype else v).contiguous() for k, v in bfl_state_dict(models.load_unet(folder)).items()},
              str(paths["transformer"]))
    vae_cfg = json.loads((Path(folder) / "vae" / "config.json").read_text())
    vae = {k.removeprefix("first_stage_model."): v for k, v in vae_to_ldm(_weights(folder, "vae"), vae_cfg).items()}
    paths["vae"] = out / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in vae.items()}, str(paths["vae"]))
    return paths
