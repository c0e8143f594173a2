"""Resident bytes of the frozen UNet (and text encoders) per train.base_precision, for the real
SD 1.5 / SD 2 / SDXL architectures (configs shipped with the package), built on the meta device:
no weights, no memory, exact sizes. Prints a table."""
from __future__ import annotations

import json

import torch
from diffusers import UNet2DConditionModel
from diffusers.utils import logging

from lorabuild import precision
from lorabuild.models import CONFIGS_DIR


def unet_bytes(arch: str, base: str, compute=torch.bfloat16) -> int:
    cfg = json.loads((CONFIGS_DIR / arch / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg).to(precision.load_dtype(base, compute))
    precision.store(unet, base, precision.load_dtype(base, compute))
    return precision.stored_bytes(unet)


if __name__ == "__main__":
    logging.set_verbosity_error()  # diffusers' note on casting with to(): these models hold no weights
    print("| UNet | bf16 (auto with mixed_precision bf16) | fp32 | fp8 |")
    print("|---|---|---|---|")
    for arch in ("sd1", "sd2", "sdxl"):
        sizes = [unet_bytes(arch, b) / 1e9 for b in ("auto", "fp32", "fp8")]
        print(f"| {arch} | " + " | ".join(f"{s:.2f} GB" for s in sizes) + " |")
