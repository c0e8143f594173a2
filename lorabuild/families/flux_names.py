"""FLUX.1 LoRA names: diffusers' module paths (what lorabuild trains on) ↔ BFL's, as kohya's
``networks/lora_flux.py`` names them (``lora_unet_double_blocks_0_img_attn_qkv``), torch only.

BFL's model fuses what diffusers splits: a double block's ``img_attn.qkv`` is ``attn.to_q``,
``to_k``, ``to_v`` stacked by output rows (``txt_attn.qkv`` the ``add_*_proj``), a single block's
``linear1`` is ``to_q``, ``to_k``, ``to_v`` and ``proj_mlp`` stacked. Several LoRAs of rank r on
the parts are exactly one LoRA of rank n·r on the fused layer: the downs stacked (``[n·r, in]``),
the ups block-diagonal (``[Σ out, n·r]``, part j's up in rows of part j and columns j·r…), alpha
n·α so that alpha/rank stays α/r. This is the layout kohya writes with ``split_qkv`` and the one
diffusers' ``_convert_kohya_flux_lora_to_diffusers`` reads back into split modules ("sparse" up:
each part's down is its chunk). kohya's default (``split_qkv`` false, lorabuild's ``network.split_qkv:
false``) is one LoRA on the fused layer: down ``[r, in]`` shared, up ``[Σ out, r]`` whose row blocks
are the parts'; split, each part gets that down and its rows (diffusers' converter does the same).
"""
from __future__ import annotations

import re

from ..lora.flow_select import EMBEDDERS as _FLOW_EMBEDDERS
from .peft_names import by_module, clip_path

# diffusers path inside a block → (BFL name, part index within a fused layer or None)
DOUBLE = {
    "attn_to_q": ("img_attn_qkv", 0), "attn_to_k": ("img_attn_qkv", 1), "attn_to_v": ("img_attn_qkv", 2),
    "attn_add_q_proj": ("txt_attn_qkv", 0), "attn_add_k_proj": ("txt_attn_qkv", 1),
    "attn_add_v_proj": ("txt_attn_qkv", 2),
    "attn_to_out_0": ("img_attn_proj", None), "attn_to_add_out": ("txt_attn_proj", None),
    "ff_net_0_proj": ("img_mlp_0", None), "ff_net_2": ("img_mlp_2", None),
    "ff_context_net_0_proj": ("txt_mlp_0", None), "ff_context_net_2": ("txt_mlp_2", None),
    "norm1_linear": ("img_mod_lin", None), "norm1_context_linear": ("txt_mod_lin", None),
}
SINGLE = {
    "attn_to_q": ("linear1", 0), "attn_to_k": ("linear1", 1), "attn_to_v": ("linear1", 2), "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None), "norm_linear": ("modulation_lin", None),
}
# the input embedders kohya's in_dims trains (networks/lora_flux.py): diffusers' path → BFL's name, as
# diffusers' _convert_kohya_flux_lora_to_diffusers reads them back: the entry's BFL module (img_in, txt_in)
# itself, or its MLPEmbedder's in_layer / out_layer (time_in, vector_in, guidance_in); the entries and their
# paths are flow_select.EMBEDDERS'
EMBEDDERS = {path: label if len(paths) == 1 else f"{label}_{layer}"
             for label, paths in _FLOW_EMBEDDERS["in_dims"][1]
             for path, layer in zip(paths, ("in_layer", "out_layer"))}
_EMB_TO_BFL = {"lora_unet_" + path.replace(".", "_"): "lora_unet_" + bfl for path, bfl in EMBEDDERS.items()}
_EMB_FROM_BFL = {bfl: ours for ours, bfl in _EMB_TO_BFL.items()}
_EMB_DOTTED = {"lora_unet_" + path.replace(".", "_"): path for path in EMBEDDERS}
_OURS = re.compile(r"^lora_unet_(transformer_blocks|single_transformer_blocks)_(\d+)_(.+)$")
_BFL = re.compile(r"^lora_unet_(double_blocks|single_blocks)_(\d+)_(.+)$")
_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


def to_bfl(tensors: dict, widths: dict[str, list[int]]) -> dict:
    """Saved-layout tensors named by diffusers' paths → BFL's names, split parts fused. ``widths``:
    {fused BFL module name: its parts' output widths} (a part without a LoRA is zeros there)."""
    out, fused = {}, {}
    for name, t in by_module(tensors).items():
        m = _OURS.match(name)
        table = None if m is None else (DOUBLE if m.group(1) == "transformer_blocks" else SINGLE)
        if table is None or m.group(3) not in table:
            out.update({f"{_EMB_TO_BFL.get(name, name)}.{s}": v for s, v in t.items()})
            continue
        bfl, part = table[m.group(3)]
        new = f"lora_unet_{'double' if table is DOUBLE else 'single'}_blocks_{m.group(2)}_{bfl}"
        if part is None:
            out.update({f"{new}.{s}": v for s, v in t.items()})
        else:
            fused.setdefault(new, {})[part] = t
    for new, parts in fused.items():
        out.update(fuse(new, parts, widths[new]))
    return out


def fuse(new: str, parts: dict[int, dict], dims: list[int]) -> dict:
    """One fused LoRA ``new`` from its parts' ({part index: {"lora_down.weight", "lora_up.weight",
    "alpha"}}; a missing part is zeros). Parts that share one down (``network.split_qkv: false``,
    kohya's default) are that one LoRA: the down once (rank r), the ups stacked by rows, alpha α. Parts
    with their own downs: downs stacked, ups block-diagonal, alpha n·α. ``dims``: the parts' output
    widths. Shared by the families whose files fuse what diffusers splits (SD 3.5)."""
    import torch

    ranks = {p["lora_down.weight"].shape[0] for p in parts.values()}
    alphas = {float(p["alpha"]) for p in parts.values()}
    if len(ranks) > 1 or len(alphas) > 1:
        raise ValueError(f"{new}: its parts' LoRAs differ in rank or alpha ({sorted(ranks)}, {sorted(alphas)}): "
                         "they cannot be saved as one fused layer")
    r, alpha = ranks.pop(), alphas.pop()
    first = next(iter(parts.values()))
    down0, up0 = first["lora_down.weight"], first["lora_up.weight"]
    # equal downs are one shared down (an exact equality: independent downs never are, from kaiming init)
    shared = len(parts) > 1 and all(torch.equal(p["lora_down.weight"], down0) for p in parts.values())
    n = len(dims)
    downs, up = [], torch.zeros(sum(dims), r if shared else n * r, dtype=up0.dtype)
    row = 0
    for j in range(n):
        p = parts.get(j)
        downs.append(p["lora_down.weight"] if p else torch.zeros_like(down0))
        if p:
            up[row : row + dims[j], slice(None) if shared else slice(j * r, (j + 1) * r)] = p["lora_up.weight"]
        row += dims[j]
    if shared:
        return {f"{new}.lora_down.weight": down0, f"{new}.lora_up.weight": up, f"{new}.alpha": first["alpha"]}
    return {f"{new}.lora_down.weight": torch.cat(downs, dim=0), f"{new}.lora_up.weight": up,
            f"{new}.alpha": torch.tensor(alpha * n, dtype=first["alpha"].dtype)}


def split(name: str, t: dict, dims: list[int], rank: int | None = None) -> list[dict]:
    """The inverse of :func:`fuse`: fused LoRA ``name``'s parts, in order. ``rank``: the rank of the
    network's modules there (None: unknown). A block-diagonal up of rank n·r splits into n LoRAs of rank
    r (lorabuild's split_qkv: true); any other, or one the network wants at the file's rank, is one LoRA
    on the fused layer: each part gets the whole down and its rows of the up, alpha unchanged (exact;
    what diffusers' kohya FLUX converter does)."""
    n, down, up = len(dims), t["lora_down.weight"], t["lora_up.weight"]
    big = down.shape[0]
    if up.shape[1] != big or up.shape[0] != sum(dims):
        raise ValueError(f"{name}: its lora_up {tuple(up.shape)} does not fit its lora_down {tuple(down.shape)} "
                         f"and the fused layer's {sum(dims)} rows")
    rows = [sum(dims[:j]) for j in range(n + 1)]
    if rank != big and big % n == 0 and _block_diagonal(up, rows, big // n):
        r = big // n
        return [{"lora_down.weight": down[j * r : (j + 1) * r], "alpha": t["alpha"] / n,
                 "lora_up.weight": up[rows[j] : rows[j + 1], j * r : (j + 1) * r]} for j in range(n)]
    if rank is not None and rank != big:
        raise ValueError(f"{name}: a fused LoRA of rank {big} does not split into parts of rank {rank} (the network's "
                         "network.dim there, and its network.split_qkv)")
    return [{"lora_down.weight": down, "lora_up.weight": up[rows[j] : rows[j + 1]], "alpha": t["alpha"]}
            for j in range(n)]


def _block_diagonal(up, rows: list[int], r: int) -> bool:
    """Whether part j's rows of ``up`` are zero outside its columns j·r…(j+1)·r."""
    for j in range(len(rows) - 1):
        off = up[rows[j] : rows[j + 1]].clone()
        off[:, j * r : (j + 1) * r] = 0
        if off.abs().max() > 0:
            return False
    return True


def part_rank(wanted, names) -> int | None:
    """The rank the network's modules ``names`` have (``wanted``: {module name: rank}, or a set of names:
    unknown)."""
    if isinstance(wanted, dict):
        for n in names:
            if n in wanted:
                return wanted[n]
    return None


def from_bfl(tensors: dict, widths: dict[str, list[int]], wanted: set[str]) -> dict:
    """The inverse of :func:`to_bfl`: a file in BFL's names → diffusers' paths; each fused layer back
    out into the parts ``wanted`` names (the network's modules; a dict: {name: rank})."""
    out = {}
    for name, t in by_module(tensors).items():
        m = _BFL.match(name)
        if m is None:
            out.update({f"{_EMB_FROM_BFL.get(name, name)}.{s}": v for s, v in t.items()})
            continue
        double = m.group(1) == "double_blocks"
        table, ours = (DOUBLE, "transformer_blocks") if double else (SINGLE, "single_transformer_blocks")
        paths = {part: path for path, (bfl, part) in table.items() if bfl == m.group(3)}
        if not paths:
            raise ValueError(f"{name}: not a module of FLUX.1's {'double' if double else 'single'} blocks")
        if None in paths:
            out.update({f"lora_unet_{ours}_{m.group(2)}_{paths[None]}.{s}": v for s, v in t.items()})
            continue
        targets = [f"lora_unet_{ours}_{m.group(2)}_{paths[j]}" for j in range(len(paths))]
        for target, part in zip(targets, split(name, t, widths[name], part_rank(wanted, targets))):
            if target in wanted:
                out.update({f"{target}.{s}": v for s, v in part.items()})
    return out


def fused_parts(config) -> dict[str, str]:
    """{our module name: the BFL layer it is a part of} for the layers BFL fuses (qkv, linear1)."""
    out = {}
    for ours, bfl, table, count in (("transformer_blocks", "double", DOUBLE, "num_layers"),
                                    ("single_transformer_blocks", "single", SINGLE, "num_single_layers")):
        for i in range(config[count]):
            out.update({f"lora_unet_{ours}_{i}_{path}": f"lora_unet_{bfl}_blocks_{i}_{name}"
                        for path, (name, part) in table.items() if part is not None})
    return out


def file_modules(config) -> dict[str, tuple[str, int, int, bool]]:
    """{our module name: (BFL's module name, part index, parts, halves swapped)} for every Linear of the
    double and single blocks: the layers a LyCORIS type trains as BFL's model has them (one module on
    each fused qkv / linear1, lora/lyco_fused.py). BFL never swaps halves."""
    out = {}
    for ours, bfl, table, count in (("transformer_blocks", "double", DOUBLE, "num_layers"),
                                    ("single_transformer_blocks", "single", SINGLE, "num_single_layers")):
        for i in range(config[count]):
            for path, (name, part) in table.items():
                n = sum(1 for other, _ in table.values() if other == name)
                out[f"lora_unet_{ours}_{i}_{path}"] = (f"lora_unet_{bfl}_blocks_{i}_{name}", part or 0, n, False)
    return out


def fused_widths(config) -> dict[str, list[int]]:
    """{fused BFL module name: its parts' output widths} of a FluxTransformer2DModel's config: q, k, v
    are heads × head_dim wide, a single block's MLP 4× that (diffusers' mlp_ratio)."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    out = {}
    for i in range(config["num_layers"]):
        out[f"lora_unet_double_blocks_{i}_img_attn_qkv"] = [inner] * 3
        out[f"lora_unet_double_blocks_{i}_txt_attn_qkv"] = [inner] * 3
    for i in range(config["num_single_layers"]):
        out[f"lora_unet_single_blocks_{i}_linear1"] = [inner] * 3 + [4 * inner]
    return out


# a block's module, as lorabuild names it (diffusers' path, "_" for "."), → diffusers' dotted path
DOTTED = {
    "attn_to_q": "attn.to_q", "attn_to_k": "attn.to_k", "attn_to_v": "attn.to_v",
    "attn_add_q_proj": "attn.add_q_proj", "attn_add_k_proj": "attn.add_k_proj", "attn_add_v_proj": "attn.add_v_proj",
    "attn_to_out_0": "attn.to_out.0", "attn_to_add_out": "attn.to_add_out",
    "ff_net_0_proj": "ff.net.0.proj", "ff_net_2": "ff.net.2",
    "ff_context_net_0_proj": "ff_context.net.0.proj", "ff_context_net_2": "ff_context.net.2",
    "norm1_linear": "norm1.linear", "norm1_context_linear": "norm1_context.linear",
    "proj_mlp": "proj_mlp", "proj_out": "proj_out", "norm_linear": "norm.linear",
}
PEFT_PREFIXES = {"transformer.": "lora_unet_", "text_encoder.": "lora_te1_"}


def peft_path(name: str) -> str:
    """A module's PEFT path for diffusers' FLUX loader (``transformer.`` + the diffusers path, CLIP's
    ``text_encoder.``); diffusers' FluxPipeline loads no T5 LoRA, so a T5 module is refused by name."""
    m = _OURS.match(name)
    if m and m.group(3) in (DOUBLE if m.group(1) == "transformer_blocks" else SINGLE):
        return f"transformer.{m.group(1)}.{m.group(2)}.{DOTTED[m.group(3)]}"
    if name in _EMB_DOTTED:  # network.in_dims
        return f"transformer.{_EMB_DOTTED[name]}"
    clip = clip_path(name, {"lora_te1": "text_encoder"})
    if clip:
        return clip
    raise ValueError(f"{name}: no module diffusers' FluxPipeline loads a LoRA into (transformer, CLIP text_encoder); "
                     "output.format: diffusers needs the T5 text encoder left untrained")
