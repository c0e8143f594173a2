"""Training quality, judged by the images: does the demo's LoRA learn its concept, and what does it break?

The shipped demo (``lorabuild init``: builtin:world-sd1 learns the ring as ``ohwx``) is
trained under each setting: one workspace, one project file per setting
(``projects/<setting>.yaml``, the demo's with the setting merged in), and one ``doit`` run
that trains them all (their resize and latent caches are shared). Then N seeds per prompt are
sampled (Euler ancestral, guidance 4, as the demo samples: ``lorabuild.detector.render_many``,
every prompt and seed of a model in a few batches) from the base model and from every saved
epoch, and ``lorabuild.detector`` reads them:

- concept rate: the share of trigger-prompt samples that show a ring (base, each epoch);
- prompt accuracy: the share of samples showing every attribute their prompt names, on 5
  prompts without the trigger (base vs the final LoRA): what the LoRA disturbs.

A Markdown table is printed and appended to bench/RESULTS.md, with the wall time and the CPU
time (user + sys of this process and its children: the figure a shared machine cannot inflate).

    python bench/quality.py --quick      # the demo, without its regularization images, dim 32 (< 10 min on 2 cores)
    python bench/quality.py              # + LoCon, min-SNR 5, text encoder trained
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import yaml

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
STEPS = 30  # sampler steps, as the demo samples


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of every child it has waited for."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def train(root: Path, names: list[str]) -> dict[str, Path]:
    """One workspace holding the demo once per setting (``projects/s<i>.yaml``), all trained by one
    ``doit`` run; {setting: its output folder}."""
    run([sys.executable, "-m", "lorabuild", "init", str(root)], cwd=root.parent)
    demo = yaml.safe_load((root / "projects" / "demo.yaml").read_text())
    projects = {}
    for i, name in enumerate(names):
        doc = yaml.safe_load(yaml.safe_dump(demo))  # a deep copy
        (root / "projects" / f"s{i}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        write_settings(root, f"s{i}", doc, {k: dict(v) for k, v in SETTINGS[name].items()})
        projects[name] = f"s{i}"
    (root / "projects" / "demo.yaml").unlink()  # its pictures stay: the settings' projects name them
    t0 = time.time()
    run([sys.executable, "-m", "doit", *[f"train:{p}" for p in projects.values()]], cwd=root)
    print(f"trained {len(names)} settings in {time.time() - t0:.0f} s", flush=True)
    return {name: root / "output" / p for name, p in projects.items()}


def epochs_of(out: Path) -> list[tuple[str, Path]]:
    saved = sorted(out.glob(f"{out.name}-*.safetensors"))
    return [(f"epoch {int(p.stem.rsplit('-', 1)[1])}", p) for p in saved] + [("final", out / f"{out.name}.safetensors")]


def measure(pipe, root: Path, out: Path, seeds: int, known) -> dict:
    from lorabuild import detector
    from lorabuild.config import load_project

    network = load_project(root / "projects" / f"{out.name}.yaml").section("network")
    rows = {}
    for label, path in epochs_of(out):
        with detector.lora(pipe, network, path):
            rows[label] = detector.lesson(pipe, TRIGGER_PROMPT, CONCEPT, known if label == "final" else (), seeds, STEPS)
    return rows


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def report(base: dict, results: dict, known, seeds: int, wall: float, cpu: float) -> str:
    epochs = [k for k in next(iter(results.values())) if k != "final"]
    header = ["setting", "concept: base", *[f"concept: {e}" for e in epochs], "concept: final",
              "accuracy: base", "accuracy: final", "change"]
    rows = []
    for name, r in results.items():
        acc = r["final"]["prompt_accuracy"]
        rows.append([name, pct(base["concept"]), *[pct(r[e]["concept"]) for e in epochs],
                     f"**{pct(r['final']['concept'])}**", pct(base["prompt_accuracy"]),
                     f"**{pct(acc)}**",
                     f"{100 * (acc - base['prompt_accuracy']):+.0f} pts"])
    first = next(iter(results))
    per = table(["prompt (no trigger)", "base", f"final ({first})"],
                [[p, pct(base["per_prompt"][p]), pct(results[first]["final"]["per_prompt"][p])] for p in known])
    return (f"N = {seeds} seeds per prompt, {STEPS} sampler steps; trigger prompt `{TRIGGER_PROMPT}` (concept: a "
            f"{CONCEPT}); {TARGETS}; {wall:.0f} s wall, {cpu:.0f} s CPU (user + sys, children included).\n\n"
            f"{table(header, rows)}\n\n{per}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"only: {', '.join(QUICK)}")
    p.add_argument("--seeds", type=int, default=32, help="samples per prompt (N)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    from lorabuild import detector, models

    torch.set_num_threads(args.threads)
    loads, t0, cpu0 = [load()], time.time(), cpu_seconds()
    known = detector.EVAL_PROMPTS[:5]
    pipe = models.world_pipeline(models.SHIPPED_DIR / "world-sd1")
    base = detector.lesson(pipe, TRIGGER_PROMPT, CONCEPT, known, args.seeds, STEPS)
    names = list(QUICK) if args.quick else list(SETTINGS)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ws"
        outs = train(root, names)
        results = {name: measure(pipe, root, out, args.seeds, known) for name, out in outs.items()}
    loads.append(load())
    text = report(base, results, known, args.seeds, time.time() - t0, cpu_seconds() - cpu0)
    publish("Training quality (bench/quality.py" + (" --quick)" if args.quick else ")"), text, loads)


if __name__ == "__main__":
    main()
