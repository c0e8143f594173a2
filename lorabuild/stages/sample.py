"""sample: the trained LoRA + each prompt → an image, and a grid of them all.

Item = one image; key = the LoRA file's sha256 + the prompt's full settings + the
base model's identity. Editing one prompt renders one image; a retrained LoRA
renders all of them again.
"""
from __future__ import annotations

import re

from ..cache import atomic_path
from .base import Context, Item, StageRun
from . import runtime

STAGE = "sample"
VERSION = 1
SETTINGS = ("negative", "width", "height", "steps", "cfg", "seed", "sampler", "lora_weight")

# Sampler names users know (A1111/kohya) → diffusers scheduler class and options.
SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}


def prompt_settings(sample_cfg: dict) -> list[dict]:
    """Each prompt with the project-wide defaults filled in."""
    out = []
    for p in sample_cfg["prompts"]:
        p = {"prompt": p} if isinstance(p, str) else dict(p)
        out.append({"prompt": p["prompt"], **{k: p.get(k, sample_cfg[k]) for k in SETTINGS}})
    return out


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:n].lower() or "prompt"


def _render(ctx: Context, missing: list[Item], lora_path, store) -> None:
    import diffusers
    import torch

    from .. import models
    from ..network import LoRANetwork

    p = ctx.project
    pipe = models.load_pipeline(runtime.model_dir(ctx), device=runtime.device(ctx))
    pipe.set_progress_bar_config(disable=True)
    network = LoRANetwork(
        pipe.unet, [pipe.text_encoder], dim=p.get("network.dim"), alpha=p.get("network.alpha"),
        train_unet=p.get("network.train_unet"), train_text_encoder=p.get("network.train_text_encoder"),
        arch=models.model_info(runtime.model_dir(ctx))["arch"],
    )
    network.load_weights(lora_path)
    network.to(pipe.device)
    network.apply()
    base_config = pipe.scheduler.config
    for it in missing:
        s = it.data
        cls_name, extra = SAMPLERS[s["sampler"]]
        pipe.scheduler = getattr(diffusers, cls_name).from_config(base_config, **extra)
        network.set_multiplier(s["lora_weight"])
        # A CPU generator makes the starting noise the same on every device (as A1111 does).
        image = pipe(
            s["prompt"], negative_prompt=s["negative"] or None, width=s["width"], height=s["height"],
            num_inference_steps=s["steps"], guidance_scale=s["cfg"],
            generator=torch.Generator("cpu").manual_seed(s["seed"]),
        ).images[0]
        with store.put(it.hash, it.key, {"prompt": s["prompt"]}) as tmp:
            image.save(tmp, format="PNG")
    network.restore()


def _grid(paths: list, labels: list[str], out) -> None:
    from PIL import Image, ImageDraw

    tiles = [Image.open(pth).convert("RGB") for pth in paths]
    cw, ch = max(t.width for t in tiles), max(t.height for t in tiles)
    label_h = 14
    grid = Image.new("RGB", (cw * len(tiles), ch + label_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        grid.paste(tile, (i * cw, label_h))
        draw.text((i * cw + 2, 1), label[: max(4, cw // 6)], fill="black")
    with atomic_path(out) as tmp:
        grid.save(tmp, format="PNG")


def run(ctx: Context) -> dict:
    sr = StageRun(ctx, STAGE)
    name = ctx.project.output_name
    lora = ctx.ws.output_dir(name) / f"{name}.safetensors"
    hashes = ctx.hashes()
    lora_hash = hashes.sha256(lora)
    hashes.save()
    base = {c: runtime.identity(ctx, c) for c in ("unet", "vae", "text_encoder")}
    items = []
    for i, s in enumerate(prompt_settings(ctx.project.section("sample"))):
        key = {"stage": STAGE, "v": VERSION, "lora": lora_hash, "settings": s, "base": base}
        items.append(Item(f"{i:02d}-{slug(s['prompt'])}", key, s))
    store = ctx.store(STAGE, ".png")
    missing = sr.split(items, store)
    if missing:
        _render(ctx, missing, lora, store)
        sr.computed += len(missing)
    out_dir = ctx.ws.output_dir(name) / "samples"
    for old in out_dir.glob("*.png"):
        if old.stem not in {it.id for it in items} and old.name != "grid.png":
            old.unlink()
    for it in items:
        with atomic_path(out_dir / f"{it.id}.png") as tmp:
            tmp.write_bytes(store.path(it.hash).read_bytes())
    if items:
        _grid([store.path(it.hash) for it in items], [it.data["prompt"] for it in items], out_dir / "grid.png")
    return sr.finish([{"id": it.id, "hash": it.hash, "prompt": it.data["prompt"]} for it in items])
