"""The train stage's launch: the trainer's inputs, what training saves as it goes, and the run
itself, in this process (or as one rank started by torchrun) or on ``train.processes`` ranks.

The stage (:mod:`lorabuild.stages.train`) decides what to train from the run plan
(:func:`lorabuild.train.plan.decide`); the files this writes go through
:class:`lorabuild.train.publish.Exporter`.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .. import cpuconv
from ..cache import key_hash
from ..captions import concept_options
from ..progress import LiveLog, live_path
from ..train.plan import RunPlan, Start, ema_key, entry_key
from ..train import dist
from ..workspace import build_id
from . import runtime, textemb
from . import sample as sample_stage
from .base import Context, StageError


@dataclass(frozen=True)
class RunInputs:
    """What one training run reads: the images' captions and latents, and the base model."""

    dataset: object
    concept_of: dict  # {image id: its concept}
    captions: dict  # {image id: caption} of the images the latents hold
    latents: dict  # {image id: latents manifest item}
    lat_manifest: dict
    cached: bool  # text embeddings from the textemb stage's cache
    te_id: str
    unet_id: str
    mdir: Path
    info: dict  # models.model_info
    samples: list  # what an epoch trains on (train.plan.project_samples)
    val_samples: list  # validation images: measured, never trained on
    init_weights: Path | None  # network.weights, resolved
    frozen: tuple = ()  # text encoders whose outputs textemb cached while the others train (T5 while CLIP does)


def _tensor_bytes(obj) -> int:
    """The bytes of every tensor in a (nested) training state: about what saving it needs."""
    if hasattr(obj, "element_size"):
        return obj.element_size() * obj.nelement()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


class Saver:
    """The trainer's callbacks: saved epochs (and their EMA files), the snapshots of sample points
    and step saves (with their full-precision weights), training states, in-training samples.
    What it saves is appended to ``start``'s rows. Rank 0 alone writes."""

    def __init__(self, ctx: Context, rp: RunPlan, start: Start, exporter, states, sampler=None):
        self.ctx, self.rp, self.start, self.exporter, self.states, self.sampler = ctx, rp, start, exporter, states, sampler
        self.rank = ctx.memo.get("rank", dist.SINGLE)
        self.session, self.started = uuid.uuid4().hex, time.time()
        self.stamps: dict[int, dict] = {}  # {saved epoch: its file's stamp}, kept with its training state
        self.ema_stamps: dict[int, dict] = {}  # {saved epoch: its EMA file's stamp}
        self.kept_state: list[int] = []  # the latest state of an epoch that is not saved, replaced as training goes

    def entry(self, network, ekey: dict, epoch: int, step: int, ema: bool = False) -> str:
        """Save ``network`` as the entry ``ekey``; a snapshot's full-precision weights go beside it."""
        from torch import save as torch_save

        stamp = {"session": self.session, "started": self.started, "finished": time.time()}
        if "snapshot" in ekey:  # its full-precision weights, to write it again in other output settings
            fkey = {**self.rp.tkey, "snapshot": ekey["snapshot"]}
            full = network.full_weights()
            info = {"epoch": epoch, "step": step, "snapshot": ekey["snapshot"], **stamp}
            with self.states.put(key_hash(fkey), fkey, info, need=_tensor_bytes(full)) as tmp, open(tmp, "wb") as fh:
                torch_save(full, fh)
        elif ema:
            self.ema_stamps[epoch] = stamp
        else:
            self.stamps[epoch] = stamp
        return self.exporter.export(network.state_dict_kohya(), ekey, epoch, step, stamp, ema=ema)

    def epoch(self, network, epoch: int, step: int, ema: bool = False) -> None:
        """train.loop.train's ``save``: the end of ``epoch`` (with ``ema``, the network holds the averaged weights)."""
        rp = self.rp
        if epoch in rp.saved and self.rank.main and ema:
            self.start.emas.append([epoch, self.entry(network, ema_key(rp.wkey, rp.plan, epoch), epoch, step, ema=True),
                                    step])
        elif epoch in rp.saved and self.rank.main:
            self.start.epochs.append([epoch, self.entry(network, entry_key(rp.wkey, rp.plan, "epoch", epoch), epoch, step),
                                      step])

    def state(self, epoch: int, state: dict) -> None:
        """TrainInputs.save_state: the training state after ``epoch``, what a later run continues from."""
        from torch import save as torch_save

        if not self.rank.main:
            return
        skey = entry_key(self.rp.tkey, self.rp.plan, "state", epoch)
        info = {"epoch": epoch, "step": state["step"], **self.stamps.get(epoch, {}),
                **({"ema_stamp": self.ema_stamps[epoch]} if epoch in self.ema_stamps else {})}
        with (self.states.put(key_hash(skey), skey, info, need=_tensor_bytes(state)) as tmp, open(tmp, "wb") as fh):
            torch_save(state, fh)  # through a Python file: a full disk's OSError is the context of torch's error
        self.ctx.memo["state_epoch"] = epoch  # what a Ctrl-C leaves to continue from (tasks.run_stage says so)
        for old in self.kept_state:
            self.states.remove(self.rp.state_hash(old))  # superseded by this later state
        self.kept_state[:] = [] if epoch in self.rp.saved else [epoch]

    def point(self, network, parts: dict, row_id: str, epoch: int, step: int) -> None:
        """TrainInputs.sample: a sample point or a step save: save the snapshot it needs, then render its samples."""
        rp, store = self.rp, self.exporter.store
        path = None
        if row_id in rp.snapshot_points:
            sh = self.entry(network, {**rp.wkey, "snapshot": row_id}, epoch, step)
            self.start.snapshots.append([row_id, rp.snapshot_points[row_id][0], step, sh])
            path = store.path(sh)
        elif row_id != "base":
            path = store.path(self.start.epochs[-1][1])
        if self.sampler is None or row_id not in rp.points:
            return
        hashes = self.ctx.hashes()
        row = sample_stage.Row(row_id, rp.points[row_id][0], path,
                               None if path is None else hashes.sha256(path, tensors_only=True))
        hashes.save()
        self.sampler(network, parts, row)


def trainer_inputs(ctx: Context, inp: RunInputs, rp: RunPlan, resume: dict | None, saver: Saver):
    """train.loop.TrainInputs for this run: the store paths of its latents (or its resized images, for
    random crop) and text embeddings, the settings, and ``saver``'s callbacks."""
    from ..train.loop import TrainInputs

    p, rank = ctx.project, saver.rank
    lat_store = ctx.store("latents", ".safetensors")
    emb_paths = None
    if inp.cached:
        emb_store = ctx.store("textemb", ".safetensors")
        clip_skip, max_tokens = p.get("textemb.clip_skip"), p.get("textemb.max_token_length")
        options = textemb.text_options(ctx)  # the family's own (FLUX's T5 length and mask)
        emb_paths = {c: emb_store.path(key_hash(textemb.item_key(c, clip_skip, max_tokens, inp.te_id, options)))
                     for c in set(inp.captions.values())}
    frozen_paths = None
    if inp.frozen:  # T5's outputs cached while CLIP trains
        store = ctx.store("textemb", ".safetensors")
        frozen_paths = {it.id: store.path(it.hash)
                        for it in textemb.frozen_items(ctx, inp.captions.values(), list(inp.frozen))}
    pixels = not inp.lat_manifest.get("cached", True)
    tin = TrainInputs(
        model_dir=inp.mdir, arch=inp.info["arch"], device=runtime.device(ctx), samples=inp.samples,
        val_samples=inp.val_samples, sizes=inp.latents,
        latent_path=None if pixels else {i: lat_store.path(inp.latents[i]["hash"]) for i in inp.latents},
        pixels={i: (ctx.store("resize", ".png").path(e["src"]), e["resized"]) for i, e in inp.latents.items()}
        if pixels else None,
        caption=inp.captions,
        caption_opts={i: concept_options(p.section("captions"), inp.concept_of[i]) for i in inp.latents},
        embedding_path=emb_paths, frozen_path=frozen_paths, frozen_parts=tuple(inp.frozen),
        cfg={s: p.section(s) for s in ("network", "train", "captions", "textemb", "latents")},
        plan=rp.plan, sample_points=frozenset(rp.points) | frozenset(rp.snapshot_points),
        sample=saver.point if rank.main and (saver.sampler or rp.snapshot_points) else None,  # rank 0 alone writes
        resume=resume, save_state=saver.state, init_weights=inp.init_weights, rank=rank,
        conv_choices=cpuconv.choices_file(),  # per machine, shared by workspaces
    )
    if pixels and p.get("train.masked_loss"):  # random crop: each crop cuts its mask from the image's alpha
        from .latents import alpha_sources, working_copy

        resize_store = ctx.store("resize", ".png")
        tin.alpha = {i: (path, *working_copy(resize_store, inp.latents[i]["src"]))
                     for i, path in alpha_sources(ctx, {"masked_loss": True}).items() if i in inp.latents}
    return tin


def _sampler(ctx: Context, inp: RunInputs):
    """The in-training sampler, rendering into the sample stage's store."""
    from .. import families, prompts

    p = ctx.project
    return sample_stage.TrainingSampler(ctx, prompts.resolve(p.section("sample"), p.root, None,
                                                             families.native_size(inp.info)),
                                        ctx.ws.output_dir(p.output_name) / "samples")


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


def train_here(ctx: Context, inp: RunInputs, rp: RunPlan, start: Start, resume: dict | None, exporter,
               states) -> tuple[list, list, tuple | None]:
    """Train in this process from ``resume`` (a saved training state, when given), appending what it
    saves to ``start``'s rows; returns (loss log, validation log, (rendered, reused) by in-training sampling)."""
    from .preview import build_plan, render
    from ..train.loop import TrainError, train

    rank = ctx.memo.get("rank", dist.SINGLE)
    sampler = _sampler(ctx, inp) if rp.points and rank.main else None
    saver = Saver(ctx, rp, start, exporter, states, sampler)
    tin = trainer_inputs(ctx, inp, rp, resume, saver)
    if rank.main:
        print(render(build_plan(ctx.project)), flush=True)
    writer = _tensorboard(ctx, key_hash(rp.wkey), resume["step"] if resume else 0) if rank.main else None
    if writer is not None:
        tin.scalar = writer.add_scalar
    live = None
    if rank.main:  # the dashboard's live view (lorabuild/progress.py), also for a build started from the CLI
        live = LiveLog(live_path(ctx.ws.cache, ctx.name), rp.plan, tin.log_rows, tin.val_rows, build_id(), tin.scalar)
        tin.scalar = live.scalar
    runtime.release_frozen()  # the cache stages' VAE is not the trainer's
    state = "failed"
    try:
        train(tin, saver.epoch)
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
    return tin.log_rows, tin.val_rows, (sampler.rendered, sampler.reused) if sampler else None


def on_ranks(ctx: Context, stage: str, launch) -> tuple | None:
    """Train on ``launch.world`` processes (:mod:`lorabuild.train.worker`); returns rank 0's sampling counts."""
    try:
        results = dist.run_ranks(stage, ctx.ws.cache, ctx.ws.root, ctx.project.file, launch)
    except dist.LaunchError as exc:
        raise exc.for_stage(f"train:{ctx.name}") from None
    main = [r for r in results if r["rank"] == 0]
    return tuple(main[0]["sampled"]) if main and main[0].get("sampled") else None
