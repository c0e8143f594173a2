"""Model access for stages: resolve the base model once, load components once per process.

doit runs python-actions in one process, so the latent and text-embedding stages of a
build share one loaded VAE/text encoder instead of loading them twice.
"""
from __future__ import annotations

import functools
import importlib
import sys
import time
from pathlib import Path

from .. import models
from .base import MODEL_LOAD, Context, StageError


def model_dir(ctx: Context) -> Path:
    """The base model's folder, resolved once per stage run (a single file's header is read,
    a pickle loaded, its hash looked up: not for every component a stage asks about)."""
    if "model_dir" not in ctx.memo:
        hashes = ctx.hashes()
        opts = {k: ctx.project.get(k) for k in models.MODEL_OPTIONS + models.PART_OPTIONS}
        t0 = time.perf_counter()  # a first build may convert a checkpoint or make the built-in model here
        try:
            ctx.memo["model_dir"] = models.resolve_base_model(ctx.project.get("base_model"), ctx.project.root,
                                                              ctx.ws.cache, opts, hashes)
        except models.ModelError as exc:
            raise StageError(f"{ctx.project.file}: base_model: {exc}") from None
        finally:
            hashes.save()
            MODEL_LOAD["seconds"] += time.perf_counter() - t0
    return ctx.memo["model_dir"]


def identity(ctx: Context, component: str) -> str:
    hashes = ctx.hashes()
    try:
        return models.component_identity(model_dir(ctx), component, hashes)
    finally:
        hashes.save()


def arch(ctx: Context) -> str:
    return models.model_info(model_dir(ctx))["arch"]


def family(ctx: Context):
    """The model family of the stage's base model (:mod:`lorabuild.families`): what stages ask
    instead of comparing arch names."""
    from ..families import family_of

    return family_of(models.model_info(model_dir(ctx)))


def text_identity(ctx: Context) -> str:
    """The text conditioning's identity: the text encoder's, or for several (SDXL) all of them together."""
    parts = models.text_parts(model_dir(ctx))
    if len(parts) == 1:
        return identity(ctx, parts[0])
    import hashlib

    return hashlib.sha256("+".join(identity(ctx, p) for p in parts).encode()).hexdigest()


def text_models(ctx: Context) -> tuple[list, list]:
    """(tokenizers, text encoders), frozen and shared: one of each per text encoder (two for SDXL)."""
    parts = models.text_parts(model_dir(ctx))
    return [frozen(ctx, p.replace("text_encoder", "tokenizer")) for p in parts], [frozen(ctx, p) for p in parts]


def device(ctx: Context):
    libraries()  # asking torch which devices there are imports it
    try:
        dev = models.pick_device(ctx.project.get("device"))
    except Exception as exc:  # pick_device raises on an unavailable explicit device
        raise StageError(f"{ctx.project.file}: device: {exc}") from None
    if "rank" in ctx.memo:  # one of several processes (lorabuild.train.worker): its own GPU
        from ..train.dist import local_device

        dev = local_device(dev)
    return dev


def release_frozen() -> None:
    """Drop the frozen models earlier stages of this process loaded (the VAE, a frozen text
    encoder) and give the memory back to the system: training holds its own copies of what it
    needs, and a sampler that needs one loads it again. On a cold CPU build the VAE and the heap
    its encoder's activations left are otherwise carried through the whole run."""
    import gc

    from ..train.loop import glibc

    _load.cache_clear()
    gc.collect()
    libc = glibc()
    if libc is not None:  # glibc's malloc_trim hands the heap's free pages back
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=4)
def _load(kind: str, folder: str, dev: str):
    if kind.startswith("tokenizer"):
        return models.load_tokenizer(Path(folder), which=kind)
    if kind.startswith("text_encoder"):
        return models.load_text_encoder(Path(folder), device=dev, which=kind)
    return {"vae": models.load_vae}[kind](Path(folder), device=dev)


def libraries() -> None:
    """Import torch, counting the time as model loading: it is the model's runtime, paid once
    per process by whichever stage first needs a model, whether one image is new or a thousand."""
    if "torch" in sys.modules:
        return
    t0 = time.perf_counter()
    importlib.import_module("torch")
    MODEL_LOAD["seconds"] += time.perf_counter() - t0


def frozen(ctx: Context, kind: str):
    """A frozen, shared component (vae, text_encoder[_2], tokenizer[_2]). Never train these copies.
    The time a first load takes counts as model loading in the stage's report."""
    t0 = time.perf_counter()
    folder, dev = str(model_dir(ctx)), str(device(ctx))
    try:
        return _load(kind, folder, dev)
    finally:
        MODEL_LOAD["seconds"] += time.perf_counter() - t0
