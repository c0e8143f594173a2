"""sample: every saved epoch's LoRA × every prompt → an image; a grid and an index.html of them all.

Item = one image; key = the sha256 of the LoRA's weights (none for the base-model row) + the
prompt's full settings (sampler included) + the base model's identity + the precision it
was rendered in + how prompts are encoded, where that is not the default (``textemb.clip_skip``,
``textemb.max_token_length``: prompts are encoded by :func:`lorabuild.textenc.condition`, as
training encodes captions, not by the pipeline's own encoder, which cuts at 77 tokens and
knows no clip_skip of ours). Adding a prompt renders one image per row; a new epoch renders one image
per prompt; a retrained LoRA renders its row again. Everything else is reused, including
the images rendered while training (``sample.every_n_epochs``/``every_n_steps``/``at_first``),
which land in the same store under the same keys.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .. import families, models
from ..lora import blocks
from ..cache import without_newer
from ..train.publish import publish as publish_file, remove, up_to_date
from .base import Context, Item, StageRun
from . import runtime, textemb
from .spec import MODEL, Inputs, Stage

STAGE = "sample"
VERSION = 3

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


# samplers whose diffusers scheduler has no rescale_betas_zero_snr option (diffusers 0.42)
NO_ZERO_SNR = ("pndm", "lms", "heun")


@dataclass(frozen=True)
class Row:
    """One row of the grid: the base model (lora None) or one LoRA file."""

    id: str  # "base", "e000006", "s000050"
    label: str  # "base model", "epoch 6", "step 50"
    lora: Path | None
    lora_hash: str | None  # sha256 of the LoRA's tensor bytes
    name: str | None = None  # the published LoRA's file name without .safetensors (A1111's <lora:name>)


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:n].lower() or "prompt"


def base_identity(ctx: Context) -> dict:
    return {"unet": runtime.identity(ctx, "unet"), "vae": runtime.identity(ctx, "vae"),
            "text_encoder": runtime.text_identity(ctx)}


# how training encodes text, at the values with which the pipeline's own encoder gave the same embeddings
TEXT_DEFAULTS = {"clip_skip": 1, "max_token_length": 75}


def text_settings(project, arch: str, options: dict | None = None) -> dict:
    """The text-encoding settings a sample is rendered with (training's); SDXL knows no clip_skip.
    ``options``: the family's own (FLUX's T5 length and mask, ``textemb.text_options``), keyed as ``options``."""
    text = {k: project.get(f"textemb.{k}") for k in TEXT_DEFAULTS}
    text = {k: v for k, v in text.items() if not (k == "clip_skip" and not families.family(arch).clip_skip)}
    return text | ({"options": options} if options else {})


def row_items(row: Row, settings: list[dict], base: dict, precision: str, text: dict) -> list[Item]:
    """The images of one row, content-addressed. ``text``: :func:`text_settings`; keyed only where
    not the default, so images rendered before prompts were encoded as training does stay valid."""
    out = []
    keyed_text = {k: v for k, v in text.items() if k == "options" or v != TEXT_DEFAULTS[k]}
    for i, s in enumerate(settings):
        key = {"stage": STAGE, "v": VERSION, "lora": row.lora_hash, "settings": s, "base": base, "precision": precision}
        if keyed_text:
            key["text"] = keyed_text
        out.append(Item(f"{row.id}-{i:02d}-{slug(s['prompt'])}", key,
                        {"settings": s, "lora": row.lora, "name": row.name, "text": text}))
    return out


def conditioning(pipe, prompt: str, negative: str, text: dict, notes: list | None = None) -> dict:
    """The pipeline's prompt arguments, as embeddings made by the family's ``condition``, the
    function the textemb stage and training encode captions with: clip_skip and captions of
    150/225 tokens are seen as in training. The prompt and the negative are encoded one at a
    time, as captions are. An empty negative is left to the SDXL pipeline, which makes it zeros
    (``force_zeros_for_empty_prompt``); SD 1/2's is encoded, as the pipeline itself would."""
    fam = families.family_of(pipe)
    tokenizers, encoders = fam.tokenizers_of(pipe), fam.encoders_of(pipe)
    clip_skip, max_tokens = text.get("clip_skip", 1), text["max_token_length"]
    n = len(pipe.tokenizer(prompt, verbose=False).input_ids) - 2
    note = (f"prompt {prompt[:40]!r}… is {n} tokens: like captions in training, it is cut at "
            f"textemb.max_token_length ({max_tokens})")
    if notes is not None and n > max_tokens and note not in notes:  # once, not once per row
        notes.append(note)
    options = text.get("options", {})
    hidden, pooled = fam.condition(tokenizers, encoders, [prompt], clip_skip, max_tokens, **options)
    neg = None
    if fam.encodes_empty_negative(pipe) or (negative and fam.objective(dict(pipe.scheduler.config)) != "flow"):
        neg = fam.condition(tokenizers, encoders, [negative or ""], clip_skip, max_tokens, **options)
    return fam.prompt_arguments(pipe, hidden, pooled, neg)


def precision_of(unet) -> str:
    return str(unet.dtype).removeprefix("torch.").replace("float32", "fp32").replace("float16", "fp16").replace(
        "bfloat16", "bf16")


def check_samplers(ctx: Context, settings: list[dict]) -> None:
    """Before any model is loaded: a sampler whose package is missing stops with one line."""
    from ..extras import sampler_problem
    from .base import StageError

    problem = sampler_problem(settings)
    if problem:
        raise StageError(f"{STAGE}:{ctx.name}: {problem}")


def render(pipe, network, items: list[Item], store, notes: list | None = None) -> None:
    """Render ``items`` with ``network`` (already applied, or None for the base model) into ``store``."""
    import diffusers
    import torch

    base_config = pipe.scheduler.config
    fam = families.family_of(pipe)
    flow = fam.objective(dict(base_config)) == "flow"  # sampled with the model's own flow-matching scheduler
    dtype = getattr(pipe, fam.denoiser_part).dtype
    autocast = torch.autocast(pipe.device.type, dtype=dtype, enabled=dtype != torch.float32)
    for it in items:
        s = it.data["settings"]
        if not flow:
            cls_name, extra = SAMPLERS[s["sampler"]]
            pipe.scheduler = getattr(diffusers, cls_name).from_config(base_config, **extra)
        if network is not None:
            network.set_multiplier(s["lora_weight"])
        # A CPU generator makes the starting noise the same on every device (as A1111 does).
        with torch.no_grad(), autocast:
            image = pipe(
                **conditioning(pipe, s["prompt"], s["negative"], it.data["text"], notes), width=s["width"],
                height=s["height"], num_inference_steps=s["steps"], **fam.guidance_arguments(s),
                generator=torch.Generator("cpu").manual_seed(s["seed"]),
            ).images[0]
        with store.put(it.hash, it.key, {"prompt": s["prompt"]}) as tmp:
            image.save(tmp, format="PNG")
    pipe.scheduler = type(pipe.scheduler).from_config(base_config)
    if network is not None:
        network.set_multiplier(1.0)


def lora_network(ctx: Context, pipe):
    from ..lora.adapter import from_config

    fam = runtime.family(ctx)
    # eval: no dropout of any kind (network, rank, module) while rendering
    return from_config(ctx.project.section("network"), getattr(pipe, fam.denoiser_part), fam.encoders_of(pipe),
                       fam.name).eval()


def _render_missing(ctx: Context, missing: list[Item], store, notes: list) -> None:
    """Render the missing images, loading the pipeline once and each LoRA file once."""
    from .. import models

    pipe = models.load_pipeline(runtime.model_dir(ctx), device=runtime.device(ctx))
    pipe.set_progress_bar_config(disable=True)
    by_lora: dict = {}
    for it in missing:
        by_lora.setdefault(it.data["lora"], []).append(it)
    for lora, items in by_lora.items():
        network = None
        if lora is not None:
            network = lora_network(ctx, pipe)
            network.load_weights(lora)
            network.to(pipe.device)
            network.apply()
        render(pipe, network, items, store, notes)
        if network is not None:
            network.restore()


def in_training_points(sample_cfg: dict, plan) -> dict[str, tuple[str, int]]:
    """{row id: (label, global step)} of the points to sample at while training (``plan``: a TrainPlan)."""
    if not sample_cfg["prompts"] and not sample_cfg.get("prompt_file"):
        return {}
    points = {}
    if sample_cfg["at_first"]:
        points["base"] = ("base model", 0)
    if sample_cfg["every_n_epochs"]:
        for e in range(sample_cfg["every_n_epochs"], plan.epochs + 1, sample_cfg["every_n_epochs"]):
            points[f"e{e:06d}"] = (f"epoch {e}", plan.epoch_end_step(e))
    if sample_cfg["every_n_steps"]:
        for s in range(sample_cfg["every_n_steps"], plan.total_steps + 1, sample_cfg["every_n_steps"]):
            points[f"s{s:06d}"] = (f"step {s}", s)
    return points


def _text_models(ctx: Context, parts: dict) -> tuple[list, list]:
    """(tokenizers, text encoders) for in-training samples: the trained ones, with any frozen one
    whose outputs training read from the cache (T5) loaded now, in its place; all frozen copies
    when none trains."""
    if not parts["text_encoders"]:
        return runtime.text_models(ctx)
    toks, tes = list(parts["tokenizers"]), list(parts["text_encoders"])
    for i, part in enumerate(models.text_parts(runtime.model_dir(ctx))):
        if part in parts.get("frozen_text", ()):
            toks.insert(i, runtime.frozen(ctx, part.replace("text_encoder", "tokenizer")))
            tes.insert(i, runtime.frozen(ctx, part))
    return toks, tes


class TrainingSampler:
    """Renders sample images while training, into the sample stage's store under the keys the
    sample stage will look up, so ``sample:<name>`` afterwards reuses them.

    The LoRA is first saved (a snapshot, unless the point is a saved epoch) and the live
    network is loaded with the saved weights for rendering, so an image shows exactly the
    file its key names; the training weights are put back afterwards.
    """

    def __init__(self, ctx: Context, settings: list[dict], publish_dir: Path):
        check_samplers(ctx, settings)
        self.ctx, self.settings, self.publish_dir = ctx, settings, publish_dir
        self.store = ctx.store(STAGE, ".png")
        self.base = base_identity(ctx)
        self.text = text_settings(ctx.project, runtime.arch(ctx), textemb.text_options(ctx))
        self.pipe = None
        self.rendered = self.reused = 0

    def __call__(self, network, parts: dict, row: Row) -> None:
        import torch

        if self.pipe is None:
            toks, tes = _text_models(self.ctx, parts)
            self.pipe = runtime.family(self.ctx).make_pipeline(
                parts["unet"], parts["vae"] or runtime.frozen(self.ctx, "vae"), tes, toks,
                models.load_sampling_scheduler(runtime.model_dir(self.ctx)))
        items = row_items(row, self.settings, self.base, precision_of(parts["unet"]), self.text)
        missing = [it for it in items if not self.store.has(it.hash)]
        self.reused += len(items) - len(missing)
        if missing:
            if row.lora is None:  # the base model: the LoRA switched off (its output is then exactly the base's)
                network.set_multiplier(0.0)
                render(self.pipe, None, missing, self.store)
            else:
                backup = {k: v.detach().clone() for k, v in network.state_dict().items()}
                network.load_weights(row.lora)
                try:
                    render(self.pipe, network, missing, self.store)
                finally:
                    with torch.no_grad():
                        network.load_state_dict(backup)
            network.set_multiplier(1.0)
            self.rendered += len(missing)
        publish(self.publish_dir, items, self.store)


def rows(ctx: Context) -> list[Row]:
    """Base model (``baseline`` or ``at_first``), in-training snapshots and every saved epoch (and
    its EMA, with ``train.ema``), by step."""
    entry = ctx.read_manifest("train")["items"][0]
    train_store = ctx.store("train", ".safetensors")
    hashes = ctx.hashes()
    found: dict[str, tuple[int, Row]] = {}
    out, last = ctx.project.output_name, max((e for e, *_ in entry["epochs"]), default=None)
    if ctx.project.get("sample.baseline") or ctx.project.get("sample.at_first"):
        found["base"] = (-1, Row("base", "base model", None, None))
    for row_id, label, step, h in entry.get("snapshots", []):
        if row_id != "base":
            path = train_store.path(h)
            found[row_id] = (step, Row(row_id, label, path, hashes.sha256(path, tensors_only=True), f"{out}-step{step:08d}"))
    ema_only = entry.get("ema_save") == "ema"  # train.ema.save: the EMA files took the raw ones' names
    for e, eh, *rest in [] if ema_only else entry["epochs"]:
        # the cache's copy, not output/'s: a locked output may still hold the previous bytes
        path = train_store.path(eh)
        step = rest[0] if rest else e
        found[f"e{e:06d}"] = (step, Row(f"e{e:06d}", f"epoch {e}", path, hashes.sha256(path, tensors_only=True),
                                        out if e == last else f"{out}-{e:06d}"))
    stem = out if ema_only else f"{out}-ema"
    for e, eh, step in entry.get("ema", []):  # train.ema: a row of its own after each epoch's raw one
        path = train_store.path(eh)
        found[f"e{e:06d}-ema"] = (step, Row(f"e{e:06d}-ema", f"epoch {e} EMA", path,
                                            hashes.sha256(path, tensors_only=True), stem if e == last else f"{stem}-{e:06d}"))
    hashes.save()
    return [r for _, r in sorted(found.values(), key=lambda sr: (sr[0], sr[1].id))]


def publish(out_dir: Path, items: list[Item], store, hashes=None, notes: list | None = None) -> None:
    """Copy the images out of the store, each with its settings in A1111's ``parameters`` chunk
    (added here, so the store's entries and their keys stay as they were). An image whose published
    bytes would not change is not rewritten (a viewer may hold it open on Windows)."""
    from ..gallery import a1111_parameters, with_text_chunk
    from ..train.publish import side_path

    for it in items:
        text = a1111_parameters(it.data["settings"], it.data["lora"] and it.data.get("name"), it.key["lora"])
        data = with_text_chunk(store.path(it.hash).read_bytes(), "parameters", text)
        dst = out_dir / f"{it.id}.png"
        try:
            unchanged = dst.is_file() and dst.stat().st_size == len(data) and dst.read_bytes() == data
        except OSError:
            unchanged = False
        if unchanged:
            remove(side_path(dst), None)
            continue
        publish_file(None, dst, notes=notes, write=lambda tmp, data=data: tmp.write_bytes(data))


def run(ctx: Context) -> dict:
    from .. import gallery, models, prompts

    sr = StageRun(ctx, STAGE)
    name = ctx.project.output_name
    info = models.model_info(runtime.model_dir(ctx))
    settings = prompts.resolve(ctx.project.section("sample"), ctx.project.root, sr.notes, families.native_size(info))
    check_samplers(ctx, settings)
    blind = sorted({s["sampler"] for s in settings if s["sampler"] in NO_ZERO_SNR}) if info["zero_terminal_snr"] else []
    if blind:  # diffusers' schedulers without rescale_betas_zero_snr sample a ztsnr model on the plain schedule
        sr.notes.append(f"the base model has a zero-terminal-SNR schedule, which {', '.join(blind)} cannot follow: "
                        "use euler, euler_a, ddim or dpm++_2m for samples that match the model")
    grid_rows = rows(ctx)
    base = base_identity(ctx)
    text = text_settings(ctx.project, runtime.arch(ctx), textemb.text_options(ctx))
    grid_items = [row_items(r, settings, base, "fp32", text) for r in grid_rows]
    items = [it for row in grid_items for it in row]
    store = ctx.store(STAGE, ".png")
    missing = sr.split(items, store)
    if missing:
        _render_missing(ctx, missing, store, sr.notes)
        sr.computed += len(missing)
    out_dir = ctx.ws.output_dir(name) / "samples"
    keep = {f"{it.id}.png" for it in items} | {"grid.png"}
    for old in out_dir.glob("*.png"):
        if old.name not in keep and old.name.replace(".new.", ".") not in keep:
            remove(old, sr.notes)  # a locked one is kept, with a warning
    hashes = ctx.hashes()
    publish(out_dir, items, store, hashes, sr.notes)
    hashes.save()
    if items:
        img = gallery.grid_image([[store.path(it.hash) for it in row] for row in grid_items],
                                 [r.label for r in grid_rows], [s["prompt"] for s in settings])
        publish_file(None, out_dir / "grid.png", notes=sr.notes, write=lambda tmp: img.save(tmp, format="PNG"))
        size = img.size
        gallery.index_html([(r.label, [(f"{it.id}.png", it.data["settings"]) for it in row])
                            for r, row in zip(grid_rows, grid_items)], out_dir / "index.html", f"{name} samples")
        sr.notes.append(f"grid {size[0]}x{size[1]}: {len(grid_rows)} rows × {len(settings)} prompts")
    return sr.finish([{"id": it.id, "hash": it.hash, "prompt": it.data["settings"]["prompt"]} for it in items])


def _deps(t: Inputs) -> list[str]:
    return [t.lora(), t.manifest("train")] + t.weights("unet", "vae", "text_encoder") + t.resolved("sample.prompt_file")


TASK = Stage(STAGE, VERSION, "the LoRA + sample.prompts → images and a grid in output/<name>/samples/",
             params=("sample", "network", "device", "textemb.clip_skip", "textemb.max_token_length") + MODEL,
             deps=_deps, run=lambda ctx, dataset: run(ctx),
             extra=lambda p, cfg: {"network": without_newer(cfg["network"], blocks.SAMPLE_NEWER),
                                   **textemb.family_record(p, cfg)},
             waits=lambda t: [(up_to_date, (str(t.out_dir / "samples"),))])
