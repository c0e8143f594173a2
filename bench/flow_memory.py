"""Peak RSS and seconds per LoRA training step of a FLUX-shaped transformer, with and without
gradient checkpointing (issue 25, memory).

Random weights, fp32, on the CPU: diffusers' FluxTransformer2DModel with FLUX.1's head width (128)
and context widths (T5 4096, CLIP pooled 768, 64 packed latent channels) but fewer heads and blocks
than the real model (24 heads = 3072 wide, 19 double and 38 single blocks, ~12 B parameters: 48 GB
in fp32, more than this machine has), so ``--heads`` and the block counts are options. A kohya
default LoRA (every Linear of the blocks, lorabuild's ``LoRANetwork``, dim 16) trains with AdamW on
one image of ``--size`` px (its packed tokens) and ``--text`` T5 tokens, guidance embedded as dev's.
Each configuration runs in a fresh process (peak RSS is that process's own high-water mark, read
from ``resource``); s/step is the median of the steps after the first. Configurations alternate
over ``--rounds``, because the cores are shared.

    python bench/flow_memory.py [--heads 8] [--double 2] [--single 4] [--size 512] [--steps 4] [--rounds 1]

Measured 2026-12-02 on the shared 2-core machine (load average 5-6), ``--heads 8 --double 2 --single 4
--size 512 --text 128 --steps 3`` (149 M parameters, 52 LoRA modules): peak RSS 2037 MiB without
gradient checkpointing, 1641 MiB with it; 34.7 and 31.4 s/step (the load, not the option, decides
the difference there); the same loss to the last digit.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load, median, table  # noqa: E402


def one(args) -> dict:
    """Train ``args.steps`` steps in this process; its s/step and peak RSS."""
    import resource

    import torch
    from diffusers import FluxTransformer2DModel

    from lorabuild.families.flux import FAMILY as FLUX
    from lorabuild.lora.network import LoRANetwork

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=args.double, num_single_layers=args.single, attention_head_dim=128,
        num_attention_heads=args.heads, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))
    model.requires_grad_(False)
    if args.checkpointing:
        model.enable_gradient_checkpointing()
    net = LoRANetwork(model, [], dim=16, alpha=16, train_text_encoder=False, arch="flux")
    net.apply()
    opt = torch.optim.AdamW([p for m in net.loras for p in (m.lora_down.weight, m.lora_up.weight)], lr=1e-4)
    side = args.size // 8  # the latent's side; FLUX packs 2×2 of it into a token
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, side, side, generator=g)
    hidden, pooled = torch.randn(1, args.text, 4096, generator=g), torch.randn(1, 768, generator=g)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        pred = FLUX.predict(model, x, torch.tensor([0.5]), hidden, {"pooled": pooled, "guidance": torch.tensor([1.0])})
        loss = torch.nn.functional.mse_loss(pred, torch.zeros_like(pred))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"s_step": median(times[1:]) if len(times) > 1 else times[0], "loss": float(loss),
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "modules": len(net.loras)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--text", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    loads, results = [load()], {False: [], True: []}
    base = [sys.executable, __file__, "--one"] + [f"--{k}={getattr(args, k)}" for k in
                                                   ("heads", "double", "single", "size", "text", "steps")]
    for _ in range(args.rounds):
        for ckpt in (False, True):
            proc = subprocess.run(base + (["--checkpointing"] if ckpt else []), capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(proc.stderr[-3000:])
            results[ckpt].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    loads.append(load())
    rows = []
    for ckpt, runs in results.items():
        rows.append(["on" if ckpt else "off", f"{runs[0]['params_m']:.0f} M", runs[0]["modules"],
                     f"{median([r['s_step'] for r in runs]):.2f}", f"{max(r['peak_mib'] for r in runs):.0f}",
                     f"{runs[0]['loss']:.6f}"])
    print(f"FLUX-shaped transformer: {args.heads} heads × 128 = {args.heads * 128} wide, {args.double} double + "
          f"{args.single} single blocks, {args.size} px ({(args.size // 16) ** 2} image tokens) + {args.text} text "
          f"tokens, fp32 CPU, LoRA dim 16, AdamW, {args.steps} steps × {args.rounds} rounds; load average "
          f"(1/5/15 min) {', '.join(loads)}\n")
    print(table(["gradient checkpointing", "transformer", "LoRA modules", "s/step", "peak RSS MiB",
                 "last loss"], rows))


if __name__ == "__main__":
    main()
