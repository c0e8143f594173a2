"""Caching throughput on the full-size SD 1.5 architecture with random weights (issue 10, item 3).

VAE latents (images/s at 256 and 512 px) and text embeddings (captions/s), each encoded
the way the latents / textemb stages encode them (``pixels.encode`` and
``textenc.condition`` under ``inference_mode``): batched by bucket (``latents.batch_size``,
``textemb.batch_size``) against one at a time. The two ways alternate (ABAB) and each
figure is the median of its rounds, since the cores are shared.

    python bench/caching.py [--quick]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load, median, publish, sd15_models, table  # noqa: E402


def images(n: int, size: int):
    """``n`` bucket-sized pixel batches as the latents stage makes them ([-1, 1], NCHW)."""
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.rand((n, 3, size, size), generator=g) * 2 - 1


def vae_rates(vae, size: int, n: int, rounds: int, channels_last: bool = False) -> tuple[float, float]:
    """(batched, one at a time) images/s; ``channels_last`` also tries that memory layout."""
    import torch

    from lorabuild.stages.latents import encode

    x = images(n, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    batched, single = [], []
    with torch.inference_mode():
        encode(vae, x[:1])  # warm-up: oneDNN picks its kernels on the first call
        for _ in range(rounds):
            t = time.perf_counter()
            encode(vae, x)
            batched.append(n / (time.perf_counter() - t))
            t = time.perf_counter()
            for i in range(n):
                encode(vae, x[i : i + 1])
            single.append(n / (time.perf_counter() - t))
    return median(batched), median(single)


def text_rates(tok, te, n: int, rounds: int) -> tuple[float, float]:
    import torch

    from lorabuild.families import family

    condition = family("sd1").condition
    captions = [f"blob, color {i % 7}, shape {i % 5}, photo number {i}" for i in range(n)]
    batched, single = [], []
    with torch.inference_mode():
        condition([tok], [te], captions[:1])
        for _ in range(rounds):
            t = time.perf_counter()
            condition([tok], [te], captions)
            batched.append(n / (time.perf_counter() - t))
            t = time.perf_counter()
            for c in captions:
                condition([tok], [te], [c])
            single.append(n / (time.perf_counter() - t))
    return median(batched), median(single)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 px only, 2 images, 1 round (a few minutes)")
    args = ap.parse_args()
    import torch

    loads = [load()]
    m = sd15_models()
    rows = []
    sizes, n, rounds = ((256,), 2, 1) if args.quick else ((256, 512), 4, 2)
    for size in sizes:
        for cl in (False, True):
            if cl:
                m["vae"].to(memory_format=torch.channels_last)
            b, s = vae_rates(m["vae"], size, n, rounds, channels_last=cl)
            rows.append([f"VAE latents, {size} px" + (", channels_last" if cl else ""), f"{n} per batch",
                         f"{b:.3f}", f"{s:.3f}", f"{1 / b:.2f}"])
            m["vae"].to(memory_format=torch.contiguous_format)
    nt = 8 if args.quick else 32
    b, s = text_rates(m["tokenizer"], m["text_encoder"], nt, rounds)
    rows.append(["text embeddings (77 tokens)", f"{nt} per batch", f"{b:.1f}", f"{s:.1f}", f"{1 / b:.3f}"])
    loads.append(load())
    text = (f"### Caching throughput, SD 1.5 architecture (random weights, fp32), median of {rounds} round(s), "
            "batched and one-at-a-time interleaved\n\n"
            + table(["what", "batch", "batched, images/s", "one at a time, images/s", "batched, s/image"], rows)
            + "\n\nAgainst kohya: bench/kohya_side.py, both tools in one run.")
    publish("Caching throughput" + (" (--quick)" if args.quick else ""), text, loads)


if __name__ == "__main__":
    main()
