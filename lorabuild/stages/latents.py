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
PARAMS = ("latents.flip", "latents.interpolation", "latents.batch_size", "latents.random_crop")
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
            "params": {k: params[k] for k in KEY_PARAMS} | ({"random_crop": True} if params["random_crop"] else {}),
            "dtype": "fp32",
            "vae": vae_id,
        }
        items.append(Item(e["id"], key, e))
    return items


def bucket_pixels(path, resized, crop, interpolation: str):
    """The bucket-sized RGB image of a working copy: resize to ``resized``, then crop to ``crop``."""
    from PIL import Image

    from ..cache import checked_read
    from ..images import RESAMPLE

    def read(p):
        with Image.open(p) as im:
            return im.convert("RGB")

    im = checked_read("resize", path, read)
    return im.resize(tuple(resized), RESAMPLE[interpolation]).crop(tuple(crop))


def to_tensor(images):
    """PIL images → a ``[B, 3, H, W]`` float tensor in [-1, 1], as the VAE expects."""
    import numpy as np
    import torch

    arrays = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).div_(127.5).sub_(1.0)


def encode(vae, x):
    """Latents already multiplied by the VAE's scaling factor (the distribution's mean)."""
    return vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor


def _encode_group(ctx: Context, group: list[Item], params: dict, stores) -> None:
    import torch
    from safetensors.torch import save_file

    resize_store, store = stores
    vae = runtime.frozen(ctx, "vae")
    x = to_tensor([bucket_pixels(resize_store.path(it.data["src"]), it.data["resized"], it.data["crop"],
                                 params["interpolation"]) for it in group])
    with torch.inference_mode():
        lat = encode(vae, x)
        lat_flip = encode(vae, torch.flip(x, dims=[3])) if params["flip"] else None
    for i, it in enumerate(group):
        tensors = {"latent": lat[i].float().cpu().contiguous()}
        if lat_flip is not None:
            tensors["latent_flip"] = lat_flip[i].float().cpu().contiguous()
        with store.put(it.hash, it.key, {"shape": list(tensors["latent"].shape)}) as tmp:
            save_file(tensors, str(tmp))


def _encode_missing(ctx: Context, missing: list[Item], params: dict, show: bool = True) -> int:
    """Encode ``missing`` in batches of one bucket; returns how many this process computed.
    Each batch claims its keys first: one another build is computing is waited for, then reused."""
    from tqdm import tqdm

    store, resize_store = ctx.store(STAGE, ".safetensors"), ctx.store("resize", ".png")
    groups: dict[tuple, list[Item]] = {}
    for it in missing:
        groups.setdefault(tuple(it.data["bucket"]), []).append(it)
    bs, computed = params["batch_size"], 0
    with tqdm(total=len(missing), desc=f"latents:{ctx.name}", unit="img", disable=not (missing and show)) as bar:
        for bucket in sorted(groups):
            group = groups[bucket]
            for i in range(0, len(group), bs):
                chunk = group[i : i + bs]
                with store.claim([it.hash for it in chunk]) as todo:
                    todo_items = [it for it in chunk if it.hash in todo]
                    if todo_items:
                        _encode_group(ctx, todo_items, params, (resize_store, store))
                computed += len(todo_items)
                bar.update(len(chunk))
    return computed


def _items(ctx: Context, params: dict) -> list[Item]:
    return plan(ctx.read_manifest("bucket")["items"], params, runtime.identity(ctx, "vae"))


def run_shard(ctx: Context, params: dict, hashes: list[str], rank) -> dict:
    """One rank's share of the missing latents (see :func:`lorabuild.dist.shard`)."""
    from ..dist import shard

    by_hash = {it.hash: it for it in _items(ctx, params)}
    return {"computed": _encode_missing(ctx, shard([by_hash[h] for h in hashes], rank), params, show=rank.main)}


def run(ctx: Context, params: dict) -> dict:
    sr = StageRun(ctx, STAGE)
    store = ctx.store(STAGE, ".safetensors")
    items = _items(ctx, params)
    if params["random_crop"]:
        reason = "latents.random_crop is on: each epoch crops anew, so training encodes images itself"
        sr.notes.append(f"skipped: {reason}")
        entries = [{"id": it.id, "hash": it.hash, "bucket": it.data["bucket"], "src": it.data["src"],
                    "resized": it.data["resized"], "orig_size": it.data.get("orig_size")} for it in items]
        return sr.finish(entries, cached=False, reason=reason, flip=params["flip"])
    missing = sr.split(items, store)
    sr.compute(missing, store, lambda: _encode_missing(ctx, missing, params))
    # sizes and crop ride along for SDXL's size/crop conditioning (not part of the keys' meaning)
    entries = [{"id": it.id, "hash": it.hash, "bucket": it.data["bucket"], "resized": it.data["resized"],
                "crop": it.data["crop"], "orig_size": it.data.get("orig_size")} for it in items]
    return sr.finish(entries, cached=True, flip=params["flip"])
