"""PEFT's LoRA names (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``), what diffusers'
``load_lora_weights`` reads, ↔ lorabuild's trained names (``lora_unet_…``, ``lora_te1_…``), shared
by the transformer families whose ``output.format: diffusers`` writes them (SD 3.5, FLUX.1); each
family gives the module paths (its ``peft_path``). PEFT files carry no alpha: diffusers scales by
1, so each module's alpha/rank is folded into its ``lora_B``. Torch only."""
from __future__ import annotations

import re

_CLIP = re.compile(r"^(lora_te[12])_text_model_encoder_layers_(\d+)_(self_attn|mlp)_(\w+)$")
PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def by_module(tensors: dict) -> dict[str, dict]:
    """{module name: {suffix: tensor}} of a LoRA file's tensors (``name.lora_down.weight`` …)."""
    out: dict[str, dict] = {}
    for k, v in tensors.items():
        name, _, suffix = k.partition(".")
        out.setdefault(name, {})[suffix] = v
    return out


def clip_path(name: str, which: dict[str, str]) -> str | None:
    """A CLIP LoRA module's PEFT path (``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``),
    ``which``: {kohya prefix: the pipeline's text encoder}; None for a name that is not one."""
    m = _CLIP.match(name)
    if m is None or m.group(1) not in which:
        return None
    return f"{which[m.group(1)]}.text_model.encoder.layers.{m.group(2)}.{m.group(3)}.{m.group(4)}"


def is_peft(tensors) -> bool:
    """Whether a LoRA file's keys are PEFT's (an ``output.format: diffusers`` file)."""
    return any(k.endswith(PEFT_SUFFIXES) for k in tensors)


def to_peft(tensors: dict, path_of) -> dict:
    """Saved-layout tensors → PEFT's names (``path_of``: module name → its PEFT path), each module's
    alpha/rank folded into its ``lora_B``."""
    out = {}
    for name, t in by_module(tensors).items():
        path = path_of(name)
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        scale = float(t["alpha"]) / down.shape[0]
        out[f"{path}.lora_A.weight"] = down
        out[f"{path}.lora_B.weight"] = (up.float() * scale).to(up.dtype)
    return out


def from_peft(tensors: dict, prefixes: dict[str, str], title: str) -> dict:
    """The inverse of :func:`to_peft` (alpha = rank: the scale is in lora_B already); ``prefixes``:
    {PEFT head (``transformer.``): kohya prefix (``lora_unet_``)}; ``title``: the family, for errors."""
    import torch

    out = {}
    for key, v in tensors.items():
        path, _, kind = key.rpartition(".lora_")
        head = next((h for h in prefixes if path.startswith(h)), None)
        if head is None or kind not in ("A.weight", "B.weight"):
            raise ValueError(f"{key}: not a PEFT LoRA key of {title} ({', '.join(h + '…' for h in prefixes)})")
        name = prefixes[head] + path[len(head):].replace(".", "_")
        out[f"{name}.{'lora_down' if kind == 'A.weight' else 'lora_up'}.weight"] = v
        if kind == "A.weight":
            out[f"{name}.alpha"] = torch.tensor(float(v.shape[0]))
    return out
