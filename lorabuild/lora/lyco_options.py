"""The LyCORIS types' options and their checks, without torch: ``validate``, ``doit list`` and
import-kohya read them, and none of those may import torch (lorabuild/lora/lyco.py builds the networks)."""
from __future__ import annotations

LOW_RANK = ("loha", "lokr", "dora")
# ia3: a trained scale per channel; full: the whole weight (its difference saved); diag-oft: a block-diagonal rotation
LYCO_TYPES = (*LOW_RANK, "ia3", "full", "diag-oft")
# network fields -> LyCORIS module keyword (kohya network_args name in the schema), or None for a network-level
# option; which types take them
OPTIONS = {"use_tucker": ("use_tucker", LOW_RANK), "use_scalar": ("use_scalar", LOW_RANK),
           "rank_dropout_scale": ("rank_dropout_scale", (*LOW_RANK, "full")),
           "dora_wd": ("weight_decompose", ("loha", "lokr")),
           "factor": ("factor", ("lokr",)), "decompose_both": ("decompose_both", ("lokr",)),
           "constraint": ("constraint", ("diag-oft",)), "rescaled": ("rescaled", ("diag-oft",)),
           "train_on_input": ("train_on_input", ("ia3",)), "train_norm": (None, LYCO_TYPES)}
OPTION_DEFAULTS = {"use_tucker": False, "use_scalar": False, "rank_dropout_scale": False, "dora_wd": False,
                   "factor": -1, "decompose_both": False, "constraint": 0.0, "rescaled": False,
                   "train_on_input": False, "train_norm": False}
# lorabuild options LyCORIS' modules do not implement (so a set one would silently do nothing)
NOT_FOR_LYCO = ("dropout", "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


# network.split_qkv false with train.scale_weight_norms: validate says it, and the network refuses it too
SPLIT_QKV_MAX_NORM = ("is not available with network.split_qkv: false (kohya scales the fused layer's one LoRA; "
                      "lorabuild's max-norm is per module)")

def option_problems(net: dict, train: dict | None = None) -> list[tuple[str, str, str]]:
    """(section, field, message) for options (``network``, ``train``) that do not fit ``network.type``:
    validate names them."""
    train = train or {}
    kind = net.get("type") or "lora"
    out = []
    if kind == "locon" and not (net.get("conv_dim") or net.get("conv_block_dims")):
        out.append(("network", "type", "locon needs network.conv_dim (LoCon is LoRA on the 3×3 convolutions too)"))
    for key, (_, types) in OPTIONS.items():
        if net.get(key, OPTION_DEFAULTS[key]) != OPTION_DEFAULTS[key] and kind not in types:
            out.append(("network", key, f"is set but network.type is {kind} ({key} is for {', '.join(types)})"))
    if kind in LYCO_TYPES:
        for key in NOT_FOR_LYCO:
            if net.get(key):
                out.append(("network", key, f"is not available for network.type {kind} (LyCORIS' {kind} has no such option)"))
        if kind == "ia3" and net.get("rank_dropout"):  # LyCORIS' IA3 takes it and never uses it
            out.append(("network", "rank_dropout", "is not available for network.type ia3 (a scale per channel has no "
                        "rank; module_dropout is)"))
        if train.get("scale_weight_norms"):
            out.append(("train", "scale_weight_norms", f"is not available for network.type {kind} (kohya's max-norm "
                        "is LoRA's)"))
        if train.get("base_precision") == "fp8":  # LyCORIS adds ΔW to the weight as stored: no float8 arithmetic
            out.append(("train", "base_precision", f"fp8 is not available for network.type {kind} (use fp16 or "
                        "bf16)"))
    if net.get("split_qkv") is False and train.get("scale_weight_norms"):  # network.max_norm_ refuses it too
        out.append(("train", "scale_weight_norms", SPLIT_QKV_MAX_NORM))
    return out


def algo_args(net: dict) -> dict[str, str]:
    """kohya GUIs' ``ss_network_args`` for ``lycoris.kohya``: ``algo`` and the LyCORIS options set."""
    kind = net["type"]
    out = {"algo": {"dora": "locon" if net.get("conv_dim") else "lora"}.get(kind, kind)}
    if kind == "dora":
        out["dora_wd"] = "True"
    for key, (_, types) in OPTIONS.items():
        value = net.get(key, OPTION_DEFAULTS[key])
        if kind in types and value != OPTION_DEFAULTS[key]:
            out[key] = str(value)
    return out
