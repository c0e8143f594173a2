"""sample: every saved epoch's LoRA × every prompt → an image; a grid and an index.html of them all.

Item = one image; key = the sha256 of the LoRA's weights (none for the base-model row) + the
prompt's full settings (sampler included) + the base model's identity. Adding a prompt
renders one image per epoch; a new epoch renders one image per prompt; a retrained
LoRA renders its row again. Everything else is reused.
"""
from __future__ import annotations

import re

from ..cache import atomic_path
from .base import Context, Item, StageRun
from . import runtime

STAGE = "sample"
VERSION = 2

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


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:n].lower() or "prompt"


def _render(ctx: Context, missing: list[Item], store) -> None:
    """Render the missing images, loading the pipeline once and each LoRA file once."""
    import diffusers
    import torch

    from .. import models
    from ..network import LoRANetwork

    p = ctx.project
    pipe = models.load_pipeline(runtime.model_dir(ctx), device=runtime.device(ctx))
    pipe.set_progress_bar_config(disable=True)
    base_config = pipe.scheduler.config
    by_lora: dict = {}
    for it in missing:
        by_lora.setdefault(it.data["lora"], []).append(it)
    for lora, items in by_lora.items():
        network = None
        if lora is not None:
            network = LoRANetwork(
                pipe.unet, [pipe.text_encoder], dim=p.get("network.dim"), alpha=p.get("network.alpha"),
                train_unet=p.get("network.train_unet"), train_text_encoder=p.get("network.train_text_encoder"),
                arch=models.model_info(runtime.model_dir(ctx))["arch"],
            )
            network.load_weights(lora)
            network.to(pipe.device)
            network.apply()
        for it in items:
            s = it.data["settings"]
            cls_name, extra = SAMPLERS[s["sampler"]]
            pipe.scheduler = getattr(diffusers, cls_name).from_config(base_config, **extra)
            if network is not None:
                network.set_multiplier(s["lora_weight"])
            # A CPU generator makes the starting noise the same on every device (as A1111 does).
            image = pipe(
                s["prompt"], negative_prompt=s["negative"] or None, width=s["width"], height=s["height"],
                num_inference_steps=s["steps"], guidance_scale=s["cfg"],
                generator=torch.Generator("cpu").manual_seed(s["seed"]),
            ).images[0]
            with store.put(it.hash, it.key, {"prompt": s["prompt"]}) as tmp:
                image.save(tmp, format="PNG")
        if network is not None:
            network.restore()


def lora_rows(ctx: Context) -> list[tuple[str, str, object]]:
    """(row id, label, LoRA path or None for the base model) for every saved epoch, final last."""
    name = ctx.project.output_name
    out = ctx.ws.output_dir(name)
    epochs = ctx.read_manifest("train")["items"][0]["epochs"]
    final = epochs[-1][0]
    rows = [("base", "base model", None)] if ctx.project.get("sample.baseline") else []
    for e, _ in epochs:
        path = out / (f"{name}.safetensors" if e == final else f"{name}-{e:06d}.safetensors")
        rows.append((f"e{e:06d}", f"epoch {e}", path))
    return rows


def run(ctx: Context) -> dict:
    from .. import gallery, prompts

    sr = StageRun(ctx, STAGE)
    name = ctx.project.output_name
    settings = prompts.resolve(ctx.project.section("sample"), ctx.project.root, sr.notes)
    rows = lora_rows(ctx)
    hashes = ctx.hashes()
    # Keyed on the weights, not the file: a re-saved epoch with new metadata but equal
    # weights (an extended run) keeps its images.
    lora_hash = {str(path): hashes.sha256(path, tensors_only=True) for _, _, path in rows if path is not None}
    hashes.save()
    base = {c: runtime.identity(ctx, c) for c in ("unet", "vae", "text_encoder")}
    grid_items: list[list[Item]] = []
    for row_id, _, path in rows:
        row = []
        for i, s in enumerate(settings):
            key = {"stage": STAGE, "v": VERSION, "lora": lora_hash.get(str(path)), "settings": s, "base": base}
            row.append(Item(f"{row_id}-{i:02d}-{slug(s['prompt'])}", key, {"settings": s, "lora": path}))
        grid_items.append(row)
    items = [it for row in grid_items for it in row]
    store = ctx.store(STAGE, ".png")
    missing = sr.split(items, store)
    if missing:
        _render(ctx, missing, store)
        sr.computed += len(missing)
    out_dir = ctx.ws.output_dir(name) / "samples"
    keep = {f"{it.id}.png" for it in items} | {"grid.png"}
    for old in out_dir.glob("*.png"):
        if old.name not in keep:
            old.unlink()
    for it in items:
        with atomic_path(out_dir / f"{it.id}.png") as tmp:
            tmp.write_bytes(store.path(it.hash).read_bytes())
    if items:
        size = gallery.grid([[store.path(it.hash) for it in row] for row in grid_items], [r[1] for r in rows],
                            [s["prompt"] for s in settings], out_dir / "grid.png")
        gallery.index_html([(label, [(f"{it.id}.png", it.data["settings"]) for it in row])
                            for (_, label, _), row in zip(rows, grid_items)], out_dir / "index.html", f"{name} samples")
        sr.notes.append(f"grid {size[0]}x{size[1]}: {len(rows)} rows × {len(settings)} prompts")
    return sr.finish([{"id": it.id, "hash": it.hash, "prompt": it.data["settings"]["prompt"]} for it in items])
