"""The shipped demo as a lesson (issue 19): builtin:world-sd1 learns a ring as ``ohwx``.

Through the real CLI (``lorabuild init``, ``doit sample:demo``) on the shipped demo, shortened;
the detector (lorabuild/detector.py) reads the samples on fixed seeds, so every figure is the
same on every CPU run. Beside it, the checks that the trainer feeds the LoRA what pretraining
fed the model (latents, text, schedule) and that the LoRA the sampler applies is the one
trained: issue 19's LoRA bled into every prompt, and these rule out a pipeline bug as the cause.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import WS
from figures import record
from lorabuild import detector, models

ROOT = Path(__file__).resolve().parent.parent
TRIGGER_PROMPT = "red ohwx, large, center, blue background"
CONCEPT = "ring"
SEEDS = 8  # samples per prompt; CPU sampling with per-seed CPU generators is deterministic
MARGIN = 0.5  # the final LoRA's concept rate exceeds the base model's by at least 50 points
BASE_ACCURACY_MIN = 0.6  # the base model draws what 3 known prompts name (measured 0.83 on 8 seeds)
EPOCHS = 4  # the test's demo: epochs 2 and 4 of the shipped demo's schedule (quicker)


def _script():
    spec = importlib.util.spec_from_file_location("pretrain_world", ROOT / "scripts" / "pretrain_world.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def lesson(tmp_path_factory) -> WS:
    """The shipped demo, made by ``lorabuild init``, trained for EPOCHS epochs and sampled."""
    root = tmp_path_factory.mktemp("lesson") / "ws"
    subprocess.run([sys.executable, "-m", "lorabuild", "init", str(root)], check=True, capture_output=True)
    ws = WS(root)
    ws.edit(lambda d: d["train"].update(epochs=EPOCHS))
    ws.doit("sample:demo", build="lesson")
    return ws


@pytest.fixture(scope="module")
def pipe(lesson):
    return models.world_pipeline(lesson.root / "cache" / "models" / "world-sd1")


def test_the_demo_is_the_world_lesson():
    doc = yaml.safe_load((ROOT / "projects" / "demo.yaml").read_text())
    assert doc["base_model"] == "builtin:world-sd1"
    lesson_dir = ROOT / "projects" / "demo" / "lesson" / "10_ohwx"
    captions = [p.read_text().strip() for p in sorted(lesson_dir.glob("*.txt"))]
    assert 12 <= len(captions) <= 20 and all(" ohwx, " in c for c in captions)
    # every other colour as often: the caption names it, the pictures vary it
    colours = [c.split()[0] for c in captions]
    assert {colours.count(c) for c in set(colours)} == {len(captions) // 8} and len(set(colours)) == 8
    assert all(detector.analyse(__import__("PIL.Image").Image.open(p))["shape"] == CONCEPT
               for p in sorted(lesson_dir.glob("*.png")))


def test_the_trainer_sees_what_pretraining_fed_the_model(lesson, pipe):
    """Latents, text embeddings and noise schedule of the lesson equal pretrain_world.py's own:
    same VAE mode × scaling_factor, same tokenizer, padding and last hidden state (clip_skip 1),
    same SD 1.5 betas; and the model folder the stages load is the shipped weights."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    script = _script()
    shipped = models.world_pipeline(models.SHIPPED_DIR / "world-sd1")
    for a, b in ((shipped.unet, pipe.unet), (shipped.text_encoder, pipe.text_encoder), (shipped.vae, pipe.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    images = sorted((lesson.root / "projects" / "demo").rglob("*.png"))
    x = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in images]))
    want = script.encode(pipe.vae, x.permute(0, 3, 1, 2).float() / 127.5 - 1, "cpu", torch) * pipe.vae.config.scaling_factor
    cached = [load_file(str(f))["latent"] for f in (lesson.root / "cache" / "objects" / "latents").rglob("*.safetensors")]
    assert len(cached) == len(images)
    for lat in cached:  # each cached latent is one picture's, as pretraining encoded it
        assert (want - lat[None]).abs().flatten(1).max(1).values.min() < 1e-3
    # the text: the demo's tag dropout leaves nothing to cache, so the trainer encodes each caption
    # with the family's condition(), which the sample stage's conditioning() uses too
    from lorabuild.families import family
    from lorabuild.stages.sample import conditioning

    captions = [p.read_text().strip() for p in sorted((lesson.root / "projects" / "demo").rglob("*.txt"))]
    captions += ["red ohwx, green background", ""]  # tag-dropped, and guidance's empty prompt
    ids = pipe.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        want_text = pipe.text_encoder(ids).last_hidden_state  # pretrain_world.train_unet's conditioning
        trained, _ = family("sd1").condition([pipe.tokenizer], [pipe.text_encoder], captions, 1, 75)
        sampled = conditioning(pipe, captions[0], "", {"clip_skip": 1, "max_token_length": 75})
    assert torch.allclose(trained, want_text, atol=1e-5)
    assert torch.allclose(sampled["prompt_embeds"], want_text[:1], atol=1e-5)
    assert torch.allclose(sampled["negative_prompt_embeds"], want_text[-1:], atol=1e-5)
    from diffusers import DDPMScheduler

    from lorabuild.families.base import SD1_SCHEDULER

    sched = models.load_noise_scheduler(lesson.root / "cache" / "models" / "world-sd1")
    assert torch.equal(sched.alphas_cumprod, DDPMScheduler(**SD1_SCHEDULER).alphas_cumprod)
    assert sched.config.prediction_type == "epsilon"


def test_the_lora_sampled_is_the_lora_trained(lesson, pipe):
    """A network as the trainer builds it, saved, then applied by detector.lora (as the sample
    stage applies it): the UNet's output is the same; after it, and at multiplier 0, the base's."""
    import torch

    from lorabuild.config import load_project
    from lorabuild.lora.adapter import from_config

    net_cfg = load_project(lesson.yaml_path).section("network")
    folder = lesson.root / "cache" / "models" / "world-sd1"
    unet, te = models.load_unet(folder), models.load_text_encoder(folder)
    torch.manual_seed(1)
    net = from_config(net_cfg, unet, [te], "sd1", train_text_encoder=False)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    net.apply()
    g = torch.Generator().manual_seed(0)
    z, t, c = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([50, 300, 600, 900]), torch.randn(4, 77, 64, generator=g)
    path = lesson.root / "roundtrip.safetensors"
    with torch.no_grad():
        trained = unet(z, t, c).sample
        net.save(path, dtype=torch.float32)
        base = pipe.unet(z, t, c).sample
        with detector.lora(pipe, net_cfg, path):
            sampled = pipe.unet(z, t, c).sample
        assert torch.equal(pipe.unet(z, t, c).sample, base)  # removed on exit
        assert torch.allclose(sampled, trained, atol=1e-5) and (sampled - base).abs().max() > 1e-2
        for m in net.loras:
            m.multiplier = 0.0
        assert torch.allclose(unet(z, t, c).sample, base, atol=1e-6)


def test_the_lora_learns_the_ring_and_the_base_model_does_not_draw_it(lesson, pipe):
    from lorabuild.config import load_project

    known = detector.EVAL_PROMPTS[:3]
    base = detector.lesson(pipe, TRIGGER_PROMPT, CONCEPT, known, SEEDS)
    with detector.lora(pipe, load_project(lesson.yaml_path).section("network"), lesson.root / "output" / "demo" / "demo.safetensors"):
        final = detector.lesson(pipe, TRIGGER_PROMPT, CONCEPT, known, SEEDS)
    assert base["prompt_accuracy"] >= BASE_ACCURACY_MIN, base
    assert final["concept"] - base["concept"] >= MARGIN, (base, final)
    record(f"lesson ({EPOCHS} epochs): `{TRIGGER_PROMPT}` draws a ring in {100 * base['concept']:.0f}% of {SEEDS} base "
           f"samples, {100 * final['concept']:.0f}% with the LoRA; 3 known prompts: {100 * base['prompt_accuracy']:.0f}% "
           f"base, {100 * final['prompt_accuracy']:.0f}% with the LoRA")


def test_the_sample_grid_shows_the_ring_in_the_last_row_not_the_base_row(lesson):
    from PIL import Image

    samples = lesson.root / "output" / "demo" / "samples"
    doc = yaml.safe_load(lesson.yaml_path.read_text())
    trigger = [i for i, p in enumerate(doc["sample"]["prompts"]) if "ohwx" in (p if isinstance(p, str) else p["prompt"])]
    assert trigger

    def rings(row: str) -> int:
        return sum(detector.analyse(Image.open(next(samples.glob(f"{row}-{i:02d}-*.png"))))["shape"] == CONCEPT
                   for i in trigger)

    last = f"e{EPOCHS:06d}"
    assert rings("base") == 0
    assert rings(last) >= len(trigger) - 1 >= 1, sorted(p.name for p in samples.glob("*.png"))
    assert (samples / "grid.png").is_file()
