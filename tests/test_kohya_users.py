"""What kohya users write in a project: YAML 1.2 floats, kohya names and spellings, optional packages."""
from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from lorabuild import config, extras
from lorabuild.yamlio import load
from conftest import init_workspace


def _validate(tmp_path, text: str):
    (tmp_path / "data" / "5_cat").mkdir(parents=True, exist_ok=True)
    (tmp_path / "p.yaml").write_text(text, encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "lorabuild", "validate", "p.yaml"], cwd=tmp_path,
                          capture_output=True, text=True)
    return proc.returncode, proc.stderr.splitlines()


GOOD = "base_model: builtin:tiny-sd1\ndataset:\n  dirs: [data]\n"


def test_exponent_floats_are_numbers_as_in_yaml_1_2(tmp_path):
    doc = load("a: 1e-4\nb: 5e-5\nc: 1E-3\nd: -2e+3\ne: 1.5\nf: 10\ng: 1_000\nh: .5\ni: 1e\nj: e5\nk: '1e-4'\n")
    assert doc == {"a": 1e-4, "b": 5e-5, "c": 1e-3, "d": -2000.0, "e": 1.5, "f": 10, "g": 1000, "h": 0.5,
                   "i": "1e", "j": "e5", "k": "1e-4"}
    assert isinstance(doc["f"], int) and isinstance(doc["a"], float)
    rc, lines = _validate(tmp_path, GOOD + "train:\n  learning_rate: 1e-4\n  unet_lr: 5e-5\n  text_encoder_lr: 1E-3\n")
    assert (rc, lines) == (0, [])
    data, problems = config.check(tmp_path / "p.yaml")
    assert problems == [] and (data["train"]["learning_rate"], data["train"]["text_encoder_lr"]) == (1e-4, 1e-3)
    # positions still point at the value (line 5, column 18)
    rc, lines = _validate(tmp_path, GOOD + "train:\n  learning_rate: 1e-4x\n")
    assert rc == 1 and lines[0].startswith("p.yaml:5:18: train.learning_rate: '1e-4x' is not of type 'number'")


@pytest.mark.parametrize("extra, expected", [
    ("network:\n  network_dim: 8\n",
     "p.yaml:5:3: network.network_dim: unknown field 'network_dim' (kohya's network_dim is network.dim)"),
    ("train:\n  max_train_epochs: 3\n",
     "p.yaml:5:3: train.max_train_epochs: unknown field 'max_train_epochs' (kohya's max_train_epochs is train.epochs)"),
    ("train:\n  clip_skip: 2\n",
     "p.yaml:5:3: train.clip_skip: unknown field 'clip_skip' (kohya's clip_skip is textemb.clip_skip)"),
    ("train:\n  max_train_epoches: 3\n",
     "p.yaml:5:3: train.max_train_epoches: unknown field 'max_train_epoches' (kohya's max_train_epoches is train.epochs)"),
    ("pretrained_model_name_or_path: m.safetensors\n",
     "p.yaml:4:1: pretrained_model_name_or_path: unknown field 'pretrained_model_name_or_path' "
     "(kohya's pretrained_model_name_or_path is base_model)"),
    ("network:\n  dim: 8\n  no_upscale: true\n",
     "p.yaml:6:3: network.no_upscale: unknown field 'no_upscale' (it is bucket.no_upscale)"),
    ("sample:\n  sampler: DPM++ 2M\n",
     "p.yaml:5:12: sample.sampler: 'DPM++ 2M' is not one of ['ddim', 'euler', 'euler_a', 'dpm++_2m', "
     "'dpm++_2m_karras', 'pndm', 'lms', 'heun'] (did you mean 'dpm++_2m'?)"),
])
def test_kohya_names_point_at_the_field(tmp_path, extra, expected):
    rc, lines = _validate(tmp_path, GOOD + extra)
    assert rc == 1 and lines == [expected]


def test_enum_values_in_kohyas_case_are_read_as_ours(tmp_path):
    text = GOOD + "train:\n  optimizer: Prodigy\n  lr_scheduler: Cosine_With_Restarts\n  mixed_precision: BF16\n" \
                  "sample:\n  sampler: k_euler_a\n"
    rc, lines = _validate(tmp_path, text)
    assert (rc, lines) == (0, [])
    data, _ = config.check(tmp_path / "p.yaml")
    assert (data["train"]["optimizer"], data["train"]["lr_scheduler"], data["train"]["mixed_precision"],
            data["sample"]["sampler"]) == ("prodigy", "cosine_with_restarts", "bf16", "euler_a")
    data, _ = config.check(tmp_path / "p.yaml")  # kohya's own name for SGD with Nesterov momentum
    (tmp_path / "p.yaml").write_text(GOOD + "train:\n  optimizer: SGDNesterov\n")
    data, problems = config.check(tmp_path / "p.yaml")
    assert problems == [] and data["train"]["optimizer"] == "sgd"


def test_missing_optional_packages_are_named_with_both_install_commands(tmp_path, monkeypatch):
    rc, lines = _validate(tmp_path, GOOD + "train:\n  optimizer: AdamW8bit\n  attention: xformers\n")
    have = {m: extras.installed(m) for m in ("bitsandbytes", "xformers")}
    expected = ['p.yaml: warning: train.optimizer: adamw8bit needs bitsandbytes, which is not installed: '
                'pip install -e ".[bnb]" in a clone of lorabuild, or pip install "lorabuild[bnb]"'] * (not have["bitsandbytes"])
    expected += ['p.yaml: warning: train.attention: xformers needs xformers, which is not installed: '
                 'pip install -e ".[xformers]" in a clone of lorabuild, or pip install "lorabuild[xformers]"'] * (not have["xformers"])
    assert rc == 0 and lines == expected  # the file is valid; this Python lacks a package
    # with the check's view of installed packages forced, every need is named (tagger: onnxruntime)
    monkeypatch.setattr(extras, "installed", lambda module: module == "xformers")
    cfg = {"train": {"optimizer": "prodigy", "attention": "xformers"}, "tagger": {"model": "t"}}
    assert extras.missing(cfg) == [
        'train.optimizer: prodigy needs prodigyopt, which is not installed: pip install -e ".[prodigy]" in a clone '
        'of lorabuild, or pip install "lorabuild[prodigy]"',
        'tagger: a WD14 tagger needs onnxruntime, which is not installed: pip install -e ".[tagger]" in a clone '
        'of lorabuild, or pip install "lorabuild[tagger]"']
    assert extras.missing(cfg, "train") == extras.missing(cfg)[:1]
    assert extras.missing({"train": {"optimizer": "lion"}}) == [
        'train.optimizer: lion needs lion-pytorch, which is not installed: pip install -e ".[lion]" in a clone '
        'of lorabuild, or pip install "lorabuild[lion]"']


def _workspace(tmp_path):
    ws = tmp_path / "ws"
    init_workspace(ws)
    return ws


def test_a_stage_needing_a_missing_package_stops_before_any_work(tmp_path, monkeypatch):
    from doit.exceptions import TaskFailed

    from lorabuild import tasks

    ws = _workspace(tmp_path)
    yaml_path = ws / "projects" / "demo.yaml"
    text = yaml_path.read_text()
    assert "\ntrain:\n" in text
    yaml_path.write_text(text.replace("\ntrain:\n", "\ntrain:\n  optimizer: AdamW8bit\n", 1))
    monkeypatch.setattr(extras, "installed", lambda module: module != "bitsandbytes")
    result = tasks.run_stage("train", str(ws), str(yaml_path))
    assert isinstance(result, TaskFailed)
    assert str(result).strip().endswith('train:demo: train.optimizer: adamw8bit needs bitsandbytes, which is not '
                                        'installed: pip install -e ".[bnb]" in a clone of lorabuild, or pip install '
                                        '"lorabuild[bnb]"')
    assert not ws.joinpath("cache", "manifests", "demo", "train.json").exists()
    plan = subprocess.run([sys.executable, "-m", "lorabuild", "plan", "demo"], cwd=ws, capture_output=True, text=True)
    listed = subprocess.run([sys.executable, "-m", "doit", "list"], cwd=ws, capture_output=True, text=True)
    if not extras.installed("bitsandbytes"):  # this Python's own view: plan and doit run in their own processes
        assert 'warning: train.optimizer: adamw8bit needs bitsandbytes' in plan.stdout
        # doit loading the task graph says it, before any stage runs
        assert ('warning: demo: train.optimizer: adamw8bit needs bitsandbytes, which is not installed: pip install '
                '-e ".[bnb]" in a clone of lorabuild, or pip install "lorabuild[bnb]" (the train stage will stop at '
                'its start)') in listed.stderr.splitlines()


def test_plan_names_caption_files_under_another_extension(tmp_path):
    ws = _workspace(tmp_path)
    concept = next(p for p in (ws / "projects" / "demo").rglob("*") if p.is_dir() and any(p.glob("*.png")))
    images = sorted(concept.glob("*.png"))
    for im in images[:2]:
        im.with_suffix(".caption").write_text("a caption kohya's default extension holds")
    Image.new("RGB", (8, 8)).save(concept / "stray.jpg")
    proc = subprocess.run([sys.executable, "-m", "lorabuild", "plan", "demo"], cwd=ws, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    line = next(w for w in proc.stdout.splitlines() if "end in .caption" in w)
    assert line == (f"  warning: {concept.name}: 2 caption file(s) end in .caption ({images[0].stem}.caption, "
                    f"{images[1].stem}.caption), but captions are read from .txt files: set "
                    "dataset.caption_extension: .caption (or the concept's caption_extension) to use them")


def test_the_lms_sampler_without_scipy_is_named_before_sampling(tmp_path, monkeypatch):
    """diffusers imports scipy only when an LMS scheduler is made: without it, one line, not an ImportError."""
    from doit.exceptions import TaskFailed

    from lorabuild import tasks

    line = ('sample.sampler: lms needs scipy, which is not installed: pip install -e ".[lms]" in a clone of '
            'lorabuild, or pip install "lorabuild[lms]"')
    monkeypatch.setattr(extras, "installed", lambda module: module != "scipy")
    assert extras.missing({"sample": {"sampler": "lms", "prompts": []}}) == [line]
    assert extras.missing({"sample": {"sampler": "euler", "prompts": ["a cat --ss k_lms"]}}, "sample") == [line]
    assert extras.missing({"sample": {"sampler": "euler", "prompts": ["a cat", {"prompt": "a dog"}]}}) == []
    # a prompt file the project file does not show: the sample stage reads it and stops at its start
    ws = _workspace(tmp_path)
    yaml_path = ws / "projects" / "demo.yaml"
    (ws / "projects" / "prompts.txt").write_text("a red circle --ss k_lms\n")
    text = yaml_path.read_text()
    assert "\nsample:\n" in text
    yaml_path.write_text(text.replace("\nsample:\n", "\nsample:\n  prompt_file: prompts.txt\n", 1))
    result = tasks.run_stage("sample", str(ws), str(yaml_path))
    assert isinstance(result, TaskFailed) and str(result).strip().endswith(f"sample:demo: {line}")
