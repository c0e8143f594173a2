"""train: cached latents (+ text embeddings) → the LoRA, saved in the kohya/A1111 layout.

Item = one trained LoRA. Its key holds everything that determines the weights: each
image's latent entry, caption and repeats, the network/train/caption settings and the
UNet and text encoder identities. Trained files are content-addressed like any other
entry (DVC calls this a run-cache): going back to a configuration trained before
restores its LoRA instead of training again.
"""
from __future__ import annotations

import csv
import io
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .. import families
from ..cache import atomic_write, checked_read, key_hash
from ..captions import concept_options
from ..config import thaw, without_newer
from ..publish import pending, publish, remove, up_to_date
from ..progress import LiveLog, live_path
from ..trainplan import Sample, make_plan, project_samples
from .. import blocks, dist, models, multires
from .. import ema as ema_settings
from ..workspace import build_id
from . import runtime, textemb
from . import sample as sample_stage
from .base import Context, StageError, StageRun
from .spec import MODEL, Inputs, Stage

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
    return {
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


# Learning-rate schedules whose value at step s does not depend on the run's length: with
# these, epoch e of a 10-epoch run equals epoch e of a 6-epoch run, so epochs, states and
# snapshots are keyed without the length and a longer run continues a shorter one.
LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup")
# what only decides how long a run goes and what it keeps, never the weights at a given epoch
LENGTH_PARAMS = ("epochs", "max_steps", "save_every_n_epochs", "save_every_n_steps")


def weights_key(key: dict, total_steps: int) -> dict:
    """The run key without its length: what determines the weights after any given epoch."""
    train = {k: v for k, v in key["params"]["train"].items() if k not in LENGTH_PARAMS}
    wkey = {**key, "params": {**key["params"], "train": train}, "kind": "epoch-weights"}
    if train["lr_scheduler"] not in LENGTH_FREE_SCHEDULES or train.get("lr_warmup_ratio") is not None:
        wkey["total_steps"] = total_steps
    return wkey


# output settings: they shape the saved files, never the weights
OUTPUT_PARAMS = ("save_precision", "metadata", "bucket")


def training_key(wkey: dict) -> dict:
    """The weights key without the output settings: the key of the training states and of the
    snapshots' full-precision weights, which every save precision and metadata share. A change of
    output settings finds them and writes the saved files again from them, training nothing."""
    return {**wkey, "params": {k: v for k, v in wkey["params"].items() if k not in OUTPUT_PARAMS}}


def entry_key(wkey: dict, plan, kind: str, epoch: int) -> dict:
    """The key of the LoRA (``kind`` "epoch") or training state ("state") after ``epoch``. An
    epoch that max_steps cuts short is a different thing from the whole epoch: its key says
    where it stopped, so a longer run never takes it for a whole one."""
    key = {**wkey, kind: epoch}
    if plan.cut_short and epoch == plan.epochs:
        key["until_step"] = plan.total_steps
    return key


def ema_key(wkey: dict, plan, epoch: int) -> dict:
    """The key of the EMA file of ``epoch`` (train.ema): the epoch's key, marked."""
    return {**entry_key(wkey, plan, "epoch", epoch), "weights": "ema"}


def step_save_points(every: int | None, plan) -> dict[str, tuple[str, int]]:
    """{row id: (label, step)} of the steps ``train.save_every_n_steps`` saves at (kohya
    save_every_n_steps; the final step is the final file). Row ids are the sample stage's, so a
    step that is also sampled uses the same file."""
    if not every:
        return {}
    return {f"s{s:06d}": (f"step {s}", s) for s in range(every, plan.total_steps, every)}


def _tensor_bytes(obj) -> int:
    """The bytes of every tensor in a (nested) training state: about what saving it needs."""
    if hasattr(obj, "element_size"):
        return obj.element_size() * obj.nelement()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0



def _write_csv(path: Path, header: list[str], rows: list) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    with atomic_write(path, "w") as fh:
        fh.write(buf.getvalue())


def _write_loss_csv(path: Path, rows: list) -> None:
    # with train.scale_weight_norms each row also holds kohya's max-norm logs (trainer.MAX_NORM_LOGS)
    extra = ["keys_scaled", "average_key_norm", "max_key_norm"] if rows and len(rows[0]) > 5 else []
    _write_csv(path, ["step", "epoch", "loss", "lr", "seconds"] + extra, rows)


def _bucket_info(lat_items: list[dict]) -> dict:
    counts: dict[tuple, int] = {}
    for e in lat_items:
        counts[tuple(e["bucket"])] = counts.get(tuple(e["bucket"]), 0) + 1
    return {"buckets": {str(i): {"resolution": list(b), "count": n} for i, (b, n) in enumerate(sorted(counts.items()))}}


@dataclass
class Run:
    """What one training run reads and what it appends to (``epochs``, ``snapshots``)."""

    ctx: Context
    dataset: object
    plan: object
    samples: list
    val_samples: list
    captions: dict
    latents: dict
    lat_manifest: dict
    cached: bool
    te_id: str
    unet_id: str
    info: dict
    mdir: Path
    wkey: dict
    tkey: dict  # training_key(wkey): training states and full-precision snapshots
    saved: set
    points: dict  # in-training sample points: {row id: (label, step)}
    snapshot_points: dict  # points that need a LoRA file of their own (step saves included)
    epochs: list
    snapshots: list
    store: object
    states: object  # training states and full-precision snapshots (.pt)
    ema_epochs: list  # [epoch, hash, step] of the EMA file of each saved epoch (train.ema)
    sampler: object = None

    def epoch_hash(self, epoch: int) -> str:
        return key_hash(entry_key(self.wkey, self.plan, "epoch", epoch))

    def state_hash(self, epoch: int) -> str:
        return key_hash(entry_key(self.tkey, self.plan, "state", epoch))

    def ema_hash(self, epoch: int) -> str:
        return key_hash(ema_key(self.wkey, self.plan, epoch))

    def snap_hash(self, row_id: str) -> str:
        return key_hash({**self.wkey, "snapshot": row_id})

    def full_hash(self, row_id: str) -> str:
        """A snapshot's full-precision weights (LoRANetwork.full_weights), kept to write it again."""
        return key_hash({**self.tkey, "snapshot": row_id})

    def export(self, tensors: dict, ekey: dict, epoch: int, step: int, stamp: dict, ema: bool = False) -> str:
        """Save saved-layout ``tensors`` as the entry ``ekey`` in the output precision, with the
        metadata of ``epoch``/``step`` (and of train.ema, ``ema``); ``stamp``: the run's session id and times."""
        import torch

        from ..network import write_kohya

        self.ctx.check_inputs()  # the UNet and text encoder trained on are those the key names
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
            self.ctx.project.get("output.save_precision")]
        with self.store.put(key_hash(ekey), ekey, {"epoch": epoch, "step": step}) as tmp:
            write_kohya(tensors, tmp, dtype, _metadata(self, epoch, step, stamp, ema))
        return key_hash(ekey)


def _metadata(r: Run, epoch: int, step: int, stamp: dict, ema: bool = False) -> dict:
    """kohya's ``ss_*`` metadata of the file saved after ``epoch``/``step`` (its EMA file's, ``ema``)."""
    from ..metadata import kohya_metadata, tag_frequency

    p = r.ctx.project
    # the metadata describes what was trained: validation images are left out of it
    val_ids = {s.id for s in r.val_samples}
    # an image trained at several resolutions counts once in the folders' counts and tags (kohya: once per folder)
    again = val_ids | {e["id"] for e in r.lat_manifest["items"] if e.get("image")}
    trained_captions = {i: c for i, c in r.captions.items() if i not in again}
    folder_of = {im.id: im.concept.folder.name for im in r.dataset.images}
    dirs = {}
    for im in r.dataset.images:
        if im.id in again:
            continue
        d = dirs.setdefault(im.concept.folder.name, {"n_repeats": im.concept.repeats, "img_count": 0})
        d["img_count"] += 1
    cfg = {s: p.section(s) for s in ("network", "train", "captions", "textemb", "latents", "output")}
    cfg["bucket"] = r.wkey["params"]["bucket"]  # what the key holds, so a restored file never states other settings
    md = kohya_metadata(
        cfg=cfg,
        output_name=p.output_name, arch=r.info["arch"], prediction_type=r.info["prediction_type"], plan=r.plan,
        epoch=epoch, step=step, dataset_dirs=dirs, tag_freq=tag_frequency(trained_captions, folder_of),
        bucket_info=_bucket_info([e for e in r.lat_manifest["items"] if e["id"] not in val_ids]),
        textemb_cached=r.cached, model_name=Path(str(p.get("base_model"))).name, model_hash=r.unet_id,
        model_source=models.source_info(r.mdir),
        session_id=stamp["session"], started=stamp["started"], finished=stamp["finished"],
        datasets=multires.datasets_metadata([e for e in r.lat_manifest["items"] if e["id"] not in val_ids], cfg["bucket"]),
    )
    if ema:
        md.update(ema_settings.metadata(p.get("train.ema")))
    if r.info.get("zero_terminal_snr"):  # the base model's own schedule (a ztsnr checkpoint) was rescaled
        md["ss_zero_terminal_snr"] = "True"
    return md


class Whole:
    """Present and undamaged (each entry checked once per run): a damaged LoRA or state is
    reported, removed and made again, never published, sampled or continued from."""

    def __init__(self):
        self.checked: dict[tuple[str, str], bool] = {}

    def __call__(self, st, h: str) -> bool:
        if (st.stage + st.ext, h) not in self.checked:
            self.checked[(st.stage + st.ext, h)] = st.verified(h)
        return self.checked[(st.stage + st.ext, h)]

    def seen(self, st, h: str) -> None:
        """``h`` was just written whole."""
        self.checked[(st.stage + st.ext, h)] = True


def export_missing(r: Run, e0: int, whole) -> int:
    """Write each saved file up to epoch ``e0`` (saved epochs, snapshots) that the store lacks from
    the full-precision weights kept beside it: what a change of ``output.save_precision`` or the
    metadata leaves to do. Returns how many were written; nothing is trained."""
    import torch

    from ..network import ema_weights, kohya_tensors

    todo = [(entry_key(r.wkey, r.plan, "epoch", e), r.state_hash(e), False) for e in sorted(r.saved)
            if e <= e0 and not whole(r.store, r.epoch_hash(e))]
    if r.ctx.project.get("train.ema"):  # the EMA files, from the averaged weights in the same states
        todo += [(ema_key(r.wkey, r.plan, e), r.state_hash(e), True) for e in sorted(r.saved)
                 if e <= e0 and not whole(r.store, r.ema_hash(e))]
    todo += [({**r.wkey, "snapshot": row}, r.full_hash(row), False) for row, (_, step) in r.snapshot_points.items()
             if step <= r.plan.epoch_end_step(e0) and not whole(r.store, r.snap_hash(row))]
    for ekey, fh, ema in todo:
        full = checked_read("train", r.states.path(fh), lambda f: torch.load(f, weights_only=True))
        info = r.states.info(fh) or {}
        if ema:
            full, info = ema_weights(full), {**info, **info.get("ema_stamp", {})}
        # the stamp of the run that trained them, so only what changed differs from its files
        stamp = {k: info.get(k, now) for k, now in (("session", uuid.uuid4().hex), ("started", time.time()),
                                                    ("finished", time.time()))}
        r.export(kohya_tensors(full), ekey, info["epoch"], info["step"], stamp, ema=ema)
        whole.seen(r.store, key_hash(ekey))
    return len(todo)


def _tensorboard(ctx: Context, run_hash: str, start_step: int):
    """A TensorBoard writer for this run (``output/<name>/tensorboard/<run>/``) when tensorboard is
    installed, else None. A continued run purges what its killed predecessor logged after the
    state it continues from, so the curves have no doubled stretch."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    log_dir = ctx.ws.output_dir(ctx.project.output_name) / "tensorboard" / run_hash[:12]
    # purge_step: events at this step and later are dropped; this run's first step is start_step + 1
    return SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1 if start_step else None)


def _train(r: Run, resume: dict | None) -> list:
    """Train (from ``resume``, a saved training state, when given); returns the loss log."""
    from torch import save as torch_save

    from ..plan import build_plan, render
    from ..trainer import TrainError, TrainInputs, train

    ctx, p, store, wkey = r.ctx, r.ctx.project, r.store, r.wkey
    rank = ctx.memo.get("rank", dist.SINGLE)
    states = r.states
    name = p.output_name
    lat_store = ctx.store("latents", ".safetensors")
    emb_paths = None
    if r.cached:
        emb_store = ctx.store("textemb", ".safetensors")
        ck = lambda c: textemb.item_key(c, p.get("textemb.clip_skip"), p.get("textemb.max_token_length"), r.te_id)  # noqa: E731
        emb_paths = {c: emb_store.path(key_hash(ck(c))) for c in set(r.captions.values())}
    concept_of = {im.id: im.concept for im in r.dataset.images}
    session, started = uuid.uuid4().hex, time.time()
    stamps: dict[int, dict] = {}  # {saved epoch: its file's stamp}, kept with its training state
    kept_state: list[int] = []  # the latest state of an epoch that is not saved, replaced as training goes

    ema_stamps: dict[int, dict] = {}  # {saved epoch: its EMA file's stamp}

    def save_entry(network, ekey: dict, epoch: int, step: int, ema: bool = False) -> str:
        stamp = {"session": session, "started": started, "finished": time.time()}
        if "snapshot" in ekey:  # its full-precision weights, to write it again in other output settings
            fkey = {**r.tkey, "snapshot": ekey["snapshot"]}
            full = network.full_weights()
            info = {"epoch": epoch, "step": step, "snapshot": ekey["snapshot"], **stamp}
            with states.put(key_hash(fkey), fkey, info, need=_tensor_bytes(full)) as tmp, open(tmp, "wb") as fh:
                torch_save(full, fh)
        elif ema:
            ema_stamps[epoch] = stamp
        else:
            stamps[epoch] = stamp
        return r.export(network.state_dict_kohya(), ekey, epoch, step, stamp, ema=ema)

    def save(network, epoch: int, step: int, ema: bool = False) -> None:
        if epoch in r.saved and rank.main and ema:  # the network holds the averaged weights now
            r.ema_epochs.append([epoch, save_entry(network, ema_key(wkey, r.plan, epoch), epoch, step, ema=True), step])
        elif epoch in r.saved and rank.main:  # rank 0 alone writes
            r.epochs.append([epoch, save_entry(network, entry_key(wkey, r.plan, "epoch", epoch), epoch, step), step])

    def save_state(epoch: int, state: dict) -> None:
        if not rank.main:
            return
        skey = entry_key(r.tkey, r.plan, "state", epoch)
        info = {"epoch": epoch, "step": state["step"], **stamps.get(epoch, {}),
                **({"ema_stamp": ema_stamps[epoch]} if epoch in ema_stamps else {})}
        with (states.put(key_hash(skey), skey, info, need=_tensor_bytes(state)) as tmp, open(tmp, "wb") as fh):
            torch_save(state, fh)  # through a Python file: a full disk's OSError is the context of torch's error
        ctx.memo["state_epoch"] = epoch  # what a Ctrl-C leaves to continue from (tasks.run_stage says so)
        for old in kept_state:
            states.remove(r.state_hash(old))  # superseded by this later state
        kept_state[:] = [] if epoch in r.saved else [epoch]

    if r.points and rank.main:
        from .. import prompts

        r.sampler = sample_stage.TrainingSampler(ctx, prompts.resolve(p.section("sample"), p.root, None,
                                                                 families.native_size(r.info)),
                                                 ctx.ws.output_dir(name) / "samples")

    def at_point(network, parts: dict, row_id: str, epoch: int, step: int) -> None:
        """A sample point or a step save: save the snapshot it needs, then render its samples."""
        path = None
        if row_id in r.snapshot_points:
            sh = save_entry(network, {**wkey, "snapshot": row_id}, epoch, step)
            r.snapshots.append([row_id, r.snapshot_points[row_id][0], step, sh])
            path = store.path(sh)
        elif row_id != "base":
            path = store.path(r.epochs[-1][1])
        if r.sampler is None or row_id not in r.points:
            return
        label = r.points[row_id][0]
        hashes = ctx.hashes()
        row = sample_stage.Row(row_id, label, path, None if path is None else hashes.sha256(path, tensors_only=True))
        hashes.save()
        r.sampler(network, parts, row)

    pixels = not r.lat_manifest.get("cached", True)
    inp = TrainInputs(
        model_dir=r.mdir, arch=r.info["arch"], device=runtime.device(ctx), samples=r.samples, val_samples=r.val_samples,
        sizes=r.latents,
        latent_path=None if pixels else {i: lat_store.path(r.latents[i]["hash"]) for i in r.latents},
        pixels={i: (ctx.store("resize", ".png").path(e["src"]), e["resized"]) for i, e in r.latents.items()}
        if pixels else None,
        caption=r.captions,
        caption_opts={i: concept_options(p.section("captions"), concept_of[i]) for i in r.latents},
        embedding_path=emb_paths, cfg={s: p.section(s) for s in ("network", "train", "captions", "textemb", "latents")},
        plan=r.plan, sample_points=frozenset(r.points) | frozenset(r.snapshot_points),
        sample=at_point if rank.main and (r.sampler or r.snapshot_points) else None,  # rank 0 alone writes
        resume=resume, save_state=save_state, init_weights=init_weights(ctx), rank=rank,
    )
    if pixels and p.get("train.masked_loss"):  # random crop: each crop cuts its mask from the image's alpha
        from .latents import alpha_sources, working_copy

        resize_store = ctx.store("resize", ".png")
        inp.alpha = {i: (path, *working_copy(resize_store, r.latents[i]["src"]))
                     for i, path in alpha_sources(ctx, {"masked_loss": True}).items() if i in r.latents}
    if rank.main:
        print(render(build_plan(p)), flush=True)
    writer = _tensorboard(ctx, key_hash(wkey), resume["step"] if resume else 0) if rank.main else None
    if writer is not None:
        inp.scalar = writer.add_scalar
    live = None
    if rank.main:  # the dashboard's live view (lorabuild/progress.py), also for a build started from the CLI
        live = LiveLog(live_path(ctx.ws.cache, ctx.name), r.plan, inp.log_rows, inp.val_rows, build_id(), inp.scalar)
        inp.scalar = live.scalar
    state = "failed"
    try:
        train(inp, save)
        state = "done"
    except KeyboardInterrupt:
        state = "stopped"
        raise
    except (FloatingPointError, TrainError) as exc:
        raise StageError(f"train:{ctx.name}: {exc}") from None
    finally:
        if writer is not None:
            writer.close()
        if live is not None:
            live.write(state)
    return inp.log_rows, inp.val_rows


def _repair_inputs(ctx: Context, dataset, lat_manifest: dict, captions: dict, cached: bool) -> None:
    """Before training reads them: re-encode any latent or text embedding that is missing from
    the store or damaged (its bytes not those its checksum recorded), each as its own stage
    would, so the run trains on exactly the entries an uninterrupted build made."""
    from . import latents as latents_stage

    if lat_manifest.get("cached", True):
        latents_stage.repair(ctx, [e["hash"] for e in lat_manifest["items"]])
    if cached:
        textemb.repair(ctx, dataset, list(captions.values()))


def _launch(ctx: Context, launch) -> tuple | None:
    """Train on ``launch.world`` processes (:mod:`lorabuild.worker`); returns rank 0's sampling counts."""
    try:
        results = dist.run_ranks(STAGE, ctx.ws.cache, ctx.ws.root, ctx.project.file, launch)
    except dist.LaunchError as exc:
        raise exc.for_stage(f"train:{ctx.name}") from None
    main = [r for r in results if r["rank"] == 0]
    return tuple(main[0]["sampled"]) if main and main[0].get("sampled") else None


def run(ctx: Context, dataset) -> dict:
    sr = StageRun(ctx, STAGE)
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
    key = run_key(ctx, dataset, captions, latents, te_id, unet_id, cached)
    h = key_hash(key)
    store = ctx.store(STAGE, ".safetensors")
    name = p.output_name
    out_dir = ctx.ws.output_dir(name)
    concept_of = {im.id: im.concept for im in dataset.images}
    every = [Sample(i, tuple(latents[i]["bucket"]), concept_of[i].repeats, concept_of[i].is_reg, concept_of[i].is_val,
                    latents[i].get("image", "")) for i in sorted(latents)]
    samples, held_out = project_samples(every, p.section("train"))
    launch = dist.launch_options(p)
    plan = make_plan(samples, p.get("train.batch_size"), p.get("train.gradient_accumulation_steps"), p.get("train.epochs"),
                     p.get("train.max_steps"), launch.world)
    save_every = p.get("train.save_every_n_epochs")
    saved = {e for e in range(1, plan.epochs + 1) if e == plan.epochs or (save_every and e % save_every == 0)}
    points = sample_stage.in_training_points(p.section("sample"), plan)
    # in-training sample points that need a LoRA file of their own (saved epochs have theirs)
    snapshot_points = {r: v for r, v in points.items() if r != "base" and not (r[0] == "e" and int(r[1:]) in saved)}
    step_saves = step_save_points(p.get("train.save_every_n_steps"), plan)
    snapshot_points = {**step_saves, **snapshot_points}
    rank = ctx.memo.get("rank")  # set in a process started by torchrun (lorabuild.worker)
    whole = Whole()
    entry = store.info(h) if whole(store, h) else None
    wkey = weights_key(key, plan.total_steps)
    states = ctx.store(STAGE, ".pt")  # training states: torch pickles (weights_only), not safetensors
    run = Run(ctx=ctx, dataset=dataset, plan=plan, samples=samples, val_samples=held_out, captions=captions,
              latents=latents, lat_manifest=lat_manifest, cached=cached, te_id=te_id, unet_id=unet_id, info=info,
              mdir=mdir, wkey=wkey, tkey=training_key(wkey), saved=saved, points=points,
              snapshot_points=snapshot_points, epochs=[], snapshots=[], store=store, states=states, ema_epochs=[])
    epoch_h, state_h, snap_h, full_h = run.epoch_hash, run.state_hash, run.snap_hash, run.full_hash
    with_ema = bool(p.get("train.ema"))
    ema_h = run.ema_hash

    def complete(entry: dict | None) -> bool:
        if entry is None or not all(whole(store, eh) for _, eh, *_ in entry.get("epochs", [])):
            return False
        have = {row_id: sh for row_id, _, _, sh in entry.get("snapshots", [])}
        if with_ema and not all(whole(store, eh) for _, eh, *_ in entry.get("ema", [])):
            return False
        return all(r in have and whole(store, have[r]) for r in snapshot_points)

    def resume_point() -> int:
        """The last epoch whose training state, saved epochs (and their EMA files) and snapshots are
        all in the store, each saved file either as it is or as the full-precision weights to write it from."""
        for e0 in range(plan.epochs, 0, -1):
            files = [(store, epoch_h(e), states, state_h(e)) for e in saved if e <= e0]
            files += [(store, ema_h(e), states, state_h(e)) for e in saved if e <= e0 and with_ema]
            files += [(store, snap_h(r), states, full_h(r)) for r, (_, step) in snapshot_points.items()
                      if step <= plan.epoch_end_step(e0)]
            if (states.has(state_h(e0)) and all(a.has(ah) or b.has(bh) for a, ah, b, bh in files)
                    and whole(states, state_h(e0)) and all(whole(a, ah) or whole(b, bh) for a, ah, b, bh in files)):
                return e0
        return 0

    def start(notes: list) -> tuple:
        """(last epoch in the store, its training state, saved epochs, snapshots and EMA files so far)."""
        e0 = resume_point()
        resume = None
        epochs = [[e, epoch_h(e), plan.epoch_end_step(e)] for e in sorted(saved) if e <= e0]
        emas = [[e, ema_h(e), plan.epoch_end_step(e)] for e in sorted(saved) if e <= e0] if with_ema else []
        snapshots = [[r, label, step, snap_h(r)] for r, (label, step) in sorted(snapshot_points.items(), key=lambda kv: kv[1][1])
                     if step <= plan.epoch_end_step(e0)]
        if e0 and rank is None:  # a rank process trains on; its parent writes what is missing
            exported = export_missing(run, e0, whole)
            if exported:
                notes.append(f"wrote {exported} saved file{'s' if exported != 1 else ''} again from the full-precision "
                             "weights in the cache (the output settings changed; nothing trained for them)")
        if e0:
            import torch

            resume = checked_read("train", states.path(state_h(e0)), lambda f: torch.load(f, weights_only=True))
            ctx.memo["state_epoch"] = e0
            notes.append(f"continued from the training state after epoch {e0} (step {resume['step']})"
                         if e0 < plan.epochs else f"assembled from epochs trained before (up to epoch {e0})")
        elif "total_steps" in wkey:
            what = ("warm-up ratio" if p.get("train.lr_scheduler") in LENGTH_FREE_SCHEDULES
                    else f"{p.get('train.lr_scheduler')} schedule")
            notes.append(f"trained from the start: the {what} depends on the run's length, so no earlier run "
                         "can be continued")
        return e0, resume, epochs, snapshots, emas

    sampled = None  # (rendered, reused) by in-training sampling
    if not complete(entry):
        e0, resume, epochs, snapshots, emas = start(sr.notes)
        if e0 < plan.epochs and rank is None:  # before any process trains on them
            _repair_inputs(ctx, dataset, lat_manifest, captions, cached)
        log_rows = list(resume["log"]) if resume else []
        val_rows = list(resume.get("val", [])) if resume else []
        if e0 < plan.epochs and launch.world > 1 and rank is None:
            # Several processes: torchrun starts the ranks; rank 0 saves every epoch and state
            # in the store, and this process assembles them as it assembles a run trained before.
            sampled = _launch(ctx, launch)
            sr.notes.append(f"trained by {launch.world} processes" + (f" on {launch.nnodes} nodes" if launch.nnodes > 1 else ""))
            e0, resume, epochs, snapshots, emas = start([])
            if e0 < plan.epochs:
                raise StageError(f"train:{ctx.name}: the ranks finished but the store has no training state "
                                 f"after epoch {plan.epochs} (only up to epoch {e0})")
            log_rows, val_rows = list(resume["log"]), list(resume.get("val", []))
        elif e0 < plan.epochs:
            run.epochs, run.snapshots, run.ema_epochs = epochs, snapshots, emas
            log_rows, val_rows = _train(run, resume)
            sampled = (run.sampler.rendered, run.sampler.reused) if run.sampler else None
        if rank is not None:
            return {"sampled": sampled}  # a rank's part ends here: its parent assembles and publishes
        final_hash = epochs[-1][1]
        info_ema = {"ema": emas} if with_ema else {}
        with store.put(h, key, {"epochs": epochs, "snapshots": snapshots, "loss": log_rows, "val": val_rows,
                                **info_ema}) as tmp:
            shutil.copyfile(store.path(final_hash), tmp)
        entry = store.info(h)
        sr.computed = 1
    else:
        sr.reused = 1
        sr.notes.append("restored a LoRA trained before with the same inputs")

    # Publish: <name>.safetensors, every saved epoch as <name>-000001.safetensors, the loss log;
    # with train.ema its files beside them (<name>-ema[-000001].safetensors), or in their place
    hashes = ctx.hashes()
    emas = entry.get("ema", []) if with_ema else []
    ema_only = bool(emas) and p.get("train.ema.save") == "ema"
    publish(store.path(emas[-1][1] if ema_only else h), out_dir / f"{name}.safetensors", hashes, sr.notes)
    final_epoch = entry["epochs"][-1][0]
    keep_last = p.get("output.keep_last")

    def per_epoch(rows: list, stem: str) -> dict:
        files = {f"{stem}-{e:06d}.safetensors": eh for e, eh, *_ in rows if e != final_epoch}
        if keep_last:  # the final LoRA counts as one of the last N (kohya save_last_n_epochs)
            files = dict(sorted(files.items())[-(keep_last - 1):]) if keep_last > 1 else {}
        return files

    wanted = per_epoch(emas if ema_only else entry["epochs"], name)
    if emas and not ema_only:
        wanted.update({f"{name}-ema.safetensors": emas[-1][1], **per_epoch(emas, f"{name}-ema")})
    # step saves (kohya naming <name>-step00000500.safetensors), the last N of them with keep_last
    steps = [[st, sh] for row_id, _, st, sh in entry.get("snapshots", []) if row_id in step_saves]
    step_files = {f"{name}-step{st:08d}.safetensors": sh for st, sh in steps}
    if keep_last:
        step_files = dict(sorted(step_files.items())[-keep_last:])
    wanted.update(step_files)
    for pattern in ("[0-9]" * 6, "step" + "[0-9]" * 8, "ema", "ema-" + "[0-9]" * 6):
        for old in out_dir.glob(f"{name}-{pattern}.safetensors"):
            if old.name not in wanted:
                remove(old, sr.notes)  # a locked one is kept, with a warning
    for side in pending(out_dir, f"{name}*"):  # a locked publish of a file no longer wanted
        if side.name.replace(".new.", ".") not in wanted and side.name != f"{name}.new.safetensors":
            remove(side, sr.notes)
    for fname, eh in wanted.items():
        publish(store.path(eh), out_dir / fname, hashes, sr.notes)
    hashes.save()
    _write_loss_csv(out_dir / "loss.csv", entry.get("loss", []))
    val_csv = out_dir / "val_loss.csv"
    if entry.get("val"):
        _write_csv(val_csv, ["epoch", "step", "val_loss"], entry["val"])
    elif val_csv.exists():
        val_csv.unlink()
    if entry.get("loss"):
        from ..report import loss_plot

        loss_plot(entry["loss"], out_dir / "loss.png", f"{name}: loss and learning rate", entry.get("val"))
    if sampled is not None:
        sr.notes.append(f"sampled while training: {sampled[0]} images rendered, {sampled[1]} reused")
    # only the snapshots the current sample settings ask for (an entry may hold more)
    snaps = [s for s in entry.get("snapshots", []) if s[0] in points]
    # the training states of saved epochs (what `epochs` raised later continues from; kept by gc)
    kept = [[e, state_h(e)] for e, *_ in entry["epochs"] if states.has(state_h(e))]
    # the snapshots' full-precision weights (kept by gc: other output settings are written from them)
    full = [[row_id, full_h(row_id)] for row_id, *_ in entry.get("snapshots", []) if states.has(full_h(row_id))]
    ema_rows = {"ema": emas, "ema_save": p.get("train.ema.save")} if emas else {}
    return sr.finish([{"id": name, "hash": h, "epochs": entry["epochs"], "snapshots": snaps, "steps": steps, **ema_rows,
                       "states": kept, "full": full}])


def _deps(t: Inputs) -> list[str]:
    return ([t.manifest("latents"), t.manifest("textemb"), *t.tagged] + t.captions() + t.weights("unet", "text_encoder")
            + t.resolved("network.weights"))


def _extra(project, cfg: dict) -> dict:
    out = {"network": blocks.keyed(cfg["network"])}  # unset new options leave an existing build up to date
    world = dist.launch_options(project).world
    if world > 1:  # `lorabuild train --nproc/--nnodes` changes the global batch, so the LoRA it trains
        out["world"] = world
    return out


TASK = Stage(STAGE, VERSION, "latents + captions → the LoRA: output/<name>/<name>.safetensors",
             params=EXTRA_PARAMS + MODEL + SAMPLE_PARAMS + ("device",), sections=SECTIONS, deps=_deps, run=run,
             extra=_extra, outputs=lambda t: [t.lora()],
             # a publish that found its output locked (publish.py) leaves the task out of date until redone
             waits=lambda t: [(up_to_date, (str(t.out_dir), f"{t.project.output_name}*"))])
