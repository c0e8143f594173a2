"""latents: each image, resized and cropped to its bucket, → VAE latents (plus its mirror image).

Item = one image (one (image, resolution) sample with several resolutions, its fit its own); key = the working copy's content (its pixels' hash, not the resize stage's
key: a ``resize.max_side`` change re-encodes only the images whose working copy changed) + its
fit (resize size, crop, bucket) + flip + interpolation + the VAE's identity. Encoded one image at a time by default: on the CPU
an image encoded in a batch differs (up to 1.4e-7) from the same image encoded alone, so an
entry's bytes would depend on which other images happened to be missing with it; one at a time
they depend on its key alone, and a rebuild after a kill or a lost entry is bit-exact.
Latents are stored already multiplied by the VAE's ``scaling_factor`` (read from
its config: 0.18215 for SD1/2, 0.13025 for SDXL); a VAE with a ``shift_factor`` (FLUX.1's 16-channel
one: 0.1159, scale 0.3611) has it subtracted first, ``(x − shift)·scale``, and both join the key as
``norm`` (absent for the SD VAEs, whose keys stay as they were).

With ``train.masked_loss`` an image that has an alpha channel also gets its mask (kohya
``alpha_mask``), and ``"mask"`` joins its key; images without alpha keep the key and entry
they have without it, so turning the option on or off recomputes only images with alpha.
A mask is made from the source image's alpha, not from the working copy, so its key also holds
the source's hash and the filter that resized it.
"""
from __future__ import annotations

from ..pixels import bucket_mask, bucket_pixels, encode, to_tensor
from .base import Context, Item, StageError, StageRun
from . import runtime
from .spec import MODEL, Stage, params_of

STAGE = "latents"
# 3: keyed on the working copy's content (2: on the resize key; encoded one at a time by default;
# 1: in batches of 8 below 256² px)
VERSION = 3
PARAMS = ("latents.flip", "latents.interpolation", "latents.batch_size", "latents.random_crop", "train.masked_loss")
KEY_PARAMS = ("flip", "interpolation")  # batch_size: see batch_size()


def plan(bucket_entries: list[dict], params: dict, vae_id: str, alpha: dict | None = None,
         mask_filter: str = "", norm: dict | None = None) -> list[Item]:
    """``alpha``: {image id: source path} of the images whose alpha channel is their mask;
    ``mask_filter``: resize.interpolation, which shrank those masks with their working copies;
    ``norm``: :func:`latent_norm`."""
    items = []
    alpha = alpha or {}
    for e in bucket_entries:
        key = {
            "stage": STAGE,
            "v": VERSION,
            "content": e["content"],
            "bucket": e["bucket"],
            "resized": e["resized"],
            "crop": e["crop"],
            "params": {k: params[k] for k in KEY_PARAMS} | ({"random_crop": True} if params["random_crop"] else {}),
            "dtype": "fp32",
            "vae": vae_id,
        }
        if norm is not None:
            key["norm"] = norm
        data = e
        image = e.get("image", e["id"])  # a multi-resolution sample names its image (lorabuild.multires)
        if image in alpha:
            key["mask"] = {"alpha": e["source_hash"], "filter": mask_filter}
            data = {**e, "source": alpha[image]}
        items.append(Item(e["id"], key, data))
    return items


def working_copy(resize_store, src: str) -> tuple[list, str]:
    """(size, resize filter) of a working copy, from the entry's own sidecar: a mask is resized
    the way its pixels were, and the copy's key (``src``) already holds both."""
    from ..cache import read_json

    side = read_json(resize_store.sidecar(src)) or {}
    return side["info"]["size"], side["key"]["params"]["interpolation"]


def source_bytes(resize_store, src: str, source) -> bytes:
    """The source image's bytes for its mask, checked to be those its working copy was made from
    (the copy's key holds their sha256): a mask from a rewritten image is never stored under
    the old image's key."""
    import hashlib
    from pathlib import Path

    from ..cache import read_json

    data = Path(source).read_bytes()
    side = read_json(resize_store.sidecar(src)) or {}
    if hashlib.sha256(data).hexdigest() != side.get("key", {}).get("src"):
        raise StageError(f"{source} changed since it was resized: run the build again")
    return data


def alpha_sources(ctx: Context, params: dict) -> dict:
    """{image id: source path} of the images whose alpha is their mask: with ``train.masked_loss``,
    every image with an alpha channel (read from the file headers only)."""
    if not params.get("masked_loss"):
        return {}
    from ..dataset import from_project
    from ..images import has_alpha

    return {im.id: im.path for im in from_project(ctx.project).images if has_alpha(im.path)}


def latent_norm(info: dict) -> dict | None:
    """The shift and scale of a VAE with a shift factor (``models.model_info``), None for the SD VAEs."""
    if info.get("latent_shift") is None:
        return None
    return {"shift": info["latent_shift"], "scale": info["latent_scale"]}


def _encode_group(ctx: Context, group: list[Item], params: dict, stores) -> None:
    runtime.libraries()
    import torch
    from safetensors.torch import save_file

    resize_store, store = stores
    vae = runtime.frozen(ctx, "vae")
    x = to_tensor([bucket_pixels(resize_store.path(it.data["src"]), it.data["resized"], it.data["crop"],
                                 params["interpolation"], resize_store.read_verified(it.data["src"])) for it in group])
    with torch.inference_mode():
        lat = encode(vae, x)
        lat_flip = encode(vae, torch.flip(x, dims=[3])) if params["flip"] else None
    ctx.check_inputs()  # the VAE loaded is the one its identity names
    for i, it in enumerate(group):
        tensors = {"latent": lat[i].float().cpu().contiguous()}
        if lat_flip is not None:
            tensors["latent_flip"] = lat_flip[i].float().cpu().contiguous()
        if "source" in it.data:  # the flipped mask is this one mirrored: the trainer flips it
            mask = bucket_mask(it.data["source"], *working_copy(resize_store, it.data["src"]), it.data["resized"],
                               it.data["crop"], params["interpolation"], lat.shape[-2:],
                               source_bytes(resize_store, it.data["src"], it.data["source"]))
            tensors["mask"] = mask if mask is not None else torch.ones(lat.shape[-2:])
        need = sum(t.element_size() * t.nelement() for t in tensors.values())  # said when the disk is full
        with store.put(it.hash, it.key, {"shape": list(tensors["latent"].shape)}, need=need) as tmp:
            save_file(tensors, str(tmp))


def batch_size(ctx: Context, params: dict, bucket: tuple[int, int]) -> int:
    """``latents.batch_size``; unset, 1: an entry's bytes then never depend on the other images
    encoded with it (see the module docstring). On the CPU it costs nothing at 256 px and up,
    where one image at a time also encodes faster (bench/RESULTS.md, the SD 1.5 VAE); a set
    batch size batches for speed, and its entries may differ in the last bits from those a
    rebuild encodes in other company."""
    return params["batch_size"] or 1


def _encode_missing(ctx: Context, missing: list[Item], params: dict, show: bool = True) -> int:
    """Encode ``missing`` in batches of one bucket; returns how many this process computed.
    Keys are claimed first, at least 8 at a time (one image per batch must not mean one round of
    file locks per image): one another build is computing is waited for, then reused."""
    from tqdm import tqdm

    if not missing:
        return 0
    store, resize_store = ctx.store(STAGE, ".safetensors"), ctx.store("resize", ".png")
    groups: dict[tuple, list[Item]] = {}
    for it in missing:
        groups.setdefault(tuple(it.data["bucket"]), []).append(it)
    computed = 0
    with tqdm(total=len(missing), desc=f"latents:{ctx.name}", unit="img", disable=not show) as bar:
        for bucket in sorted(groups):
            group = groups[bucket]
            bs = batch_size(ctx, params, bucket)
            claim_n = max(bs, 8)
            for i in range(0, len(group), claim_n):
                chunk = group[i : i + claim_n]
                with store.claim([it.hash for it in chunk]) as todo:
                    todo_items = [it for it in chunk if it.hash in todo]
                    for j in range(0, len(todo_items), bs):
                        _encode_group(ctx, todo_items[j : j + bs], params, (resize_store, store))
                        bar.update(len(todo_items[j : j + bs]))
                computed += len(todo_items)
                bar.update(len(chunk) - len(todo_items))
    return computed


def _items(ctx: Context, params: dict) -> list[Item]:
    from .. import models

    return plan(ctx.read_manifest("bucket")["items"], params, runtime.identity(ctx, "vae"), alpha_sources(ctx, params),
                ctx.project.get("resize.interpolation"), latent_norm(models.model_info(runtime.model_dir(ctx))))


def project_params(project) -> dict:
    """The stage's parameters as tasks.py hands them to :func:`run` (the last part of each key)."""
    return {k.rsplit(".", 1)[-1]: project.get(k) for k in PARAMS}


def repair(ctx: Context, wanted: list[str]) -> int:
    """Re-encode those of the entries ``wanted`` (key hashes from the latents manifest) that are
    missing or damaged, for a stage that is about to read them (train); returns how many.
    One at a time, as the stage itself does, so a repaired entry is the bytes it had."""
    store = ctx.store(STAGE, ".safetensors")
    bad = {h for h in wanted if not store.verified(h)}
    if not bad:
        return 0
    params = project_params(ctx.project)
    missing = list({it.hash: it for it in _items(ctx, params) if it.hash in bad}.values())
    if len(missing) < len(bad):
        raise StageError("the latents manifest does not match the dataset: run the latents stage again")
    print(f"latents:{ctx.name}: re-encoding {len(missing)} missing or damaged entries", flush=True)
    return _encode_missing(ctx, missing, params, show=False)


def run_shard(ctx: Context, params: dict, hashes: list[str], rank) -> dict:
    """One rank's share of the missing latents (see :func:`lorabuild.train.dist.shard`)."""
    from ..train.dist import shard

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
                    "resized": it.data["resized"], "orig_size": it.data.get("orig_size"), **_image(it)} for it in items]
        return sr.finish(entries, cached=False, reason=reason, flip=params["flip"])
    missing = sr.split(items, store)
    sr.compute(missing, store, lambda: _encode_missing(ctx, missing, params))
    # sizes and crop ride along for SDXL's size/crop conditioning (not part of the keys' meaning)
    entries = [{"id": it.id, "hash": it.hash, "bucket": it.data["bucket"], "resized": it.data["resized"],
                "crop": it.data["crop"], "orig_size": it.data.get("orig_size"), **_image(it)} for it in items]
    return sr.finish(entries, cached=True, flip=params["flip"])


def _image(it: Item) -> dict:
    """The image and resolution of a multi-resolution sample (absent for a single-resolution project)."""
    return {k: it.data[k] for k in ("image", "resolution") if k in it.data}


TASK = Stage(STAGE, VERSION, "bucketed images → VAE latents (content-addressed)",
             params=PARAMS + MODEL + ("device",), deps=lambda t: [t.manifest("bucket")] + t.weights("vae"),
             run=lambda ctx, dataset: run(ctx, params_of(ctx.project, PARAMS)))
