"""latents: each image, resized and cropped to its bucket, → VAE latents (plus its mirror image).

Item = one image; key = working image hash + its fit (resize size, crop, bucket) +
flip + interpolation + the VAE's identity. Encoded in batches of one bucket size.
Latents are stored already multiplied by the VAE's ``scaling_factor`` (read from
its config: 0.18215 for SD1/2, 0.13025 for SDXL).
"""
from __future__ import annotations

from .base import Context, Item, StageRun
from . import runtime

STAGE = "latents"
VERSION = 1
PARAMS = ("latents.flip", "latents.interpolation", "latents.batch_size")
KEY_PARAMS = ("flip", "interpolation")  # batch_size does not change the result


def plan(bucket_entries: list[dict], params: dict, vae_id: str) -> list[Item]:
    items = []
    for e in bucket_entries:
        key = {
            "stage": STAGE,
            "v": VERSION,
            "src": e["src"],
            "bucket": e["bucket"],
            "resized": e["resized"],
            "crop": e["crop"],
            "params": {k: params[k] for k in KEY_PARAMS},
            "dtype": "fp32",
            "vae": vae_id,
        }
        items.append(Item(e["id"], key, e))
    return items


def _pixels(item: Item, resize_store, interpolation: str):
    """The bucket-sized RGB image of one item (resize, centre crop) from the resize entry."""
    from PIL import Image

    from ..images import RESAMPLE

    with Image.open(resize_store.path(item.data["src"])) as im:
        im = im.convert("RGB")
        im = im.resize(tuple(item.data["resized"]), RESAMPLE[interpolation])
        return im.crop(tuple(item.data["crop"]))


def _encode_group(ctx: Context, group: list[Item], params: dict, stores) -> None:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    resize_store, store = stores
    vae = runtime.frozen(ctx, "vae")
    scale = vae.config.scaling_factor
    arrays = [np.asarray(_pixels(it, resize_store, params["interpolation"]), dtype=np.float32) for it in group]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).div_(127.5).sub_(1.0)
    x = x.to(vae.device, vae.dtype)
    with torch.inference_mode():
        lat = vae.encode(x).latent_dist.mean * scale
        lat_flip = vae.encode(torch.flip(x, dims=[3])).latent_dist.mean * scale if params["flip"] else None
    for i, it in enumerate(group):
        tensors = {"latent": lat[i].float().cpu().contiguous()}
        if lat_flip is not None:
            tensors["latent_flip"] = lat_flip[i].float().cpu().contiguous()
        with store.put(it.hash, it.key, {"shape": list(tensors["latent"].shape)}) as tmp:
            save_file(tensors, str(tmp))


def run(ctx: Context, params: dict) -> dict:
    from tqdm import tqdm

    sr = StageRun(ctx, STAGE)
    store = ctx.store(STAGE, ".safetensors")
    resize_store = ctx.store("resize", ".png")
    items = plan(ctx.read_manifest("bucket")["items"], params, runtime.identity(ctx, "vae"))
    missing = sr.split(items, store)
    groups: dict[tuple, list[Item]] = {}
    for it in missing:
        groups.setdefault(tuple(it.data["bucket"]), []).append(it)
    bs = params["batch_size"]
    with tqdm(total=len(missing), desc=f"latents:{ctx.name}", unit="img", disable=not missing) as bar:
        for bucket in sorted(groups):
            group = groups[bucket]
            for i in range(0, len(group), bs):
                _encode_group(ctx, group[i : i + bs], params, (resize_store, store))
                sr.computed += len(group[i : i + bs])
                bar.update(len(group[i : i + bs]))
    entries = [{"id": it.id, "hash": it.hash, "bucket": it.data["bucket"]} for it in items]
    return sr.finish(entries, flip=params["flip"])
