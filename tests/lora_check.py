"""One check two tests share: a saved LoRA applied by lorabuild and by diffusers' load_lora_weights."""
from __future__ import annotations

from pathlib import Path

import torch

from lorabuild import models
from lorabuild.network import LoRANetwork


def unet_outputs(folder: Path, lora: Path, arch: str, width: int, dim: int = 8, alpha: float = 8):
    """(our UNet output with the LoRA, without it, diffusers' with the LoRA) on fixed random inputs."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10, 500])
    hidden = torch.randn(2, 77, width, generator=g)
    unet = models.load_unet(folder)
    net = LoRANetwork(unet, [], dim=dim, alpha=alpha, train_unet=True, train_text_encoder=False, arch=arch)
    net.load_weights(lora)
    net.apply()
    with torch.no_grad():
        ours = unet(x, t, encoder_hidden_states=hidden).sample
        net.set_multiplier(0.0)
        plain = unet(x, t, encoder_hidden_states=hidden).sample
    pipe = models.load_pipeline(folder)
    pipe.load_lora_weights(str(lora))
    with torch.no_grad():
        theirs = pipe.unet(x, t, encoder_hidden_states=hidden).sample
    return ours, plain, theirs
