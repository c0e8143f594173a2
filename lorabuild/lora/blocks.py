"""Block-wise LoRA settings (kohya network_args ``block_dims``, ``block_alphas``,
``conv_block_dims``, ``conv_block_alphas``, ``down/mid/up_lr_weight``,
``block_lr_zero_threshold``): numbers in, numbers out; no torch.

Facts from sd-scripts ``networks/lora.py`` (commit 6a584ca): an SD 1.x/2.x UNet has 25
blocks (12 down, 1 mid, 12 up) and SDXL 23 (1 base, 9 input, 3 middle, 9 output, 1 out).
``get_block_index``: SD ``down_blocks_i_(resnets|attentions)_j`` → 1+3i+j, ``…_downsamplers``
→ 1+3i+2, ``mid_block`` → 12, ``up_blocks_i_…_j`` → 13+3i+j, ``…_upsamplers`` → 13+3i+2,
anything else -1 (so the last entry; no default target lives there); SDXL
``input_blocks_n`` → 1+n, ``middle_block_n`` → 10+n, ``output_blocks_n`` → 13+n, ``out_`` →
22, ``time_embed_``/``label_emb_`` → 0. The lr weights are ``down + mid + up`` (SDXL:
``[1] + down + mid + up + [1]``), indexed by block; SD's block 0 holds no module, so
``down_lr_weight[0]`` has no effect there (kohya's layout, kept). A weight ≤
``block_lr_zero_threshold`` becomes 0 and its block's modules are not created.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping

from ..cache import without_newer
from ..families import FAMILIES, family

# per architecture: (blocks, down/up lr-weight entries, mid lr-weight entries), each family's
LAYOUT = {name: f.block_layout for name, f in FAMILIES.items()}
BLOCK_FIELDS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
LR_FIELDS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
_PRESET = re.compile(r"^(cosine|sine|linear|reverse_linear|zeros)(?:\+(.+))?$")
_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")

# network fields added after keys were first made, with the value that leaves the network
# as it was: a project that does not use them keeps its training key (and its trained LoRA).
KEY_DEFAULTS = {"unet_target_modules": ["Transformer2DModel"], "text_encoder_target_modules": ["CLIPAttention", "CLIPMLP"],
                "exclude_patterns": [], "include_patterns": [], **{f: None for f in BLOCK_FIELDS + LR_FIELDS},
                "block_lr_zero_threshold": 0, "loraplus_unet_lr_ratio": None, "loraplus_text_encoder_lr_ratio": None,
                "rank_dropout": 0, "module_dropout": 0,
                # LyCORIS types (lora/lyco.py); lora and locon are the one kohya LoRA, so they key alike
                "type": "lora", "factor": -1, "decompose_both": False, "use_tucker": False, "use_scalar": False,
                "rank_dropout_scale": False, "dora_wd": False,
                "constraint": 0, "rescaled": False, "train_on_input": False, "train_norm": False,
                # FLUX.1 / SD 3.5 block selection and T5 training (lora/flow_select.py)
                "train_double_block_indices": None, "train_single_block_indices": None, "train_blocks": None,
                "train_block_indices": None, "train_t5xxl": False, "split_qkv": True, "in_dims": None, "emb_dims": None}


# network fields added after sample tasks were first recorded: the sample task's record holds
# them only when set, so an existing build is not re-run (it would compute nothing) for them
SAMPLE_NEWER = {k: KEY_DEFAULTS[k] for k in ("constraint", "rescaled", "train_on_input", "train_norm",
                                              "train_double_block_indices", "train_single_block_indices",
                                              "train_blocks", "train_block_indices", "train_t5xxl", "split_qkv",
                                              "in_dims", "emb_dims")}


def keyed(net: Mapping) -> dict:
    """The ``network`` section as the training key holds it: new fields only when they are set."""
    return without_newer({**net, "type": "lora"} if net.get("type") == "locon" else net, KEY_DEFAULTS)


def block_index(name: str, arch: str) -> int:
    """kohya's ``get_block_index`` for a ``lora_unet_…`` module name (-1: no block)."""
    if not family(arch).sgm_names:
        m = _UPDOWN.search(name)
        if m:
            updown, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
            idx = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
            return 1 + idx if updown == "down" else 13 + idx
        return 12 if "mid_block_" in name else -1
    if not name.startswith("lora_unet_"):
        return -1
    rest = name[len("lora_unet_"):]
    if rest.startswith(("time_embed_", "label_emb_")):
        return 0
    for prefix, base in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if rest.startswith(prefix):
            return base + int(rest.split("_")[2])
    return 22 if rest.startswith("out_") else -1


def preset(spec: str, n: int) -> list[float]:
    """kohya's lr-weight presets over ``n`` blocks, optionally ``+<base>`` (``sine+.5``)."""
    m = _PRESET.match(spec)
    if not m:
        raise ValueError(f"unknown preset {spec!r} (known: {', '.join(PRESETS)}, optionally +<number>)")
    name, base = m.group(1), float(m.group(2)) if m.group(2) else 0.0
    ramp = [i / (n - 1) for i in range(n)]
    values = {"cosine": [math.sin(math.pi * r / 2) for r in reversed(ramp)],
              "sine": [math.sin(math.pi * r / 2) for r in ramp],
              "linear": ramp, "reverse_linear": list(reversed(ramp)), "zeros": [0.0] * n}[name]
    return [v + base for v in values]


def length_problems(net: Mapping, arch: str | None) -> list[tuple[str, str]]:
    """(field, message) for every block list whose length does not fit ``arch`` (``None``:
    either architecture, but all lists the same one)."""
    one_per_layout: dict = {}
    for name, f in FAMILIES.items():
        one_per_layout.setdefault(f.block_layout, name)
    archs = [arch] if arch else list(one_per_layout.values())  # sd1, sdxl
    wanted = {}
    for f in BLOCK_FIELDS:
        wanted[f] = {a: LAYOUT[a][0] for a in archs}
    for f in ("down_lr_weight", "up_lr_weight"):
        wanted[f] = {a: LAYOUT[a][1] for a in archs}
    wanted["mid_lr_weight"] = {a: LAYOUT[a][2] for a in archs}
    out, fits = [], {}
    for f, by_arch in wanted.items():
        v = net.get(f)
        if v is None or isinstance(v, str):
            continue
        ok = {a for a, n in by_arch.items() if len(v) == n}
        if not ok:
            need = " or ".join(f"{n} for {family(a).unet_title}" for a, n in by_arch.items())
            out.append((f, f"has {len(v)} entries; it needs {need}"))
        fits[f] = ok
    if not out and fits and not set.intersection(*fits.values()):
        out.append((next(iter(fits)), "the block lists do not all fit the same architecture: "
                    + ", ".join(f"{f} has {len(net[f])} entries" for f in fits)))
    return out


def lr_weights(net: Mapping, arch: str) -> list[float] | None:
    """One learning-rate weight per block, or ``None`` when no lr weight is set."""
    if all(net.get(f) is None for f in LR_FIELDS):
        return None
    n, n_side, n_mid = LAYOUT[arch]
    zero = net.get("block_lr_zero_threshold") or 0.0

    def side(f: str, n: int) -> list[float]:
        v = net.get(f)
        v = [1.0] * n if v is None else preset(v, n) if isinstance(v, str) else [float(x) for x in v]
        return [w if w > zero else 0.0 for w in v] if net.get(f) is not None else v

    w = side("down_lr_weight", n_side) + side("mid_lr_weight", n_mid) + side("up_lr_weight", n_side)
    ends = [1.0] * ((n - len(w)) // 2)  # SDXL's base and out blocks, outside down/mid/up
    return ends + w + ends


def block_settings(net: Mapping, arch: str) -> dict | None:
    """Per-block ``dims``, ``alphas``, ``conv_dims``, ``conv_alphas`` (the last two ``None``
    without LoCon) and ``lr_weights`` (``None`` without), or ``None`` when no block option is
    set. Unset lists take the network's dim/alpha/conv_dim/conv_alpha; a block whose lr
    weight is 0 gets dim 0 (no modules), as in kohya's ``remove_block_dims_and_alphas``."""
    if all(net.get(f) is None for f in BLOCK_FIELDS + LR_FIELDS):
        return None
    problems = length_problems(net, arch)
    if problems:
        f, msg = problems[0]
        raise ValueError(f"network.{f}: {msg}")
    n = LAYOUT[arch][0]
    dims = list(net.get("block_dims") or [net["dim"]] * n)
    alphas = [float(a) for a in (net.get("block_alphas") or [net["alpha"]] * n)]
    conv_dims = net.get("conv_block_dims") or ([net["conv_dim"]] * n if net.get("conv_dim") else None)
    conv_alphas = None
    if conv_dims is not None:
        conv_dims = list(conv_dims)
        given = net.get("conv_block_alphas")
        # lorabuild's conv_alpha default is the conv dim (scale 1), per block here
        conv_alphas = ([float(a) for a in given] if given is not None else
                       [float(net["conv_alpha"]) if net.get("conv_alpha") is not None else float(d) for d in conv_dims])
    weights = lr_weights(net, arch)
    if weights is not None:
        for i, w in enumerate(weights):
            if w == 0:
                dims[i] = 0
                if conv_dims is not None:
                    conv_dims[i] = 0
    return {"dims": dims, "alphas": alphas, "conv_dims": conv_dims, "conv_alphas": conv_alphas, "lr_weights": weights}
