"""Which parts of a flow model's network train: kohya's block selection for FLUX.1 and SD 3.5, its
input-embedder dims (``in_dims``, ``emb_dims``) and its T5 option; numbers and names only, no torch
(``validate`` reads it).

Facts from sd-scripts ``networks/lora_flux.py`` (``parse_block_selection``, ``train_blocks``,
``train_t5xxl``) and ``networks/lora_sd3.py`` (``train_block_indices``): a selection is ``all``,
``none`` (or empty), or a comma list of 0-based indices and inclusive ranges (``0-5,10``); an index
the model does not have is refused. ``train_blocks`` keeps one kind of FLUX block (``single`` or
``double``; ``all``). A block left out gets no LoRA module. With ``train_t5xxl`` the T5 encoder's
attention and gated MLP (kohya's ``T5Attention``, ``T5DenseGatedActDense``) train beside CLIP, as
``lora_te3_…``; kohya trains it only with the text encoders.

lorabuild's module names are diffusers' paths (``lora_unet_transformer_blocks_3_attn_to_q``), so a
module's block is the number after its blocks' prefix.
"""
from __future__ import annotations

import re

# family → its block kinds: (kind, lorabuild's module-name prefix, the transformer config's count, field)
BLOCKS = {
    "flux": (("double", "lora_unet_transformer_blocks_", "num_layers", "train_double_block_indices"),
             ("single", "lora_unet_single_transformer_blocks_", "num_single_layers", "train_single_block_indices")),
    "sd3": (("joint", "lora_unet_transformer_blocks_", "num_layers", "train_block_indices"),),
}
# each selection field and train_blocks → the family it is for
FIELDS = {"train_double_block_indices": "flux", "train_single_block_indices": "flux", "train_blocks": "flux",
          "train_block_indices": "sd3"}
# kohya's LoRA on the input embedders (and SD 3.5's final layer): network field → (family, its entries in
# kohya's order, each (kohya's label, the diffusers module paths it trains)). Facts from sd-scripts
# networks/lora_flux.py (in_dims: img, time, vector, guidance, txt; the Linears under BFL's img_in,
# time_in, vector_in, guidance_in, txt_in) and networks/lora_sd3.py (emb_dims: context_embedder,
# t_embedder, x_embedder (its patch conv), y_embedder, final_layer_adaLN_modulation, final_layer_linear);
# the diffusers paths of those BFL / SAI modules are diffusers' converters' (lora_conversion_utils
# _convert_kohya_flux_lora_to_diffusers; convert_sd3_transformer_checkpoint_to_diffusers). 0: not trained.
EMBEDDERS = {
    "in_dims": ("flux", (
        ("img_in", ("x_embedder",)),
        ("time_in", ("time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2")),
        ("vector_in", ("time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2")),
        ("guidance_in", ("time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2")),
        ("txt_in", ("context_embedder",)))),
    "emb_dims": ("sd3", (
        ("context_embedder", ("context_embedder",)),
        ("t_embedder", ("time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2")),
        ("x_embedder", ("pos_embed.proj",)),
        ("y_embedder", ("time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2")),
        ("final_mod", ("norm_out.linear",)),
        ("final_linear", ("proj_out",)))),
}
T5_FAMILIES = ("flux", "sd3")
T5_TARGETS = ("T5Attention", "T5DenseGatedActDense")  # kohya TEXT_ENCODER_TARGET_REPLACE_MODULE's T5 part
_PART = re.compile(r"^(\d+)(?:-(\d+))?$")
TITLES = {"flux": "FLUX.1", "sd3": "SD 3.5"}


def parse(text: str, total: int | None, field: str) -> set[int]:
    """The block indices ``text`` selects out of ``total`` blocks (None: unknown, so no range check)."""
    text = str(text).strip()
    if text == "all":
        if total is None:
            return set()
        return set(range(total))
    if text in ("none", ""):
        return set()
    out: set[int] = set()
    for part in text.split(","):
        m = _PART.match(part.replace(" ", ""))
        if m is None:
            raise ValueError(f"network.{field}: {part.strip()!r} is not an index or a range (kohya's syntax: all, none, "
                             "or indices and ranges such as 0-5,10)")
        start, end = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if start > end:
            raise ValueError(f"network.{field}: the range {start}-{end} runs backwards")
        if total is not None and end >= total:
            raise ValueError(f"network.{field}: block {end} is out of range: this transformer has {total} such blocks "
                             f"(0-{total - 1})")
        out.update(range(start, end + 1))
    return out


def problems(net: dict, arch: str | None) -> list[tuple[str, str]]:
    """(field, message) for selection options that cannot apply: the wrong family (where it is known),
    syntax, T5 training without the text encoders. Ranges are checked with the model (:func:`block_filter`)."""
    out = [("type", type_problem(net, arch))] if type_problem(net, arch) else []
    out += lyco_problems(net, arch)
    for field, fam in FIELDS.items():
        if net.get(field) is None:
            continue
        if arch is not None and arch != fam:
            out.append((field, f"is for {TITLES[fam]}; this model is not"))
        elif field != "train_blocks":
            try:
                parse(net[field], None, field)
            except ValueError as exc:
                out.append((field, str(exc).split(": ", 1)[1]))
    if net.get("split_qkv") is False and (net.get("type") or "lora") in ("lora", "locon"):
        out += [("split_qkv", p) for p in split_qkv_problems(net, arch)]
    out += embedder_problems(net, arch)
    if net.get("train_t5xxl"):
        if arch is not None and arch not in T5_FAMILIES:
            out.append(("train_t5xxl", "is for FLUX.1 and SD 3.5 (the models with a T5 text encoder)"))
        elif not net.get("train_text_encoder"):
            out.append(("train_t5xxl", "needs network.train_text_encoder: true (kohya trains T5 only with the text "
                        "encoders)"))
    return out


def split_qkv_problems(net: dict, arch: str | None) -> list[str]:
    """Why ``network.split_qkv: false`` (one LoRA per fused layer, its down shared by the parts) cannot
    apply: a model without fused layers. Its dropouts are drawn once per fused layer, as kohya's
    (``lora/network.py`` ``FusedDraw``)."""
    if arch is not None and arch not in BLOCKS:
        return ["false is for FLUX.1 and SD 3.5 (the models whose files fuse q, k and v)"]
    return []


def embedder_problems(net: dict, arch: str | None) -> list[tuple[str, str]]:
    """(field, message) for ``in_dims`` / ``emb_dims`` that cannot apply: another family's, the wrong
    number of entries, an entry that is not a whole number ≥ 0."""
    out = []
    for field, (fam, entries) in EMBEDDERS.items():
        dims = net.get(field)
        if dims is None:
            continue
        labels = ", ".join(label for label, _ in entries)
        if arch is not None and arch != fam:
            out.append((field, f"is for {TITLES[fam]}; this model is not"))
        elif not isinstance(dims, (list, tuple)) or len(dims) != len(entries):
            out.append((field, f"takes {len(entries)} dims, one per entry in kohya's order ({labels}; 0: not trained)"))
        elif any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in dims):
            out.append((field, f"{list(dims)}: each entry is a rank, a whole number ≥ 0 ({labels})"))
    return out


def embedders(net: dict, arch: str, denoiser) -> list[tuple[str, object, int]]:
    """(module name, module, dim) for the input embedders ``in_dims`` / ``emb_dims`` train, in kohya's
    order (each after the blocks' modules, as kohya creates them); an entry whose module this
    transformer lacks (FLUX.1 schnell has no guidance embedder) is a ValueError naming the field."""
    out = []
    for field, (fam, entries) in EMBEDDERS.items():
        if fam != arch or not net.get(field):
            continue
        for i, ((label, paths), dim) in enumerate(zip(entries, net[field])):
            if not dim:
                continue
            for path in paths:
                try:
                    module = denoiser.get_submodule(path)
                except AttributeError:
                    raise ValueError(f"network.{field}: entry {i + 1} ({label}) is {dim}, but this transformer has no "
                                     f"{path} (set it to 0)") from None
                out.append(("lora_unet_" + path.replace(".", "_"), module, int(dim)))
    return out


def type_problem(net: dict, arch: str | None) -> str | None:
    """Why ``network.type`` cannot train this flow model, or None. The LyCORIS types train the files'
    layers as lycoris.kohya does on sd-scripts' BFL/SAI models: one module on each fused qkv / linear1
    (lora/lyco_fused.py), exact for every type whose delta LyCORIS computes from the layer's weight;
    ``full`` (LyCORIS' own trained copy of each weight and bias) is not built on fused layers."""
    if arch in BLOCKS and net.get("type") == "full":
        return (f"full is not available for {TITLES[arch]}: lorabuild trains LyCORIS on the files' fused layers "
                "(q, k, v as one qkv) through a module over the parts, and full's trained copy of the whole weight is "
                "not built that way; use loha, lokr, dora, ia3 or diag-oft")
    return None


def format_problem(net: dict, arch: str | None, fmt: str | None) -> str | None:
    """Why ``output.format`` cannot hold this network, or None: diffusers' FLUX.1 and SD 3.5 loaders read
    LoRA files only (its kohya-FLUX converter ``_convert_kohya_flux_lora_to_diffusers`` takes
    lora_down/lora_up; its LoKr converters are for FLUX.2's and Z-Image's layouts)."""
    kind = net.get("type") or "lora"
    if arch in BLOCKS and fmt == "diffusers" and kind not in ("lora", "locon"):
        return (f"diffusers is not available with network.type {kind}: diffusers loads LoRA files only for "
                f"{TITLES[arch]}; use kohya (ComfyUI and Forge load the {kind} file)")
    return None


def lyco_problems(net: dict, arch: str | None) -> list[tuple[str, str]]:
    """(field, message) for LyCORIS options a flow model cannot take: ``train_norm`` (lorabuild trains
    no norm layer of FLUX.1's or SD 3.5's; their blocks' norms are RMSNorm or have no weights) and the
    embedders' dims (``in_dims``, ``emb_dims``: kohya's LoRA networks' options, not lycoris.kohya's)."""
    kind = net.get("type") or "lora"
    if arch not in BLOCKS or kind in ("lora", "locon"):
        return []
    out = [("train_norm", f"is not available for {TITLES[arch]} (its blocks' norms are RMSNorm or have no "
            "weights; lorabuild trains no norm layer of this model)")] if net.get("train_norm") else []
    # kohya's in_dims / emb_dims are lora_flux's / lora_sd3's arguments; lycoris.kohya has none
    return out + [(field, f"is kohya's LoRA option (networks.lora_flux / lora_sd3); network.type {kind} trains the "
                   "blocks' layers only, as lycoris.kohya does")
                  for field in EMBEDDERS if net.get(field) and any(net[field])]


def block_filter(net: dict, arch: str, config: dict):
    """``keep(module name) -> bool`` for the denoiser's modules under the block selection, or None when
    every block trains; a selection the model does not fit is a ValueError naming the field."""
    wrong = problems(net, arch)
    if wrong:
        field, msg = wrong[0]
        raise ValueError(f"network.{field}: {msg}")
    chosen = {}
    for kind, prefix, count, field in BLOCKS.get(arch, ()):
        total = int(config.get(count) or 0)
        picked = parse(net.get(field) or "all", total, field)
        if net.get("train_blocks") not in (None, "all", kind):
            picked = set()
        if len(picked) < total:
            chosen[prefix] = picked
    if not chosen:
        return None

    def keep(name: str) -> bool:
        for prefix, picked in chosen.items():
            if name.startswith(prefix):
                return int(name[len(prefix):].split("_", 1)[0]) in picked
        return True  # not a block's module (a text encoder's)
    return keep


def te_targets(net: dict, targets) -> tuple[str, ...]:
    """The text encoders' target classes: T5's added with ``train_t5xxl``."""
    return (*targets, *T5_TARGETS) if net.get("train_t5xxl") else tuple(targets)
