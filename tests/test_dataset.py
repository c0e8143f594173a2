"""Datasets and captions at kohya parity: folder names, explicit concepts, regularization, caption options."""
from __future__ import annotations

import random

import pytest
from PIL import Image

from lorabuild.captions import dataset_captions, fixed_caption, is_randomised, random_caption, read_caption
from lorabuild.dataset import DatasetError, parse_concept_name, scan
from lorabuild.train.plan import Sample, balance_reg, make_plan

OPTS = {
    "prepend": [], "append": [], "exclude": [], "dedupe": True, "underscores_to_spaces": False, "shuffle": False,
    "keep_tokens": 0, "keep_tokens_separator": "", "dropout": 0, "tag_dropout": 0, "dropout_every_n_epochs": 0,
    "replace": {}, "wildcards": False,
}


def _img(path, size=(64, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(path)


@pytest.mark.parametrize("name, expected", [
    ("5_kamisato_ayaka 1girl", (5, "kamisato_ayaka 1girl")),
    ("10_sks dog", (10, "sks dog")),
    ("1_ünïcode ☆ chara", (1, "ünïcode ☆ chara")),
    ("kamisato_ayaka", None),
    ("x5_dog", None),
    ("5", None),
])
def test_kohya_folder_names(name, expected):
    assert parse_concept_name(name) == expected


def test_scan_folders_with_spaces_and_non_ascii(tmp_path):
    ds_dir = tmp_path / "data set"
    _img(ds_dir / "3_ünï chara girl" / "a b.png")
    (ds_dir / "3_ünï chara girl" / "a b.txt").write_text("x")
    _img(ds_dir / "3_ünï chara girl" / "c.jpg")
    _img(ds_dir / "not numbered" / "d.png")
    ds = scan([ds_dir], tmp_path, ".txt")
    assert [(c.repeats, c.tokens) for c in ds.concepts] == [(3, "ünï chara girl")]
    assert [im.id for im in ds.images] == ["data set/3_ünï chara girl/a b.png", "data set/3_ünï chara girl/c.jpg"]
    assert ds.images[0].caption_path is not None and ds.images[1].caption_path is None
    assert any("not numbered" in w and "does not start with '<repeats>_'" in w for w in ds.warnings)


def test_common_folder_mistakes_say_how_to_fix_them(tmp_path):
    _img(tmp_path / "10_dog" / "a.png")
    with pytest.raises(DatasetError, match="looks like a concept folder.*must name its parent"):
        scan([tmp_path / "10_dog"], tmp_path, ".txt")
    _img(tmp_path / "flat" / "a.png")
    with pytest.raises(DatasetError, match="holds images but no concept folders.*sub-folder named"):
        scan([tmp_path / "flat"], tmp_path, ".txt")


def test_explicit_concepts_and_regularization(tmp_path):
    _img(tmp_path / "mine" / "a.png")
    _img(tmp_path / "reg" / "1_person" / "r.png")
    explicit = [{"path": tmp_path / "mine", "repeats": 4, "trigger": "sks", "class": "dog", "caption_extension": None,
                 "is_reg": False, "captions": {"prepend": ["best"]}}]
    ds = scan([], tmp_path, ".txt", [tmp_path / "reg"], explicit)
    mine = next(im for im in ds.images if im.id == "mine/a.png")
    assert (mine.concept.repeats, mine.concept.tokens, mine.concept.is_reg) == (4, "sks dog", False)
    reg = next(im for im in ds.images if im.id == "reg/1_person/r.png")
    assert reg.concept.is_reg and reg.concept.tokens == "person"
    caps = dataset_captions(ds.images, OPTS)
    assert caps == {"mine/a.png": "best, sks dog", "reg/1_person/r.png": "person"}  # per-concept prepend


def test_validation_folders_plain_or_kohya_and_is_val_concepts(tmp_path):
    from lorabuild.train.plan import training_samples

    _img(tmp_path / "train" / "5_sks dog" / "t1.png")
    _img(tmp_path / "train" / "5_sks dog" / "t2.png")
    _img(tmp_path / "val plain" / "v1.png")  # a plain folder of images
    _img(tmp_path / "val kohya" / "3_sks dog" / "v2.png")  # or kohya's layout
    _img(tmp_path / "more" / "v3.png")
    explicit = [{"path": tmp_path / "more", "repeats": 1, "trigger": "sks", "class": "", "caption_extension": None,
                 "is_reg": False, "is_val": True, "captions": {}}]
    ds = scan([tmp_path / "train"], tmp_path, ".txt", [], explicit, [tmp_path / "val plain", tmp_path / "val kohya"])
    kinds = {im.id: (im.concept.is_val, im.concept.tokens) for im in ds.images}
    assert kinds == {"train/5_sks dog/t1.png": (False, "sks dog"), "train/5_sks dog/t2.png": (False, "sks dog"),
                     "val plain/v1.png": (True, ""), "val kohya/3_sks dog/v2.png": (True, "sks dog"),
                     "more/v3.png": (True, "sks")}
    every = [Sample(im.id, (64, 64), im.concept.repeats, im.concept.is_reg, im.concept.is_val) for im in ds.images]
    train, val = training_samples(every, 0.5, 1)  # the split holds one of the two training images out too
    assert len(train) == 1 and not train[0].is_val
    assert sorted(s.id for s in val if s.is_val) == ["more/v3.png", "val kohya/3_sks dog/v2.png", "val plain/v1.png"]
    assert len(val) == 4 and make_plan(train, 1, 1, 1).samples_per_epoch == 5
    with pytest.raises(DatasetError, match="no training images"):
        scan([], tmp_path, ".txt", [], explicit, [tmp_path / "val plain"])
    with pytest.raises(DatasetError, match="validation folder .* does not exist"):
        scan([tmp_path / "train"], tmp_path, ".txt", [], [], [tmp_path / "nope"])


def test_regularization_is_balanced_like_kohya():
    train = [Sample("t1", (64, 64), 5), Sample("t2", (64, 64), 5)]  # 10 training samples per epoch
    few = balance_reg(train, [Sample("r1", (64, 64), 1, True), Sample("r2", (64, 64), 1, True)])
    assert sum(s.repeats for s in few) == 10 and [s.repeats for s in few] == [5, 5]  # repeated up to the count
    many = balance_reg(train, [Sample(f"r{i}", (64, 64), 3, True) for i in range(8)])
    assert sum(s.repeats for s in many) == 12 and len(many) == 4  # truncated: reg beyond the count unused
    plan = make_plan(train + few, 2, 1, 3)
    assert (plan.images, plan.reg_samples_per_epoch, plan.samples_per_epoch, plan.steps_per_epoch) == (2, 10, 20, 10)


def test_caption_files_bom_crlf_and_blank_tags(tmp_path):
    p = tmp_path / "c.txt"
    p.write_bytes("\ufeffred, circle,, \r\nshape,\r\n".encode())
    assert fixed_caption(read_caption(p), OPTS) == "red, circle, shape"
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02")
    with pytest.raises(UnicodeDecodeError):
        read_caption(tmp_path / "bin.txt")


def test_fixed_options():
    opts = {**OPTS, "prepend": ["sks"], "append": ["masterpiece"], "exclude": ["bad"], "underscores_to_spaces": True,
            "replace": {"1girl": "one girl"}}
    assert fixed_caption("1girl, long_hair, bad, long_hair, sks", opts) == "sks, one girl, long hair, masterpiece"
    assert fixed_caption("a, a", {**OPTS, "dedupe": False}) == "a, a"


def test_random_options_are_seeded_and_keep_the_kept_tags():
    opts = {**OPTS, "shuffle": True, "keep_tokens": 1}
    text = "sks, a, b, c, d, e"
    draws = [random_caption(text, opts, random.Random(s)) for s in range(20)]
    assert all(d.startswith("sks, ") for d in draws) and len(set(draws)) > 5
    assert draws == [random_caption(text, opts, random.Random(s)) for s in range(20)]  # same seed, same caption
    sep = {**OPTS, "shuffle": True, "keep_tokens_separator": "|||"}
    assert all(random_caption("x, y ||| a, b, c", sep, random.Random(s)).startswith("x, y, ") for s in range(10))
    assert fixed_caption("x, y ||| a, b", {**OPTS, "keep_tokens_separator": "|||"}) == "x, y, a, b"
    drop = {**OPTS, "tag_dropout": 0.5}
    lengths = {len(random_caption("a, b, c, d, e, f, g, h", drop, random.Random(s)).split(", ")) for s in range(30)}
    assert min(lengths) < 8
    every = {**OPTS, "dropout_every_n_epochs": 3}
    assert [random_caption("a", every, random.Random(0), e) for e in (1, 2, 3, 6)] == ["a", "a", "", ""]
    assert is_randomised(every) and not is_randomised(OPTS)


def test_wildcards_and_multi_line_captions():
    opts = {**OPTS, "wildcards": True}
    text = fixed_caption("a {red|blue} dog\nanother, line", opts)
    assert text == "a {red|blue} dog\nanother, line"
    seen = {random_caption(text, opts, random.Random(s)) for s in range(40)}
    assert seen == {"a red dog", "a blue dog", "another, line"}
