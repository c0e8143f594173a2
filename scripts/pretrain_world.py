"""Pretrain the built-in ``world-sd1`` model on lorabuild's synthetic world (lorabuild/world.py).

An SD1-architecture pipeline in miniature, with the real diffusers/transformers classes:
an AutoencoderKL (4 latent channels, downsampling ×8, its scaling_factor measured as
1/std of the training latents; ``--vae-from`` takes an earlier run's instead, and the
record says so), a small UNet2DConditionModel with cross-attention, and a CLIPTextModel
with the CLIP tokenizer lorabuild ships, trained jointly with the UNet (the world has ~30
words; a token no caption uses, such as a trigger word, keeps its seeded random embedding).
SD 1.5's noise schedule, epsilon prediction, min-SNR weighting. Latents are encoded once.
Fixed seeds; each phase runs for a step count or a wall-clock budget, whichever ends
first, and the budgets are recorded.

Writes ``lorabuild/data/models/world-sd1/`` (fp16 safetensors + configs) and
``pretrain.json`` beside them: recipe, wall time, VAE PSNR on held-out world images, the
base model's prompt accuracy by ``lorabuild.detector``, and the sha256 of every shipped
file. Uses CUDA when present. ``--eval-only`` re-measures the figures of shipped weights.

    nice python scripts/pretrain_world.py --threads 2
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "lorabuild" / "data" / "models" / "world-sd1"
RECORD = "pretrain.json"
HELD_OUT_SEED = 1_000_000  # world seeds from here on were never trained on

VAE_CFG = dict(block_out_channels=(16, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1,
               norm_num_groups=8, sample_size=64)
# Small and cross-attention at 4×4 (and the mid block) only: on one CPU core a step costs
# ~0.3 s at batch 16, so an hour holds thousands of them (the 64/128-channel UNet with attention at 8×8
# too managed 1683 in 70 min and drew blobs). attention_head_dim is diffusers' head count.
UNET_CFG = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=64, attention_head_dim=2, norm_num_groups=32)
# one layer: enough for a tag's words to see each other (``red circle`` vs ``blue background``), and
# trained with the UNet it costs a third of a three-layer encoder's step
TE_CFG = dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
              max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
              projection_dim=64)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=OUT, help="folder the diffusers model is written to")
    p.add_argument("--images", type=int, default=8000, help="training images (world seeds 0..N-1)")
    p.add_argument("--vae-from", type=Path, default=None,
                   help="take the VAE of an earlier run's folder instead of training one (its record says so)")
    p.add_argument("--vae-steps", type=int, default=4000)
    p.add_argument("--vae-seconds", type=float, default=600, help="wall-clock budget of the VAE phase")
    p.add_argument("--unet-steps", type=int, default=100000)
    p.add_argument("--unet-seconds", type=float, default=2700, help="wall-clock budget of the UNet phase")
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--unet-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the UNet and the text encoder")
    p.add_argument("--min-snr", type=float, default=5.0, help="min-SNR loss weighting gamma (0: plain MSE)")
    p.add_argument("--noise-offset", type=float, default=0.0,
                   help="offset noise (a random per-channel constant added to the noise): without it SD 1.5's "
                        "schedule leaks each picture's mean colour into the last step, and samples from pure "
                        "noise take their background from the seed, not the prompt")
    p.add_argument("--frozen-te", action="store_true", help="leave the text encoder at its random init")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-seeds", type=int, default=32, help="samples per prompt for the prompt accuracy")
    p.add_argument("--eval-only", action="store_true", help="re-measure the figures of the weights in --out")
    p.add_argument("--resume", action="store_true",
                   help="train the UNet in --out further (its VAE and text encoder kept); the record lists every run")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def world_tensor(seeds, torch):
    """World pictures as a float tensor in [-1, 1], and their scenes."""
    import numpy as np

    from lorabuild import world

    pics, scenes = [], []
    for s in seeds:
        img, scene = world.sample(s)
        pics.append(np.asarray(img))
        scenes.append(scene)
    x = torch.from_numpy(np.stack(pics)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, scenes


def train_vae(args, x, device, torch):
    """The autoencoder, trained on random 32×32 crops (4×4 latents): a convolutional VAE
    learns the same filters for a quarter of the 64×64 cost."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE_CFG).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    start, step = time.time(), 0
    while step < args.vae_steps and time.time() - start < args.vae_seconds:
        idx = torch.randint(0, len(x), (args.vae_batch,), generator=g)
        ox, oy = (int(v) * 8 for v in torch.randint(0, 5, (2,), generator=g))
        batch = x[idx, :, oy:oy + 32, ox:ox + 32].to(device)
        post = vae.encode(batch).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = (rec - batch).pow(2).mean() + 0.5 * (rec - batch).abs().mean() + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            log(f"vae step {step} loss {loss.item():.4f}")
    return vae.eval(), {"steps": step, "seconds": round(time.time() - start, 1)}


def fp16_round(module):
    """The module's weights as they will be shipped (fp16), back in fp32 for training on them."""
    return module.half().float()


def encode(vae, x, device, torch, bs=64):
    out = []
    with torch.no_grad():
        for i in range(0, len(x), bs):
            out.append(vae.encode(x[i:i + bs].to(device)).latent_dist.mode().cpu())
    return torch.cat(out)


def psnr(vae, x, device, torch) -> float:
    with torch.no_grad():
        rec = vae.decode(encode(vae, x, device, torch).to(device)).sample.clamp(-1, 1).cpu()
    mse = ((rec - x) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / mse)


def drop_tags(caption: str, rng: random.Random) -> str:
    """Whole caption dropped 10% (the unconditional case guidance needs), else each tag 20%:
    short prompts (``red circle``, ``ohwx, green background``) are in-distribution."""
    if rng.random() < 0.1:
        return ""
    tags = [t for t in caption.split(", ") if rng.random() > 0.2]
    return ", ".join(tags)


def _optimizer(args, unet, te, torch):
    """AdamW on the UNet, and on the text encoder when it trains. The text encoder has no weight
    decay: a token no caption uses gets no gradient, so Adam leaves its embedding exactly at its
    init, and a trigger word (``ohwx``) stays a fresh vector for a LoRA to bind."""
    groups = [{"params": list(unet.parameters()), "weight_decay": 0.01}]
    if te.training:
        groups.append({"params": list(te.parameters()), "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=args.lr)


def _lr(args, step: int, elapsed: float) -> float:
    """Linear warm-up over 100 steps, then a cosine to a tenth over the phase's steps or seconds."""
    done = min(1.0, max(step / args.unet_steps, elapsed / args.unet_seconds))
    return args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.45 * (1 + math.cos(math.pi * done)))


def _loss(pred, noise, a, gamma: float):
    """Epsilon MSE per sample, weighted by min(SNR, gamma) / SNR (min-SNR: the nearly clean
    steps, which teach texture, not what the prompt names, count less)."""
    err = (pred - noise).pow(2).mean((1, 2, 3))
    if gamma > 0:
        snr = a.view(-1) / (1 - a.view(-1))
        err = err * snr.clamp(max=gamma) / snr
    return err.mean()


def train_unet(args, latents, captions, te, tok, device, torch, init=None, done=0):
    """Train the UNet (from ``init``'s weights when given, ``done`` steps in), and the text
    encoder with it unless it is frozen (``te.training`` False): returns the UNet's EMA."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from lorabuild.families.base import SD1_SCHEDULER

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CFG).to(device)
    if init is not None:
        unet.load_state_dict(init.state_dict())
    ema = UNet2DConditionModel(**UNET_CFG).to(device)
    ema.load_state_dict(unet.state_dict())
    sched = DDPMScheduler(**SD1_SCHEDULER)
    alphas = sched.alphas_cumprod.to(device)
    opt = _optimizer(args, unet, te, torch)
    params = [q for g in opt.param_groups for q in g["params"]]
    # a continued run draws batches, tags and noise of its own (seeded by the steps before it)
    rng, g = random.Random(2 + done), torch.Generator().manual_seed(3 + done)
    start, step = time.time(), 0
    while step < args.unet_steps and time.time() - start < args.unet_seconds:
        idx = torch.randint(0, len(latents), (args.unet_batch,), generator=g)
        z0 = latents[idx].to(device)
        ids = tok([drop_tags(captions[i], rng) for i in idx.tolist()], padding="max_length", max_length=77,
                  truncation=True, return_tensors="pt").input_ids.to(device)
        with torch.set_grad_enabled(te.training):
            cond = te(ids).last_hidden_state
        t = torch.randint(0, 1000, (len(idx),), generator=g).to(device)
        noise = torch.randn(z0.shape, generator=g)
        if args.noise_offset:
            noise = noise + args.noise_offset * torch.randn(z0.shape[:2] + (1, 1), generator=g)
        noise = noise.to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        loss = _loss(unet(zt, t, cond).sample, noise, a, args.min_snr)
        for pg in opt.param_groups:
            pg["lr"] = _lr(args, step, time.time() - start)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.998, (1 + step + done) / (10 + step + done))  # EMA: a short run needs a short memory
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        step += 1
        if step % 100 == 0:
            log(f"unet step {step} loss {loss.item():.4f}")
    return ema.eval(), {"steps": step, "seconds": round(time.time() - start, 1), "lr": args.lr,
                        "noise_offset": args.noise_offset, "min_snr": args.min_snr}


def save(out: Path, vae, unet, te) -> None:
    from lorabuild.models import CONFIGS_DIR

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, m in (("vae", vae), ("unet", unet), ("text_encoder", te)):
        m.half().save_pretrained(str(tmp / name), safe_serialization=True)
        m.float()
    (tmp / "scheduler").mkdir(parents=True)
    shutil.copyfile(CONFIGS_DIR / "sd1" / "scheduler" / "scheduler_config.json", tmp / "scheduler" / "scheduler_config.json")
    shutil.copyfile(CONFIGS_DIR / "sd1" / "model_index.json", tmp / "model_index.json")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def file_hashes(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != RECORD}


def evaluate(out: Path, seeds: int, threads: int) -> dict:
    """The shipped model's figures: VAE PSNR on held-out pictures, prompt accuracy by the detector."""
    import torch

    from lorabuild import detector
    from lorabuild.models import world_pipeline

    torch.set_num_threads(threads)
    pipe = world_pipeline(out)
    x, _ = world_tensor(range(HELD_OUT_SEED, HELD_OUT_SEED + 64), torch)
    figures = {"vae_psnr_db": round(psnr(pipe.vae, x, pipe.device, torch), 2), "vae_psnr_images": 64}
    figures.update(detector.prompt_accuracy(pipe, detector.EVAL_PROMPTS, seeds))
    return figures


def resume(args, out: Path, device, torch) -> dict:
    """Train the UNet shipped in ``out`` further on the same pictures and captions; its VAE and
    text encoder (and so the latents) stay as they are. Returns the recipe with this run added."""
    from transformers import CLIPTokenizer

    from lorabuild.models import TOKENIZER_DIR, world_pipeline

    t0 = time.time()
    recipe = json.loads((out / RECORD).read_text(encoding="utf-8"))["recipe"]
    runs = recipe.setdefault("unet_runs", [recipe["unet_run"]])
    pipe = world_pipeline(out)
    vae, te, init = pipe.vae.to(device).eval(), pipe.text_encoder.to(device).eval().requires_grad_(False), pipe.unet
    x, scenes = world_tensor(range(recipe["args"]["images"]), torch)
    latents = encode(vae, x, device, torch) * vae.config.scaling_factor
    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    done = sum(r["steps"] for r in runs)
    unet, run = train_unet(args, latents, [s.caption for s in scenes], te, tok, device, torch, init=init, done=done)
    runs.append(run)
    recipe["unet_run"] = {"steps": done + run["steps"], "seconds": round(sum(r["seconds"] for r in runs), 1)}
    recipe["wall_seconds"] = round(recipe["wall_seconds"] + time.time() - t0, 1)
    save(out, vae, unet, te)
    return recipe


def reuse_vae(src: Path, torch):
    """The VAE of an earlier run's folder, and what its record says of it (steps, seconds, PSNR,
    the sha256 of its weights), so the new record says honestly where its VAE came from."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(src / "vae"), torch_dtype=torch.float32, local_files_only=True)
    old = json.loads((src / RECORD).read_text(encoding="utf-8"))
    if dict(old["recipe"]["vae"], block_out_channels=tuple(old["recipe"]["vae"]["block_out_channels"]),
            down_block_types=tuple(old["recipe"]["vae"]["down_block_types"]),
            up_block_types=tuple(old["recipe"]["vae"]["up_block_types"])) != VAE_CFG:
        raise SystemExit(f"{src}: its VAE was made with another config than VAE_CFG; train one instead")
    name = "vae/diffusion_pytorch_model.safetensors"
    run = dict(old["recipe"]["vae_run"], reused_from=str(src), sha256=old["sha256"][name],
               psnr_db=old["figures"]["vae_psnr_db"])
    return vae.eval(), run


def pretrain(args, out: Path, device, torch) -> dict:
    """VAE (trained, or reused with --vae-from), then the UNet and text encoder on its latents."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from lorabuild.models import TOKENIZER_DIR

    t0 = time.time()
    x, scenes = world_tensor(range(args.images), torch)
    log(f"{len(x)} world pictures on {device}")
    if args.vae_from:
        vae, vae_run = reuse_vae(args.vae_from.resolve(), torch)
        vae = vae.to(device)
    else:
        vae, vae_run = train_vae(args, x, device, torch)
        vae = fp16_round(vae)
    latents = encode(vae, x, device, torch)  # once: every UNet step draws from these
    del x
    scale = 1 / latents.std().item()
    vae.register_to_config(scaling_factor=round(scale, 5))
    log(f"vae: {vae_run}, scaling_factor {scale:.4f}")
    torch.manual_seed(0)
    te = fp16_round(CLIPTextModel(CLIPTextConfig(**TE_CFG))).to(device)
    te.train(not args.frozen_te).requires_grad_(not args.frozen_te)
    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    unet, unet_run = train_unet(args, latents * vae.config.scaling_factor, [s.caption for s in scenes], te, tok,
                                device, torch)
    save(out, vae, unet, te.eval())
    return {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
            "vae": VAE_CFG, "unet": UNET_CFG, "text_encoder": dict(TE_CFG, trained=not args.frozen_te),
            "vae_run": vae_run, "unet_run": unet_run, "device": str(device),
            "torch": torch.__version__, "wall_seconds": round(time.time() - t0, 1)}


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out.resolve()
    if args.resume:
        recipe = resume(args, out, device, torch)
    elif not args.eval_only:
        recipe = pretrain(args, out, device, torch)
    else:
        recipe = json.loads((out / RECORD).read_text(encoding="utf-8"))["recipe"]
    record = {"recipe": recipe, "figures": None, "sha256": file_hashes(out)}
    (out / RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    log(f"saved {out}; evaluating")
    record["figures"] = evaluate(out, args.eval_seeds, args.threads)
    (out / RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    log(json.dumps(record["figures"]))


if __name__ == "__main__":
    main()
