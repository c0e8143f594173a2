"""Model access for stages: resolve the base model once, load components once per process.

doit runs python-actions in one process, so the latent and text-embedding stages of a
build share one loaded VAE/text encoder instead of loading them twice.
"""
from __future__ import annotations

import functools
from pathlib import Path

from .. import models
from .base import Context, StageError


MODEL_OPTIONS = ("model_type", "prediction_type", "base_model_config", "vae", "allow_pickle")


def model_options(project) -> dict:
    return {k: project.get(k) for k in MODEL_OPTIONS}


def model_dir(ctx: Context) -> Path:
    hashes = ctx.hashes()
    try:
        return models.resolve_base_model(ctx.project.get("base_model"), ctx.project.root, ctx.ws.cache,
                                         model_options(ctx.project), hashes)
    except models.ModelError as exc:
        raise StageError(f"{ctx.project.file}: base_model: {exc}") from None
    finally:
        hashes.save()


def identity(ctx: Context, component: str) -> str:
    hashes = ctx.hashes()
    try:
        return models.component_identity(model_dir(ctx), component, hashes)
    finally:
        hashes.save()


def device(ctx: Context):
    try:
        return models.pick_device(ctx.project.get("device"))
    except Exception as exc:  # pick_device raises on an unavailable explicit device
        raise StageError(f"{ctx.project.file}: device: {exc}") from None


@functools.lru_cache(maxsize=4)
def _load(kind: str, folder: str, dev: str):
    loader = {
        "vae": models.load_vae,
        "text_encoder": models.load_text_encoder,
        "tokenizer": models.load_tokenizer,
    }[kind]
    if kind == "tokenizer":
        return loader(Path(folder))
    return loader(Path(folder), device=dev)


def frozen(ctx: Context, kind: str):
    """A frozen, shared component (vae, text_encoder, tokenizer). Never train these copies."""
    return _load(kind, str(model_dir(ctx)), str(device(ctx)))
