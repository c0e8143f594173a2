"""A/B of process-wide settings (environment variables, glibc's heap) on the UNet LoRA step, in lockstep.

Some settings can only be chosen when a process starts (PyTorch reads ``THP_MEM_ALLOC_ENABLE``
once, OpenMP its ``OMP_*`` variables), so ``train_step.py --ab``'s one-process A/B cannot compare
them. Timing one fresh process after another does not work on a shared machine either: here the
same step took 3.0 s in one minute and 5.5 s a quarter of an hour later. So each variant gets its own
process, every process builds the same model and LoRA (SD 1.5 architecture, random weights, fp32,
dim 32 on kohya's 192 UNet modules, AdamW, batch 1, cached text embeddings, the trainer's CPU
convolution choices), and they take turns step by step, passing a token through pipes: A's step,
B's step, A's, ..., so both see the same machine at nearly the same time. Each row: median wall
seconds of the steps after a warm-up, system CPU seconds and minor page faults per step, and the
process's peak RSS.

``--variant NAME=K=V,K=V``: environment variables for one process; ``LORABUILD_BENCH_KEPT_HEAP=1``
sets glibc's trim threshold to its maximum in that process (the heap keeps what it once grew to).

    python bench/env_ab.py --size 256 --steps 8 --variant default= --variant thp=THP_MEM_ALLOC_ENABLE=1
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load, median, publish, table  # noqa: E402
from train_step import _step_fn  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def worker(size: int, steps: int, tiny: bool) -> None:
    """One variant's process: build, warm up, then a step each time a token arrives on stdin;
    one line per step on stdout."""
    import torch

    sys.path.insert(0, str(ROOT))
    from lorabuild import cpuconv
    from lorabuild.lora.network import LoRANetwork

    from lorabuild.train.loop import glibc

    libc = glibc() if os.environ.get("LORABUILD_BENCH_KEPT_HEAP") else None
    if libc is not None:
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never give the heap's top back
    if tiny:
        from lorabuild import models

        unet = models.world_pipeline(models.SHIPPED_DIR / "world-sd1").unet
        ctx = unet.config.cross_attention_dim
    else:
        from common import sd15_models

        unet, ctx = sd15_models(("unet",))["unet"], 768
    cpuconv.install(unet, cpuconv.Chooser(cpuconv.choices_file()))
    net = LoRANetwork(unet, [], dim=32, alpha=16, train_text_encoder=False)
    net.apply()
    params = list(net.parameters())
    prepare, one = _step_fn("as trained", unet, params, torch.optim.AdamW(params, lr=1e-4))  # train_step.py's step
    prepare()
    g = torch.Generator().manual_seed(0)
    lat = torch.randn((1, unet.config.in_channels, size // 8, size // 8), generator=g)
    inputs = (lat, torch.tensor([500]), torch.randn((1, 77, ctx), generator=g), torch.randn(lat.shape, generator=g))

    def step():
        one(*inputs)

    step()  # warm-up (and any convolution timing), outside the turns
    print("ready", flush=True)
    for _ in range(steps):
        if not sys.stdin.readline():
            return
        r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step()
        wall, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
        print(f"step {wall:.4f} {r1.ru_stime - r0.ru_stime:.4f} {r1.ru_minflt - r0.ru_minflt} "
              f"{r1.ru_maxrss}", flush=True)


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, assigns = text.partition("=")
    env = {}
    for part in filter(None, assigns.split(",")):
        k, sep, v = part.partition("=")
        if not sep:
            sys.exit(f"--variant {text!r}: {part!r} is not KEY=VALUE")
        env[k] = v
    return name, env


def lockstep(variants: list[tuple[str, dict]], size: int, steps: int, tiny: bool) -> dict:
    procs = []
    for name, env in variants:
        cmd = [sys.executable, __file__, "--worker", "--size", str(size), "--steps", str(steps)] + (["--tiny"] if tiny else [])
        procs.append((name, subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                             env={**os.environ, **env})))
    for name, p in procs:  # every process built and warmed up before the first timed step
        line = p.stdout.readline()
        while line and not line.startswith("ready"):
            line = p.stdout.readline()
        if not line:
            sys.exit(f"bench: variant {name} stopped before its first step")
    got: dict[str, list] = {name: [] for name, _ in variants}
    for i in range(steps):
        for name, p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
            line = p.stdout.readline().split()
            if not line or line[0] != "step":
                sys.exit(f"bench: variant {name} stopped at step {i + 1}")
            got[name].append((float(line[1]), float(line[2]), int(line[3]), int(line[4])))
            print(f"bench: {size} px {name} step {i + 1}: {line[1]} s, sys {line[2]} s, {line[3]} faults", flush=True)
    for _, p in procs:
        p.stdin.close()
        p.wait()
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant (after one warm-up step)")
    ap.add_argument("--variant", action="append", default=[], help="NAME=K=V,K=V (repeatable; at least two)")
    ap.add_argument("--tiny", action="store_true", help="the shipped world-sd1 model instead of full-size SD 1.5 (a quick check)")
    ap.add_argument("--append", action="store_true", help="append the table to bench/RESULTS.md")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.size, args.steps, args.tiny)
    variants = [parse_variant(v) for v in args.variant] or [("default", {}), ("thp", {"THP_MEM_ALLOC_ENABLE": "1"})]
    if len(variants) < 2 or len({n for n, _ in variants}) != len(variants):
        sys.exit("bench: give at least two --variant with different names")
    loads = [load()]
    got = lockstep(variants, args.size, args.steps, args.tiny)
    loads.append(load())
    base = median(w for w, *_ in got[variants[0][0]])
    rows = []
    for name, env in variants:
        wall = median(w for w, *_ in got[name])
        rows.append([name, ", ".join(f"{k}={v}" for k, v in env.items()) or "(none)", f"{wall:.2f}",
                     f"{wall / base:.2f}×", f"{median(s for _, s, _, _ in got[name]):.2f}",
                     int(median(f for _, _, f, _ in got[name])),
                     f"{max(r for *_, r in got[name]) / 2**20:.2f}"])
    model = "world-sd1 (shipped)" if args.tiny else "SD 1.5 architecture (random weights, fp32)"
    text = (f"### {args.size} px, {model}, UNet LoRA dim 32, AdamW, batch 1; {len(variants)} processes taking turns "
            f"step by step, median of {args.steps} steps each after a warm-up\n\n"
            + table(["variant", "environment", "wall s/step", f"vs {variants[0][0]}", "system CPU s/step",
                     "minor faults/step", "peak RSS GiB"], rows))
    if args.append:
        publish("Process settings in lockstep (bench/env_ab.py)", text, loads)
    else:
        print(text)


if __name__ == "__main__":
    main()
