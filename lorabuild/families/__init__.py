"""Model families: one module per family of base models (``sd1``, ``sd2``, ``sdxl``, ``sd3``).

Where a family's facts live
---------------------------
Each module holds one :class:`~lorabuild.families.base.Family` subclass and its instance
``FAMILY``: its shipped configs (``lorabuild/data/configs/<name>``), how its tiny built-in
model is made (and, for SD 1.x, the shipped pretrained one), how a single file is converted
(the pipeline class diffusers' ``from_single_file`` is called on, which tokenizers pad with
"!"), how a folder is recognised (``claims``) and a single file (``checkpoint_prefix``,
``cross_attention_width``), its text conditioning (``condition``: encoders, clip_skip,
pooled output; ``added_inputs``: SDXL's ``text_embeds``/``time_ids``), kohya's LoRA names
(``te_prefixes``, ``sgm_names``/``unet_rename`` to the SGM layout, ``block_layout`` for the
block-wise options), the checks that need no model (``bucket_step``), its noise objective's
defaults (the prediction type in its shipped scheduler config, SD 2.x's 768-v), its ``ss_*``
and ``modelspec.*`` architecture metadata and its sampling pipeline (``make_pipeline``,
``from_pretrained``, ``prompt_arguments``, ``sample_size``).

Who asks: ``models.py`` (built-ins, conversion, ``model_info``, loaders), the textemb stage,
the trainer and the sample stage through ``condition`` (``textenc`` holds the CLIP encoding
they share), ``lora/network.py`` and ``lora/blocks.py`` for names and block layouts, ``lora/metadata.py``
for the architecture keys, ``config.py`` for ``bucket.step``, ``native_size``, and
``stages/runtime.family(ctx)`` for the family of a stage's base model. Nothing else branches
on an arch string.

Layering: at import time this package reads only ``resources``; ``textenc``, ``layout`` and
``models.to_device`` are imported inside the methods that need them.

Adding a family (FLUX.1, SD 3.5): a new module with its Family subclass and configs under
``lorabuild/data/configs/<name>``, one line in ``FAMILIES`` below, and its tests. The
family is asked before the older ones it might resemble (``DETECT_ORDER``).

No torch import here or in the family modules at import time: doit imports this when it
loads the task graph.
"""
from __future__ import annotations

from .base import Family
from .flux import FAMILY as FLUX
from .sd1 import FAMILY as SD1
from .sd2 import FAMILY as SD2
from .sdxl import FAMILY as SDXL
from .sd3 import FAMILY as SD3

FAMILIES: dict[str, Family] = {f.name: f for f in (SD1, SD2, SDXL, FLUX, SD3)}
# most specific first: SD 1.x claims any SD-shaped model, so it is asked last; FLUX (a transformer,
# two text encoders) before SDXL, which claims any model with a second text encoder; SD 3.5 (a
# transformer, CLIP-L with a projection, CLIP-G, T5) before FLUX
DETECT_ORDER = (SD3, FLUX, SDXL, SD2, SD1)


def family(arch: str) -> Family:
    """The family named ``arch`` (``model_info(...)["arch"]``, ``model_type``)."""
    try:
        return FAMILIES[arch]
    except KeyError:
        raise ValueError(f"unknown model architecture {arch!r}") from None


def family_of(thing) -> Family:
    """The family of a ``model_info`` dict, an arch name, or a loaded diffusers pipeline
    (a stage's base model: ``stages.runtime.family(ctx)``)."""
    if isinstance(thing, str):
        return family(thing)
    if isinstance(thing, dict):
        return family(thing["arch"])
    parts = {k for k, v in thing.components.items() if v is not None}
    return detect(parts, thing.text_encoder.config.to_dict())


def detect(parts: set[str], te_config: dict) -> Family:
    """The family of a model with components ``parts`` whose first text encoder has ``te_config``."""
    return next(f for f in DETECT_ORDER if f.claims(parts, te_config))


def detect_checkpoint(tensors: dict) -> str | None:
    """The family name of a single file from its keys ({key: (shape, dtype)}): which text encoder
    it carries, else the UNet's cross-attention width; None when neither tells."""
    keys = tensors.keys()
    for f in DETECT_ORDER:
        if f.claims_checkpoint(keys):
            return f.name
    widths = {shape[1] for k, (shape, _) in tensors.items()
              if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight")}
    by_width = {f.cross_attention_width: f.name for f in reversed(DETECT_ORDER)}
    return by_width.get(min(widths)) if widths else None


def builtin_family(name: str) -> Family | None:
    """The family of built-in model ``name`` (tiny-sd1, world-sd1, …), None for an unknown name."""
    return next((f for f in FAMILIES.values() if name in f.tiny_models or name in f.shipped_models), None)


def builtin_models() -> tuple[str, ...]:
    return tuple(sorted(n for f in FAMILIES.values() for n in (*f.tiny_models, *f.shipped_models)))


def native_size(info: dict) -> int:
    """The size a model was trained at, from ``models.model_info``: the default sample size (its family's)."""
    return family_of(info).sample_size(info["prediction_type"])
