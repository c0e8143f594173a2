"""SD 3.5 LoRA names: diffusers' module paths (what lorabuild trains) ↔ SAI's MMDiT names, as kohya's
``networks/lora_sd3.py`` writes them (``lora_unet_joint_blocks_0_x_block_attn_qkv``), and ↔ PEFT's
(``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``), what diffusers' ``load_lora_weights``
reads: it has no converter from kohya's SD3 names, so ``output.format: diffusers`` is the file
diffusers users load. Torch only.

kohya's SD3 modules are the Linears of the MMDiT's x and context blocks (its ``SingleDiTBlock``);
SAI fuses q, k, v into one ``qkv`` where diffusers splits them (:func:`mmdit_layout`, the same
table as SAI's single files: tests/ldm_layout.py writes those with it). Three LoRAs of rank r on the parts are exactly one of rank 3r on
the fused layer: the downs stacked, the ups block-diagonal, alpha 3α so that alpha/rank stays α/r
(kohya's ``split_qkv`` layout, its ``state_dict``); with ``network.split_qkv: false`` (kohya's
default) the parts share one down and the file holds one LoRA of rank r on ``qkv``. The last block's context adaLN gives (shift,
scale) in SAI's model and (scale, shift) in diffusers': its up's two halves of rows swap.
"""
from __future__ import annotations

import re

from . import peft_names
from .flux_names import fuse, part_rank, split
from .peft_names import by_module
from .peft_names import clip_path

_T5 = re.compile(r"^lora_te3_encoder_block_(\d+)_layer_(\d+)_(SelfAttention|DenseReluDense)_(\w+)$")


def mmdit_layout(num_layers: int, dual_layers=()) -> dict[str, tuple[tuple[str, ...], bool]]:
    """SAI's MMDiT modules (``joint_blocks.3.x_block.attn.qkv``, the names of SAI's single files and
    kohya's LoRA names) → (the diffusers modules whose output rows they stack, in order; whether the
    two halves of the rows are swapped). SAI fuses q, k, v into one ``qkv``; diffusers splits them
    (``to_q``…, the context stream's ``add_q_proj``…). SAI's continuous adaLN (the last block's context
    stream, the final layer) gives (shift, scale), diffusers' (scale, shift). The last block's context
    stream has no output projection and no MLP (``context_pre_only``). Facts from diffusers'
    ``convert_sd3_transformer_checkpoint_to_diffusers``; our own table, used both ways."""
    out: dict[str, tuple[tuple[str, ...], bool]] = {
        "x_embedder.proj": (("pos_embed.proj",), False),
        "t_embedder.mlp.0": (("time_text_embed.timestep_embedder.linear_1",), False),
        "t_embedder.mlp.2": (("time_text_embed.timestep_embedder.linear_2",), False),
        "y_embedder.mlp.0": (("time_text_embed.text_embedder.linear_1",), False),
        "y_embedder.mlp.2": (("time_text_embed.text_embedder.linear_2",), False),
        "context_embedder": (("context_embedder",), False),
        "final_layer.linear": (("proj_out",), False),
        "final_layer.adaLN_modulation.1": (("norm_out.linear",), True),
    }
    for i in range(num_layers):
        j, d, last = f"joint_blocks.{i}.", f"transformer_blocks.{i}.", i == num_layers - 1
        attn = [("attn", "attn", ("to_q", "to_k", "to_v"), "to_out.0", ("norm_q", "norm_k")),
                ("context_attn", "attn", ("add_q_proj", "add_k_proj", "add_v_proj"), None if last else "to_add_out",
                 ("norm_added_q", "norm_added_k"))]
        if i in dual_layers:
            attn.append(("attn2", "attn2", ("to_q", "to_k", "to_v"), "to_out.0", ("norm_q", "norm_k")))
        for kind, mod, qkv, proj, norms in attn:
            block = j + ("context_block.attn" if kind == "context_attn" else f"x_block.{kind}")
            out[block + ".qkv"] = (tuple(f"{d}{mod}.{p}" for p in qkv), False)
            out[block + ".ln_q"], out[block + ".ln_k"] = ((f"{d}{mod}.{norms[0]}",), False), ((f"{d}{mod}.{norms[1]}",), False)
            if proj:
                out[block + ".proj"] = ((f"{d}{mod}.{proj}",), False)
        out[j + "x_block.adaLN_modulation.1"] = ((d + "norm1.linear",), False)
        out[j + "context_block.adaLN_modulation.1"] = ((d + "norm1_context.linear",), last)
        for stream, ff in (("x_block", "ff"), ("context_block", "ff_context")):
            if stream == "x_block" or not last:
                out[f"{j}{stream}.mlp.fc1"] = ((f"{d}{ff}.net.0.proj",), False)
                out[f"{j}{stream}.mlp.fc2"] = ((f"{d}{ff}.net.2",), False)
    return out


def swap_halves(rows):
    """(a, b) → (b, a) along the first dimension: SAI's (shift, scale) ↔ diffusers' (scale, shift)."""
    import torch

    first, second = rows.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _kohya(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def _table(config: dict) -> dict[str, tuple[str, int, int, bool]]:
    """{our module name: (kohya's SAI name, part index, parts, halves swapped)} of a transformer config."""
    out = {}
    for sai, (parts, swapped) in mmdit_layout(config["num_layers"], config.get("dual_attention_layers") or ()).items():
        for j, path in enumerate(parts):
            out[_kohya(path)] = (_kohya(sai), j, len(parts), swapped)
    return out


def file_modules(config: dict) -> dict[str, tuple[str, int, int, bool]]:
    """{our module name: (kohya's SAI name, part index, parts, halves swapped)}: the layers a LyCORIS
    type trains as SAI's MMDiT has them (lora/lyco_fused.py)."""
    return _table(config)


def fused_parts(config: dict) -> dict[str, str]:
    """{our module name: the SAI layer it is a part of} for the layers SAI fuses (q, k, v)."""
    return {ours: sai for ours, (sai, _, n, _) in _table(config).items() if n > 1}


def to_sai(tensors: dict, config: dict) -> dict:
    """Saved-layout tensors named by diffusers' paths → kohya's SAI names, q/k/v fused (a part
    without a LoRA is zeros in the fused one)."""
    table, width = _table(config), config["num_attention_heads"] * config["attention_head_dim"]
    out, fused = {}, {}
    for name, t in by_module(tensors).items():
        if name not in table:  # the text encoders' (kohya's lora_te1/2/3 are diffusers' paths)
            out.update({f"{name}.{s}": v for s, v in t.items()})
            continue
        sai, j, n, swapped = table[name]
        if n == 1:
            up = swap_halves(t["lora_up.weight"]) if swapped else t["lora_up.weight"]
            out.update({f"{sai}.lora_down.weight": t["lora_down.weight"], f"{sai}.lora_up.weight": up,
                        f"{sai}.alpha": t["alpha"]})
        else:
            fused.setdefault(sai, {})[j] = t
    for sai, parts in fused.items():
        out.update(fuse(sai, parts, [width] * 3))
    return out


def from_sai(tensors: dict, config: dict, wanted: set[str]) -> dict:
    """The inverse of :func:`to_sai`; ``wanted``: the network's module names. A fused LoRA whose up
    is not block-diagonal (kohya's split_qkv false: one LoRA on SAI's fused layer) gives each part the
    shared down and its rows (flux_names.split)."""
    inverse: dict[str, list] = {}
    for ours, (sai, j, n, swapped) in _table(config).items():
        inverse.setdefault(sai, [None] * n)[j] = (ours, swapped)
    out = {}
    for name, t in by_module(tensors).items():
        if name not in inverse:
            out.update({f"{name}.{s}": v for s, v in t.items()})
            continue
        parts = inverse[name]
        if len(parts) == 1:
            ours, swapped = parts[0]
            up = swap_halves(t["lora_up.weight"]) if swapped else t["lora_up.weight"]
            out.update({f"{ours}.lora_down.weight": t["lora_down.weight"], f"{ours}.lora_up.weight": up,
                        f"{ours}.alpha": t["alpha"]})
            continue
        rank = part_rank(wanted, [ours for ours, _ in parts])
        for (ours, _), part in zip(parts, split(name, t, [t["lora_up.weight"].shape[0] // 3] * 3, rank)):
            if ours in wanted:
                out.update({f"{ours}.{k}": v for k, v in part.items()})
    return out


def peft_path(name: str, config: dict) -> str:
    """A module's PEFT path for diffusers' SD3 loader from its lorabuild name: ``transformer.`` + the
    diffusers path, ``text_encoder.`` / ``text_encoder_2.`` / ``text_encoder_3.`` + the encoder's."""
    paths = {_kohya(p): p for parts, _ in mmdit_layout(
        config["num_layers"], config.get("dual_attention_layers") or ()).values() for p in parts}
    if name in paths:
        return "transformer." + paths[name]
    clip = clip_path(name, {"lora_te1": "text_encoder", "lora_te2": "text_encoder_2"})
    if clip:
        return clip
    m = _T5.match(name)
    if m:
        return f"text_encoder_3.encoder.block.{m.group(1)}.layer.{m.group(2)}.{m.group(3)}.{m.group(4)}"
    raise ValueError(f"{name}: not a module lorabuild trains on SD 3.5")


def to_peft(tensors: dict, config: dict) -> dict:
    """Saved-layout tensors → PEFT's names (families/peft_names.py)."""
    return peft_names.to_peft(tensors, lambda name: peft_path(name, config))


PEFT_PREFIXES = {"transformer.": "lora_unet_", "text_encoder.": "lora_te1_", "text_encoder_2.": "lora_te2_",
                 "text_encoder_3.": "lora_te3_"}


def from_peft(tensors: dict) -> dict:
    """The inverse of :func:`to_peft` (alpha = rank: the scale is in lora_B already)."""
    return peft_names.from_peft(tensors, PEFT_PREFIXES, "SD 3.5")
