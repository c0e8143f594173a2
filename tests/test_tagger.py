"""The WD14 tag stage: a tiny ONNX tagger built here with onnx's helper API, shaped like
SmilingWolf's models (input ``[batch, S, S, 3]`` float32 BGR 0–255, output ``[batch,
n_tags]`` sigmoid probabilities) with a small ``selected_tags.csv``.

The model takes each image's mean colour per channel and maps it through a fixed
matrix, so red, green and blue images get different tags, deterministically, with
confidences these tests compute by hand.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from PIL import Image

from conftest import WS, init_workspace

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SIZE = 16
# name, category, weights on the mean (b, g, r) in 0..1, bias: logit = w·x + bias
TAGS = [
    ("general", 9, (0, 0, 0), 1.0),
    ("sensitive", 9, (0, 0, 3), -1.0),  # red images: 2 > 1, so the top rating is sensitive
    ("questionable", 9, (0, 0, 0), -3.0),
    ("explicit", 9, (0, 0, 0), -3.0),
    ("red_theme", 0, (-4, -4, 8), -2.0),
    ("blue_theme", 0, (8, -4, -4), -2.0),
    ("green_theme", 0, (-4, 8, -4), -2.0),
    ("long_hair", 0, (0, 0, 0), 2.0),  # 0.881 on every image
    ("simple_background", 0, (0, 0, 0), 0.0),  # 0.5 on every image: between thresholds
    ("^_^", 0, (4, 4, 4), -9.0),  # white images only
    ("hatsune_miku", 4, (-4, 8, -4), -1.0),  # green: 0.999, above the character threshold
    ("kagamine_rin", 4, (0, 0, 0), 1.0),  # 0.731 everywhere: a general threshold would pass it
]
SOLID = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def make_tagger(folder, n_tags: int | None = None, size: int = SIZE, batch="batch"):
    """Write model.onnx + selected_tags.csv; ``n_tags`` makes the CSV disagree with the model."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    w = np.array([t[2] for t in TAGS], dtype=np.float32).T / 255.0  # [3, n]: inputs are 0..255
    b = np.array([t[3] for t in TAGS], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input_1"], ["mean"], axes=[1, 2], keepdims=0),
         helper.make_node("MatMul", ["mean", "w"], ["mm"]),
         helper.make_node("Add", ["mm", "b"], ["logits"]),
         helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"])],
        "tiny_wd14",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, [batch, size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch, len(TAGS)])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    rows = ["tag_id,name,category,count"] + [f"{i},{name},{cat},{100 - i}" for i, (name, cat, _, _) in enumerate(TAGS)]
    rows = rows[: (n_tags + 1) if n_tags is not None else None]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


SETTINGS = {"general_threshold": 0.35, "character_threshold": 0.85, "rating": "none", "exclude_tags": [],
            "underscores_to_spaces": True, "additional_tags": [], "mode": "missing"}


# --- the model and the selection rules, in process ---------------------------------------

def test_preprocess_pads_on_white_resizes_and_swaps_to_bgr():
    from lorabuild.wd14 import preprocess

    x = preprocess(Image.new("RGB", (40, 20), (255, 0, 0)), SIZE)
    assert x.shape == (SIZE, SIZE, 3) and x.dtype.name == "float32"
    assert x[0].tolist() == [[255.0, 255.0, 255.0]] * SIZE  # the top rows are padding: white
    assert x[SIZE // 2, SIZE // 2].tolist() == [0.0, 0.0, 255.0]  # red in BGR order
    small = preprocess(Image.new("RGB", (4, 4), (0, 0, 255)), SIZE)  # upscaled to the model's size
    assert small.shape == (SIZE, SIZE, 3) and small[3, 3].tolist() == [255.0, 0.0, 0.0]


def test_model_reads_size_from_onnx_and_tags_by_colour(tmp_path):
    import numpy as np

    from lorabuild.wd14 import Tagger, preprocess, select

    t = Tagger(make_tagger(tmp_path / "m", size=24), "cpu")
    assert t.size == 24 and t.provider == "CPUExecutionProvider"
    batch = np.stack([preprocess(Image.new("RGB", (30, 30), c), t.size) for c in SOLID.values()])
    probs = t.predict(batch)
    assert probs.shape == (4, len(TAGS))
    tags = {name: [tag for tag, _ in select(p, t.labels, SETTINGS)] for name, p in zip(SOLID, probs)}
    assert tags == {
        "red": ["red theme", "long hair", "simple background"],
        "green": ["hatsune miku", "green theme", "long hair", "simple background"],  # 0.999 > 0.998
        "blue": ["blue theme", "long hair", "simple background"],
        "white": ["^_^", "long hair", "simple background"],
    }
    conf = dict(select(probs[0], t.labels, SETTINGS))
    assert conf["red theme"] == pytest.approx(sig(6), abs=1e-4) and conf["simple background"] == pytest.approx(0.5, abs=1e-4)


def test_padding_changes_the_mean_as_the_wd14_models_expect(tmp_path):
    """A 2:1 red image is padded with white to a square: mean (b, g, r) = (0.5, 0.5, 1)."""
    from lorabuild.wd14 import Tagger, preprocess, select

    t = Tagger(make_tagger(tmp_path / "m"), "cpu")
    p = t.predict(preprocess(Image.new("RGB", (40, 20), (255, 0, 0)), t.size)[None])[0]
    assert dict(select(p, t.labels, SETTINGS))["red theme"] == pytest.approx(sig(8 - 2 - 2 - 2), abs=1e-3)


def _probs(**conf):
    from lorabuild.wd14 import Labels

    labels = Labels(tuple(t[0] for t in TAGS), tuple(t[1] for t in TAGS))
    return [conf.get(name, 0.0) for name in labels.names], labels


def test_thresholds_rating_exclude_underscores_and_order():
    from lorabuild.wd14 import select

    probs, labels = _probs(general=0.3, sensitive=0.6, long_hair=0.5, simple_background=0.9, red_theme=0.36,
                           kagamine_rin=0.8, hatsune_miku=0.86, **{"^_^": 0.7})
    names = lambda **s: [t for t, _ in select(probs, labels, {**SETTINGS, **s})]  # noqa: E731
    # by confidence; character tags need 0.85, general ones 0.35; no rating by default
    assert names() == ["simple background", "hatsune miku", "^_^", "long hair", "red theme"]
    assert names(general_threshold=0.6) == ["simple background", "hatsune miku", "^_^"]
    assert names(character_threshold=0.75) == ["simple background", "hatsune miku", "kagamine rin", "^_^",
                                                "long hair", "red theme"]
    assert names(rating="first")[0] == "sensitive" and names(rating="last")[-1] == "sensitive"
    assert names(underscores_to_spaces=False) == ["simple_background", "hatsune_miku", "^_^", "long_hair", "red_theme"]
    # excluded in either spelling
    assert names(exclude_tags=["long_hair", "hatsune miku", "^_^"]) == ["simple background", "red theme"]


def test_combine_modes_additional_tags_and_dedupe():
    from lorabuild.wd14 import combine

    tags = ["long hair", "red theme"]
    c = lambda existing, **s: combine(existing, tags, {**SETTINGS, **s})  # noqa: E731
    assert c(None) == ["long hair", "red theme"]
    assert c(["a cat"]) is None  # missing: a caption file is kept
    assert c(None, additional_tags=["sks"]) == ["sks", "long hair", "red theme"]
    assert c(["a cat", "long_hair"], mode="merge") == ["a cat", "long_hair", "red theme"]  # existing first, no repeat
    assert c(["a cat", "sks"], mode="merge", additional_tags=["sks"]) == ["sks", "a cat", "long hair", "red theme"]
    assert c(["a cat"], mode="replace", additional_tags=["sks", "sks"]) == ["sks", "long hair", "red theme"]
    assert combine(None, [], SETTINGS) is None  # nothing above the thresholds: the caption stays
    # merging what merge wrote changes nothing, so --write --force then a rebuild is stable
    merged = c(["a cat"], mode="merge", additional_tags=["sks"])
    assert c(merged, mode="merge", additional_tags=["sks"]) == merged


def test_missing_onnxruntime_names_the_install(tmp_path, monkeypatch):
    from lorabuild.wd14 import Tagger, TaggerError

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(TaggerError, match=r'onnxruntime.*pip install -e "\.\[tagger\]" in a clone of lorabuild, or pip install "lorabuild\[tagger\]"'):
        Tagger(make_tagger(tmp_path / "m"))


# --- the stage in the build, through the real CLIs ---------------------------------------

def _add_tagger(ws: WS, **settings) -> None:
    model = make_tagger(ws.root / "projects" / "tagger-model")
    ws.edit(lambda d: d.update(tagger={"model": str(model.relative_to(ws.yaml_path.parent)), **settings}))


def _set(ws: WS, **settings) -> None:
    ws.edit(lambda d: d["tagger"].update(settings))


def _counts(ws: WS, stage: str = "tag") -> tuple[int, int]:
    r = ws.report(stage)
    return r["computed"], r["reused"]


def _captions(ws: WS) -> dict[str, str]:
    return {e["id"]: e["caption"] for e in ws.manifest("tag")["items"]}


@pytest.fixture
def fresh(tmp_path) -> WS:
    """A new demo workspace, not built: the tag stage needs nothing upstream."""
    root = tmp_path / "ws"
    init_workspace(root)
    return WS(root)


def _solid(path, colour, size=(32, 32)):
    Image.new("RGB", size, colour).save(path)


RED = "demo/10_redcircle shape/redcircle_07.png"  # the demo's two images without a caption file
BLUE = "demo/10_bluesquare shape/bluesquare_07.png"


def test_project_without_tagger_has_no_tag_stage(fresh):
    listed = fresh.doit("list", "--all", build="l").stdout
    assert "tag:demo" not in listed and "textemb:demo" in listed
    st = fresh.lorabuild("status", "demo", "--json")
    assert "tag" not in json.loads(st.stdout)["stages"]


def test_tag_stage_counts_per_image(fresh):
    _add_tagger(fresh, additional_tags=["sks"])
    fresh.doit("tag:demo", build="b1")
    assert _counts(fresh) == (2, 0)  # mode missing: only the two images without a caption file
    caps = _captions(fresh)
    assert set(caps) == {RED, BLUE}
    assert caps[RED].startswith("sks, ") and "long hair" in caps[RED]

    fresh.doit("tag:demo", build="b2")
    assert "tag" not in fresh.ran("b2")  # nothing changed: doit runs nothing
    # one new image: one computed, the others reused
    _solid(fresh.data / "10_redcircle shape" / "new_red.png", (255, 0, 0))
    fresh.doit("tag:demo", build="b3")
    assert _counts(fresh) == (1, 2)
    assert _captions(fresh)["demo/10_redcircle shape/new_red.png"] == "sks, red theme, long hair, simple background"
    # a threshold is part of every key: all recomputed
    _set(fresh, general_threshold=0.6)
    fresh.doit("tag:demo", build="b4")
    assert _counts(fresh) == (3, 0)
    assert _captions(fresh)["demo/10_redcircle shape/new_red.png"] == "sks, red theme, long hair"
    # the trigger word only combines stored tags with captions: no model run
    _set(fresh, additional_tags=["xyz"])
    fresh.doit("tag:demo", build="b5")
    assert _counts(fresh) == (0, 3)
    assert _captions(fresh)["demo/10_redcircle shape/new_red.png"] == "xyz, red theme, long hair"
    # merge tags every image: the 14 with a caption file are new, the 3 reused
    _set(fresh, mode="merge")
    fresh.doit("tag:demo", build="b6")
    assert _counts(fresh) == (14, 3)
    existing = (fresh.data / "10_redcircle shape" / "redcircle_00.txt").read_text().strip()
    assert _captions(fresh)["demo/10_redcircle shape/redcircle_00.png"].startswith(f"xyz, {existing}, ")


def test_tags_reach_textemb_and_train(demo):
    """The built demo plus a tagger: the two uncaptioned images' captions come from the
    tagger, textemb encodes them (and reuses every other caption), train sees them."""
    from safetensors import safe_open

    _add_tagger(demo, additional_tags=["sks"])
    demo.doit("train:demo", build="t1")
    assert demo.report("tag")["build"] == "t1" and _counts(demo) == (2, 0)
    assert {"textemb", "train"} <= demo.ran("t1") and "latents" not in demo.ran("t1")
    caps = _captions(demo)
    encoded = {e["id"] for e in demo.manifest("textemb")["items"]}
    assert caps[RED] in encoded and caps[BLUE] in encoded
    assert "redcircle shape" not in encoded  # the folder caption the two images had before
    # the tiny model tags both images alike: one new caption; the caption files' 14 reused
    assert caps[RED] == caps[BLUE] and _counts(demo, "textemb") == (1, 14)
    lora = demo.root / "output" / "demo" / "demo.safetensors"
    with safe_open(str(lora), "pt") as f:
        freq = json.loads(f.metadata()["ss_tag_frequency"])
    assert freq["10_redcircle shape"]["sks"] == 1 and freq["10_bluesquare shape"]["long hair"] == 1
    demo.doit("train:demo", build="t2")
    assert demo.ran("t2") == set() and demo.report("tag")["build"] == "t1"  # up to date


def test_cli_prints_and_writes_only_missing_captions_without_force(fresh):
    _add_tagger(fresh, additional_tags=["sks"])
    red_txt = fresh.data / "10_redcircle shape" / "redcircle_07.txt"
    plan = fresh.lorabuild("plan", "demo")
    assert "the tagger has not run yet" in plan.stderr and "defaulted 1" in plan.stdout
    out = fresh.lorabuild("tag", "demo")
    assert out.returncode == 0, out.stderr
    assert f"{RED}: sks, " in out.stdout and not red_txt.exists()  # printed, nothing written
    plan = json.loads(fresh.lorabuild("plan", "demo", "--json").stdout)
    assert [(c["captions_defaulted"], c["captions_tagged"]) for c in plan["concepts"]] == [(0, 1), (0, 1)]
    assert ["sks", 2] in plan["top_tags"]
    out = fresh.lorabuild("tag", "demo", "--write")
    assert out.returncode == 0, out.stderr
    assert "wrote 2 caption file(s)" in out.stdout
    assert red_txt.read_text(encoding="utf-8") == _captions(fresh)[RED] + "\n"
    # the written files now are those images' captions: the build sees the same text
    fresh.doit("textemb:demo", build="w1")
    assert _counts(fresh) == (0, 0) and fresh.manifest("tag")["items"] == []
    assert _captions_used(fresh)[RED] == red_txt.read_text(encoding="utf-8").strip()

    # replace: the 14 hand-written caption files differ from the tagger's text (the 2 it
    # wrote do not); none is overwritten without --force
    before = {p: p.read_bytes() for p in fresh.data.rglob("*.txt")}
    _set(fresh, mode="replace")
    out = fresh.lorabuild("tag", "demo", "--write")
    assert out.returncode == 0, out.stderr
    assert "wrote 0 caption file(s); 2 already said the same" in out.stdout
    assert "skipped 14 existing caption file(s) that differ (--force overwrites them)" in out.stdout
    assert "redcircle_00.txt" in out.stdout
    assert {p: p.read_bytes() for p in fresh.data.rglob("*.txt")} == before
    out = fresh.lorabuild("tag", "demo", "--write", "--force")
    assert "wrote 14 caption file(s)" in out.stdout and "skipped" not in out.stdout
    replaced = (fresh.data / "10_redcircle shape" / "redcircle_00.txt").read_text()
    assert replaced == _captions(fresh)["demo/10_redcircle shape/redcircle_00.png"] + "\n"
    assert replaced.startswith("sks, ") and "redcircle" not in replaced
    out = fresh.lorabuild("tag", "demo", "--write")  # written once: now they agree
    assert "wrote 0 caption file(s); 16 already said the same" in out.stdout and "skipped" not in out.stdout
    bad = fresh.lorabuild("tag", "demo", "--force")
    assert bad.returncode != 0 and "--force only applies with --write" in bad.stderr


def _captions_used(ws: WS) -> dict[str, str]:
    """Image id → the caption textemb and train use, computed by lorabuild itself."""
    code = ("import json, sys; from pathlib import Path; from lorabuild.stages.base import load_context as _context; "
            "from lorabuild.dataset import from_project; from lorabuild.stages.textemb import captions_for; "
            "ctx = _context(sys.argv[1], sys.argv[2]); print(json.dumps(captions_for(ctx, from_project(ctx.project))))")
    proc = subprocess.run([sys.executable, "-c", code, str(ws.root), str(ws.yaml_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_errors_name_the_folder_files_and_layout(fresh):
    model = make_tagger(fresh.root / "projects" / "tagger-model")
    fresh.edit(lambda d: d.update(tagger={"model": "no-such-folder"}))
    out = fresh.lorabuild("validate", "projects/demo.yaml")
    assert out.returncode == 1
    assert "tagger.model: folder" in out.stderr and "no-such-folder does not exist" in out.stderr
    assert "model.onnx and selected_tags.csv" in out.stderr
    (model / "model.onnx").rename(model / "other.onnx")
    fresh.edit(lambda d: d.update(tagger={"model": "tagger-model"}))
    out = fresh.lorabuild("validate", "projects/demo.yaml")
    assert f"{model / 'model.onnx'} is missing: a tagger folder holds model.onnx and selected_tags.csv" in out.stderr
    doit = fresh.doit("tag:demo", build="e1", check=False)
    assert doit.returncode != 0 and "tagger.model" in doit.stdout + doit.stderr
    # a tag list from another model
    make_tagger(model, n_tags=len(TAGS) - 2)
    doit = fresh.doit("tag:demo", build="e2", check=False)
    assert doit.returncode != 0
    assert f"{model / 'selected_tags.csv'} lists {len(TAGS) - 2} tags but {model / 'model.onnx'} outputs {len(TAGS)}" in doit.stdout + doit.stderr
    (model / "selected_tags.csv").write_text("id,tag\n0,x\n", encoding="utf-8")
    doit = fresh.doit("tag:demo", build="e3", check=False)
    assert "selected_tags.csv: the header must start with tag_id,name,category" in doit.stdout + doit.stderr


def test_status_names_the_tag_stage_and_why(fresh):
    _add_tagger(fresh)
    fresh.doit("tag:demo", build="s1")
    st = json.loads(fresh.lorabuild("status", "demo", "--json").stdout)["stages"]
    assert st["tag"]["state"] == "up to date"
    _set(fresh, character_threshold=0.5)
    st = json.loads(fresh.lorabuild("status", "demo", "--json").stdout)["stages"]
    assert st["tag"]["state"] == "stale" and "tagger.character_threshold: 0.85 → 0.5" in st["tag"]["why"]


def test_fixed_batch_model_pads_the_last_chunk(tmp_path):
    """Some exported taggers take one batch size only: a short last chunk is padded, and the
    tags equal those of a model with a dynamic batch."""
    import numpy as np

    from lorabuild.wd14 import Tagger, preprocess

    fixed = Tagger(make_tagger(tmp_path / "fixed", batch=4), "cpu")
    dynamic = Tagger(make_tagger(tmp_path / "dynamic"), "cpu")
    assert fixed.fixed_batch == 4 and dynamic.fixed_batch is None
    batch = np.stack([preprocess(Image.new("RGB", (8, 8), c), SIZE) for c in list(SOLID.values())[:3]])
    assert np.allclose(fixed.predict(batch), dynamic.predict(batch), atol=1e-6)


def test_unreadable_entry_is_recomputed_and_bad_images_follow_on_bad_image(fresh):
    _add_tagger(fresh)
    fresh.doit("tag:demo", build="c1")
    entries = sorted((fresh.root / "cache" / "objects" / "tag").glob("*/*.tags.json"))
    assert len(entries) == 2 and all(e.with_name(e.name.replace(".tags", "")).is_file() for e in entries)  # key beside each
    entries[0].write_text("{trunc")
    fresh.doit("-a", "tag:demo", build="c2")  # -a: run even though doit sees nothing changed
    assert _counts(fresh) == (1, 1) and len(_captions(fresh)) == 2
    (fresh.data / "10_redcircle shape" / "broken.png").write_bytes(b"not a png")
    proc = fresh.doit("tag:demo", build="c3", check=False)
    assert proc.returncode != 0 and "broken.png: not a readable image" in proc.stdout + proc.stderr
    fresh.edit(lambda d: d["dataset"].update(on_bad_image="skip"))
    fresh.doit("tag:demo", build="c4")
    assert _counts(fresh) == (0, 2) and "broken.png" in "; ".join(fresh.report("tag")["notes"])
    assert "demo/10_redcircle shape/broken.png" not in _captions(fresh)


def test_an_image_rewritten_after_hashing_is_tagged_under_its_new_bytes(fresh, monkeypatch):
    """Issue 18: the tags of an image replaced between the plan's hash and the model's read are
    stored under the key of the bytes that were tagged, never under the old bytes' key."""
    import hashlib

    from lorabuild.cache import key_hash
    from lorabuild.dataset import from_project
    from lorabuild.stages import tag
    from lorabuild.stages.base import load_context as _context

    _add_tagger(fresh)
    red = fresh.root / "projects" / RED
    _solid(red, SOLID["red"])
    red_sha = hashlib.sha256(red.read_bytes()).hexdigest()
    plan = tag.plan

    def plan_then_rewrite(*args):
        items = plan(*args)
        _solid(red, SOLID["blue"])  # a writer replaces it before it is read for tagging
        return items

    monkeypatch.setattr(tag, "plan", plan_then_rewrite)
    ctx = _context(str(fresh.root), str(fresh.yaml_path))
    tag.run(ctx, from_project(ctx.project))
    entry = next(e for e in fresh.manifest("tag")["items"] if e["id"] == RED)
    assert "blue theme" in entry["tags"] and "red theme" not in entry["tags"]
    side = json.loads(ctx.store("tag", ".tags.json").sidecar(entry["hash"]).read_text())
    assert side["key"]["src"] == hashlib.sha256(red.read_bytes()).hexdigest() != red_sha
    assert not ctx.store("tag", ".tags.json").has(key_hash({**side["key"], "src": red_sha}))
