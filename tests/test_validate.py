"""``lorabuild validate``: every problem at FILE:LINE:COL with the field, exit codes, and no re-validation of an unchanged file."""
from __future__ import annotations

import subprocess
import sys

import pytest

from figures import COUNTS, outcome
from lorabuild import config


def _validate(tmp_path, text: str, name: str = "p.yaml"):
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / name).write_text(text, encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "lorabuild", "validate", name], cwd=tmp_path, capture_output=True, text=True)
    return proc.returncode, proc.stderr.splitlines()


GOOD = "base_model: builtin:tiny-sd1\ndataset:\n  dirs: [data]\n"


def test_a_valid_file_passes_silently(tmp_path):
    assert _validate(tmp_path, GOOD) == (0, [])


@pytest.mark.parametrize("extra, expected", [
    ("train:\n  learing_rate: 0.1\n",
     "p.yaml:5:3: train.learing_rate: unknown field 'learing_rate' (did you mean 'learning_rate'?)"),
    ("train:\n  batch_size: two\n", "p.yaml:5:15: train.batch_size: 'two' is not of type 'integer'"),
    ("train:\n  batch_size: -1\n", "p.yaml:5:15: train.batch_size: -1 is less than the minimum of 1"),
    ("bucket:\n  resolution: 512\n  step: 7\n", "p.yaml:6:9: bucket.step: 7 is less than the minimum of 8"),
    ("network:\n  train_unet: maybe\n", "p.yaml:5:15: network.train_unet: 'maybe' is not of type 'boolean'"),
    ("sample:\n  sampler: dpm\n", "p.yaml:5:12: sample.sampler: 'dpm' is not one of ['ddim', 'euler', 'euler_a', 'dpm++_2m', 'dpm++_2m_karras', 'pndm', 'lms', 'heun']"),
    ("sample:\n  prompts:\n    - prompt: a cat\n      seed: -3\n",
     "p.yaml:7:13: sample.prompts.0.seed: -3 is less than the minimum of 0"),
])
def test_each_problem_at_its_place(tmp_path, extra, expected):
    rc, lines = _validate(tmp_path, GOOD + extra)
    assert rc == 1 and lines == [expected]


def test_missing_required_field_points_at_the_parent(tmp_path):
    rc, lines = _validate(tmp_path, "base_model: builtin:tiny-sd1\ndataset:\n  caption_extension: .txt\ndevice: cpu\n")
    assert rc == 1
    assert lines == ["p.yaml:3:3: dataset: no training images: give dirs (parents of '<repeats>_<tokens>' folders) or concepts"]
    rc, lines = _validate(tmp_path, "dataset:\n  dirs: [data]\n")
    assert lines == ["p.yaml:1:1: base_model: required field is missing"]


def test_yaml_syntax_error_duplicate_key_and_non_mapping(tmp_path):
    rc, lines = _validate(tmp_path, GOOD + "train: {epochs: 3\n")
    assert rc == 1 and lines[0].startswith("p.yaml:5:1: YAML syntax error:")
    rc, lines = _validate(tmp_path, GOOD + "device: cpu\ndevice: cuda\n")
    assert lines == ["p.yaml:5:1: device: duplicate key (the first one is earlier in the file)"]
    rc, lines = _validate(tmp_path, "- a\n- b\n")
    assert lines == ["p.yaml:1:1: a project file must be a mapping of sections (base_model:, dataset:, …)"]
    rc, lines = _validate(tmp_path, "")
    assert rc == 1 and "the file is empty" in lines[0]


def test_alias_bomb_and_objects_are_refused(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh"))
    rc, lines = _validate(tmp_path, bomb)
    assert rc == 1 and "alias bomb" in lines[0]
    rc, lines = _validate(tmp_path, GOOD + "x: !!python/object/apply:os.system ['true']\n")
    assert rc == 1 and lines[0] == "p.yaml:4:4: x: YAML tag tag:yaml.org,2002:python/object/apply:os.system is not allowed"


def test_every_problem_is_reported_and_good_files_stay_silent(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "good.yaml").write_text(GOOD)
    (tmp_path / "bad.yaml").write_text(GOOD + "train:\n  epochs: 0\n  seed: -1\nnetwork: {dim: 0}\n")
    proc = subprocess.run([sys.executable, "-m", "lorabuild", "validate", "good.yaml", "bad.yaml"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "bad.yaml:5:11: train.epochs: 0 is less than the minimum of 1",
        "bad.yaml:6:9: train.seed: -1 is less than the minimum of 0",
        "bad.yaml:7:16: network.dim: 0 is less than the minimum of 1",
    ]


def test_semantic_checks(tmp_path):
    rc, lines = _validate(tmp_path, GOOD + "textemb: {cache: true}\n")
    assert rc == 1 and lines[0].startswith("p.yaml:4:18: textemb.cache: true is impossible: network.train_text_encoder is true")
    rc, lines = _validate(tmp_path, GOOD + "network: {train_text_encoder: false}\ncaptions: {shuffle: true}\ntextemb: {cache: true}\n")
    assert "captions are randomised per epoch" in lines[0]
    rc, lines = _validate(tmp_path, GOOD + "bucket: {min_reso: 512, max_reso: 256}\n")
    assert lines == ["p.yaml:4:20: bucket.min_reso: 512 is larger than bucket.max_reso (256)"]
    rc, lines = _validate(tmp_path, "base_model: builtin:huge\ndataset:\n  dirs: [data, nowhere]\n")
    assert lines[0].startswith("p.yaml:1:13: base_model: unknown built-in model 'builtin:huge' (known: builtin:tiny-flux, builtin:tiny-flux-schnell, builtin:tiny-sd1, builtin:tiny-sd2, builtin:tiny-sd3, builtin:tiny-sdxl, builtin:world-sd1)")
    assert lines[1].startswith("p.yaml:3:16: dataset.dirs.1: folder ") and lines[1].endswith("nowhere does not exist")


def test_defaults_are_filled_and_frozen(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "p.yaml").write_text(GOOD)
    p = config.load_project(tmp_path / "p.yaml")
    assert p.get("train.learning_rate") == 0.0001 and p.get("network.dim") == 32 and p.get("train.seed") == 42
    assert p.get("dataset.caption_extension") == ".txt" and p.output_name == "p"
    with pytest.raises(TypeError):
        p.cfg["train"]["epochs"] = 3


def test_an_unchanged_file_is_not_validated_again(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "p.yaml").write_text(GOOD)
    memo = tmp_path / "memo"
    config.load_project(tmp_path / "p.yaml", memo_dir=memo)
    calls = []
    monkeypatch.setattr(config, "_schema_problems", lambda *a: calls.append(a))
    config.load_project(tmp_path / "p.yaml", memo_dir=memo)
    assert calls == []
    (tmp_path / "p.yaml").write_text(GOOD + "device: cpu\n")
    config.load_project(tmp_path / "p.yaml", memo_dir=memo)
    assert len(calls) == 1


def test_bucket_step_follows_the_architecture(tmp_path):
    sdxl = GOOD.replace("tiny-sd1", "tiny-sdxl")
    assert _validate(tmp_path, sdxl + "bucket: {step: 32, min_reso: 256, max_reso: 1024}\n") == (0, [])
    rc, lines = _validate(tmp_path, sdxl + "bucket: {step: 48, min_reso: 240, max_reso: 960}\n")
    assert lines == ["p.yaml:4:16: bucket.step: 48 is not a multiple of 32, which SDXL needs"]
    rc, lines = _validate(tmp_path, GOOD + "bucket: {step: 32, min_reso: 256, max_reso: 1024}\n")
    assert lines == ["p.yaml:4:16: bucket.step: 32 is not a multiple of 64, which SD 1.x/2.x needs"]


def test_timestep_range_and_noise_refinements_without_their_base_are_refused(tmp_path):
    rc, lines = _validate(tmp_path, GOOD + "train: {min_timestep: 600, max_timestep: 600}\n")
    assert lines == ["p.yaml:4:23: train.min_timestep: 600 is not below train.max_timestep (600): timesteps are drawn "
                     "from [min_timestep, max_timestep)"]
    rc, lines = _validate(tmp_path, GOOD + "train: {adaptive_noise_scale: 0.01, ip_noise_gamma_random_strength: true}\n")
    assert lines == ["p.yaml:4:31: train.adaptive_noise_scale: is set but train.noise_offset is not, so it would do nothing",
                     "p.yaml:4:69: train.ip_noise_gamma_random_strength: is set but train.ip_noise_gamma is not, so it "
                     "would do nothing"]
    ok = "train: {min_timestep: 0, max_timestep: 500, noise_offset: 0.05, adaptive_noise_scale: -0.01, " \
         "noise_offset_random_strength: true, ip_noise_gamma: 0.1, scale_weight_norms: 1}\nnetwork: {rank_dropout: 0.1, " \
         "module_dropout: 0.1}\n"
    assert _validate(tmp_path, GOOD + ok) == (0, [])


def _weights_file(tmp_path, kind: str) -> str:
    """A network.weights file that is not safetensors: a torch pickle, garbage, a truncated file."""
    import torch
    from safetensors.torch import save_file

    path = tmp_path / f"{kind}.safetensors"
    if kind == "pickle":
        torch.save({"a": torch.zeros(3)}, path)
    elif kind == "bogus":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    else:
        save_file({"a": torch.zeros(3)}, str(path))
        path.write_bytes(path.read_bytes()[:-4])
    return path.name


@pytest.mark.parametrize("extra, expected", [
    ("train:\n  learning_rate: .nan\n", "p.yaml:5:18: train.learning_rate: nan is not a finite number"),
    ("network:\n  alpha: .inf\n", "p.yaml:5:10: network.alpha: inf is not a finite number"),
    ("train:\n  max_grad_norm: -.inf\n", "p.yaml:5:18: train.max_grad_norm: -inf is not a finite number"),
    ("train:\n  optimizer_args: {eps: .nan}\n", "p.yaml:5:25: train.optimizer_args.eps: nan is not a finite number"),
    ("train:\n  optimizer_args: {foo: 1}\n",
     "p.yaml:5:20: train.optimizer_args.foo: AdamW takes no argument 'foo' (it takes: betas, eps, weight_decay, "
     "amsgrad, maximize, foreach, capturable, differentiable, fused)"),
    ("train:\n  optimizer: sgd\n  optimizer_args: {betas: [0.9, 0.99]}\n",
     "p.yaml:6:20: train.optimizer_args.betas: SGD takes no argument 'betas'"),
    ("train:\n  optimizer_args: {lr: 0.1}\n",
     "p.yaml:5:20: train.optimizer_args.lr: 'lr' is set by train.learning_rate (and unet_lr, text_encoder_lr), not here"),
    ("dataset:\n  concepts: [{path: data, repeats: 1000000000}]\n",
     "p.yaml:3:36: dataset.concepts.0.repeats: 1000000000 is greater than the maximum of 10000"),
    ("network:\n  conv_dim: 10000000\n", "p.yaml:5:13: network.conv_dim: 10000000 is greater than the maximum of 4096"),
    ("output:\n  name: " + "n" * 300 + "\n", "p.yaml:5:9: output.name: the name is 300 characters; at most 128"),
    ("network:\n  weights: pickle.safetensors\n", "p.yaml:5:12: network.weights: "),
    ("network:\n  weights: bogus.safetensors\n", "p.yaml:5:12: network.weights: "),
    ("network:\n  weights: truncated.safetensors\n", "p.yaml:5:12: network.weights: "),
])
def test_values_training_would_choke_on_fail_at_their_line(tmp_path, extra, expected):
    text = GOOD + extra
    if "weights:" in extra:
        _weights_file(tmp_path, extra.split("weights: ")[1].split(".")[0])
    if extra.startswith("dataset:"):
        text = text.replace("dataset:\n  dirs: [data]\n", "")
    rc, lines = _validate(tmp_path, text)
    outcome("\n".join(lines), clear=rc == 1 and len(lines) == 1 and lines[0].startswith(expected))
    assert rc == 1 and len(lines) == 1 and lines[0].startswith(expected), lines
    if "weights:" in extra:
        kind = extra.split("weights: ")[1].split(".")[0]
        reason = {"pickle": "is a pickle (torch.save) file, not safetensors", "bogus": "its header is not JSON",
                  "truncated": "the header's entry for tensor 'a' does not match the file"}[kind]
        assert reason in lines[0]
    COUNTS["values training chokes on (item 5)"] += 1


def test_a_long_project_file_name_and_a_huge_repeats_folder_fail_validate(tmp_path):
    rc, lines = _validate(tmp_path, GOOD, name="p" * 245 + ".yaml")
    outcome("\n".join(lines), clear=rc == 1 and len(lines) == 1)
    assert rc == 1 and lines == [f"{'p' * 245}.yaml:1:1: the project's name (its file name without .yaml) is 245 "
                                 "characters; at most 128 (it names folders and files under cache/ and output/, and "
                                 "most file systems refuse names over 255 bytes)"]
    (tmp_path / "data" / "1000000000_x").mkdir(parents=True)
    rc, lines = _validate(tmp_path, GOOD)
    outcome("\n".join(lines), clear=rc == 1 and len(lines) == 1)
    assert rc == 1 and lines == [f"p.yaml:3:3: dataset: {tmp_path / 'data' / '1000000000_x'}: 1000000000 repeats is "
                                 "more than 10000 (each repeat is a pass over the folder's images in every epoch): "
                                 "rename the folder"]
    COUNTS["values training chokes on (item 5)"] += 2


def test_a_good_weights_file_and_known_optimizer_args_pass(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    extra = "network:\n  weights: w.safetensors\ntrain:\n  optimizer_args: {betas: [0.9, 0.99], eps: 1.0e-8}\n"
    assert _validate(tmp_path, GOOD + extra) == (0, [])
