"""Training on a GPU (issue 27): s/step, peak VRAM and VAE caching rate on the full-size SD 1.5 and
SDXL architectures with random weights, through lorabuild's own trainer (``train.loop.train``,
``network.LoRANetwork``, the latents stage's ``encode``), in one process.

Every training case is one real ``train.loop.train`` run on cached latents written here (random,
seeded): models loaded from a diffusers folder by ``models.load_*``, the LoRA built and applied
by the product's code, its optimizer, autocast, GradScaler, checkpointing and loss readback.
s/step is steady: from the end of step 1 (whose loss the trainer reads back at once) to the end
of the last step, device synchronised at both ends, over the steps between. Peak VRAM is
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over the run (models included).
Each case checks what the issue asks: every logged loss finite (the trainer stops on one that is
not), the gradients finite on every optimizer step that ran (a global optimizer pre-step hook;
fp16's GradScaler skips steps whose scaled gradients overflow, counted as skipped), the LoRA's
weights finite, and the UNet's output with the LoRA differs from the output without it
(``Δout``: ‖out(LoRA) − out(base)‖ / ‖out(base)‖, same input, same autocast).

On a CUDA machine the default models are the full-size ones (weights made on the GPU, seeded,
saved once in fp16 under --work); elsewhere the built-in tiny ones, so the script runs (and is
tested) on the CPU. ``--quick`` takes fewer steps and images per case (estimated at 3 to 4 minutes
on an H200, models written included; not yet measured there).

    python bench/gpu.py [--quick] [--model full|tiny] [--device cuda] [--out bench/RESULTS.md]
                        [--jsonl rows.jsonl] [--deadline SECONDS] [--only REGEX]
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from common import table  # noqa: E402
RESULTS = ROOT / "bench" / "RESULTS.md"
GIB = 2**30
# the guide many users follow (issue 27): kohya, SD 1.5 at 512 px, dim 32, 30 images, RTX 4070 Ti
GUIDE = {"vram_gb": 7.7, "s_per_step": 7.4 * 60 / 1000, "mb_per_image": 4.8}


@dataclass
class Case:
    name: str
    arch: str  # sd1 | sdxl
    px: int
    batch: int
    precision: str  # no | fp16 | bf16 (train.mixed_precision)
    checkpointing: bool
    attention: str = "sdpa"
    train_te: bool = True  # False: cached text embeddings
    images: int = 10
    steps: int = 12
    optimizer: str = "adamw"
    tf32: bool = False  # torch.backends.cuda.matmul.allow_tf32 for this case
    optimizer_args: dict = field(default_factory=dict)


def cases(args) -> list[Case]:
    """The issue's cases, the one closest to the guide's figure first (a late failure loses least)."""
    tiny = args.model == "tiny"
    sd_px, xl_px = (64, 64) if tiny else (512, 1024)
    steps = 3 if tiny else (12 if args.quick else 30)
    big = args.big_dataset
    out = [Case("sd15 b1 bf16", "sd1", sd_px, 1, "bf16", False, steps=steps),
           # right after the 10-image case, so the two peaks differ by the dataset alone
           Case(f"sd15 b1 bf16, {big} latents", "sd1", sd_px, 1, "bf16", False, images=big, steps=steps)]
    for batch in (1, 4):
        for prec in ("bf16", "fp16"):
            for gc_on in (False, True):
                if (batch, prec, gc_on) != (1, "bf16", False):
                    out.append(Case(f"sd15 b{batch} {prec}{' gc' if gc_on else ''}", "sd1", sd_px, batch, prec, gc_on,
                                    steps=steps))
    out.append(Case("sdxl b1 bf16 gc, cached TE", "sdxl", xl_px, 1, "bf16", True, train_te=False,
                    steps=max(3, steps * 2 // 3)))
    out.append(Case("sd15 b1 fp32", "sd1", sd_px, 1, "no", False, steps=steps))
    if args.device == "cuda":  # what allowing TF32 matmuls (lorabuild does not) would give fp32 training
        out.append(Case("sd15 b1 fp32, TF32 allowed", "sd1", sd_px, 1, "no", False, steps=steps, tf32=True))
    out.append(Case("sd15 b1 bf16, AdamW fused", "sd1", sd_px, 1, "bf16", False, steps=steps,
                    optimizer_args={"fused": True}))
    if args.device == "cuda" and importlib.util.find_spec("bitsandbytes") is not None:
        out.append(Case("sd15 b1 bf16, AdamW8bit", "sd1", sd_px, 1, "bf16", False, steps=steps, optimizer="adamw8bit"))
    if args.device == "cuda" and importlib.util.find_spec("xformers") is not None:
        out += [Case(f"sd15 b{b} bf16 xformers", "sd1", sd_px, b, "bf16", False, "xformers", steps=steps) for b in (1, 4)]
    return [c for c in out if not args.only or re.search(args.only, c.name)]


# --- models and data ------------------------------------------------------------------

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def full_folder(arch: str, work: Path, device, parts: tuple[str, ...]) -> Path:
    """A diffusers folder with the real architecture (lorabuild's shipped configs) and random
    weights made on ``device`` (seeded per component), saved in fp16; written once under ``work``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lorabuild import models

    models.offline()
    folder = work / f"{arch}-random"
    if not (folder / "model_index.json").is_file():
        shutil.copytree(models.CONFIGS_DIR / arch, folder, dirs_exist_ok=True)
        for tok in ("tokenizer", "tokenizer_2") if arch == "sdxl" else ("tokenizer",):
            shutil.copytree(models.TOKENIZER_DIR, folder / tok, dirs_exist_ok=True)
        models._add_slow_tokenizer_files(folder)
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}
    for part in parts:
        seed = ("unet", "vae", "text_encoder", "text_encoder_2").index(part)
        if (folder / part / "done").is_file():
            continue
        t = time.perf_counter()
        cfg = json.loads((folder / part / "config.json").read_text())
        torch.manual_seed(seed)
        with torch.device(device):
            if part in classes:
                m = classes[part].from_config(cfg)
            else:
                te_cls = CLIPTextModelWithProjection if part == "text_encoder_2" else CLIPTextModel
                m = te_cls(CLIPTextConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")}))
        m.to(torch.float16).save_pretrained(str(folder / part), safe_serialization=True)
        del m
        (folder / part / "done").write_text("random weights\n")
        print(f"gpu bench: random {arch} {part} written in {time.perf_counter() - t:.1f} s", flush=True)
    return folder


def model_folder(arch: str, args, device, parts: tuple[str, ...]) -> Path:
    from lorabuild import models

    if args.model == "tiny":
        return models.ensure_builtin({"sd1": "tiny-sd1", "sdxl": "tiny-sdxl"}[arch], args.work)
    return full_folder(arch, args.work, device, parts)


def dataset(folder: Path, c: Case, work: Path) -> dict:
    """Cached latents for ``c.images`` images (random, seeded) and, for cached text, one
    embedding: the files the latents and textemb stages write, in their layout."""
    import torch
    from safetensors.torch import save_file

    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    d = work / f"data-{c.arch}-{c.px}-{c.images}"
    lat_dir = d / "latents"
    lat_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    ids = [f"img{i:05d}" for i in range(c.images)]
    for i in ids:
        f = lat_dir / f"{i}.safetensors"
        if not f.is_file():
            save_file({"latent": torch.randn((4, c.px // 8, c.px // 8), generator=g)}, str(f))
    caption = "a photo of sks dog"
    emb = None
    if not c.train_te:
        emb = d / "embedding.safetensors"
        hidden = {"hidden": torch.randn((77, unet_cfg["cross_attention_dim"]), generator=g)}
        if c.arch == "sdxl":  # the UNet's added embedding: pooled text + 6 size/crop numbers
            pooled = unet_cfg["projection_class_embeddings_input_dim"] - 6 * unet_cfg["addition_time_embed_dim"]
            hidden["pooled"] = torch.randn((pooled,), generator=g)
        save_file(hidden, str(emb))
    return {"ids": ids, "latents": {i: lat_dir / f"{i}.safetensors" for i in ids}, "caption": caption,
            "embeddings": None if emb is None else {caption: emb}, "unet_cfg": unet_cfg}


def sections(c: Case, lr: float) -> dict:
    """The project sections the trainer reads: the schema's defaults with this case's settings."""
    from lorabuild.config import apply_defaults, schema

    doc = apply_defaults({"base_model": "x", "dataset": {"dirs": ["x"]}, "network": {}, "train": {}, "captions": {},
                          "textemb": {}, "latents": {}}, schema())
    doc["network"].update(dim=32, alpha=16, train_text_encoder=c.train_te)
    doc["train"].update(batch_size=c.batch, mixed_precision=c.precision, gradient_checkpointing=c.checkpointing,
                        attention=c.attention, max_steps=c.steps, epochs=1, learning_rate=lr,
                        optimizer=c.optimizer, optimizer_args=c.optimizer_args)
    return {s: doc[s] for s in ("network", "train", "captions", "textemb", "latents")}


class Probe:
    """What one run is measured by: callbacks the trainer already offers (``scalar``, ``save``, the
    in-training sample points ``base`` and ``e000001``) and a global optimizer pre-step hook."""

    def __init__(self, c: Case, device, data: dict):
        self.c, self.device, self.data = c, device, data
        self.t_start = time.perf_counter()
        self.t_first = self.t_end = None
        self.peak = (float("nan"), float("nan"))
        self.steps_run, self.bad_grads, self.hook = 0, None, None
        self.result: dict = {}

    def scalar(self, tag: str, value: float, step: int) -> None:
        if tag == "loss/step" and step == 1:  # the trainer reads step 1's loss back at once
            _sync(self.device)
            self.t_first = time.perf_counter()
        if tag == "loss/step":
            self.result["loss"] = value

    def pre_step(self, optimizer, args, kwargs) -> None:
        import torch

        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        # one multi-tensor norm per step: a non-finite gradient makes its norm non-finite
        bad = (~torch.isfinite(torch.stack(torch._foreach_norm(grads)))).any().to(torch.int32)
        self.bad_grads = bad if self.bad_grads is None else self.bad_grads + bad
        self.steps_run += 1

    def save(self, network, epoch: int, step: int) -> None:
        import torch

        _sync(self.device)
        self.t_end = time.perf_counter()
        if self.device.type == "cuda":
            self.peak = (torch.cuda.max_memory_allocated(self.device) / GIB,
                         torch.cuda.max_memory_reserved(self.device) / GIB)
        self.result["steps"] = step

    def sample(self, network, parts: dict, row_id: str, epoch: int, step: int) -> None:
        import torch
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        if row_id == "base":
            self.hook = register_optimizer_step_pre_hook(self.pre_step)
            return
        self.result["lora_finite"] = all(bool(torch.isfinite(p.detach()).all()) for p in network.parameters())
        self.result["lora_up_max"] = max(float(m.lora_up.weight.detach().abs().max()) for m in network.loras)
        self.result["delta_out"] = self.output_change(network, parts["unet"])

    def output_change(self, network, unet) -> float:
        """‖out(LoRA) − out(base)‖ / ‖out(base)‖ of the UNet on one fixed input, under the case's autocast."""
        import torch

        c, cfg = self.c, self.data["unet_cfg"]
        g = torch.Generator().manual_seed(1)
        lat = torch.randn((1, 4, c.px // 8, c.px // 8), generator=g).to(self.device)
        hidden = torch.randn((1, 77, cfg["cross_attention_dim"]), generator=g).to(self.device)
        added = None
        if c.arch == "sdxl":
            pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            added = {"text_embeds": torch.randn((1, pooled), generator=g).to(self.device),
                     "time_ids": torch.tensor([[c.px, c.px, 0, 0, c.px, c.px]], dtype=torch.float32, device=self.device)}
        t = torch.tensor([500], device=self.device)
        dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[c.precision]
        outs = []
        with torch.no_grad(), torch.autocast(self.device.type, dtype=dtype, enabled=c.precision != "no"):
            for m in (1.0, 0.0):
                network.set_multiplier(m)
                outs.append(unet(lat, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample.float())
        network.set_multiplier(1.0)
        if not all(bool(torch.isfinite(o).all()) for o in outs):
            return float("nan")
        return float((outs[0] - outs[1]).norm() / outs[1].norm())


def run_case(c: Case, args, device) -> dict:
    """One ``train.loop.train`` run of case ``c``; the measured row."""
    import torch

    from lorabuild.train.loop import TrainInputs, train
    from lorabuild.train.plan import Sample, make_plan

    parts = ("unet", "text_encoder") if c.arch == "sd1" else ("unet",)
    folder = model_folder(c.arch, args, device, parts)
    data = dataset(folder, c, args.work)
    repeats = math.ceil(c.steps * c.batch / c.images)  # one epoch holds every step: no epoch-end reads
    samples = [Sample(i, (c.px, c.px), repeats) for i in data["ids"]]
    cfg = sections(c, args.lr)
    plan = make_plan(samples, c.batch, 1, 1, c.steps)
    probe = Probe(c, device, data)
    inp = TrainInputs(
        model_dir=folder, arch=c.arch, device=device, samples=samples, latent_path=data["latents"], pixels=None,
        caption={i: data["caption"] for i in data["ids"]}, caption_opts={i: cfg["captions"] for i in data["ids"]},
        embedding_path=data["embeddings"], cfg=cfg, plan=plan, sample_points=frozenset({"base", "e000001"}),
        sample=probe.sample, scalar=probe.scalar,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = c.tf32
    try:
        train(inp, probe.save)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        if probe.hook is not None:
            probe.hook.remove()
    r = probe.result
    timed = r["steps"] - 1
    r.update(
        s_per_step=(probe.t_end - probe.t_first) / timed if timed > 0 else float("nan"), timed=timed,
        first_s=probe.t_first - probe.t_start, peak_alloc=probe.peak[0], peak_reserved=probe.peak[1],
        steps_run=probe.steps_run, grads_bad=int(probe.bad_grads) if probe.bad_grads is not None else 0,
        losses_finite=all(math.isfinite(row[2]) for row in inp.log_rows),
    )
    return r


def vae_rate(arch: str, px: int, batch: int, n: int, args, device) -> dict:
    """Images/s of the latents stage's ``encode`` (the VAE in fp32, as the stage loads it) on
    ``n`` random images, after one warm-up batch; peak VRAM of the encode."""
    import torch

    from lorabuild import models
    from lorabuild.stages.latents import encode

    vae = models.load_vae(model_folder(arch, args, device, ("vae",)), device=device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand((batch, 3, px, px), generator=g) * 2 - 1
    if device.type == "cuda":
        x = x.pin_memory()
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        lat = encode(vae, x)
        _sync(device)
        t, done = time.perf_counter(), 0
        while done < n:
            lat = encode(vae, x).float().cpu()  # the stage stores each latent on the CPU
            done += batch
        secs = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else float("nan")
    ok = bool(torch.isfinite(lat).all())
    return {"images_s": done / secs, "images": done, "peak_alloc": peak, "finite": ok}


def _cleanup(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- the report -------------------------------------------------------------------------

def machine(device) -> str:
    import diffusers
    import torch
    import transformers

    libs = (f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
            f"Python {platform.python_version()}")
    if device.type != "cuda":
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (no GPU), {libs}"
    driver = "driver unknown"
    try:
        driver = "driver " + subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    props = torch.cuda.get_device_properties(device)
    return (f"{props.name} ({props.total_memory / GIB:.0f} GiB), {driver}, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}, {libs}")


def _f(v, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def train_row(c: Case, r: dict) -> list:
    if "error" in r:
        return [c.name, c.px, c.batch, c.precision, "on" if c.checkpointing else "off", c.attention,
                "trained" if c.train_te else "cached", c.images, r["error"], *["-"] * 7]
    grads = ("finite" if r["grads_bad"] == 0 else f"{r['grads_bad']} non-finite") + \
        (f", {r['steps'] - r['steps_run']} skipped" if r["steps_run"] < r["steps"] else "")
    ok = r["losses_finite"] and r["lora_finite"] and r["delta_out"] > 0
    return [c.name, c.px, c.batch, c.precision, "on" if c.checkpointing else "off", c.attention,
            "trained" if c.train_te else "cached", c.images, _f(r["s_per_step"], 3), r["timed"], _f(r["first_s"], 1),
            _f(r["peak_alloc"]), _f(r["peak_reserved"]), f"{r['loss']:.4g}", grads,
            f"{r['delta_out']:.2e}" + ("" if ok else " FAIL")]


TRAIN_HEADER = ["case", "px", "batch", "precision", "grad. ckpt", "attention", "text encoder", "images", "s/step",
                "steps timed", "load + step 1 s", "peak alloc GiB", "peak reserved GiB", "last loss", "gradients",
                "Δout (LoRA on/off)"]


def dataset_note(results: list) -> str:
    """Peak VRAM at 10 and at many cached latents, per image, against kohya's +4.8 MB."""
    by = {c.name: (c, r) for c, r in results if "error" not in r}
    small, big = by.get("sd15 b1 bf16"), next((v for k, v in by.items() if k.endswith(" latents")), None)
    if small is None or big is None or math.isnan(small[1]["peak_alloc"]):
        return ""
    (c_small, small), (c_big, big) = small, big
    n_big = c_big.images
    per = (big["peak_alloc"] - small["peak_alloc"]) * GIB / 2**20 / (n_big - c_small.images)
    return (f"\n\nPeak VRAM against dataset size (SD 1.5, batch 1, bf16): {small['peak_alloc']:.3f} GiB at 10 cached "
            f"latents, {big['peak_alloc']:.3f} GiB at {n_big}: {per:+.3f} MB per extra image (kohya, which keeps "
            f"the latents on the device: +{GUIDE['mb_per_image']} MB).")


def report(args, device, results: list, vae: list, skipped: list, started: float) -> str:
    steps = "steps 2..N" if results else ""
    head = (f"### Training, one `train.loop.train` per case: LoRA dim 32 (alpha 16) on kohya's default modules, AdamW "
            f"lr {args.lr:g}, {args.model} models (random weights), s/step over {steps} (device synchronised)\n\n")
    text = head + table(TRAIN_HEADER, [train_row(c, r) for c, r in results])
    text += dataset_note(results)
    if vae:
        text += ("\n\n### VAE caching: the latents stage's `encode`, fp32, random images\n\n"
                 + table(["model", "px", "batch", "images/s", "images", "peak alloc GiB", "finite"],
                         [[a, px, b, _f(r.get("images_s"), 1), r.get("images", "-"), _f(r.get("peak_alloc")),
                           r.get("finite", r.get("error"))] for a, px, b, r in vae]))
    if skipped:
        text += f"\n\nNot run (deadline {args.deadline} s, or interrupted): {', '.join(skipped)}."
    for lib, what in (("xformers", "xformers attention"), ("bitsandbytes", "AdamW8bit")):
        if args.device == "cuda" and importlib.util.find_spec(lib) is None:
            text += f"\n\n{lib} is not importable here: the {what} cases were not run."
    text += (f"\n\nThe guide's reference (kohya, SD 1.5, 512 px, dim 32, 30 images, RTX 4070 Ti): {GUIDE['vram_gb']} GB "
             f"VRAM, {GUIDE['s_per_step']:.3f} s/step (7.4 min per 1,000 steps), +{GUIDE['mb_per_image']} MB VRAM "
             f"per extra image. Whole run {time.perf_counter() - started:.0f} s.")
    return text


def publish(args, device, text: str) -> None:
    block = (f"\n## GPU training{' (--quick)' if args.quick else ''}\n\n{machine(device)}, "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n{text}\n")
    print(block, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a", encoding="utf-8") as fh:
        fh.write(block)


def _record(args, what: dict) -> None:
    """One finished measurement, at once, so a run cut short still leaves its rows."""
    if args.jsonl:
        with args.jsonl.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(what, default=str) + "\n")


def _error(exc: BaseException) -> str:
    traceback.print_exc()
    kind = "out of memory" if "OutOfMemory" in type(exc).__name__ else type(exc).__name__
    return f"failed: {kind}: {str(exc).splitlines()[0][:120] if str(exc) else ''}".replace("|", "/")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and images per case")
    ap.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    ap.add_argument("--model", choices=("full", "tiny"), default=None,
                    help="full-size random models (default on CUDA) or the built-in tiny ones (default elsewhere)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="the Markdown file the table is appended to")
    ap.add_argument("--jsonl", type=Path, default=None, help="also append each measurement here as it finishes")
    ap.add_argument("--work", type=Path, default=None, help="where models and latents are written (default: a temp dir)")
    ap.add_argument("--deadline", type=float, default=None, help="seconds: cases not started by then are skipped")
    ap.add_argument("--only", default=None, help="only the training cases whose name matches this regex")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--big-dataset", type=int, default=1000, help="cached latents in the dataset-size case")
    ap.add_argument("--no-vae", action="store_true", help="skip the VAE caching measurement")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    args.model = args.model or ("full" if device.type == "cuda" else "tiny")
    if device.type == "cpu" and args.model == "tiny":
        torch.set_num_threads(1)  # kernels too small to share; on busy cores threads wait on each other
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="lorabuild-gpu-bench-")
        args.work = Path(tmp.name)
    args.work.mkdir(parents=True, exist_ok=True)
    results, vae, skipped = [], [], []
    todo = cases(args)
    tiny = args.model == "tiny"
    vae_jobs = [] if args.no_vae else [("sd1", 64 if tiny else 512, 1), ("sd1", 64 if tiny else 512, 8),
                                       ("sdxl", 64 if tiny else 1024, 4)]
    n_vae = 4 if tiny else (16 if args.quick else 64)
    try:
        for i, c in enumerate(todo):
            if i and args.deadline and time.perf_counter() - started > args.deadline:
                skipped += [x.name for x in todo[i:]]
                break
            print(f"gpu bench: {c.name} ({asdict(c)})", flush=True)
            try:
                r = run_case(c, args, device)
            except Exception as exc:  # one case failing must not lose the others' figures
                r = {"error": _error(exc)}
            _cleanup(device)
            results.append((c, r))
            _record(args, {"case": asdict(c), **r})
            print(f"gpu bench: {c.name}: {r}", flush=True)
        for arch, px, b in vae_jobs:
            if args.deadline and time.perf_counter() - started > args.deadline:
                skipped.append(f"VAE {arch} {px} px batch {b}")
                continue
            try:
                r = vae_rate(arch, px, b, n_vae, args, device)
            except Exception as exc:
                r = {"error": _error(exc)}
            _cleanup(device)
            vae.append((arch, px, b, r))
            _record(args, {"vae": [arch, px, b], **r})
    except KeyboardInterrupt:  # a time limit's SIGINT: report what was measured
        skipped.append("the rest (interrupted)")
    publish(args, device, report(args, device, results, vae, skipped, started))
    if tmp is not None:
        tmp.cleanup()
    return 0 if all("error" not in r for _, r in results) and all("error" not in r for *_, r in vae) else 1


if __name__ == "__main__":
    sys.exit(main())
