"""train: cached latents (+ text embeddings) → the LoRA, saved in the kohya/A1111 layout.

Item = one trained LoRA. Its key holds everything that determines the weights: each
image's latent entry, caption and repeats, the network/train/caption settings and the
UNet and text encoder identities. Trained files are content-addressed like any other
entry (DVC calls this a run-cache): going back to a configuration trained before
restores its LoRA instead of training again.

The stage reads its inputs and builds the run key here; the run plan (what is saved under which
key, what is restored or continued from) is :mod:`lorabuild.train.plan`, the launch
:mod:`lorabuild.stages.train_launch`, the saved files and their publishing :mod:`lorabuild.train.publish`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..cache import checked_read, key_hash
from ..config import thaw, without_newer
from .. import models, multires
from ..lora import blocks
from ..train import dist
from ..train import publish
from ..train import ema as ema_settings
from ..train.plan import RunPlan, Sample, Start, Whole, decide, make_plan, project_samples, run_plan, start_note
from . import runtime, textemb
from . import sample as sample_stage
from . import train_launch
from .base import Context, StageError, StageRun
from .spec import MODEL, Inputs, Stage
from .train_launch import RunInputs

STAGE = "train"
VERSION = 2
SECTIONS = ("network", "train", "captions", "output")
# when to sample while training: decides which snapshots a run keeps, never the weights
SAMPLE_PARAMS = ("sample.at_first", "sample.every_n_epochs", "sample.every_n_steps")
EXTRA_PARAMS = ("textemb.cache", "textemb.clip_skip", "textemb.max_token_length", "latents.flip", "dataset",
                "bucket.resolution", "bucket.min_reso", "bucket.max_reso", "bucket.no_upscale")  # metadata: BUCKET_METADATA


# train options added after LoRAs were trained without them, with the value that means "off"
NEWER_OFF = {"masked_loss": False, "validation_seed": None, "min_timestep": None, "max_timestep": None,
             "ip_noise_gamma": None, "ip_noise_gamma_random_strength": False, "noise_offset_random_strength": False,
             "adaptive_noise_scale": None, "scale_weight_norms": None, "base_precision": "auto", "ema": None}
# flow models' objective (lorabuild/flow.py), null = the family's default: in the key and the task's
# record only when set, so SD builds made before they existed stay up to date
FLOW_OFF = {k: None for k in ("timestep_sampling", "sigmoid_scale", "logit_mean", "logit_std", "mode_scale",
                              "discrete_flow_shift", "weighting_scheme", "guidance_scale")}
NEWER_OFF |= FLOW_OFF
# train options added after the task records were first made, at their default: out of the record too
RECORD_OFF = FLOW_OFF | {"reg_target": "noise"}
NEWER_OFF |= RECORD_OFF
# train options that change how memory is managed, never a weight
UNKEYED = ("lean_cpu_memory",)
# bucket settings kohya's metadata records (ss_resolution, ss_min/max_bucket_reso, ss_bucket_no_upscale)
BUCKET_METADATA = ("resolution", "min_reso", "max_reso", "no_upscale")


def init_weights(ctx: Context) -> Path | None:
    w = ctx.project.get("network.weights")
    return ctx.project.resolve(w) if w else None


def run_key(ctx: Context, dataset, captions: dict, latents: dict, te_id: str, unet_id: str, cached: bool) -> dict:
    cfg = {s: ctx.project.section(s) for s in ("network", "train", "captions")}
    cfg["network"] = blocks.keyed(cfg["network"])  # options added later count only when set
    cfg["train"] = without_newer(dist.keyed_train(cfg["train"], dist.launch_options(ctx.project).world), NEWER_OFF)
    cfg["train"] = {k: v for k, v in cfg["train"].items() if k not in UNKEYED}
    if "ema" in cfg["train"]:  # its save choice publishes, it does not train
        cfg["train"]["ema"] = ema_settings.keyed(cfg["train"]["ema"])
    start = init_weights(ctx)
    if start is not None:  # the starting LoRA by content: a moved or touched file changes nothing
        hashes = ctx.hashes()
        cfg["network"] = {**cfg["network"], "weights": hashes.sha256(start, tensors_only=True)}
        hashes.save()
    cfg["save_precision"] = ctx.project.get("output.save_precision")
    if ctx.project.get("output.format") != "kohya":  # PEFT's names (SD 3.5, FLUX.1 for diffusers); absent at the default
        cfg["format"] = ctx.project.get("output.format")
    # what goes into the saved files' metadata (a change writes them again, without training: training_key)
    cfg["metadata"] = [ctx.project.get("output.metadata"), ctx.project.get("output.comment")]
    # the bucket settings the files' ss_* metadata states (the latents' own buckets are keyed with them)
    cfg["bucket"] = {k: thaw(ctx.project.get(f"bucket.{k}")) for k in BUCKET_METADATA}  # a resolution list: JSON
    concept_of = {im.id: im.concept for im in dataset.images}
    images = []
    for i in sorted(latents):
        c = concept_of[i]
        # everything per image that shapes training: latent, caption, repeats, reg, caption options
        images.append([i, latents[i]["hash"], captions[i], c.repeats] + ([True] if c.is_reg else [])
                      + ([c.captions] if c.captions else []) + (["val"] if c.is_val else []))
    key = {
        "stage": STAGE,
        "v": VERSION,
        "images": images,
        "textemb_max_tokens": ctx.project.get("textemb.max_token_length"),
        "params": cfg,
        "clip_skip": ctx.project.get("textemb.clip_skip"),
        "flip": ctx.project.get("latents.flip"),
        "textemb_cached": cached,
        "unet": unet_id,
        "te": te_id,
        "noise": models.noise_schedule(runtime.model_dir(ctx)),  # e.g. v-prediction set on the same weights
    }
    return key | flow_key(ctx)


def flow_key(ctx: Context) -> dict:
    """A flow model's objective as trained (its family's defaults filled in) and the family's text
    settings (FLUX's T5 length and mask); nothing for the SD families, whose keys stay as they were."""
    from ..flow import FlowSettings

    fam, out = runtime.family(ctx), {}
    if fam.objective(models.noise_schedule(runtime.model_dir(ctx))) == "flow":
        try:
            out["objective"] = FlowSettings.of(ctx.project.section("train"), fam.flow_defaults).keyed()
        except ValueError as exc:
            raise StageError(f"{ctx.project.file}: {exc}") from None
    options = textemb.text_options(ctx)
    if options:
        out["text"] = options
    return out


def _repair_inputs(ctx: Context, dataset, lat_manifest: dict, captions: dict, cached: bool, frozen: list) -> None:
    """Before training reads them: re-encode any latent or text embedding that is missing from
    the store or damaged (its bytes not those its checksum recorded), each as its own stage
    would, so the run trains on exactly the entries an uninterrupted build made."""
    from . import latents as latents_stage

    if lat_manifest.get("cached", True):
        latents_stage.repair(ctx, [e["hash"] for e in lat_manifest["items"]])
    if cached or frozen:
        textemb.repair(ctx, dataset, list(captions.values()), frozen)



def gather(ctx: Context, dataset) -> RunInputs:
    """What the run trains on: the dataset's captions and latents (from their manifests), the base model."""
    p = ctx.project
    cached, _ = textemb.project_mode(p)
    captions = textemb.captions_for(ctx, dataset)
    lat_manifest = ctx.read_manifest("latents")
    lat_items = lat_manifest["items"]
    dataset = multires.with_samples(dataset, lat_items)  # a multi-resolution sample is trained like its image
    captions.update({e["id"]: captions[e["image"]] for e in lat_items if e.get("image") in captions})
    latents = {e["id"]: e for e in lat_items}
    if not set(latents) <= set(captions):
        raise StageError("the latents manifest does not match the dataset: run the latents stage again")
    captions = {i: c for i, c in captions.items() if i in latents}  # images the resize stage skipped drop out
    mdir = runtime.model_dir(ctx)
    info = models.model_info(mdir)
    te_id, unet_id = runtime.text_identity(ctx), runtime.identity(ctx, "unet")
    concept_of = {im.id: im.concept for im in dataset.images}
    every = [Sample(i, tuple(latents[i]["bucket"]), concept_of[i].repeats, concept_of[i].is_reg, concept_of[i].is_val,
                    latents[i].get("image", "")) for i in sorted(latents)]
    samples, held_out = project_samples(every, p.section("train"))
    return RunInputs(dataset=dataset, concept_of=concept_of, captions=captions, latents=latents,
                     lat_manifest=lat_manifest, cached=cached, te_id=te_id, unet_id=unet_id, mdir=mdir, info=info,
                     samples=samples, val_samples=held_out, init_weights=init_weights(ctx),
                     frozen=() if cached else tuple(textemb.frozen_parts(ctx)))


def project_run_plan(ctx: Context, key: dict, samples: list, world: int) -> RunPlan:
    """The run plan of ``key`` under the project's train and sample settings (``world`` processes)."""
    p = ctx.project
    plan = make_plan(samples, p.get("train.batch_size"), p.get("train.gradient_accumulation_steps"), p.get("train.epochs"),
                     p.get("train.max_steps"), world)
    return run_plan(key, plan, p.get("train.save_every_n_epochs"), p.get("train.save_every_n_steps"),
                    sample_stage.in_training_points(p.section("sample"), plan), bool(p.get("train.ema")))


def _resume(ctx: Context, rp: RunPlan, start: Start, exporter: publish.Exporter, states, whole: Whole,
            notes: list) -> dict | None:
    """The training state ``start`` continues from (None: from the start), after writing again the
    saved files up to there that only output settings made missing."""
    resume = None
    if start.epoch and ctx.memo.get("rank") is None:  # a rank process trains on; its parent writes what is missing
        exported = publish.export_missing(exporter, states, start.epoch, whole)
        if exported:
            notes.append(f"wrote {exported} saved file{'s' if exported != 1 else ''} again from the full-precision "
                         "weights in the cache (the output settings changed; nothing trained for them)")
    if start.epoch:
        import torch

        resume = checked_read("train", states.path(rp.state_hash(start.epoch)), lambda f: torch.load(f, weights_only=True))
        ctx.memo["state_epoch"] = start.epoch
    note = start_note(rp, start.epoch, resume["step"] if resume else None, ctx.project.get("train.lr_scheduler"))
    if note:
        notes.append(note)
    return resume


def _make(ctx: Context, inp: RunInputs, rp: RunPlan, start: Start, stores: tuple, notes: list) -> tuple:
    """Train what ``start`` leaves to train, here or on ranks; returns (the run entry's info, or None in
    a rank process, and in-training sampling counts)."""
    store, states, whole = stores
    rank, launch, epochs = ctx.memo.get("rank"), dist.launch_options(ctx.project), rp.plan.epochs
    exporter = publish.Exporter(ctx, store, inp, rp)
    resume = _resume(ctx, rp, start, exporter, states, whole, notes)
    if start.epoch < epochs and rank is None:  # before any process trains on them
        _repair_inputs(ctx, inp.dataset, inp.lat_manifest, inp.captions, inp.cached, inp.frozen)
    log_rows = list(resume["log"]) if resume else []
    val_rows = list(resume.get("val", [])) if resume else []
    sampled = None  # (rendered, reused) by in-training sampling
    if start.epoch < epochs and launch.world > 1 and rank is None:
        # Several processes: torchrun starts the ranks; rank 0 saves every epoch and state
        # in the store, and this process assembles them as it assembles a run trained before.
        sampled = train_launch.on_ranks(ctx, STAGE, launch)
        notes.append(f"trained by {launch.world} processes" + (f" on {launch.nnodes} nodes" if launch.nnodes > 1 else ""))
        start = decide(rp, None, store, states, whole)
        resume = _resume(ctx, rp, start, exporter, states, whole, [])
        if start.epoch < epochs:
            raise StageError(f"train:{ctx.name}: the ranks finished but the store has no training state "
                             f"after epoch {epochs} (only up to epoch {start.epoch})")
        log_rows, val_rows = list(resume["log"]), list(resume.get("val", []))
    elif start.epoch < epochs:
        log_rows, val_rows, sampled = train_launch.train_here(ctx, inp, rp, start, resume, exporter, states)
    if rank is not None:
        return None, sampled
    return {"epochs": start.epochs, "snapshots": start.snapshots, "loss": log_rows, "val": val_rows,
            **({"ema": start.emas} if rp.with_ema else {})}, sampled


def run(ctx: Context, dataset) -> dict:
    sr = StageRun(ctx, STAGE)
    inp = gather(ctx, dataset)
    fam = runtime.family(ctx)
    if ctx.project.get("output.format") == "diffusers" and not fam.peft_format:
        raise StageError(f"{ctx.project.file}: output.format: diffusers is for SD 3.5 and FLUX.1 (diffusers has no converter "
                         f"from kohya's names there); diffusers reads {fam.title} LoRAs in kohya's format: use kohya")
    from ..lora.flow_select import format_problem

    wrong = format_problem(ctx.project.section("network"), fam.name, ctx.project.get("output.format"))
    if wrong:
        raise StageError(f"{ctx.project.file}: output.format: {wrong}")
    key = run_key(ctx, inp.dataset, inp.captions, inp.latents, inp.te_id, inp.unet_id, inp.cached)  # multi-res: its samples
    h = key_hash(key)
    store = ctx.store(STAGE, ".safetensors")
    rp = project_run_plan(ctx, key, inp.samples, dist.launch_options(ctx.project).world)
    whole = Whole()
    entry = store.info(h) if whole(store, h) else None
    states = ctx.store(STAGE, ".pt")  # training states: torch pickles (weights_only), not safetensors
    start = decide(rp, entry, store, states, whole)
    sampled = None
    if start.restore:
        sr.reused = 1
        sr.notes.append("restored a LoRA trained before with the same inputs")
    else:
        info, sampled = _make(ctx, inp, rp, start, (store, states, whole), sr.notes)
        if info is None:
            return {"sampled": sampled}  # a rank's part ends here: its parent assembles and publishes
        with store.put(h, key, info) as tmp:
            shutil.copyfile(store.path(info["epochs"][-1][1]), tmp)
        entry = store.info(h)
        sr.computed = 1
    return _publish(ctx, sr, h, entry, rp, states, sampled)


def _publish(ctx: Context, sr: StageRun, h: str, entry: dict, rp: RunPlan, states, sampled: tuple | None) -> dict:
    """Publish the run's files (:func:`lorabuild.train.publish.run_files`) and logs; write the manifest."""
    p, store = ctx.project, ctx.store(STAGE, ".safetensors")
    name = p.output_name
    out_dir = ctx.ws.output_dir(name)
    hashes = ctx.hashes()
    emas = entry.get("ema", []) if rp.with_ema else []
    ema_only = bool(emas) and p.get("train.ema.save") == "ema"
    wanted, steps = publish.run_files(entry, name, emas, ema_only, rp.step_saves, p.get("output.keep_last"))
    publish.publish_run(store, emas[-1][1] if ema_only else h, wanted, out_dir, name, hashes, sr.notes)
    hashes.save()
    publish.write_logs(out_dir, name, entry)
    if sampled is not None:
        sr.notes.append(f"sampled while training: {sampled[0]} images rendered, {sampled[1]} reused")
    # only the snapshots the current sample settings ask for (an entry may hold more)
    snaps = [s for s in entry.get("snapshots", []) if s[0] in rp.points]
    # the training states of saved epochs (what `epochs` raised later continues from; kept by gc)
    kept = [[e, rp.state_hash(e)] for e, *_ in entry["epochs"] if states.has(rp.state_hash(e))]
    # the snapshots' full-precision weights (kept by gc: other output settings are written from them)
    full = [[row_id, rp.full_hash(row_id)] for row_id, *_ in entry.get("snapshots", []) if states.has(rp.full_hash(row_id))]
    ema_rows = {"ema": emas, "ema_save": p.get("train.ema.save")} if emas else {}
    return sr.finish([{"id": name, "hash": h, "epochs": entry["epochs"], "snapshots": snaps, "steps": steps, **ema_rows,
                       "states": kept, "full": full}])


def _deps(t: Inputs) -> list[str]:
    return ([t.manifest("latents"), t.manifest("textemb"), *t.tagged] + t.captions() + t.weights("unet", "text_encoder")
            + t.resolved("network.weights"))


def _extra(project, cfg: dict) -> dict:
    out = {"network": blocks.keyed(cfg["network"]),  # unset new options leave an existing build up to date
           "train": without_newer(cfg["train"], RECORD_OFF), **textemb.family_record(project, cfg),
           "output": without_newer(cfg["output"], {"format": "kohya"})}
    world = dist.launch_options(project).world
    if world > 1:  # `lorabuild train --nproc/--nnodes` changes the global batch, so the LoRA it trains
        out["world"] = world
    return out


TASK = Stage(STAGE, VERSION, "latents + captions → the LoRA: output/<name>/<name>.safetensors",
             params=EXTRA_PARAMS + MODEL + SAMPLE_PARAMS + ("device",), sections=SECTIONS, deps=_deps, run=run,
             extra=_extra, outputs=lambda t: [t.lora()],
             # a publish that found its output locked (train/publish.py) leaves the task out of date until redone
             waits=lambda t: [(publish.up_to_date, (str(t.out_dir), f"{t.project.output_name}*"))])
