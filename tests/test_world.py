"""The synthetic world, its detector and the pretrained world-sd1 model that ships with lorabuild
(made by scripts/pretrain_world.py; the record beside the weights says how). The shipped demo
that teaches it a new shape is tested in test_lesson.py."""
from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

import pytest
from PIL import Image

from figures import record
from lorabuild import detector, models, world

SHIPPED = models.SHIPPED_DIR / "world-sd1"
PSNR_MIN = 20.0  # dB on 8 held-out pictures; pretrain.json records the figure on 64
BASE_ACCURACY_MIN = 0.5  # share of base samples showing everything their prompt names


def test_world_pictures_are_the_same_bytes_from_the_same_seed(tmp_path):
    a, scene = world.sample(12)
    b, _ = world.sample(12)
    assert a.tobytes() == b.tobytes() and a.size == (64, 64)
    assert world.sample(13)[0].tobytes() != a.tobytes()
    assert scene.caption == f"{scene.colour} {scene.shape}, {scene.size}, {scene.position}, " + (
        f"{scene.background} background" if scene.pattern == "plain" else f"{scene.background} {scene.pattern} background")
    assert scene.colour != scene.background
    sub = world.write_dataset(tmp_path, 3, 5, "ohwx", seed=7, shapes=("ring",), word="ohwx")
    assert sub.name == "5_ohwx"
    assert sorted(p.name for p in sub.iterdir()) == ["000.png", "000.txt", "001.png", "001.txt", "002.png", "002.txt"]
    assert " ohwx, " in (sub / "000.txt").read_text()
    with pytest.raises(ValueError, match="unknown shape 'blob'"):
        world.render(world.Scene("blob", "red", "large", "left", "blue"))


def test_detector_reads_fresh_world_pictures():
    # 300 pictures from seeds no centroid was fitted on, the demo's ring included
    acc = detector.accuracy(300)
    assert acc["all"] >= 0.95, acc  # measured: 1.00 for every attribute
    assert detector.named("red circle, large, left, blue striped background") == {
        "colour": "red", "shape": "circle", "background": "blue"}
    assert detector.named("ohwx, green background") == {"background": "green"}


def test_bold_hearts_are_larger_with_a_deeper_notch_and_still_hearts():
    # world.render's bold (bench/lesson_variants.py --bold): the lesson's heart drawn larger and
    # with a deeper notch; off, the picture is the world's own
    import numpy as np

    scene = world.Scene("heart", "red", "large", "center", "blue")
    plain, bold = world.render(scene), world.render(scene, bold=True)
    assert world.render(scene, bold=False).tobytes() == plain.tobytes() != bold.tobytes()

    def red(img):
        a = np.asarray(img).astype(int)
        return (a[..., 0] > 150) & (a[..., 2] < 120)

    def notch_row(mask):  # the first red row of the middle column, below the lobes' first row
        return int(np.argmax(mask[:, 32])) - int(np.argmax(mask.any(axis=1)))

    def width(mask):
        return int(mask.any(axis=0).sum())

    assert width(red(bold)) >= width(red(plain)) + 4  # 15% larger: 38 px wide → 44
    assert notch_row(red(bold)) >= notch_row(red(plain)) + 3
    rng = random.Random(5)
    scenes = [world.Scene("heart", c, size, pos, rng.choice([b for b in world.COLOURS if b != c]))
              for c in world.COLOURS for size in world.SIZES for pos in world.POSITIONS]
    assert all(detector.analyse(world.render(s, bold=True))["shape"] == "heart" for s in scenes)


def test_shipped_weights_are_the_ones_the_script_recorded():
    record_ = json.loads((SHIPPED / models.SHIPPED_RECORD).read_text())
    files = {p.relative_to(SHIPPED).as_posix(): p for p in SHIPPED.rglob("*") if p.is_file()}
    files.pop(models.SHIPPED_RECORD)
    assert set(record_["sha256"]) == set(files)
    for name, path in files.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == record_["sha256"][name], name
    weights = [p for p in files.values() if p.suffix == ".safetensors"]
    assert len(weights) == 3 and sum(p.stat().st_size for p in weights) <= 20 * 2**20
    assert record_["figures"]["vae_psnr_db"] >= PSNR_MIN and "prompt_accuracy" in record_["figures"]


def test_a_pretrained_builtin_without_its_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "SHIPPED_DIR", tmp_path / "models")  # a package whose weights are missing
    with pytest.raises(models.ModelError, match="weights are missing .*pretrain_world.py"):
        models._write_builtin("world-sd1", tmp_path / "world-sd1")


@pytest.fixture(scope="module")
def world_pipe(tmp_path_factory):
    """world-sd1 as every stage loads it: written once as a diffusers folder from the shipped files."""
    folder = models.ensure_builtin("world-sd1", tmp_path_factory.mktemp("cache"))
    return models.world_pipeline(folder)


def test_vae_reconstructs_regenerated_world_pictures(world_pipe):
    import numpy as np
    import torch

    seeds = range(1_000_000, 1_000_008)  # held out from pretraining, as pretrain_world.py measures
    x = torch.from_numpy(np.stack([np.asarray(world.sample(s)[0]) for s in seeds])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        rec = world_pipe.vae.decode(world_pipe.vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    psnr = 10 * math.log10(1 / ((rec - x) / 2).pow(2).mean().item())
    flat = x.mean(dim=(2, 3), keepdim=True).expand_as(x)  # each picture's mean colour: no structure at all
    flat_psnr = 10 * math.log10(1 / ((flat - x) / 2).pow(2).mean().item())
    assert psnr >= PSNR_MIN and psnr >= flat_psnr + 5, (psnr, flat_psnr)
    record(f"world-sd1 VAE: {psnr:.1f} dB on 8 regenerated held-out pictures (their flat mean colour: {flat_psnr:.1f} dB)")


def test_detector_reads_the_vaes_reconstructions(world_pipe):
    # what the base model's figures rest on: a decoded picture (blurred, with a halo at the
    # shape's edge) is read like the picture itself; large centred shapes, as EVAL_PROMPTS ask
    import random

    import numpy as np
    import torch

    scenes = [world.random_scene(random.Random(5_000_000 + i)) for i in range(12)]
    scenes = [world.Scene(s.shape, s.colour, "large", "center", s.background) for s in scenes]
    x = torch.from_numpy(np.stack([np.asarray(world.render(s)) for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        rec = world_pipe.vae.decode(world_pipe.vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    pics = [Image.fromarray(((r.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype("uint8")) for r in rec]
    got = [detector.analyse(im) for im in pics]
    right = sum((g["shape"], g["colour"], g["background"]) == (s.shape, s.colour, s.background)
                for g, s in zip(got, scenes))
    assert right >= 11, list(zip(scenes, got))  # measured: 12 of 12 (of 120: 119)
    record(f"detector on world-sd1 VAE reconstructions: {right} of 12 large centred pictures read right")


def test_the_trigger_words_embedding_is_the_untrained_init():
    # a LoRA binds "ohwx" to the demo's ring: the text encoder trained with the UNet, yet the
    # token no caption used kept its seeded random embedding, while a world word's moved
    import importlib.util

    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    spec = importlib.util.spec_from_file_location("pretrain_world", Path(__file__).parent.parent / "scripts" / "pretrain_world.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    torch.manual_seed(0)
    init = script.fp16_round(CLIPTextModel(CLIPTextConfig(**script.TE_CFG))).get_input_embeddings().weight
    shipped = CLIPTextModel.from_pretrained(str(SHIPPED / "text_encoder"), torch_dtype=torch.float32)
    weights = shipped.get_input_embeddings().weight
    tok = CLIPTokenizer.from_pretrained(str(models.TOKENIZER_DIR))
    (trigger,), (red,) = tok("ohwx", add_special_tokens=False).input_ids, tok("red", add_special_tokens=False).input_ids
    assert torch.equal(weights[trigger], init[trigger])
    assert not torch.equal(weights[red], init[red])


def test_base_model_follows_its_prompts(world_pipe):
    acc = detector.prompt_accuracy(world_pipe, detector.EVAL_PROMPTS[:3], 8)
    assert acc["prompt_accuracy"] >= BASE_ACCURACY_MIN, acc
    record(f"world-sd1 base model: {100 * acc['prompt_accuracy']:.0f}% of 24 samples (3 prompts x 8 seeds) show "
           "the shape, colour and background their prompt names")
