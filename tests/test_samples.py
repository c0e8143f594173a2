"""The sample stage: kohya prompt lines, content-addressed images, the grid and its page."""
from __future__ import annotations

import html
import html.parser
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from lorabuild import gallery, prompts
from lorabuild.stages.sample import in_training_points
from lorabuild.train.plan import TrainPlan

DEFAULTS = {"prompts": [], "negative": "", "width": 512, "height": 512, "steps": 20, "cfg": 7.0, "seed": 1,
            "sampler": "euler_a", "lora_weight": 1.0, "prompt_file": None}


# --- kohya prompt lines ---------------------------------------------------------------

def test_a_full_kohya_line_parses_every_option():
    got = prompts.parse_line("masterpiece, 1girl --n lowres, bad hands --w 512 --h 768 --s 28 --l 7.5 --d 1234 "
                             "--ss k_euler_a --m 0.8")
    assert got == {"prompt": "masterpiece, 1girl", "negative": "lowres, bad hands", "width": 512, "height": 768,
                   "steps": 28, "cfg": 7.5, "seed": 1234, "sampler": "euler_a", "lora_weight": 0.8}


def test_odd_spacing_and_case_are_tolerated():
    got = prompts.parse_line("   a cat,   sitting   --W  640 --h768   --D 5  --n   ugly  ")
    assert got == {"prompt": "a cat,   sitting", "width": 640, "height": 768, "seed": 5, "negative": "ugly"}


def test_missing_options_take_the_project_defaults():
    (s,) = prompts.resolve({**DEFAULTS, "prompts": ["just a prompt"]}, Path("."))
    assert s == {"prompt": "just a prompt", **{k: DEFAULTS[k] for k in prompts.SETTINGS}}


def test_bad_and_unknown_options_are_reported_and_skipped():
    warnings: list[str] = []
    got = prompts.parse_line("dog --w wide --x 3 --ss nosuchsampler --s 12", warnings)
    assert got == {"prompt": "dog", "steps": 12}
    assert len(warnings) == 3
    assert any("--w" in w and "wide" in w for w in warnings)
    assert any("--x 3" in w for w in warnings)
    assert any("nosuchsampler" in w for w in warnings)


def test_comments_blank_lines_and_a_bom_in_a_prompt_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_bytes("\ufeff# my prompts\n\nfirst --d 1\r\n  # indented comment\nsecond --s 3\n".encode())
    assert prompts.read_prompt_file(f) == [{"prompt": "first", "seed": 1}, {"prompt": "second", "steps": 3}]


def test_sizes_are_floored_to_multiples_of_8_and_steps_clamped():
    (s,) = prompts.resolve({**DEFAULTS, "prompts": ["x --w 515 --h 20 --s 0"]}, Path("."))
    assert (s["width"], s["height"], s["steps"]) == (512, 64, 1)


def test_yaml_entries_and_prompt_file_combine_in_order(tmp_path):
    (tmp_path / "p.txt").write_text("from file --l 3\n")
    cfg = {**DEFAULTS, "prompts": [{"prompt": "object", "seed": 9}, "string --d 4"], "prompt_file": "p.txt"}
    got = prompts.resolve(cfg, tmp_path)
    assert [(s["prompt"], s["seed"], s["cfg"]) for s in got] == [("object", 9, 7.0), ("string", 4, 7.0),
                                                                   ("from file", 1, 3.0)]


def test_in_training_points():
    plan = TrainPlan(images=4, reg_samples_per_epoch=0, samples_per_epoch=40, batch_size=4, batches_per_epoch=10,
                     gradient_accumulation_steps=1, steps_per_epoch=10, epochs=3, total_steps=30)
    cfg = {**DEFAULTS, "prompts": ["p"], "at_first": True, "every_n_epochs": 2, "every_n_steps": 12}
    assert in_training_points(cfg, plan) == {"base": ("base model", 0), "e000002": ("epoch 2", 20),
                                             "s000012": ("step 12", 12), "s000024": ("step 24", 24)}
    assert in_training_points({**cfg, "prompts": []}, plan) == {}


# --- the grid ---------------------------------------------------------------------------

def _tile(path: Path, colour: str, size=(32, 24)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def test_grid_dimensions_cells_and_labels(tmp_path):
    colours = [["red", "green", "blue"], ["yellow", "purple", "orange"]]
    cells = [[_tile(tmp_path / f"{c}.png", c) for c in row] for row in colours]
    out = tmp_path / "grid.png"
    size = gallery.grid(cells, ["epoch 1", "epoch 2"], ["a", "b", "c"], out)
    img = Image.open(out).convert("RGB")
    assert size == img.size == (gallery.LABEL_W + 3 * 32, gallery.LABEL_H + 2 * 24)
    for r, row in enumerate(colours):
        for c, colour in enumerate(row):
            centre = (gallery.LABEL_W + c * 32 + 16, gallery.LABEL_H + r * 24 + 12)
            assert img.getpixel(centre) == Image.new("RGB", (1, 1), colour).getpixel((0, 0))

    def inked(box) -> bool:
        return img.crop(box).convert("L").getextrema()[0] < 255

    for r in range(2):  # each row label is drawn in the left margin beside its row
        assert inked((0, gallery.LABEL_H + r * 24, gallery.LABEL_W, gallery.LABEL_H + (r + 1) * 24))
    for c in range(3):  # each column label above its column
        assert inked((gallery.LABEL_W + c * 32, 0, gallery.LABEL_W + (c + 1) * 32, gallery.LABEL_H))
    assert not inked((0, 0, gallery.LABEL_W, gallery.LABEL_H))  # the corner stays empty


def _font():
    from PIL import ImageDraw

    return ImageDraw.Draw(Image.new("RGB", (1, 1))).getfont()


def test_wrap_keeps_every_word_and_fits_the_width():
    font = _font()
    prompt = "masterpiece, best quality, 1girl, long hair, looking at viewer, simple background, smile"
    for width in (60, 124, 300):
        lines = gallery.wrap(prompt, font, width)
        assert " ".join(lines) == prompt  # nothing cut off
        assert all(font.getlength(line) <= width for line in lines)
    assert len(gallery.wrap(prompt, font, 60)) > len(gallery.wrap(prompt, font, 124)) > len(gallery.wrap(prompt, font, 300))
    word = "supercalifragilisticexpialidocious_extra_long_tag"  # wider than a column: broken between characters
    lines = gallery.wrap(word, font, 40)
    assert len(lines) > 1 and "".join(lines) == word and all(font.getlength(line) <= 40 for line in lines)
    assert gallery.wrap("fits", font, 124) == ["fits"]


def _band(img: Image.Image, x0: int, x1: int, bottom: int) -> list[int]:
    """The rows (y) of a strip that have ink."""
    gray = img.crop((x0, 0, x1, bottom)).convert("L")
    return [y for y in range(gray.height) if gray.crop((0, y, gray.width, y + 1)).getextrema()[0] < 255]


def test_long_prompt_labels_wrap_over_as_many_lines_as_they_need(tmp_path):
    font = _font()
    step = gallery.line_height(font)
    cells = [[_tile(tmp_path / "r.png", "red", (64, 48)), _tile(tmp_path / "g.png", "green", (64, 48))]]
    heights = []
    for n in (1, 4, 12):
        prompt = " ".join(["long hair"] * n)
        img = gallery.grid_image(cells, ["epoch 1"], ["a", prompt])
        band = img.height - 48
        heights.append(band)
        lines = gallery.wrap(prompt, font, 60)
        assert band == gallery.LABEL_H + step * (len(lines) - 1)  # the band grows to the longest label
        inked = _band(img, gallery.LABEL_W + 64, gallery.LABEL_W + 128, band)
        for i in range(len(lines)):  # every line is drawn, one below the other, inside the band
            assert any(2 + i * step <= y < 2 + (i + 1) * step for y in inked), (n, i)
        assert img.getpixel((gallery.LABEL_W + 96, band + 24)) == (0, 128, 0)  # the tiles sit below the band
        assert max(_band(img, gallery.LABEL_W, gallery.LABEL_W + 64, band)) < step + 2  # "a": its one line only
    assert heights[0] == gallery.LABEL_H and heights[0] < heights[1] < heights[2]


def test_a_long_row_label_wraps_in_the_margin_and_its_row_grows_to_fit(tmp_path):
    font = _font()
    step = gallery.line_height(font)
    cells = [[_tile(tmp_path / "r.png", "red", (16, 8))], [_tile(tmp_path / "b.png", "blue", (16, 8))]]
    label = "epoch 12 of a run with a long name"
    lines = gallery.wrap(label, font, gallery.LABEL_W - 4)
    assert len(lines) > 1 and " ".join(lines) == label
    img = gallery.grid_image(cells, [label, "base model"], ["a"])
    rh = (img.height - gallery.LABEL_H) // 2
    assert rh >= step * len(lines)  # taller than the 8 px tiles: the label needs it
    margin = _band(img, 0, gallery.LABEL_W, gallery.LABEL_H + rh)
    assert len({(y - gallery.LABEL_H) // step for y in margin if y >= gallery.LABEL_H}) >= len(lines)
    assert img.getpixel((gallery.LABEL_W + 8, gallery.LABEL_H + 4)) == (255, 0, 0)
    assert img.getpixel((gallery.LABEL_W + 8, gallery.LABEL_H + rh + 4)) == (0, 0, 255)


def test_index_html_shows_every_prompt_in_full_above_its_column(tmp_path):
    long = "masterpiece, best quality, " + ", ".join(f"tag number {i}" for i in range(40))
    s = {**DEFAULTS, "prompt": long, "width": 64, "height": 64}
    short = {**s, "prompt": "a cat"}
    gallery.index_html([("base model", [("base-00.png", s), ("base-01.png", short)]),
                        ("epoch 1", [("e1-00.png", s), ("e1-01.png", short)])], tmp_path / "index.html", "x samples")
    page = (tmp_path / "index.html").read_text()
    heads = re.findall(r"<th class='prompt'>(.*?)</th>", page)
    assert [html.unescape(h) for h in heads] == [long, "a cat"]
    assert "…" not in page and "<th>base model</th>" in page and "<th>epoch 1</th>" in page


# --- the stage on the demo --------------------------------------------------------------

def _sample_counts(ws, build: str) -> tuple[int, int]:
    ws.doit("sample:demo", build=build)
    r = ws.report("sample")
    return r["computed"], r["reused"]


def test_adding_a_prompt_renders_one_image_per_row(demo):
    demo.edit(lambda d: d["sample"]["prompts"].append("redcircle, shape --d 3 --s 4"))
    assert _sample_counts(demo, "add") == (2, 4)  # one new image per row
    assert demo.ran("add") == {"sample"}
    demo.edit(lambda d: d["sample"]["prompts"][1].update(seed=8))
    assert _sample_counts(demo, "seed") == (2, 4)  # that prompt's column, every row
    files = sorted(p.name for p in (demo.root / "output/demo/samples").glob("*.png"))
    assert files == sorted(["grid.png"] + [f"{row}-{i:02d}-{slug}.png" for row in ("base", "e000001")
                                          for i, slug in enumerate(["redcircle-shape-white-background",
                                                                    "bluesquare-shape-yellow-background",
                                                                    "redcircle-shape"])])
    grid = Image.open(demo.root / "output/demo/samples/grid.png")
    # the two longer prompts take two lines of a 128 px column: the label band is one line taller
    assert grid.size == (gallery.LABEL_W + 3 * 128, gallery.LABEL_H + gallery.line_height(_font()) + 2 * 128)


def test_a_new_epoch_renders_one_image_per_prompt(demo):
    # Training is deterministic and the learning rate constant, so epoch e's weights are the same
    # whatever the epoch count: epoch 1 is this workspace's one-epoch build, epoch 2 the
    # six-epoch demo build it was copied from (saved every 2). Only epoch 3 is new.
    demo.edit(lambda d: d["train"].update(epochs=3, save_every_n_epochs=1))
    assert _sample_counts(demo, "epoch3") == (2, 6)
    assert demo.report("train")["computed"] == 1
    items = [i["id"] for i in demo.manifest("sample")["items"]]
    assert [i.split("-")[0] for i in items] == ["base"] * 2 + ["e000001"] * 2 + ["e000002"] * 2 + ["e000003"] * 2


def test_sampling_while_training_is_reused_by_the_sample_stage_bit_for_bit(demo):
    demo.edit(lambda d: (d["train"].update(epochs=2), d["sample"].update(at_first=True, every_n_epochs=1,
                                                                           every_n_steps=30)))
    demo.doit("train:demo", build="train")
    train = demo.report("train")
    assert train["computed"] == 1
    # 40 steps per epoch: base, step 30, epoch 1, step 60, epoch 2 (final), two prompts each. The
    # base model's and both epochs' images are in the store already, from the demo builds this
    # workspace was copied from (deterministic training: same weights, same keys).
    assert "4 images rendered, 6 reused" in " ".join(train["notes"])
    samples = demo.root / "output/demo/samples"
    assert len(list(samples.glob("s000030-*.png"))) == 2  # visible while training runs
    assert _sample_counts(demo, "sample") == (0, 10)
    rows = [i["id"].split("-")[0] for i in demo.manifest("sample")["items"]]
    assert rows == [r for r in ("base", "s000030", "e000001", "s000060", "e000002") for _ in range(2)]
    # Render them all again in the sample stage: the same bytes (same seed, same image).
    before = {p.name: p.read_bytes() for p in samples.glob("*-*.png")}
    shutil.rmtree(demo.root / "cache/objects/sample")
    demo.doit("forget", "sample:demo", build="forget")
    assert _sample_counts(demo, "again") == (10, 0)
    after = {p.name: p.read_bytes() for p in samples.glob("*-*.png")}
    assert after == before
    # the base-model row is the model without the LoRA: not the trained epochs
    assert before["base-00-redcircle-shape-white-background.png"] != before["e000002-00-redcircle-shape-white-background.png"]


class _Images(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def test_index_html_references_every_image_with_its_settings(demo):
    samples = demo.root / "output/demo/samples"
    page = html.unescape((samples / "index.html").read_text())
    parser = _Images()
    parser.feed(page)
    assert sorted(parser.srcs) == sorted(p.name for p in samples.glob("*.png"))
    assert "Prompt: bluesquare, shape, yellow background\n" in page  # readable text, not JSON
    assert "Seed: 7, Size: 128x128, LoRA weight: 1" in page and ", Sampler: " in page and '"seed"' not in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it)")
def test_index_html_shows_no_broken_image_in_headless_chromium(built_demo):
    from playwright.sync_api import sync_playwright

    page_path = built_demo.root / "output/demo/samples/index.html"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            images = page.evaluate("[...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
        finally:
            browser.close()
    assert len(images) == 1 + 4 * 2  # the grid, then (base model + epochs 2, 4, 6) × 2 prompts
    broken = [src for src, complete, width in images if not complete or width == 0]
    assert broken == []


LONG_CAPTION = "bluesquare, shape, " + ", ".join(f"{c} square number {i}" for i, c in
                                              zip(range(20), ["blue", "small", "flat", "bright", "plain"] * 4))


def _render_one(pipe, text: dict, prompt: str, tmp_path: Path, name: str) -> bytes:
    from lorabuild.cache import Store
    from lorabuild.stages.sample import Row, render, row_items

    settings = {"prompt": prompt, "negative": "", "width": 64, "height": 64, "steps": 2, "cfg": 7.0, "seed": 3,
                "sampler": "euler", "lora_weight": 1.0}
    store = Store(tmp_path / name, "sample", ".png")
    [item] = row_items(Row("base", "base model", None, None), [settings], {}, "fp32", text)
    render(pipe, None, [item], store)
    return store.path(item.hash).read_bytes()


def test_samples_encode_prompts_as_training_encodes_captions(tmp_path):
    """textemb.clip_skip and prompts over 75 tokens reach the samples (issue 24, item 7): a prompt's
    embedding is the very tensor the textemb stage cached for the same caption text."""
    import io

    from conftest import init_workspace

    import numpy as np
    import torch
    from safetensors.torch import load_file

    from lorabuild import models
    from lorabuild.stages.sample import conditioning

    demo = init_workspace(tmp_path / "ws")
    (demo.data / "10_bluesquare shape" / "bluesquare_03.txt").write_text(LONG_CAPTION + "\n")
    demo.edit(lambda d: d["textemb"].update(clip_skip=2, max_token_length=150))
    demo.doit("textemb:demo", build="long")
    entry = next(e for e in demo.manifest("textemb")["items"] if e["id"] == LONG_CAPTION)
    cached = load_file(demo.root / "cache/objects/textemb" / entry["hash"][:2] / f"{entry['hash'][2:]}.safetensors")
    pipe = models.load_pipeline(demo.root / "cache/models/tiny-sd1")
    n_tokens = len(pipe.tokenizer(LONG_CAPTION).input_ids) - 2
    assert 75 < n_tokens <= 150
    text = {"clip_skip": 2, "max_token_length": 150}
    notes = []
    with torch.no_grad():
        embeds = conditioning(pipe, LONG_CAPTION, "", text, notes)
        default = conditioning(pipe, LONG_CAPTION, "", {"clip_skip": 1, "max_token_length": 75})["prompt_embeds"]
    assert embeds["prompt_embeds"].shape == (1, 152, cached["hidden"].shape[-1])
    assert torch.equal(embeds["prompt_embeds"][0], cached["hidden"])
    assert embeds["negative_prompt_embeds"].shape == embeds["prompt_embeds"].shape
    assert notes == []  # nothing cut
    # the pipeline's own encoder is what samples used before: 77 tokens, the last layer
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(LONG_CAPTION, "cpu", 1, False)
    assert torch.equal(theirs, default)
    # rendering takes them: at the defaults the image is the pipeline's own (samples rendered before
    # stay valid under their keys); clip_skip 2 and the whole caption give another image
    import diffusers

    scheduler = pipe.scheduler
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(scheduler.config)
    with torch.no_grad():
        own = pipe(LONG_CAPTION, width=64, height=64, num_inference_steps=2, guidance_scale=7.0,
                   generator=torch.Generator("cpu").manual_seed(3)).images[0]
    pipe.scheduler = scheduler
    pixels = lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.int16)  # noqa: E731
    plain = _render_one(pipe, {"clip_skip": 1, "max_token_length": 75}, LONG_CAPTION, tmp_path, "plain")
    assert np.array_equal(pixels(plain), np.asarray(own.convert("RGB"), dtype=np.int16))
    skip2 = _render_one(pipe, text, LONG_CAPTION, tmp_path, "skip2")
    assert np.abs(pixels(plain) - pixels(skip2)).max() > 0
    cut = []
    with torch.no_grad():
        conditioning(pipe, LONG_CAPTION, "", {"clip_skip": 1, "max_token_length": 75}, cut)
    assert len(cut) == 1 and f"is {n_tokens} tokens" in cut[0] and "(75)" in cut[0]


def test_sdxl_samples_take_long_prompts_and_keep_the_pipelines_embeddings_at_the_defaults(tmp_path):
    """SDXL: both encoders and the pooled output come from the training code; at 75 tokens they are
    the pipeline's own (images rendered before stay valid), at 150 a long prompt renders whole."""
    import torch

    from lorabuild import models
    from lorabuild.stages.sample import conditioning

    pipe = models.load_pipeline(models.ensure_builtin("tiny-sdxl", tmp_path / "models"))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe.encode_prompt(LONG_CAPTION, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        ours = conditioning(pipe, LONG_CAPTION, "", {"max_token_length": 75})
        whole = conditioning(pipe, LONG_CAPTION, "", {"max_token_length": 150})
    assert torch.equal(theirs[0], ours["prompt_embeds"]) and torch.equal(theirs[2], ours["pooled_prompt_embeds"])
    assert "negative_prompt_embeds" not in ours  # an empty negative: the pipeline's zeros
    assert whole["prompt_embeds"].shape[1] == 152
    assert _render_one(pipe, {"max_token_length": 150}, LONG_CAPTION, tmp_path, "whole") != \
        _render_one(pipe, {"max_token_length": 75}, LONG_CAPTION, tmp_path, "cut")
