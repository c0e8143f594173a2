"""FLUX.1's transformer in Black Forest Labs' single-file layout (``flux1-dev.safetensors``:
``double_blocks.N.img_attn.qkv.weight``, ``single_blocks.N.linear1.weight``, …) from a diffusers
``FluxTransformer2DModel``: what BFL's own files hold, so a file written from the tiny model tests
the way back, which diffusers' ``from_single_file`` takes
(``convert_flux_transformer_checkpoint_to_diffusers``). Where diffusers splits, BFL fuses: a
block's q, k, v (and a single block's MLP input) are one Linear, stacked by output rows; the final
layer's modulation is (shift, scale) where diffusers has (scale, shift).
"""
from __future__ import annotations

# diffusers module → BFL module, weights and biases alike (``{i}``: the block)
PLAIN = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
}
DOUBLE = {
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
}
DOUBLE_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}


def _move(sd: dict, out: dict, src: str, dst: str) -> None:
    """A Linear's weight (and bias, if it has one) from ``sd[src.*]`` to ``out[dst.*]``."""
    for p in ("weight", "bias"):
        if f"{src}.{p}" in sd:
            out[f"{dst}.{p}"] = sd.pop(f"{src}.{p}")


def bfl_state_dict(transformer) -> dict:
    """The transformer's weights under BFL's names (tensors shared where nothing is fused)."""
    import torch

    sd = transformer.state_dict()
    out = {}

    def fused(prefix: str, dst: str, parts: tuple) -> None:
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = torch.cat([sd.pop(f"{prefix}{part}.{p}") for part in parts], dim=0)

    for src, dst in PLAIN.items():
        _move(sd, out, src, dst)
    for kind, plain, norms, fuse, name in (("transformer_blocks", DOUBLE, DOUBLE_NORMS, DOUBLE_FUSED, "double_blocks"),
                                           ("single_transformer_blocks", SINGLE, SINGLE_NORMS, SINGLE_FUSED,
                                            "single_blocks")):
        for i in range(len(getattr(transformer, kind))):
            pre, bfl = f"{kind}.{i}.", f"{name}.{i}."
            for src, dst in plain.items():
                _move(sd, out, pre + src, bfl + dst)
            for src, dst in norms.items():
                out[f"{bfl}{dst}.scale"] = sd.pop(f"{pre}{src}.weight")
            for dst, parts in fuse.items():
                fused(pre, bfl + dst, parts)
    for p in ("weight", "bias"):  # diffusers' (scale, shift) → BFL's (shift, scale)
        scale, shift = sd.pop(f"norm_out.linear.{p}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale], dim=0)
    if sd:
        raise ValueError(f"FLUX transformer weights with no BFL name: {sorted(sd)[:4]}")
    return out


def from_bfl(sd: dict, config: dict) -> dict:
    """The inverse of :func:`bfl_state_dict`: BFL's names back to a ``FluxTransformer2DModel``'s
    with the split widths from its ``config`` (q, k, v: heads × head width each; a single block's
    MLP input: the rest of ``linear1``). Any BFL key left unread is an error, so a file of another
    layout cannot load half-way."""
    import torch

    sd = dict(sd)
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    out = {}

    def take(key: str):
        if key not in sd:
            raise ValueError(f"the file has no {key}")
        return sd.pop(key)

    def split(prefix: str, src: str, parts: tuple) -> None:
        for p in ("weight", "bias"):
            fused = take(f"{src}.{p}")
            sizes = [inner] * 3 + ([fused.shape[0] - 3 * inner] if len(parts) == 4 else [])
            for part, piece in zip(parts, torch.split(fused, sizes, dim=0)):
                out[f"{prefix}{part}.{p}"] = piece

    for dst, src in PLAIN.items():
        if config.get("guidance_embeds") or not dst.startswith("time_text_embed.guidance_embedder"):
            _move(sd, out, src, dst)  # schnell has no guidance embedding: a dev file's is left over, an error
    for kind, plain, norms, fuse, name, n in (
            ("transformer_blocks", DOUBLE, DOUBLE_NORMS, DOUBLE_FUSED, "double_blocks", config["num_layers"]),
            ("single_transformer_blocks", SINGLE, SINGLE_NORMS, SINGLE_FUSED, "single_blocks",
             config["num_single_layers"])):
        for i in range(n):
            pre, bfl = f"{kind}.{i}.", f"{name}.{i}."
            for dst, src in plain.items():
                _move(sd, out, bfl + src, pre + dst)
            for dst, src in norms.items():
                out[f"{pre}{dst}.weight"] = take(f"{bfl}{src}.scale")
            for src, parts in fuse.items():
                split(pre, bfl + src, parts)
    for p in ("weight", "bias"):  # BFL's (shift, scale) → diffusers' (scale, shift)
        shift, scale = take(f"final_layer.adaLN_modulation.1.{p}").chunk(2, dim=0)
        out[f"norm_out.linear.{p}"] = torch.cat([scale, shift], dim=0)
    if sd:
        raise ValueError(f"BFL keys this transformer's config has no place for: {sorted(sd)[:4]}")
    return out
