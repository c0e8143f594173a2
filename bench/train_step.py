"""Seconds per training step and peak RSS on the full-size SD 1.5 architecture (issue 10, item 4).

Random weights, fp32, batch 1, LoRA dim 32 on kohya's default modules, AdamW, SDPA, with
and without gradient checkpointing, with the text encoder trained (captions encoded every
step) and frozen (cached embeddings). Each configuration is a real ``doit train:bench``
in a fresh process on a warm project (latents and embeddings cached beforehand); it is
stopped after a few optimizer steps. s/step is the median of the steps after the first;
peak RSS is the process's own high-water mark (``os.wait4``). Configurations alternate
(each one's rounds are spread over the run), because the cores are shared. Every size also
runs kohya's configuration with ``train.lean_cpu_memory`` (``--lean``: only that configuration,
without and with it).

``--ab`` instead times each optimisation against the trainer's way in one process, the
variants alternating step by step (see ``ab_table``).

    python bench/train_step.py [--quick] [--sizes 256 512] [--lean] [--ab [--variants ...]]
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load, median, publish, run, sd15_project, table, watch, write_settings  # noqa: E402

def measure(root: Path, settings: dict, steps: int, env: dict | None = None):
    """One fresh ``doit train:bench`` with ``settings``, stopped after ``steps`` optimizer steps."""
    # a new comment makes a new run key, so training runs instead of restoring an earlier result
    write_settings(root, "bench", settings={**settings, "output": {"comment": uuid.uuid4().hex}})
    run([sys.executable, "-m", "doit", "latents:bench", "textemb:bench"], cwd=root, env=env)  # warm caches
    return watch([sys.executable, "-m", "doit", "train:bench"], root, stop_after=steps, env=env)


def configs(sizes, quick: bool, only_lean: bool = False):
    """(px, text encoder trained, checkpointing, train.lean_cpu_memory)"""
    for size in sizes:
        for te, gc in itertools.product((True, False), (False, True)):
            if (quick and gc and not te) or (only_lean and (gc or not te)):
                continue
            yield size, te, gc, False
        yield size, True, False, True  # kohya's configuration with the lean heap


def main_table(args, tmp: Path) -> str:
    rows, loads = [], [load()]
    roots = {}
    for size in args.sizes:
        roots[size] = Path(tmp) / f"ws{size}"
        sd15_project(roots[size], args.images, size)
    results: dict[tuple, list] = {}
    for r in range(args.rounds):  # rounds alternate over every configuration
        for size, te, gc, lean in configs(args.sizes, args.quick, args.lean):
            settings = {"network": {"train_text_encoder": te},
                        "train": {"gradient_checkpointing": gc, "lean_cpu_memory": lean}}
            w = measure(roots[size], settings, args.steps)
            results.setdefault((size, te, gc, lean), []).append(w)
            print(f"bench: {size} px, TE {'trained' if te else 'frozen'}, checkpointing {gc}, lean heap {lean}: "
                  f"steps {[round(s, 2) for s in w.step_seconds()]} s, CPU {[round(s, 2) for s in w.step_cpu()]} s, "
                  f"peak RSS {w.rss_gib:.2f} GiB", flush=True)
    for (size, te, gc, lean), ws in results.items():
        per_step = median([s for w in ws for s in w.step_seconds()])
        cpu = median([s for w in ws for s in w.step_cpu()])
        rss = max(w.rss_gib for w in ws)
        rows.append([size, "trained" if te else "frozen (cached embeddings)", "on" if gc else "off", "on" if lean else "off",
                     f"{per_step:.2f}", f"{cpu:.2f}", f"{rss:.2f}"])
    loads.append(load())
    return loads, (f"### s/step and peak RSS, SD 1.5 architecture (random weights, fp32), batch 1, LoRA dim 32, "
                   f"AdamW, SDPA; median of steps 2..{args.steps} over {args.rounds} round(s); "
                   f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'default')}\n\n"
                   + table(["px", "text encoder", "grad. checkpointing", "lean_cpu_memory", "s/step", "CPU s/step",
                            "peak RSS GiB"], rows))


VARIANTS = ("as trained", "base weights require grad", "channels_last", "bf16 autocast", "torch.compile")


def _step_fn(variant: str, unet, params, optimizer):
    """(prepare, step): put the model in ``variant``'s state (untimed), then one LoRA training
    step of the UNet on fixed inputs, as ``variant`` runs it."""
    import torch

    model = unet
    if variant == "torch.compile":
        model = torch.compile(unet)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16 autocast")

    fmt = torch.channels_last if variant == "channels_last" else torch.contiguous_format

    def prepare():
        unet.to(memory_format=fmt)
        # what freezing saves: weight gradients nobody uses
        unet.requires_grad_(variant == "base weights require grad")

    def step(noisy, t, hidden, target):
        with autocast:
            pred = model(noisy.contiguous(memory_format=fmt), t, encoder_hidden_states=hidden).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        unet.zero_grad(set_to_none=True)

    return prepare, step


def ab_table(args) -> tuple[list, str]:
    """Each optimisation against the trainer's way, in one process on one model, variants
    alternating step by step (ABAB...): wall and CPU seconds per step (``time.process_time``)."""
    import time

    import torch

    from lorabuild.lora.network import LoRANetwork

    from common import sd15_models

    loads, rows = [load()], []
    unet = sd15_models(("unet",))["unet"]
    net = LoRANetwork(unet, [], dim=32, alpha=16, train_text_encoder=False)
    net.apply()
    params = list(net.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    variants = [v for v in VARIANTS if v in args.variants]
    steps = {v: _step_fn(v, unet, params, optimizer) for v in variants}
    for size in args.sizes:
        g = torch.Generator().manual_seed(0)
        lat = torch.randn((1, 4, size // 8, size // 8), generator=g)
        inputs = (lat, torch.tensor([500]), torch.randn((1, 77, 768), generator=g), torch.randn(lat.shape, generator=g))
        got: dict[str, list] = {v: [] for v in variants}
        for v in variants:  # warm-up (and compilation) outside the timing
            steps[v][0]()
            t = time.perf_counter()
            steps[v][1](*inputs)
            print(f"bench: {size} px {v}: first step {time.perf_counter() - t:.1f} s", flush=True)
        for _ in range(args.rounds):
            for v in variants:
                steps[v][0]()
                t, c = time.perf_counter(), time.process_time()
                steps[v][1](*inputs)
                got[v].append((time.perf_counter() - t, time.process_time() - c))
                print(f"bench: {size} px {v}: {got[v][-1][0]:.2f} s, CPU {got[v][-1][1]:.2f} s", flush=True)
        base = None
        for v in variants:
            wall, cpu = median([w for w, _ in got[v]]), median([c for _, c in got[v]])
            base = base or (wall, cpu)
            rows.append([size, v, f"{wall:.2f}", f"{wall / base[0]:.2f}×", f"{cpu:.2f}", f"{cpu / base[1]:.2f}×"])
    loads.append(load())
    return loads, (f"### A/B of each optimisation: one UNet LoRA step (dim 32, kohya's 192 UNet modules, AdamW, batch 1, "
                   f"cached text embeddings), SD 1.5 architecture, random weights; {torch.get_num_threads()} threads; "
                   f"variants alternate step by step, median of {args.rounds} steps each after a warm-up step\n\n"
                   + table(["px", "variant", "wall s/step", "vs first", "CPU s/step", "vs first"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 px, 3 configurations, 3 steps (about 5 minutes idle)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (the first is not timed)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--lean", action="store_true",
                    help="only kohya's configuration (TE trained, no checkpointing) without and with train.lean_cpu_memory")
    ap.add_argument("--images", type=int, default=8, help="images in the project (kohya's reference: 8)")
    ap.add_argument("--ab", action="store_true", help="A/B of each optimisation in one process (see VARIANTS)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), help="with --ab: which variants")
    args = ap.parse_args()
    args.sizes = args.sizes or ([256] if args.quick else [256, 512])
    args.steps = args.steps or (3 if args.quick else 4)
    with tempfile.TemporaryDirectory(dir=os.environ.get("LORABUILD_BENCH_TMP")) as tmp:
        if args.ab:
            loads, text = ab_table(args)
            title = "Training step A/B"
        else:
            loads, text = main_table(args, Path(tmp))
            title = "Training step"
    note = "\n\nAgainst kohya: bench/kohya_side.py, both tools in one run."
    publish(title + (" (--quick)" if args.quick else ""), text + note, loads)


if __name__ == "__main__":
    main()
