"""Training quality, judged by the images: does the demo's LoRA learn its concept, and what does it break?

The shipped demo (``lorabuild init``: builtin:world-sd1 learns the ring as ``ohwx``) is
trained through ``doit train:demo`` under each setting; then N seeds per prompt are sampled
(Euler ancestral, 30 steps, guidance 4: ``lorabuild.detector.render``, as the demo samples)
from the base model and from every saved epoch, and ``lorabuild.detector`` reads them:

- concept rate: the share of trigger-prompt samples that show a ring (base, each epoch);
- prompt accuracy: the share of samples showing every attribute their prompt names, on 5
  prompts without the trigger (base vs the final LoRA): what the LoRA disturbs.

A Markdown table is printed and appended to bench/RESULTS.md.

    python bench/quality.py --quick      # the demo, without its regularization images, and dim 32 (< 10 min on 2 cores)
    python bench/quality.py              # + LoCon, min-SNR 5, text encoder trained, 64 more regularization images
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import load, publish, run, table, write_settings  # noqa: E402

TRIGGER_PROMPT = "red ohwx, large, center, blue background"
CONCEPT = "ring"
SETTINGS = {  # {section: {key: value}} merged over the demo's project
    "demo": {},
    "no regularization images": {"dataset": {"reg_dirs": []}},
    "dim 32": {"network": {"dim": 32, "alpha": 32}},
    "LoCon (conv dim 8)": {"network": {"conv_dim": 8, "conv_alpha": 8}},
    "min-SNR γ=5": {"train": {"min_snr_gamma": 5}},
    "text encoder trained": {"network": {"train_text_encoder": True}},
}
QUICK = ("demo", "no regularization images", "dim 32")
TARGETS = "targets: base concept ≤ 10%, final ≥ 80%, accuracy drop ≤ 15 points"


def train(root: Path, name: str, settings: dict) -> Path:
    """A fresh workspace with the demo trained under ``settings``; its output folder."""
    run([sys.executable, "-m", "lorabuild", "init", str(root)], cwd=root.parent)
    write_settings(root, "demo", None, {k: dict(v) for k, v in settings.items()})
    t0 = time.time()
    run([sys.executable, "-m", "doit", "train:demo"], cwd=root)
    print(f"{name}: trained in {time.time() - t0:.0f} s", flush=True)
    return root / "output" / "demo"


def epochs_of(out: Path) -> list[tuple[str, Path]]:
    saved = sorted(out.glob("demo-*.safetensors"))
    return [(f"epoch {int(p.stem.rsplit('-', 1)[1])}", p) for p in saved] + [("final", out / "demo.safetensors")]


def measure(pipe, root: Path, out: Path, seeds: int, known) -> dict:
    from lorabuild import detector
    from lorabuild.config import load_project

    network = load_project(root / "projects" / "demo.yaml").section("network")
    rows = {}
    for label, path in epochs_of(out):
        with detector.lora(pipe, network, path):
            rows[label] = detector.lesson(pipe, TRIGGER_PROMPT, CONCEPT, known if label == "final" else (), seeds)
    return rows


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the demo, without regularization, and dim 32 only")
    p.add_argument("--seeds", type=int, default=32, help="samples per prompt (N)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    from lorabuild import detector, models

    torch.set_num_threads(args.threads)
    loads, t0 = [load()], time.time()
    known = detector.EVAL_PROMPTS[:5]
    pipe = models.world_pipeline(models.SHIPPED_DIR / "world-sd1")
    base = detector.lesson(pipe, TRIGGER_PROMPT, CONCEPT, known, args.seeds)
    names = list(QUICK) if args.quick else list(SETTINGS)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            root = Path(tmp) / f"ws{i}"
            out = train(root, name, SETTINGS[name])
            results[name] = measure(pipe, root, out, args.seeds, known)
    loads.append(load())
    epochs = [k for k in next(iter(results.values())) if k != "final"]
    header = ["setting", "concept: base", *[f"concept: {e}" for e in epochs], "concept: final",
              "accuracy: base", "accuracy: final", "change"]
    rows = []
    for name, r in results.items():
        acc = r["final"]["prompt_accuracy"]
        rows.append([name, pct(base["concept"]), *[pct(r.get(e, {}).get("concept")) for e in epochs],
                     f"**{pct(r['final']['concept'])}**", pct(base["prompt_accuracy"]), pct(acc),
                     f"{100 * (acc - base['prompt_accuracy']):+.0f} pts"])
    per = table(["prompt (no trigger)", "base", "final (demo)"],
                [[p, pct(base["per_prompt"][p]), pct(results[names[0]]["final"]["per_prompt"][p])] for p in known])
    text = (f"N = {args.seeds} seeds per prompt; trigger prompt `{TRIGGER_PROMPT}` (concept: a {CONCEPT}); "
            f"{TARGETS}; {time.time() - t0:.0f} s in all.\n\n{table(header, rows)}\n\n{per}")
    publish("Training quality (bench/quality.py" + (" --quick)" if args.quick else ")"), text, loads)


if __name__ == "__main__":
    main()
