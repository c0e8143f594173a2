"""The demo LoRA learns, and diffusers loads it to the same UNet output as lorabuild's own."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lora_check import unet_outputs
from lorabuild import models
from lorabuild.lora.network import LoRANetwork


def _cached_batch(ws):
    """Every demo image's cached latent and text embedding, from the build's manifests."""
    cache = ws.root / "cache"
    lat_items = json.loads((cache / "manifests" / "demo" / "latents.json").read_text())["items"]
    emb_items = {e["id"]: e["hash"] for e in json.loads((cache / "manifests" / "demo" / "textemb.json").read_text())["items"]}
    by_bucket: dict[tuple, list] = {}
    captions = _captions(ws)
    for e in lat_items:
        h = e["hash"]
        lat = load_file(str(cache / "objects" / "latents" / h[:2] / f"{h[2:]}.safetensors"))["latent"]
        eh = emb_items[captions[e["id"]]]
        emb = load_file(str(cache / "objects" / "textemb" / eh[:2] / f"{eh[2:]}.safetensors"))["hidden"]
        by_bucket.setdefault(tuple(e["bucket"]), []).append((lat, emb))
    return by_bucket


def _captions(ws):
    from lorabuild.captions import dataset_captions
    from lorabuild.config import load_project
    from lorabuild.dataset import from_project

    p = load_project(ws.root / "projects" / "demo.yaml")
    ds = from_project(p)
    return dataset_captions(ds.images, p.section("captions"))


def _denoising_loss(unet, sched, by_bucket, seed=0) -> float:
    """Mean ε-prediction MSE over all images at fixed noise and timesteps."""
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    with torch.no_grad():
        for pairs in by_bucket.values():
            lat = torch.stack([p[0] for p in pairs])
            emb = torch.stack([p[1] for p in pairs])
            for _ in range(4):
                noise = torch.randn(lat.shape, generator=g)
                t = torch.randint(0, 1000, (lat.shape[0],), generator=g)
                pred = unet(sched.add_noise(lat, noise, t), t, encoder_hidden_states=emb).sample
                total += torch.nn.functional.mse_loss(pred, noise, reduction="sum").item()
                n += noise.numel()
    return total / n


def test_training_lowers_the_denoising_loss(built_demo):
    folder = built_demo.root / "cache" / "models" / "tiny-sd1"
    unet = models.load_unet(folder)
    sched = models.load_noise_scheduler(folder)
    batch = _cached_batch(built_demo)
    base = _denoising_loss(unet, sched, batch)
    net = LoRANetwork(unet, [], dim=8, alpha=8, train_unet=True, train_text_encoder=False, arch="sd1")
    net.load_weights(built_demo.root / "output" / "demo" / "demo.safetensors")
    net.apply()
    trained = _denoising_loss(unet, sched, batch)
    net.restore()
    # The demo's settings are chosen so the tiny model learns: at least 10% lower loss.
    assert trained < 0.9 * base, (base, trained)
    assert _denoising_loss(unet, sched, batch) == pytest.approx(base)


def test_diffusers_load_lora_weights_gives_our_unet_output(built_demo):
    folder = built_demo.root / "cache" / "models" / "tiny-sd1"
    lora = built_demo.root / "output" / "demo" / "demo.safetensors"
    ours, plain, theirs = unet_outputs(folder, lora, "sd1", 32)
    # The LoRA changes the output, and diffusers applies it as we do (fp16 file: fp16 tolerance).
    assert (ours - plain).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, atol=2e-3, rtol=2e-3)
