"""One check two tests share: a saved LoRA applied by lorabuild and by diffusers' load_lora_weights."""
from __future__ import annotations

from pathlib import Path

import torch

from lorabuild import models
from lorabuild.lora.adapter import from_config
from lorabuild.lora.network import LoRANetwork


def unet_outputs(folder: Path, lora: Path, arch: str, width: int, dim: int = 8, alpha: float = 8, pooled: int = 0,
                 net_cfg: dict | None = None, diffusers: bool = True):
    """(our UNet output with the LoRA, without it, diffusers' with the LoRA) on fixed random inputs
    (``pooled``: SDXL's pooled text width; its size/crop ids are those of a 128² image; ``net_cfg``: a
    project's ``network`` section, for a LoRA whose modules or ranks are not uniform; ``diffusers``
    False: None for diffusers' output, which is not computed)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10, 500])
    hidden = torch.randn(2, 77, width, generator=g)
    added = None
    if pooled:
        added = {"text_embeds": torch.randn(2, pooled, generator=g),
                 "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * 2)}
    from safetensors import safe_open

    unet = models.load_unet(folder)
    with safe_open(str(lora), "pt") as fh:
        with_te = any(k.startswith("lora_te") for k in fh.keys())
    tes = [models.load_text_encoder(folder, which=p) for p in models.text_parts(folder)] if with_te else []
    if net_cfg is not None:
        net = from_config(net_cfg, unet, tes, arch, train_text_encoder=with_te)
    else:
        net = LoRANetwork(unet, tes, dim=dim, alpha=alpha, train_unet=True, train_text_encoder=with_te, arch=arch)
    net.load_weights(lora)
    net.eval()  # no dropout while measuring
    net.apply()
    with torch.no_grad():
        ours = unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
        net.set_multiplier(0.0)
        plain = unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
    if not diffusers:
        return ours, plain, None
    pipe = models.load_pipeline(folder)
    pipe.load_lora_weights(str(lora))
    with torch.no_grad():
        theirs = pipe.unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
    return ours, plain, theirs
