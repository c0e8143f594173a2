"""The LoRA training loop on cached latents (and cached text embeddings when they serve).

Reads top to bottom: set up → for each epoch, for each batch: noise → loss → step →
log → save. Everything random is drawn from generators seeded by
(project seed, epoch, image, repeat), so a run is reproducible bit for bit on CPU and
does not depend on batch order bookkeeping.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import dist
from .. import objective as objectives
from ..cache import checked_read
from ..captions import random_caption
from .losses import multires_noise, offset_noise, per_sample_loss, perturbed_noise
from .plan import Sample, TrainPlan, derive_seed, epoch_batches
from .preserve import base_model, base_targets, reg_rows


class TrainError(Exception):
    """Training cannot start or go on; the message names the setting or file at fault."""


@dataclass
class TrainInputs:
    """Everything the loop reads, resolved by the train stage: paths and plain settings."""

    model_dir: Path
    arch: str
    device: object  # torch.device
    samples: list[Sample]
    latent_path: dict[str, Path] | None  # image id → latent entry; None: random crop, encode here
    pixels: dict[str, tuple[Path, list]] | None  # image id → (working copy, resize size) for random crop
    caption: dict[str, str]  # image id → caption after the fixed options
    caption_opts: dict[str, dict]  # image id → its concept's caption options
    embedding_path: dict[str, Path] | None  # caption → cached embedding; None: encode on the fly
    cfg: dict  # the project's sections (network, train, captions, textemb, latents)
    plan: TrainPlan
    log_rows: list = field(default_factory=list)
    val_samples: list[Sample] = field(default_factory=list)  # held-out images: validation loss every epoch
    val_rows: list = field(default_factory=list)  # (epoch, step, validation loss)
    # In-training sample points by row id ("base" before the first step, "s000050" after
    # optimizer step 50, "e000002" after epoch 2 is saved); the callback renders them.
    sample_points: frozenset[str] = frozenset()
    sample: Callable[[object, dict, str, int, int], None] | None = None
    init_weights: Path | None = None  # network.weights, resolved
    resume: dict | None = None  # a training state saved by ``save_state``: continue after its epoch
    save_state: Callable[[int, dict], None] | None = None  # called at the end of every epoch
    sizes: dict[str, dict] = field(default_factory=dict)  # image id → latents manifest entry (SDXL time_ids)
    scalar: Callable[[str, float, int], None] | None = None  # (tag, value, step): a live log such as TensorBoard
    rank: dist.Rank = dist.SINGLE  # with several processes: this one's share of each epoch (see train/dist.py)
    # random crop with train.masked_loss: image id → (source image, working size, resize filter) of
    # the images with alpha, whose mask is cut with each crop (cached latents carry theirs)
    alpha: dict[str, tuple] = field(default_factory=dict)
    # the text encoders train but these (T5) do not: caption → their cached output, never loaded here
    frozen_path: dict[str, Path] | None = None
    frozen_parts: tuple[str, ...] = ()
    conv_choices: Path | None = None  # the CPU's convolution-path choices (cpuconv.py), kept per machine


def _dtype(mixed_precision: str):
    import torch

    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def _load_models(inp: TrainInputs):
    from .. import models, precision

    compute = _dtype(inp.cfg["train"]["mixed_precision"])
    base = inp.cfg["train"].get("base_precision", "auto")  # kohya fp8_base: stored apart from the compute dtype
    weight_dtype = precision.load_dtype(base, compute)
    unet = models.load_unet(inp.model_dir, device=inp.device, dtype=weight_dtype)
    precision.store(unet, base, weight_dtype)
    tes, toks, vae = [], [], None
    if inp.pixels is not None:
        vae = models.load_vae(inp.model_dir, device=inp.device)  # fp32: the SD VAE overflows in fp16
    if inp.embedding_path is None:  # one text encoder, or SDXL's two
        loaded = [p for p in models.text_parts(inp.model_dir) if p not in inp.frozen_parts]
        for part in loaded:
            tes.append(models.load_text_encoder(inp.model_dir, device=inp.device, dtype=weight_dtype, which=part))
            precision.store(tes[-1], base, weight_dtype)
            toks.append(models.load_tokenizer(inp.model_dir, which=part.replace("text_encoder", "tokenizer")))
        if inp.frozen_parts and inp.rank.main:
            print(f"train: text encoders loaded: {', '.join(loaded)}; {', '.join(inp.frozen_parts)} not loaded "
                  "(its outputs come from the textemb cache)", flush=True)
    sched = models.load_noise_scheduler(inp.model_dir)
    if inp.cfg["train"].get("zero_terminal_snr"):  # kohya zero_terminal_snr: betas rescaled so ᾱ_T = 0
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(sched.config, rescale_betas_zero_snr=True)
    return unet, tes, toks, vae, sched


def _memory_options(tr: dict, unet, trained_tes: list) -> None:
    """Gradient checkpointing and the attention backend, on the models the loss flows through."""
    if tr["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
        for te in trained_tes:
            te.gradient_checkpointing_enable()
    if tr["attention"] == "xformers":
        try:
            unet.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError) as exc:
            raise TrainError(f"train.attention: xformers is not usable here ({exc}); "
                             "install the xformers extra on a CUDA machine, or use sdpa") from None


def _compiled(tr: dict, unet, device):
    """The UNet the loss calls: ``torch.compile``d with ``train.compile`` (after the LoRA is
    applied, so its modules are traced in). Compilation happens at the first call; on CPU
    inductor builds C++ kernels, so a missing compiler is named here rather than deep
    inside that call."""
    import os
    import shutil
    import sys

    import torch

    if not tr.get("compile"):
        return unet
    # inductor's C++ compilers: MSVC's cl on Windows (inductor's cpp_builder), g++/clang++ elsewhere
    compilers = ("cl",) if sys.platform == "win32" else (os.environ.get("CXX", "g++"), "g++", "clang++", "c++")
    if device.type == "cpu" and not any(shutil.which(c) for c in compilers):
        hint = ("Visual Studio's C++ build tools, from a Developer PowerShell" if sys.platform == "win32"
                else "one (e.g. apt-get install g++)")
        raise TrainError(f"train.compile: torch.compile on CPU needs a C++ compiler ({' or '.join(dict.fromkeys(compilers))}) "
                         f"on PATH, and none was found; install {hint} or set train.compile: false")
    return torch.compile(unet)


def glibc():
    """The C library this process runs on when it is glibc on Linux (mallopt, malloc_trim), else None."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):  # elsewhere CDLL(None) raises TypeError (Windows), or finds no glibc
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


class LeanHeap:
    """``train.lean_cpu_memory``: while the forward pass runs, glibc serves allocations of 1 MiB
    and more that the heap's free space cannot hold with their own mappings, returned to the
    system the moment they are freed; the backward pass uses the heap as usual, and after it the
    heap is trimmed, so its free space holds no memory until it is used again.

    What it fixes: by default glibc serves tensors under 32 MiB from its heap, where the
    forward pass's short-lived tensors, freed between the activations kept for backward, leave
    holes the next step cannot always reuse, so the process holds more than it uses (at 512 px
    on the SD 1.5 UNet: 6.84 GiB peak by default, 6.19 with this option). Mapping costs page
    faults, hence the option (bench/RESULTS.md has both sides). On a GPU the activations are not
    in this process's heap, so it applies to CPU training on Linux (glibc) only.
    """

    M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter; setting it also stops the dynamic threshold
    FORWARD, BACKWARD = 1 << 20, 32 << 20  # 32 MiB: the ceiling glibc's dynamic threshold climbs to

    def __init__(self, wanted: bool, device):
        self.libc = None
        if not wanted:
            return
        libc = glibc()
        usable = libc is not None and device.type == "cpu" and libc.mallopt(self.M_MMAP_THRESHOLD, self.BACKWARD) == 1
        self.libc = libc if usable else None
        if self.libc is None:
            print(f"train: lean_cpu_memory has no effect here (it needs CPU training with glibc on Linux; "
                  f"device {device.type})", flush=True)

    def forward(self) -> None:
        if self.libc is not None:
            self.libc.mallopt(self.M_MMAP_THRESHOLD, self.FORWARD)

    def backward(self) -> None:
        if self.libc is not None:
            self.libc.mallopt(self.M_MMAP_THRESHOLD, self.BACKWARD)

    def done(self) -> None:
        if self.libc is not None:
            self.libc.malloc_trim(0)


def _guarded(fn, *args):
    """``fn(*args)``, with a failed ``torch.compile`` reported as the setting at fault."""
    try:
        return fn(*args)
    except Exception as exc:
        if type(exc).__module__.startswith("torch._dynamo") or type(exc).__module__.startswith("torch._inductor"):
            raise TrainError(f"train.compile: torch.compile failed ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:300] if str(exc) else ''}); set train.compile: false") from exc
        raise


def _random_crop_latent(inp: TrainInputs, sample: Sample, g, vae):
    """The uncached path (kohya ``random_crop``): a random bucket-sized window, encoded now;
    (latent, crop's left/top, flipped, its alpha mask or None)."""
    import torch

    from ..pixels import bucket_mask, bucket_pixels, encode, to_tensor

    path, resized = inp.pixels[sample.id]
    bw, bh = sample.bucket
    left = int(torch.randint(0, resized[0] - bw + 1, (1,), generator=g))
    top = int(torch.randint(0, resized[1] - bh + 1, (1,), generator=g))
    x = to_tensor([bucket_pixels(path, resized, (left, top, left + bw, top + bh), inp.cfg["latents"]["interpolation"])])
    flipped = inp.cfg["latents"]["flip"] and bool(torch.randint(0, 2, (1,), generator=g))
    if flipped:
        x = torch.flip(x, dims=[3])
    with torch.no_grad():
        lat = encode(vae, x)[0].float().cpu()
    mask = None
    if sample.id in inp.alpha:
        source, working, resize_filter = inp.alpha[sample.id]
        mask = bucket_mask(source, working, resize_filter, resized, (left, top, left + bw, top + bh),
                           inp.cfg["latents"]["interpolation"], lat.shape[-2:])
        if mask is not None and flipped:
            mask = torch.flip(mask, dims=[-1])
    return lat, (left, top), flipped, mask


def _time_ids(inp: TrainInputs, sample: Sample, crop_lt=None, flipped: bool = False) -> list[float]:
    """SDXL's size/crop conditioning (kohya, diffusers): original (h, w), crop (top, left) in the
    resized image, target (h, w) = the bucket. A mirrored image is cropped from the other side."""
    e = inp.sizes.get(sample.id, {})
    bw, bh = sample.bucket
    resized = e.get("resized") or [bw, bh]
    ow, oh = e.get("orig_size") or resized
    left, top = crop_lt if crop_lt is not None else (e.get("crop") or [0, 0])[:2]
    if flipped:
        left = resized[0] - left - bw
    return [oh, ow, top, left, bh, bw]


def _conditioning(inp: TrainInputs, captions: list[str], toks, tes):
    """(hidden states, pooled or None): cached embeddings when they serve, else encoded now."""
    import torch
    from safetensors.torch import load_file

    from ..families import family

    fam = family(inp.arch)
    if inp.embedding_path is None:
        text, frozen = inp.cfg["textemb"], {}
        if inp.frozen_path is not None:  # T5's outputs from the textemb cache, CLIP's encoded now
            from ..precision import to_device

            states = [checked_read("textemb", inp.frozen_path[c], lambda f: load_file(str(f)))["hidden"]
                      for c in captions]
            frozen = {"t5_hidden": to_device(torch.stack(states), inp.device)}
        return fam.condition(toks, tes, captions, text["clip_skip"], text["max_token_length"],
                             **fam.text_options(text, inp.model_dir), **frozen)
    stored = [checked_read("textemb", inp.embedding_path[c], lambda f: load_file(str(f))) for c in captions]
    pooled = torch.stack([s["pooled"] for s in stored]) if fam.pooled else None
    return torch.stack([s["hidden"] for s in stored]), pooled


def _added(inp: TrainInputs, pooled, time_ids: list, obj) -> dict | None:
    """The denoiser's extra inputs, the family's (SDXL's pooled text and size/crop ids; nothing for
    SD 1.x/2.x) and the objective's (a flow model's embedded guidance)."""
    from ..families import family
    from ..precision import to_device

    added = obj.added(family(inp.arch).added_inputs(pooled, time_ids), len(time_ids))
    return None if added is None else {k: to_device(v, inp.device) for k, v in added.items()}


def _stored_latent(inp: TrainInputs, image_id: str, flipped: bool):
    """(cached latent, its alpha mask or None) of an image, mirrored when ``flipped``."""
    import torch
    from safetensors.torch import load_file

    stored = checked_read("latents", inp.latent_path[image_id], lambda f: load_file(str(f)))
    mask = stored.get("mask") if inp.cfg["train"].get("masked_loss") else None
    if mask is not None and flipped:
        mask = torch.flip(mask, dims=[-1])
    return stored["latent_flip" if flipped else "latent"], mask


def _mask_batch(masks: list, latents: list, device):
    """The batch's masks ``[B, h, w]`` (all ones for an image without alpha), or None when no
    image of the batch has one."""
    import torch

    from ..precision import to_device

    if all(m is None for m in masks):
        return None
    stacked = torch.stack([m if m is not None else torch.ones(lat.shape[-2:]) for m, lat in zip(masks, latents)])
    return to_device(stacked, device)


def _batch_inputs(inp: TrainInputs, batch, epoch: int, obj, toks, tes, vae, base_text=None):
    """Latents, noise, timesteps and conditioning of one batch, each drawn per sample (on the
    CPU, from per-sample generators, so a run is the same on every device), then moved; the noise the
    noisy input is made from comes next (the noise itself unless ip_noise_gamma perturbs it), and last
    the base text encoders' (hidden, added) of the same captions when ``base_text`` (a context in which
    the LoRA is off) is given and the batch has regularization items, else None: ``train.reg_target:
    base`` with the text encoder trained."""
    import torch

    from ..precision import to_device

    seed, flip = inp.cfg["train"]["seed"], inp.cfg["latents"]["flip"]
    tr = inp.cfg["train"]
    latents, noises, steps, captions, weights, time_ids, masks, inputs = [], [], [], [], [], [], [], []
    for sample, rep in batch:
        g = torch.Generator().manual_seed(derive_seed(seed, epoch, sample.id, rep))
        if inp.latent_path is None:
            lat, crop_lt, use_flip, mask = _random_crop_latent(inp, sample, g, vae)
        else:
            use_flip = flip and bool(torch.randint(0, 2, (1,), generator=g).item())
            (lat, mask), crop_lt = _stored_latent(inp, sample.id, use_flip), None
        latents.append(lat)
        masks.append(mask)
        time_ids.append(_time_ids(inp, sample, crop_lt, use_flip))
        noise = torch.randn(lat.shape, generator=g)
        if tr["noise_offset"]:
            noise = offset_noise(noise, tr["noise_offset"], g, tr.get("noise_offset_random_strength", False),
                                 tr.get("adaptive_noise_scale"), lat)
        elif tr["multires_noise_iterations"]:
            noise = multires_noise(noise, tr["multires_noise_iterations"], tr["multires_noise_discount"], g)
        noises.append(noise)
        steps.append(obj.draw(g, lat))  # a DDPM step, or a flow model's σ
        # drawn after the timestep, as kohya does; nothing is drawn when it is off
        inputs.append(perturbed_noise(noise, tr.get("ip_noise_gamma"), g, tr.get("ip_noise_gamma_random_strength", False)))
        rng = random.Random(derive_seed("caption", seed, epoch, sample.id, rep))
        captions.append(random_caption(inp.caption[sample.id], inp.caption_opts[sample.id], rng, epoch))
        weights.append(inp.cfg["train"]["prior_loss_weight"] if sample.is_reg else 1.0)
    hidden, pooled = _conditioning(inp, captions, toks, tes)
    dev = inp.device
    base = None
    if base_text is not None and any(sample.is_reg for sample, _ in batch):  # only rows to fit to the base
        with torch.no_grad(), base_text():
            base_hidden, base_pooled = _conditioning(inp, captions, toks, tes)
        base = (to_device(base_hidden, dev), _added(inp, base_pooled, time_ids, obj))
    noise = to_device(torch.stack(noises), dev)
    noise_in = noise if all(a is b for a, b in zip(inputs, noises)) else to_device(torch.stack(inputs), dev)
    return (to_device(torch.stack(latents), dev), noise, to_device(torch.cat(steps), dev),
            to_device(hidden, dev), to_device(torch.tensor(weights), dev), _added(inp, pooled, time_ids, obj),
            _mask_batch(masks, latents, dev), noise_in, base)


def _device_rng(device, state: dict | None = None) -> dict:
    """The accelerator's global generator (rank dropout draws its masks there): its state to save,
    or, given a saved ``state``, restored from it. Nothing on the CPU, whose generator is saved apart."""
    import torch

    if device.type != "cuda":
        return {}
    if state is None:
        return {"cuda_rng": torch.cuda.get_rng_state(device)}
    if "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return {}


MAX_NORM_LOGS = ("keys_scaled", "average_key_norm", "max_key_norm")  # kohya's names, after scale_weight_norms
def validation_loss(inp: TrainInputs, unet, obj, toks, tes, vae, autocast) -> float:
    """Mean loss over the held-out images at fixed timesteps and fixed noise (seeded per image),
    with each image's fixed caption: the same measurement every epoch, so its curve compares.
    With ``train.masked_loss`` an image's mask weighs its loss as in training (kohya measures
    validation unmasked; here the curve then measures what training optimises)."""
    import torch

    from ..families import family

    seed, predict = inp.cfg["train"]["seed"], family(inp.arch).predict
    ts = obj.fixed_steps(inp.device)
    losses = []
    with torch.no_grad():
        for sample in inp.val_samples:
            image_id = sample.id
            g = torch.Generator().manual_seed(derive_seed("validation", seed, image_id))
            crop_lt = None
            if inp.latent_path is None:
                lat, crop_lt, _, mask = _random_crop_latent(inp, sample, g, vae)
            else:
                lat, mask = _stored_latent(inp, image_id, False)
            hidden, pooled = _conditioning(inp, [inp.caption[image_id]], toks, tes)
            k = len(ts)
            lat = lat[None].expand(k, *lat.shape).to(inp.device)
            noise = torch.randn(lat.shape, generator=g).to(inp.device)
            noisy, target = obj.noisy_target(lat, noise, noise, ts)
            added = _added(inp, None if pooled is None else pooled.expand(k, -1),
                           [_time_ids(inp, sample, crop_lt)] * k, obj)
            with autocast:
                pred = predict(unet, noisy, ts, hidden.to(inp.device).expand(k, -1, -1), added)
            mask = None if mask is None else mask[None].expand(k, *mask.shape)
            losses.append(float(per_sample_loss(pred, target, "l2", 0.0, mask).mean()))
    return sum(losses) / len(losses)


READBACK_SECONDS = 1.0  # how often a single process reads its losses back from the device


class LossReadback:
    """The losses of the steps since the last read, kept where they were computed until they are
    read together. Reading a loss (``loss.item()``, ``if not torch.isfinite(loss)``) waits until
    the device has finished everything queued, so reading every step leaves a GPU idle while the
    host prepares the next batch. They are read at the first step, then about once a
    ``READBACK_SECONDS``, before every in-training sample point and step save, and at the end of
    each epoch (before validation, saving and the training state); with several processes every
    step, because the log's all-reduce must come at the same point of every rank. A non-finite loss
    stops training naming the first step that had one, before anything after it is saved. On
    the CPU nothing waits, and the values and the log are the same as when read at once."""

    def __init__(self, log, every_step: bool):
        self.log = log  # log(step, epoch, loss, lr, seconds, last, running): one optimizer step
        self.every_step = every_step
        self.pending: list = []  # (epoch, step, loss tensor, live, (lr, seconds, last) at a step's end)
        self.read_at = None

    def add(self, epoch: int, step: int, loss, live: bool, ends=None) -> None:
        self.pending.append((epoch, step, loss.detach(), live, ends))

    def due(self, step: int) -> bool:
        return (self.every_step or step == 1 or self.read_at is None
                or time.perf_counter() - self.read_at >= READBACK_SECONDS)

    def read(self, running: list) -> None:
        import torch

        if not self.pending:
            return
        values = torch.stack([p[2] for p in self.pending]).tolist()  # one wait for the device
        pending, self.pending = self.pending, []
        for (epoch, step, _, live, ends), value in zip(pending, values):
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at epoch {epoch}, step {step}: stopping")
            if live:
                running.append(value)
            if ends is not None:
                self.log(step, epoch, value, *ends, running)
        self.read_at = time.perf_counter()


def _ema(tr: dict, network, params: list):
    """The moving average of ``train.ema`` (lorabuild/train/ema.py), or None when it is off."""
    if not tr.get("ema"):
        return None
    from .ema import AdapterEMA

    e = tr["ema"]
    return AdapterEMA(network, params, e["decay"], e["update_after_step"], e["every_n_steps"])


def train(inp: TrainInputs, save: Callable[..., None]) -> None:
    """Train; ``save(network, epoch, step)`` is called at the end of every epoch, and with
    ``train.ema`` once more as ``save(network, epoch, step, ema=True)`` while the network holds
    the averaged weights."""
    import torch
    from diffusers.optimization import get_scheduler
    from tqdm import tqdm

    from . import optimizers
    from .. import cpuconv
    from ..lora.adapter import from_config
    from ..families import family
    from ..lora.network import NetworkConfigError

    torch.manual_seed(inp.cfg["train"]["seed"])  # LoRA init (kaiming) draws from the global RNG
    net_cfg, tr = inp.cfg["network"], inp.cfg["train"]
    unet, tes, toks, vae, sched = _load_models(inp)
    train_te = net_cfg["train_text_encoder"] and bool(tes)
    _memory_options(tr, unet, tes if train_te else [])
    try:
        network = from_config(net_cfg, unet, tes, inp.arch, train_text_encoder=train_te)
    except NetworkConfigError as exc:
        raise TrainError(str(exc)) from None
    if inp.init_weights is not None:
        try:
            fresh = network.load_weights(inp.init_weights, strict=False)  # kohya network_weights
        except ValueError as exc:
            raise TrainError(f"network.weights: {exc}") from None
        if fresh:
            print(f"train: {len(fresh)} LoRA modules are not in {inp.init_weights.name} and start fresh", flush=True)
    network.to(inp.device)
    network.apply()
    if cpuconv.enabled(inp.device):  # the UNet's faster CPU convolution per layer shape, timed once per machine
        cpuconv.install(unet, cpuconv.Chooser(inp.conv_choices))
    forward = _compiled(tr, unet, inp.device)
    te_lr = tr["text_encoder_lr"] or tr["learning_rate"]
    ratio = net_cfg.get("loraplus_lr_ratio")  # LoRA+; kohya's per-part ratios override it
    groups = network.param_groups(tr["unet_lr"] or tr["learning_rate"], te_lr, net_cfg.get("loraplus_unet_lr_ratio") or ratio,
                                  te2_lr=tr.get("text_encoder_2_lr") or te_lr,
                                  loraplus_te_ratio=net_cfg.get("loraplus_text_encoder_lr_ratio") or ratio)
    optimizer = optimizers.make(tr["optimizer"], groups, tr["learning_rate"], tr["weight_decay"], tr["optimizer_args"])
    warmup = tr["lr_warmup_steps"]
    if tr.get("lr_warmup_ratio") is not None:
        warmup = int(tr["lr_warmup_ratio"] * inp.plan.total_steps)
    lr_sched = get_scheduler(
        tr["lr_scheduler"], optimizer, num_warmup_steps=warmup, num_training_steps=inp.plan.total_steps,
        num_cycles=tr["lr_scheduler_num_cycles"], power=tr["lr_scheduler_power"],
    )
    autocast = torch.autocast(inp.device.type, dtype=_dtype(tr["mixed_precision"]), enabled=tr["mixed_precision"] != "no")
    scaler = torch.amp.GradScaler(enabled=tr["mixed_precision"] == "fp16" and inp.device.type == "cuda")
    params = [p for g in groups for p in g["params"]]
    ema = _ema(tr, network, params)
    accum, step, t0 = tr["gradient_accumulation_steps"], 0, time.perf_counter()
    first_epoch = 1
    if inp.resume is not None:
        # Continue exactly where the state was taken: weights, optimizer moments, schedule
        # position, step count and RNG. Everything else random is derived from the seed per
        # (epoch, image, repeat), so the rest of the run equals one never interrupted.
        st = inp.resume
        network.load_state_dict(st["network"])
        optimizer.load_state_dict(st["optimizer"])
        lr_sched.load_state_dict(st["scheduler"])
        scaler.load_state_dict(st["scaler"])
        torch.set_rng_state(st["rng"])
        _device_rng(inp.device, st)
        if ema is not None:
            ema.load_state_dict(st["ema"])
        step, first_epoch = st["step"], st["epoch"] + 1
        inp.log_rows[:] = [tuple(row) for row in st["log"]]
        inp.val_rows[:] = [tuple(row) for row in st.get("val", [])]
        t0 -= inp.log_rows[-1][4] if inp.log_rows else 0.0
    try:  # DDPM (ε, v) or rectified flow, by the family; its settings checked before the first step
        obj = objectives.make(family(inp.arch), sched, tr)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    denoise = dist.Denoise(forward, network, inp.rank, inp.device, family(inp.arch).predict)  # DDP with several ranks
    heap = LeanHeap(tr.get("lean_cpu_memory", False), inp.device)
    main = inp.rank.main

    if main:
        print(f"train: {network.module_count()} LoRA modules (unet, text encoder)\n{inp.plan.banner()}", flush=True)
    parts = {"unet": unet, "text_encoders": tes, "tokenizers": toks, "vae": vae, "frozen_text": inp.frozen_parts}

    def sample(row_id: str, epoch: int) -> None:
        if inp.sample is not None and row_id in inp.sample_points:
            network.eval()
            inp.sample(network, parts, row_id, epoch, step)
            network.train()

    if first_epoch == 1:
        sample("base", 0)  # kohya's sample_at_first: the base model before any step
    bar = tqdm(total=inp.plan.total_steps, initial=step, desc="train", unit="step", disable=not main)

    def log(at: int, epoch: int, loss: float, lr: float, seconds: float, last: bool, norms, running: list) -> None:
        logged = denoise.logged(loss, last)  # several ranks: from the one with the step's last batch
        mean = sum(running[-accum * 10 :]) / len(running[-accum * 10 :]) if running else logged
        # scale_weight_norms: read with the loss (the device has finished by now)
        norms = [int(norms[0]), float(norms[1]), float(norms[2])] if norms else []
        inp.log_rows.append((at, epoch, logged, lr, seconds, *norms))
        if inp.scalar is not None:
            inp.scalar("loss/step", logged, at)
            inp.scalar("loss/running_mean", mean, at)
            inp.scalar("lr", lr, at)
            for tag, value in zip(MAX_NORM_LOGS, norms):
                inp.scalar(f"max_norm/{tag}", value, at)
        bar.set_postfix(epoch=f"{epoch}/{inp.plan.epochs}", loss=f"{mean:.4f}", lr=f"{lr:.2e}", refresh=False,
                        **({"keys_scaled": norms[0], "avg_key_norm": f"{norms[1]:.3f}"} if norms else {}))

    losses = LossReadback(log, every_step=inp.rank.world > 1)
    # train.reg_target base: regularization items are fitted to the base model's own predictions
    reg_base = tr.get("reg_target", "noise") == "base"
    base_text = (lambda: base_model(network)) if reg_base and train_te else None
    for epoch in range(first_epoch, inp.plan.epochs + 1):
        batches = epoch_batches(inp.samples, inp.plan.batch_size, tr["seed"], epoch)
        running = []
        for batch, live, ends_step, last in dist.micro_batches(batches, accum, inp.rank):
            heap.forward()
            # 1. inputs: cached latents, per-sample noise and timesteps, text conditioning
            with torch.set_grad_enabled(train_te), autocast:
                latents, noise, t, hidden, weight, added, mask, noise_in, base_cond = _batch_inputs(
                    inp, batch, epoch, obj, toks, tes, vae, base_text)
            noisy, target = obj.noisy_target(latents, noise_in, noise, t)
            if reg_base:  # the base's prediction (no DDP: it has no gradient to reduce)
                target = base_targets(target, reg_rows(batch), denoise.module, network, noisy, t, hidden, added,
                                      autocast, base_cond)
            # 2. loss
            with autocast:
                pred = _guarded(denoise, noisy, t, hidden, added, ends_step)
            # per-sample loss (masked by alpha with masked_loss); the objective's weighting (min-SNR,
            # debiased; a flow weighting scheme); regularization images weighted by prior_loss_weight (kohya)
            per_sample = obj.weighted(per_sample_loss(pred, target, tr["loss_type"], tr["huber_c"], mask), t)
            loss = (per_sample * weight).mean() * (1.0 if live else 0.0)  # a rank's filler joins the all-reduce only
            heap.backward()
            scaler.scale(loss / accum).backward()
            heap.done()
            if not ends_step:
                losses.add(epoch, step + 1, loss, live)
                continue
            # 3. optimizer step every `accum` batches (and at the end of the epoch)
            scaler.unscale_(optimizer)
            if tr["max_grad_norm"] > 0:
                torch.nn.utils.clip_grad_norm_(params, tr["max_grad_norm"])
            scaler.step(optimizer)
            scaler.update()
            # the rate this step used (Prodigy's effective rate is its d × lr, as kohya logs it)
            # (a block-weighted group's rate over its weight: the base rate, as without block weights)
            g0 = optimizer.param_groups[0]
            lr = lr_sched.get_last_lr()[0] * g0.get("d", 1.0) / (g0.get("lr_weight") or 1.0)
            lr_sched.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            norms = network.max_norm_(tr["scale_weight_norms"]) if tr.get("scale_weight_norms") else ()
            if ema is not None:  # after max-norm scaling: the average is of the weights as saved
                ema.update(step)
            # 4. log: the loss is read back now and then (LossReadback), not every step
            losses.add(epoch, step, loss, live, (lr, round(time.perf_counter() - t0, 3), last, norms))
            if losses.due(step) or f"s{step:06d}" in inp.sample_points:
                losses.read(running)
            bar.update(1)
            sample(f"s{step:06d}", epoch)
            if step >= inp.plan.total_steps:  # max_steps: the last epoch stops here
                break
        losses.read(running)
        bar.refresh()
        if inp.val_samples and main:
            network.eval()  # no dropout of any kind while measuring
            val = validation_loss(inp, unet, obj, toks, tes, vae, autocast)
            network.train()
            inp.val_rows.append((epoch, step, val))
            if inp.scalar is not None:
                inp.scalar("loss/validation", val, step)
            bar.write(f"epoch {epoch}: validation loss {val:.5f} ({len(inp.val_samples)} held-out images)")
        # 5. save: the LoRA (the stage keeps the saved epochs), samples, then the training state
        save(network, epoch, step)
        ema_full = None
        if ema is not None:
            with ema.applied():
                save(network, epoch, step, ema=True)
                # kept in the state: the EMA file is written again from them in other output settings
                ema_full = network.full_weights() if inp.save_state is not None else None
        sample(f"e{epoch:06d}", epoch)
        if inp.save_state is not None:
            inp.save_state(epoch, {
                **network.full_weights(),  # "network" (what resume loads) and the modules' names
                "optimizer": optimizer.state_dict(), "scheduler": lr_sched.state_dict(),
                "scaler": scaler.state_dict(), "rng": torch.get_rng_state(), **_device_rng(inp.device),
                "step": step, "epoch": epoch, **({"ema": ema.state_dict(), "ema_full": ema_full} if ema is not None else {}),
                "log": [list(row) for row in inp.log_rows], "val": [list(row) for row in inp.val_rows],
            })
    bar.close()
    network.restore()
