"""One variant of the demo's lesson, scored by the images (issue 19's experiments).

The shipped demo (``lorabuild init``) with one change: another concept shape for ``ohwx``
(``--concept``, any of ``lorabuild.world.NEW_SHAPES``: the 16 lesson pictures are made as
scripts/make_world_demo.py makes the rings, same colours, sizes, positions and backgrounds;
``--bold``: drawn larger, a heart with a deeper notch),
other regularization pictures (``--reg world``: the demo's 64; ``base``: the base model's own
samples for the same captions, kohya's generated class images; ``none``), and any project
settings (``--set '{"train": {"learning_rate": 0.004}}'``). ``doit train:demo`` trains it; the
base model and every saved epoch are scored on ``--seeds`` seeds as bench/quality.py scores them
(concept rate of the trigger prompt; prompt accuracy on 5 known prompts, with the shape and colour
read right). One line of a Markdown table is printed; nothing is written to RESULTS.md.

    python bench/lesson_variants.py --concept heart --set '{"train": {"prior_loss_weight": 0.2}}'
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from common import run, write_settings  # noqa: E402
from quality import STEPS, TRIGGER_PROMPT, epochs_of  # noqa: E402


def lesson_data(data: Path, concept: str, reg: str, pipe, swap: str | None = None, bold: bool = False) -> None:
    """The demo's pictures with ``concept`` in the ring's place and the ``reg`` regularization set;
    with ``swap`` the lesson pictures again, captioned with the word ``swap`` in the trigger's place,
    among the regularization pictures (ai-toolkit's differential output preservation: with
    ``train.reg_target: base`` the model learns to predict, for ``red circle`` on a noisy ring, what
    the base model predicts); ``bold`` draws the lesson pictures' shape larger and a heart with a
    deeper notch (``world.render``'s ``bold``)."""
    import make_world_demo as mk
    from dataclasses import replace

    from lorabuild import detector, world

    shutil.rmtree(data)
    scenes = [replace(s, shape=concept) for s in mk.lesson_scenes(mk.LESSON, mk.SEED)]
    mk.write(data / "lesson" / f"{mk.REPEATS}_{mk.TRIGGER}", scenes, bold)
    if swap:
        mk.write(data / "reg" / f"1_{swap}", [replace(s, word=swap) for s in scenes], bold)
    if reg == "none":
        return
    sub = world.write_dataset(data / "reg", count=mk.REG, repeats=1, tokens="shape", seed=mk.REG_SEED)
    if reg == "base":  # prior preservation with what the base model itself draws for each caption
        captions = {f: f.read_text(encoding="utf-8").strip() for f in sorted(sub.glob("*.txt"))}
        images = detector.render_many(pipe, list(dict.fromkeys(captions.values())), [7], STEPS)
        for f, caption in captions.items():
            images[caption][0].save(f.with_suffix(".png"))


def pct(x: float) -> str:
    return f"{100 * x:.0f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concept", default="ring")
    p.add_argument("--reg", choices=("world", "base", "none"), default="world")
    p.add_argument("--swap", default=None, help="add the lesson pictures captioned with this word to the reg set")
    p.add_argument("--bold", action="store_true", help="lesson pictures drawn larger, a heart with a deeper notch")
    p.add_argument("--bold-scale", type=float, default=None,
                   help="with --bold, the shape's scale (lorabuild.world.BOLD_SCALE; 1: the notch only)")
    p.add_argument("--set", default="{}", help="JSON {section: {key: value}} merged over the demo's project")
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch

    from lorabuild import detector, models, world
    from lorabuild.config import load_project

    torch.set_num_threads(args.threads)
    if args.bold_scale is not None:
        world.BOLD_SCALE = args.bold_scale
    pipe = models.world_pipeline(models.SHIPPED_DIR / "world-sd1")
    known = detector.EVAL_PROMPTS[:5]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ws"
        run([sys.executable, "-m", "lorabuild", "init", str(root)], cwd=root.parent)
        lesson_data(root / "projects" / "demo", args.concept, args.reg, pipe, args.swap, args.bold)
        settings = json.loads(args.set)
        if args.reg == "none" and not args.swap:
            settings.setdefault("dataset", {})["reg_dirs"] = []
        write_settings(root, "demo", None, settings)
        t0 = time.time()
        run([sys.executable, "-m", "doit", "train:demo"], cwd=root)
        trained = time.time() - t0
        network = load_project(root / "projects" / "demo.yaml").section("network")
        rows = [("base", detector.lesson(pipe, TRIGGER_PROMPT, args.concept, known, args.seeds, STEPS))]
        for label, path in epochs_of(root / "output" / "demo"):
            with detector.lora(pipe, network, path):
                rows.append((label, detector.lesson(pipe, TRIGGER_PROMPT, args.concept, known, args.seeds, STEPS)))
    cells = [" / ".join(pct(r["concept"]) for _, r in rows) + "%",
             " / ".join(pct(r["prompt_accuracy"]) for _, r in rows) + "%",
             f"{pct(rows[-1][1]['attributes']['shape'])} / {pct(rows[-1][1]['attributes']['colour'])}%"]
    print(f"columns: {', '.join(label for label, _ in rows)}; trained in {trained:.0f} s")
    swap = (f", swap {args.swap}" if args.swap else "") + (", bold" if args.bold else "") + (
        f" (scale {args.bold_scale})" if args.bold and args.bold_scale is not None else "")
    print(f"| {args.concept}, reg {args.reg}{swap}, {args.set} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
