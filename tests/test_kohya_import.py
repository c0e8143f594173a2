"""`lorabuild import-kohya`: kohya configs and command lines become valid projects."""
from __future__ import annotations

import subprocess
import sys

import yaml

from lorabuild.importers.convert import convert
from lorabuild.importers.read import parse_command_line

CONFIG = """
pretrained_model_name_or_path = "builtin:tiny-sd1"
train_data_dir = "img"
reg_data_dir = "reg"
output_name = "ayaka"
network_dim = 16
network_alpha = 8
network_args = ["conv_dim=4", "conv_alpha=1"]
learning_rate = 0.0001
unet_lr = 0.0001
text_encoder_lr = 0.00005
optimizer_type = "Prodigy"
optimizer_args = ["decouple=True", "betas=0.9,0.99"]
lr_scheduler = "cosine"
lr_warmup_steps = 0.05
max_train_epochs = 8
train_batch_size = 2
seed = 1234
resolution = "512,512"
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 1024
clip_skip = 2
shuffle_caption = true
keep_tokens = 1
mixed_precision = "bf16"
save_precision = "float"
save_every_n_epochs = 2
noise_offset = 0.05
min_snr_gamma = 5
cache_latents = true
xformers = true
gradient_checkpointing = true
vae_batch_size = 4
network_train_unet_only = true
sample_sampler = "k_euler_a"
color_aug = true
max_train_steps = 1600
"""

DATASET = """
[general]
shuffle_caption = true
caption_extension = ".txt"

[[datasets]]
resolution = 768
batch_size = 4

  [[datasets.subsets]]
  image_dir = "chars/ayaka"
  num_repeats = 10
  class_tokens = "ayaka 1girl"

  [[datasets.subsets]]
  image_dir = "reg/girls"
  num_repeats = 1
  is_reg = true
  color_aug = true
"""


def test_a_kohya_config_maps_every_known_option():
    import tomllib

    doc, unmapped, notes = convert(tomllib.loads(CONFIG))
    assert doc["base_model"] == "builtin:tiny-sd1"
    assert doc["dataset"] == {"dirs": ["img"], "reg_dirs": ["reg"]}
    assert doc["network"] == {"dim": 16, "alpha": 8.0, "conv_dim": 4, "conv_alpha": 1.0, "train_text_encoder": False}
    t = doc["train"]
    assert (t["optimizer"], t["optimizer_args"]) == ("prodigy", {"decouple": True, "betas": [0.9, 0.99]})
    assert (t["lr_scheduler"], t["lr_warmup_ratio"], t["epochs"], t["batch_size"], t["seed"]) == ("cosine", 0.05, 8, 2, 1234)
    assert (t["mixed_precision"], t["noise_offset"], t["min_snr_gamma"], t["text_encoder_lr"]) == ("bf16", 0.05, 5.0, 5e-05)
    assert (t["gradient_checkpointing"], t["attention"], doc["latents"]) == (True, "xformers", {"batch_size": 4})
    assert doc["bucket"] == {"resolution": 512, "min_reso": 256, "max_reso": 1024}
    assert doc["textemb"] == {"clip_skip": 2} and doc["captions"] == {"shuffle": True, "keep_tokens": 1}
    assert doc["output"] == {"name": "ayaka", "save_precision": "fp32"}
    assert doc["sample"] == {"sampler": "euler_a"}
    assert unmapped == ["color_aug = True (no equivalent in lorabuild)"]
    # kohya: max_train_epochs overrides max_train_steps
    assert "max_steps" not in t and any("overrides max_train_steps" in n for n in notes)


def test_loraplus_part_ratios_map():
    doc, unmapped, _ = convert({"network_args": ["loraplus_unet_lr_ratio=16", "loraplus_text_encoder_lr_ratio=4"],
                                "max_train_epochs": 1})
    assert doc["network"] == {"loraplus_unet_lr_ratio": 16.0, "loraplus_text_encoder_lr_ratio": 4.0} and unmapped == []


def test_length_and_saving_options_map():
    doc, unmapped, notes = convert({"max_train_steps": "900", "save_every_n_steps": "300", "save_last_n_steps": "2",
                                    "sdxl": True, "pretrained_model_name_or_path": "m.safetensors"})
    assert doc["train"] == {"max_steps": 900, "save_every_n_steps": 300}
    assert doc["output"] == {"keep_last": 2} and doc["model_type"] == "sdxl" and unmapped == []
    # neither length given: kohya trains its default 1600 steps, and so does the import
    doc, _, notes = convert({"pretrained_model_name_or_path": "m.safetensors"})
    assert doc["train"] == {"max_steps": 1600} and any("1600" in n for n in notes)


def test_a_dataset_config_becomes_concepts():
    import tomllib

    doc, unmapped, _ = convert({"pretrained_model_name_or_path": "m"}, tomllib.loads(DATASET))
    assert doc["dataset"]["concepts"] == [
        {"path": "chars/ayaka", "repeats": 10, "trigger": "ayaka 1girl"},
        {"path": "reg/girls", "repeats": 1, "is_reg": True},
    ]
    assert doc["bucket"]["resolution"] == 768 and doc["train"]["batch_size"] == 4
    assert doc["captions"]["shuffle"] is True and doc["dataset"]["caption_extension"] == ".txt"
    assert unmapped == ["subset reg/girls: color_aug = True (no equivalent in lorabuild)"]


def test_a_saved_command_line_with_continuations():
    text = ('accelerate launch --num_cpu_threads_per_process 1 train_network.py \\\n'
            '  --pretrained_model_name_or_path="/models/any merge.safetensors" \\\n'
            '  --network_dim 32 --network_alpha=16 --shuffle_caption --optimizer_args weight_decay=0.1 betas=0.9,0.99 ^\n'
            '  --learning_rate 2e-4  # a comment\n')
    flat = parse_command_line(text)
    assert flat["pretrained_model_name_or_path"] == "/models/any merge.safetensors"
    assert flat["network_dim"] == "32" and flat["network_alpha"] == "16" and flat["shuffle_caption"] is True
    assert flat["optimizer_args"] == ["weight_decay=0.1", "betas=0.9,0.99"] and flat["learning_rate"] == "2e-4"
    doc, unmapped, _ = convert(flat)
    assert doc["train"]["optimizer_args"] == {"weight_decay": 0.1, "betas": [0.9, 0.99]}
    assert doc["network"] == {"dim": 32, "alpha": 16.0} and unmapped == []


def test_the_cli_writes_a_project_that_validates(tmp_path):
    (tmp_path / "config.toml").write_text(CONFIG.replace('lr_scheduler = "cosine"', 'lr_scheduler = "constant"'))
    (tmp_path / "dataset.toml").write_text(DATASET)
    ws = tmp_path / "ws"
    for d in ("img/10_ayaka", "reg", "chars/ayaka", "reg/girls"):
        (ws / "projects" / d).mkdir(parents=True)
    out = ws / "projects" / "ayaka.yaml"
    proc = subprocess.run([sys.executable, "-m", "lorabuild", "import-kohya", str(tmp_path / "config.toml"),
                           "--dataset-config", str(tmp_path / "dataset.toml"), "-o", str(out),
                           "--root", str(ws / "projects")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "not mapped: color_aug = True" in proc.stderr
    text = out.read_text()
    assert text.startswith("# Imported by lorabuild import-kohya from ") and "#   color_aug = True" in text
    assert yaml.safe_load(text)["network"]["conv_dim"] == 4
    val = subprocess.run([sys.executable, "-m", "lorabuild", "validate", str(out)], capture_output=True, text=True)
    assert val.returncode == 0, val.stdout + val.stderr


def test_masked_loss_alpha_mask_and_validation_options_are_mapped():
    import tomllib

    doc, unmapped, _ = convert(parse_command_line(
        "train_network.py --masked_loss --validation_split 0.1 --validation_seed 7 --validate_every_n_epochs 1"))
    assert doc["train"] == {"masked_loss": True, "validation_split": 0.1, "validation_seed": 7, "max_steps": 1600}
    assert unmapped == ["validate_every_n_epochs = '1' (no equivalent in lorabuild)"]
    dataset = """
[[datasets]]
validation_split = 0.2
validation_seed = 3

  [[datasets.subsets]]
  image_dir = "chars/ayaka"
  alpha_mask = true
"""
    doc, unmapped, _ = convert({}, tomllib.loads(dataset))
    assert doc["train"] == {"masked_loss": True, "validation_split": 0.2, "validation_seed": 3, "max_steps": 1600}
    assert doc["dataset"]["concepts"] == [{"path": "chars/ayaka", "repeats": 1}] and unmapped == []
    doc, _, _ = convert({"alpha_mask": False, "masked_loss": True})
    assert doc["train"] == {"masked_loss": True, "max_steps": 1600}


def test_timestep_noise_max_norm_dropout_and_fp8_base_knobs_map_and_validate(tmp_path):
    text = ("accelerate launch train_network.py --pretrained_model_name_or_path builtin:tiny-sd1 --train_data_dir img "
            "--max_train_epochs 1 --min_timestep 100 --max_timestep 900 --ip_noise_gamma 0.1 "
            "--ip_noise_gamma_random_strength --noise_offset 0.05 --noise_offset_random_strength "
            "--adaptive_noise_scale 0.01 --scale_weight_norms 1.0 --fp8_base --network_args rank_dropout=0.1 module_dropout=0.2")
    doc, unmapped, _ = convert(parse_command_line(text))
    assert unmapped == []
    assert {k: doc["train"][k] for k in ("min_timestep", "max_timestep", "ip_noise_gamma", "ip_noise_gamma_random_strength",
                                         "noise_offset", "noise_offset_random_strength", "adaptive_noise_scale",
                                         "scale_weight_norms")} == {
        "min_timestep": 100, "max_timestep": 900, "ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True,
        "noise_offset": 0.05, "noise_offset_random_strength": True, "adaptive_noise_scale": 0.01, "scale_weight_norms": 1.0}
    assert doc["network"] == {"rank_dropout": 0.1, "module_dropout": 0.2} and doc["train"]["base_precision"] == "fp8"
    (tmp_path / "img").mkdir()
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc))
    val = subprocess.run([sys.executable, "-m", "lorabuild", "validate", str(tmp_path / "p.yaml")], capture_output=True,
                         text=True)
    assert val.returncode == 0, val.stdout + val.stderr


def test_flux_and_sd3_model_files_map_to_vae_and_text_encoders_and_validate(tmp_path):
    """flux_train_network.py's --ae/--clip_l/--t5xxl (sd3's --clip_g too) name the separate files of a
    single-file base model: vae and text_encoders, written relative to the project and validated."""
    models = tmp_path / "models"
    models.mkdir()
    names = ("flux1-dev.safetensors", "ae.safetensors", "clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors")
    for name in names:
        (models / name).write_bytes(b"")
    (tmp_path / "projects" / "img" / "10_ayaka").mkdir(parents=True)
    config = "\n".join(f'{k} = "{(models / v).as_posix()}"' for k, v in zip(
        ("pretrained_model_name_or_path", "ae", "clip_l", "clip_g", "t5xxl"), names)) + '\ntrain_data_dir = "img"\n'
    (tmp_path / "config.toml").write_text(config + "max_train_steps = 10\n")
    out = tmp_path / "projects" / "flux.yaml"
    proc = subprocess.run([sys.executable, "-m", "lorabuild", "import-kohya", str(tmp_path / "config.toml"), "-o", str(out),
                           "--root", str(tmp_path / "projects")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    doc = yaml.safe_load(out.read_text())
    assert doc["vae"] == "../models/ae.safetensors"
    assert doc["text_encoders"] == {"clip_l": "../models/clip_l.safetensors", "clip_g": "../models/clip_g.safetensors",
                                    "t5xxl": "../models/t5xxl_fp16.safetensors"}
    val = subprocess.run([sys.executable, "-m", "lorabuild", "validate", str(out)], capture_output=True, text=True)
    assert val.returncode == 0, val.stdout + val.stderr
    (models / "clip_g.safetensors").unlink()
    val = subprocess.run([sys.executable, "-m", "lorabuild", "validate", str(out)], capture_output=True, text=True)
    assert val.returncode != 0 and "text_encoders.clip_g" in val.stdout + val.stderr
