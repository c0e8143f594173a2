"""textemb: each distinct caption → the text encoder's hidden states (SDXL: both encoders', and the pooled output).

Item = one distinct caption (after the fixed caption options); key = caption text +
clip_skip + the text encoder's identity. ``textemb.cache: auto`` skips the stage, and
says why, when the text encoder trains or captions are randomised: then training
encodes captions itself (but for a frozen T5 of FLUX.1 / SD 3.5 while its CLIPs train:
its outputs alone are cached, and training never loads it). Captions are encoded one at a
time by default (``textemb.batch_size: 1``), for the reason latents are: an entry's bytes
then depend on its key alone. A caption's key is its text itself, read once from its file,
so what is encoded is what is keyed.
"""
from __future__ import annotations

from .. import models
from ..captions import CaptionError, dataset_captions, is_randomised
from .base import Context, Item, StageError, StageRun
from . import runtime
from .spec import MODEL, Inputs, Stage, params_of, plain, short

STAGE = "textemb"
VERSION = 2  # 2: encoded one at a time by default (1: in batches of 32)
PARAMS = ("textemb.cache", "textemb.clip_skip", "textemb.batch_size", "textemb.max_token_length")
# a family's own text settings (FLUX's T5 length and mask: Family.text_options): in the task's record
# only when set, so builds made before they existed stay up to date
FAMILY_PARAMS = ("textemb.t5_max_length", "textemb.apply_t5_attn_mask")


def mode(cache: object, train_text_encoder: bool, randomised: bool) -> tuple[bool, str]:
    """Whether embeddings are cached, and why not when they are not."""
    if cache is False:
        return False, "textemb.cache is false"
    if train_text_encoder:
        return False, "the text encoder trains (network.train_text_encoder), so embeddings change every step"
    if randomised:
        return False, "captions are randomised per epoch (shuffle/dropout), so training encodes them"
    return True, ""


def _randomised(project) -> bool:
    opts = project.section("captions")
    overrides = [c["captions"] for c in project.section("dataset")["concepts"]]
    return any(is_randomised({**opts, **o}) for o in [{}] + overrides)


def project_mode(project) -> tuple[bool, str]:
    return mode(project.get("textemb.cache"), project.get("network.train_text_encoder"), _randomised(project))


def frozen_parts(ctx: Context) -> list[str]:
    """The text encoders cached while the others train (FLUX.1 / SD 3.5: T5 while CLIP trains, as
    kohya caches T5's outputs then): the family's frozen ones, when only the training of the text
    encoders keeps the cache off; training then reads their outputs and never loads them."""
    p = ctx.project
    if not p.get("network.train_text_encoder") or p.get("textemb.cache") is False or _randomised(p):
        return []
    parts = models.text_parts(runtime.model_dir(ctx))
    return [parts[i] for i in runtime.family(ctx).frozen_text_parts(p.section("network")) if i < len(parts)]


def frozen_key(caption: str, te_id: str, parts: list[str], options: dict) -> dict:
    """A frozen encoder's entry: its output alone (no clip_skip or CLIP length: they do not reach it)."""
    return {"stage": STAGE, "v": VERSION, "caption": caption, "te": te_id, "parts": parts, "text": options}


def frozen_items(ctx: Context, captions, parts: list[str]) -> list[Item]:
    """One item per distinct caption: the frozen encoders' (``parts``) entry for it."""
    te_id, options = runtime.identity(ctx, parts[0]), text_options(ctx)
    return [Item(c, frozen_key(c, te_id, parts, options)) for c in sorted(set(captions))]


def _frozen_encoder(ctx: Context, parts: list[str]):
    """``encode(captions) → (hidden, None)`` with the frozen encoder alone (Family.encode_frozen)."""
    (part,) = parts  # one frozen encoder (T5) in the families that have one
    tok, te = runtime.frozen(ctx, part.replace("text_encoder", "tokenizer")), runtime.frozen(ctx, part)
    return lambda captions: (runtime.family(ctx).encode_frozen(tok, te, captions, **text_options(ctx)), None)


def item_key(caption: str, clip_skip: int, max_token_length: int, te_id: str, options: dict | None = None) -> dict:
    """``options``: the family's :meth:`~lorabuild.families.base.Family.text_options` (none for SD)."""
    key = {"stage": STAGE, "v": VERSION, "caption": caption, "clip_skip": clip_skip, "te": te_id}
    if max_token_length != 75:  # absent at the default, so entries made before the option existed stay valid
        key["max_token_length"] = max_token_length
    if options:
        key["text"] = options
    return key


def text_options(ctx: Context) -> dict:
    """The base model family's own text settings from the project (FLUX: T5 length and mask)."""
    return runtime.family(ctx).text_options(ctx.project.section("textemb"), runtime.model_dir(ctx))


def captions_for(ctx: Context, dataset) -> dict[str, str]:
    """Image id → caption, for the images the resize stage kept (the tagger's where it sets them)."""
    from .tag import tagged_captions

    kept = {e["id"] for e in ctx.read_manifest("resize")["items"]}
    try:
        return dataset_captions([im for im in dataset.images if im.id in kept], ctx.project.section("captions"),
                                tagged_captions(ctx))
    except CaptionError as exc:
        raise StageError(str(exc)) from None


def _encode_missing(ctx: Context, missing: list[Item], params: dict, frozen: list[str] | None = None) -> int:
    """Encode ``missing`` captions in batches (with ``frozen``: those encoders' outputs alone);
    returns how many this process computed. Each batch claims its keys first: one another build
    is computing is waited for, then reused."""
    if not missing:
        return 0
    runtime.libraries()
    import torch
    from safetensors.torch import save_file

    store = ctx.store(STAGE, ".safetensors")
    if frozen:
        encode = _frozen_encoder(ctx, frozen)
    else:
        condition, (tokenizers, encoders) = runtime.family(ctx).condition, runtime.text_models(ctx)
        encode = lambda captions: condition(tokenizers, encoders, captions, params["clip_skip"],  # noqa: E731
                                            params["max_token_length"], **text_options(ctx))
    bs, computed = params["batch_size"], 0
    for i in range(0, len(missing), bs):
        with store.claim([it.hash for it in missing[i : i + bs]]) as todo:
            chunk = [it for it in missing[i : i + bs] if it.hash in todo]
            if not chunk:
                continue
            with torch.inference_mode():
                hidden, pooled = encode([it.id for it in chunk])
            ctx.check_inputs()  # the text encoder loaded is the one its identity names
            for j, it in enumerate(chunk):
                tensors = {"hidden": hidden[j].float().cpu().contiguous()}
                if pooled is not None:  # a family with a pooled text embedding (SDXL's second encoder's projection)
                    tensors["pooled"] = pooled[j].float().cpu().contiguous()
                with store.put(it.hash, it.key, {"shape": list(hidden[j].shape)}) as tmp:
                    save_file(tensors, str(tmp))
        computed += len(chunk)
    return computed


def _items(ctx: Context, dataset, params: dict) -> list[Item]:
    captions = captions_for(ctx, dataset)
    te_id, options = runtime.text_identity(ctx), text_options(ctx)
    return [Item(c, item_key(c, params["clip_skip"], params["max_token_length"], te_id, options))
            for c in sorted(set(captions.values()))]


def repair(ctx: Context, dataset, captions: list[str], frozen: list[str] | None = None) -> int:
    """Re-encode the embeddings of ``captions`` (``frozen``: those encoders' entries) that are missing
    or damaged, for train, which is about to read them; returns how many."""
    params = {k.rsplit(".", 1)[-1]: ctx.project.get(k) for k in PARAMS}
    store = ctx.store(STAGE, ".safetensors")
    te_id, options = runtime.text_identity(ctx), text_options(ctx)
    items = frozen_items(ctx, captions, frozen) if frozen else [
        Item(c, item_key(c, params["clip_skip"], params["max_token_length"], te_id, options))
        for c in sorted(set(captions))]
    missing = [it for it in items if not store.verified(it.hash)]
    if not missing:
        return 0
    print(f"textemb:{ctx.name}: re-encoding {len(missing)} missing or damaged entries", flush=True)
    return _encode_missing(ctx, missing, params, frozen)


def run_shard(ctx: Context, params: dict, hashes: list[str], rank) -> dict:
    """One rank's share of the missing embeddings (see :func:`lorabuild.train.dist.shard`)."""
    from ..dataset import from_project
    from ..train.dist import shard

    dataset, frozen = from_project(ctx.project), None if project_mode(ctx.project)[0] else frozen_parts(ctx)
    items = frozen_items(ctx, captions_for(ctx, dataset).values(), frozen) if frozen else _items(ctx, dataset, params)
    by_hash = {it.hash: it for it in items}
    return {"computed": _encode_missing(ctx, shard([by_hash[h] for h in hashes], rank), params, frozen)}


def run(ctx: Context, dataset, params: dict) -> dict:
    sr = StageRun(ctx, STAGE)
    enabled, reason = project_mode(ctx.project)
    frozen = [] if enabled else frozen_parts(ctx)
    if not enabled and not frozen:
        sr.notes.append(f"skipped: {reason}")
        return sr.finish([], enabled=False, reason=reason)
    store = ctx.store(STAGE, ".safetensors")
    if frozen:  # the text encoders train, but not this one: its outputs are cached, training never loads it
        items = frozen_items(ctx, captions_for(ctx, dataset).values(), frozen)
        missing = sr.split(items, store)
        sr.compute(missing, store, lambda: _encode_missing(ctx, missing, params, frozen))
        sr.notes.append(f"{reason}: only the frozen {', '.join(frozen)} is cached")
        return sr.finish([{"id": it.id, "hash": it.hash} for it in items], enabled=False, reason=reason, frozen=frozen)
    items = _items(ctx, dataset, params)
    missing = sr.split(items, store)
    sr.compute(missing, store, lambda: _encode_missing(ctx, missing, params))
    entries = [{"id": it.id, "hash": it.hash} for it in items]
    return sr.finish(entries, enabled=True)


def _deps(t: Inputs) -> list[str]:
    return [t.manifest("resize"), *t.tagged] + t.captions() + t.weights("text_encoder")


def family_record(project, cfg: dict) -> dict:
    """The family text settings that are set, for a task's record (Stage.extra)."""
    return {short(k): plain(project.get(k)) for k in FAMILY_PARAMS if project.get(k) is not None}


TASK = Stage(STAGE, VERSION, "distinct captions → text-encoder embeddings (when they can be cached)",
             params=PARAMS + MODEL + ("captions", "network.train_text_encoder", "dataset"), deps=_deps,
             run=lambda ctx, dataset: run(ctx, dataset, params_of(ctx.project, PARAMS)), extra=family_record)
