"""`lorabuild import-kohya` on each form a kohya setup takes: lora-scripts' train.ps1 and train.sh,
sd-scripts TOML (sections), dataset configs, kohya_ss GUI presets. The fixtures are written
here after the constructs those projects' files use; each import is checked field by field,
for what it lists as not mapped, and by `lorabuild validate` once the named paths exist."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lorabuild.importers.convert import convert_full
from lorabuild.yamlio import load

PS1 = r'''# LoRA settings, lora-scripts style
$pretrained_model = "./sd-models/base.ckpt" # base model path
$is_v2_model = 0 # SD2.0 model
$train_data_dir = "./train/aki"
$reg_data_dir = ""
$network_module = "lycoris.kohya"
$network_weights = ""
$network_dim = 32
$network_alpha = 16
$resolution = "512,512"
$batch_size = 2
$max_train_epoches = 10
$save_every_n_epochs = 0
$train_unet_only = 1
$noise_offset = 0
$min_snr_gamma = 5
$lr = "1e-4"
$unet_lr = "1e-4"
$text_encoder_lr = "1e-5"
$lr_scheduler = "cosine_with_restarts"
$lr_warmup_steps = 0
$output_name = "aki"
$optimizer_type = "AdamW8bit"
$algo = "loha"
$conv_dim = 4
$conv_alpha = 2
$dropout = "0"
$use_wandb = 0

$Env:HF_HOME = "huggingface"
$ext_args = [System.Collections.ArrayList]::new()
$launch_args = [System.Collections.ArrayList]::new()

if ($is_v2_model) {
  [void]$ext_args.Add("--v2")
}
else {
  [void]$ext_args.Add("--clip_skip=2")
}
if ($train_unet_only) {
  [void]$ext_args.Add("--network_train_unet_only")
}
if ($network_weights) { [void]$ext_args.Add("--network_weights=" + $network_weights) }
if ($reg_data_dir) {
  [void]$ext_args.Add("--reg_data_dir=" + $reg_data_dir)
}
if ($optimizer_type) {
  [void]$ext_args.Add("--optimizer_type=" + $optimizer_type)
}
if ($network_module -eq "lycoris.kohya") {
  [void]$ext_args.Add("--network_args")
  [void]$ext_args.Add("conv_dim=$conv_dim")
  [void]$ext_args.Add("conv_alpha=$conv_alpha")
  [void]$ext_args.Add("algo=$algo")
  [void]$ext_args.Add("dropout=$dropout")
}
if ($noise_offset -ne 0) {
  [void]$ext_args.Add("--noise_offset=$noise_offset")
}
if ($min_snr_gamma -ne 0) {
  [void]$ext_args.Add("--min_snr_gamma=$min_snr_gamma")
}
if ($use_wandb -eq 1) {
  [void]$ext_args.Add("--log_with=all")
}
else {
  [void]$ext_args.Add("--log_with=tensorboard")
}

# run train
accelerate launch $launch_args --num_cpu_threads_per_process=8 "./sd-scripts/train_network.py" `
  --enable_bucket `
  --pretrained_model_name_or_path=$pretrained_model `
  --train_data_dir=$train_data_dir `
  --output_dir="./output" `
  --resolution=$resolution `
  --network_module=$network_module `
  --max_train_epochs=$max_train_epoches `
  --learning_rate=$lr `
  --unet_lr=$unet_lr `
  --text_encoder_lr=$text_encoder_lr `
  --lr_scheduler=$lr_scheduler `
  --lr_warmup_steps=$lr_warmup_steps `
  --network_dim=$network_dim `
  --network_alpha=$network_alpha `
  --output_name=$output_name `
  --train_batch_size=$batch_size `
  --save_every_n_epochs=$save_every_n_epochs `
  --mixed_precision="fp16" `
  --seed="1337" `
  --cache_latents `
  --caption_extension=".txt" `
  --xformers --shuffle_caption $ext_args
Write-Output "Train finished"
Read-Host | Out-Null ;
'''

SH = '''#!/bin/bash
pretrained_model="./sd-models/xl.safetensors" # base model path
is_v2_model=0
train_data_dir="./train/aki"
reg_data_dir="./train/reg"
network_weights=""
network_dim=16
network_alpha=8
resolution="1024,1024"
batch_size=1
max_train_epoches=4
noise_offset="0.05"
min_snr_gamma=0
lr="5e-5"
output_name="xl"
optimizer_type="Lion"
multi_gpu=0

extArgs=()
launchArgs=()
if [[ $multi_gpu == 1 ]]; then launchArgs+=("--multi_gpu"); fi

if [[ $is_v2_model == 1 ]]; then
  extArgs+=("--v2");
else
  extArgs+=("--clip_skip 1");
fi
if [[ $network_weights ]]; then extArgs+=("--network_weights $network_weights"); fi
if [[ $reg_data_dir ]]; then extArgs+=("--reg_data_dir $reg_data_dir"); fi
if [[ $optimizer_type ]]; then extArgs+=("--optimizer_type $optimizer_type"); fi
if [[ $noise_offset != "0" ]]; then extArgs+=("--noise_offset $noise_offset"); fi
if [[ $min_snr_gamma -ne 0 ]]; then extArgs+=("--min_snr_gamma $min_snr_gamma"); fi

python -m accelerate.commands.launch ${launchArgs[@]} --num_cpu_threads_per_process=8 "./sd-scripts/sdxl_train_network.py" \\
  --enable_bucket \\
  --pretrained_model_name_or_path=$pretrained_model \\
  --train_data_dir=$train_data_dir \\
  --resolution=$resolution \\
  --network_module=networks.lora \\
  --max_train_epochs=$max_train_epoches \\
  --learning_rate=$lr \\
  --network_dim=$network_dim \\
  --network_alpha=$network_alpha \\
  --output_name=$output_name \\
  --train_batch_size=$batch_size \\
  --shuffle_caption ${extArgs[@]}
'''


def _import(tmp_path: Path, name: str, text: str, *extra: str, out: str = "ws/projects/p.yaml"):
    (tmp_path / name).write_text(text, encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "lorabuild", "import-kohya", name, "-o", out, *extra],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    written = (tmp_path / out).read_text(encoding="utf-8")
    return load(written), written, proc


def _validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorabuild", "validate", str(path)], capture_output=True, text=True)


def _unmapped(text: str) -> list[str]:
    lines = text.splitlines()
    if "# Not mapped (no equivalent here, or not understood):" not in lines:
        return []
    start = lines.index("# Not mapped (no equivalent here, or not understood):") + 1
    return [ln[4:] for ln in lines[start:] if ln.startswith("#   ")]


def test_a_lora_scripts_ps1_with_variables_and_ext_args(tmp_path):
    (tmp_path / "train" / "aki" / "10_aki").mkdir(parents=True)
    (tmp_path / "sd-models").mkdir()
    (tmp_path / "sd-models" / "base.ckpt").write_bytes(b"not really a model")
    doc, text, proc = _import(tmp_path, "train.ps1", PS1)
    assert doc["base_model"] == "../../sd-models/base.ckpt"  # resolved from the script's folder, written from the YAML's
    assert doc["allow_pickle"] is True and "is a pickle checkpoint (.ckpt)" in text and "allow_pickle" in text
    assert doc["dataset"] == {"dirs": ["../../train/aki"], "caption_extension": ".txt"}
    assert doc["captions"] == {"shuffle": True}  # --shuffle_caption before $ext_args is a flag, not a value
    assert doc["bucket"] == {"resolution": 512} and doc["textemb"] == {"clip_skip": 2}
    # lycoris.kohya algo=loha is LyCORIS' LoHa, with its convolution rank
    assert doc["network"] == {"dim": 32, "alpha": 16.0, "train_text_encoder": False, "type": "loha", "conv_dim": 4,
                              "conv_alpha": 2.0}
    assert doc["train"] == {"epochs": 10, "learning_rate": 1e-4, "unet_lr": 1e-4, "text_encoder_lr": 1e-5,
                            "lr_scheduler": "cosine_with_restarts", "batch_size": 2, "mixed_precision": "fp16",
                            "seed": 1337, "attention": "xformers", "optimizer": "adamw8bit", "min_snr_gamma": 5.0}
    assert doc["output"] == {"name": "aki"}
    assert _unmapped(text) == [] and "not mapped" not in proc.stderr
    assert "  type: loha  # kohya: network_args algo=loha\n" in text
    off = next(ln for ln in text.splitlines() if ln.startswith("# Off"))
    assert off.endswith(": lr_warmup_steps, save_every_n_epochs, network_args dropout")
    assert "  dim: 32  # kohya: network_dim\n" in text and "  optimizer: adamw8bit  # kohya: optimizer_type\n" in text
    assert "log_with" in next(ln for ln in text.splitlines() if ln.startswith("# Not needed"))
    assert "validated ws/projects/p.yaml: no problems" in proc.stdout
    assert _validate(tmp_path / "ws" / "projects" / "p.yaml").returncode == 0


def test_a_ps1_variable_that_is_never_set_is_listed_not_a_traceback(tmp_path):
    text = PS1.replace('$lr_warmup_steps = 0\n', "").replace('$pretrained_model = "./sd-models/base.ckpt" # base model path\n', "")
    doc, written, proc = _import(tmp_path, "train.ps1", text)
    assert "lr_warmup_steps" not in doc["train"] and "lr_warmup_ratio" not in doc["train"]
    assert "lr_warmup_steps = '' " not in written
    # an unset PowerShell variable is empty, so both are kohya's default; the base model falls back loudly
    assert doc["base_model"] == "builtin:tiny-sd1" and "no base model (pretrained_model_name_or_path)" in written
    assert "lr_warmup_steps" in next(ln for ln in written.splitlines() if ln.startswith("# Off"))


def test_a_lora_scripts_sh(tmp_path):
    for d in ("train/aki/5_aki", "train/reg/1_girl"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "sd-models").mkdir()
    (tmp_path / "sd-models" / "xl.safetensors").write_bytes(b"x")
    doc, text, proc = _import(tmp_path, "train.sh", SH)
    assert doc["model_type"] == "sdxl"  # from the script: sdxl_train_network.py
    assert doc["base_model"] == "../../sd-models/xl.safetensors" and "allow_pickle" not in doc
    assert doc["dataset"] == {"dirs": ["../../train/aki"], "reg_dirs": ["../../train/reg"]}
    assert doc["bucket"] == {"resolution": 1024} and doc["textemb"] == {"clip_skip": 1}
    assert doc["train"] == {"epochs": 4, "learning_rate": 5e-5, "batch_size": 1, "optimizer": "lion",
                            "noise_offset": 0.05}
    assert doc["network"] == {"dim": 16, "alpha": 8.0} and _unmapped(text) == []
    assert "  model_type: sdxl" not in text and "model_type: sdxl  # kohya: sdxl_train_network.py" in text


def test_toml_sections_clash_visibly_and_empty_never_wins(tmp_path):
    (tmp_path / "train" / "input").mkdir(parents=True)
    toml = '''[model]
pretrained_model_name_or_path = "builtin:tiny-sd1"
train_data_dir = "./train/input"

[additional_network]
network_dim = 8
network_alpha = 4
network_module = "lycoris.kohya"
network_args = ["algo=locon", "conv_dim=4", "conv_alpha=1"]

[optimizer]
learning_rate = 2e-4
lr_scheduler = "constant"

[training]
max_train_epochs = 0
max_train_steps = 600
seed = 1
min_snr_gamma = 0
vae_batch_size = 0
debiased_estimation_loss = true
multires_noise_iterations = 6
multires_noise_discount = 0.3

[saving]
save_every_n_steps = 0
save_last_n_epochs = 0

[others]
seed = 2
train_data_dir = ""

[sample_prompt]
sample_every_n_epochs = 0
sample_every_n_steps = 0

[wd14_caption]
train_data_dir = ""
general_threshold = 0.35
'''
    doc, text, proc = _import(tmp_path, "lora.toml", toml)
    assert doc["dataset"] == {"dirs": ["../../train/input"]}  # neither [others]' nor [wd14_caption]'s empty one
    assert doc["train"] == {"learning_rate": 2e-4, "lr_scheduler": "constant", "max_steps": 600, "seed": 2,
                            "debiased_estimation": True, "multires_noise_iterations": 6, "multires_noise_discount": 0.3}
    assert doc["network"] == {"dim": 8, "alpha": 4.0, "conv_dim": 4, "conv_alpha": 1.0}
    assert "# Note: seed is 1 in [training] and 2 in [others]: the later one is used, as sd-scripts does" in text
    assert "# Note: train_data_dir is './train/input' in [model] and empty in [others]: the empty one is ignored" in text
    assert _unmapped(text) == [
        "[wd14_caption] train_data_dir = '' (a tagger setting of the GUI, not a training option; see lorabuild's "
        "tagger section)",
        "[wd14_caption] general_threshold = 0.35 (a tagger setting of the GUI, not a training option; see "
        "lorabuild's tagger section)"]
    off = next(ln for ln in text.splitlines() if ln.startswith("# Off"))
    for key in ("max_train_epochs", "min_snr_gamma", "vae_batch_size", "save_every_n_steps", "save_last_n_epochs",
                "sample_every_n_epochs", "sample_every_n_steps"):
        assert key in off
    for section in ("latents", "sample", "output"):
        assert section not in doc  # every 0 = off left lorabuild's default
    assert "locon" in text and _validate(tmp_path / "ws" / "projects" / "p.yaml").returncode == 0


DATASET = '''[general]
caption_extension = ".txt"
shuffle_caption = true
keep_tokens = 1

[[datasets]]
resolution = [768, 768]
batch_size = 2

  [[datasets.subsets]]
  image_dir = "img/chara"
  num_repeats = 8
  class_tokens = "chara 1girl"
  caption_dropout_rate = 0.1

  [[datasets.subsets]]
  image_dir = "img/reg"
  is_reg = true

[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = "img/style"
  num_repeats = 2
  caption_extension = ".caption"
  shuffle_caption = false
  face_crop_aug_range = [2.0, 4.0]
'''


def test_a_dataset_config_with_two_datasets_and_w_h_resolutions(tmp_path):
    for d in ("img/chara", "img/reg", "img/style"):
        (tmp_path / d).mkdir(parents=True)
    doc, text, proc = _import(tmp_path, "dataset.toml", DATASET, out="p.yaml")
    assert doc["dataset"] == {"caption_extension": ".txt", "concepts": [
        {"path": "img/chara", "repeats": 8, "trigger": "chara 1girl", "captions": {"dropout": 0.1}},
        {"path": "img/reg", "repeats": 1, "is_reg": True},
        {"path": "img/style", "repeats": 2, "caption_extension": ".caption",
         "captions": {"keep_tokens": 2, "shuffle": False}, "bucket": {"resolution": 512}}]}
    assert doc["captions"] == {"shuffle": True, "keep_tokens": 1}
    assert doc["bucket"] == {"resolution": 768} and doc["train"]["batch_size"] == 2  # datasets[1]'s: its concepts'
    assert _unmapped(text) == [
        "datasets[1] batch_size = 4 (a project has one train.batch_size; its concepts are imported with "
        "datasets[0]'s 2: make a second project to train them at this value)",
        "subset img/style: face_crop_aug_range = [2.0, 4.0] (no equivalent in lorabuild)"]
    assert "concepts:  # kohya: [[datasets.subsets]]" in text
    assert _validate(tmp_path / "p.yaml").returncode == 0


def test_a_training_toml_naming_its_dataset_config_and_a_root(tmp_path):
    kohya = tmp_path / "sd-scripts"
    for d in ("img/chara", "img/reg", "img/style"):
        (kohya / d).mkdir(parents=True)
    (kohya / "dataset.toml").write_text(DATASET)
    (tmp_path / "cfg").mkdir()
    toml = 'pretrained_model_name_or_path = "builtin:tiny-sd1"\ndataset_config = "dataset.toml"\n' \
           'train_data_dir = "ignored"\nmax_train_epochs = 3\n'
    doc, text, _ = _import(tmp_path, "cfg/train.toml", toml, "--root", str(kohya), out="projects/p.yaml")
    assert [c["path"] for c in doc["dataset"]["concepts"]] == ["../sd-scripts/img/chara", "../sd-scripts/img/reg",
                                                               "../sd-scripts/img/style"]
    assert "dirs" not in doc["dataset"]
    assert "train_data_dir = 'ignored' (sd-scripts ignores it when a dataset config is given)" in _unmapped(text)
    assert _validate(tmp_path / "projects" / "p.yaml").returncode == 0


GUI = {
    "LoRA_type": "LyCORIS/LoHa", "adaptive_noise_scale": 0, "additional_parameters": "--max_grad_norm=0.5",
    "block_alphas": "", "bucket_no_upscale": True, "bucket_reso_steps": 1, "cache_latents": True,
    "caption_dropout_rate": 0.05, "caption_extension": ".txt", "clip_skip": "2", "color_aug": False,
    "conv_alpha": 4, "conv_dim": 8, "enable_bucket": True, "epoch": 12, "factor": -1, "flip_aug": False,
    "gradient_checkpointing": True, "keep_tokens": "1", "learning_rate": 0.0001, "lora_network_weights": "",
    "lr_scheduler": "cosine", "lr_scheduler_num_cycles": "", "lr_warmup": 10, "max_data_loader_n_workers": "0",
    "max_resolution": "768,768", "max_bucket_reso": 1024, "min_bucket_reso": 256, "max_token_length": "75",
    "max_train_epochs": "", "max_train_steps": "", "min_snr_gamma": 0, "mixed_precision": "bf16",
    "multires_noise_discount": 0.3, "multires_noise_iterations": 6, "network_alpha": 16, "network_dim": 32,
    "noise_offset": 0.05, "noise_offset_type": "Multires", "num_cpu_threads_per_process": 2,
    "optimizer": "AdamW8bit", "optimizer_args": "weight_decay=0.1 betas=0.9,0.99", "output_dir": "./out",
    "output_name": "gui", "pretrained_model_name_or_path": "models/base.safetensors", "train_data_dir": "img",
    "sample_prompts": "a photo of sks dog --w 512 --h 512\nsks dog in a bucket", "sample_every_n_epochs": 2,
    "sample_sampler": "euler_a", "save_every_n_steps": 0, "save_precision": "fp16", "seed": "",
    "shuffle_caption": True, "text_encoder_lr": 0.00005, "train_batch_size": 2, "unet_lr": 0.0001,
    "use_wandb": False, "v2": False, "vae_batch_size": 0, "weighted_captions": False, "xformers": "sdpa",
}


def test_a_kohya_ss_gui_preset(tmp_path):
    (tmp_path / "img" / "10_sks dog").mkdir(parents=True)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base.safetensors").write_bytes(b"x")
    doc, text, proc = _import(tmp_path, "preset.json", json.dumps(GUI, indent=2))
    assert doc["base_model"] == "../../models/base.safetensors"
    assert doc["dataset"] == {"caption_extension": ".txt", "dirs": ["../../img"]}
    assert doc["captions"] == {"dropout": 0.05, "keep_tokens": 1, "shuffle": True}
    assert doc["bucket"] == {"no_upscale": True, "step": 64, "resolution": 768, "max_reso": 1024, "min_reso": 256}
    assert doc["textemb"] == {"clip_skip": 2, "max_token_length": 75}
    assert doc["network"] == {"alpha": 16.0, "dim": 32, "type": "loha", "conv_dim": 8, "conv_alpha": 4.0}  # LyCORIS' LoHa
    t = doc["train"]
    assert (t["epochs"], t["lr_warmup_ratio"], t["optimizer"], t["max_grad_norm"]) == (12, 0.1, "adamw8bit", 0.5)
    assert t["optimizer_args"] == {"weight_decay": 0.1, "betas": [0.9, 0.99]}
    assert (t["multires_noise_iterations"], t["multires_noise_discount"]) == (6, 0.3) and "noise_offset" not in t
    assert doc["sample"] == {"prompts": ["a photo of sks dog --w 512 --h 512", "sks dog in a bucket"],
                             "every_n_epochs": 2, "sampler": "euler_a"}
    assert doc["output"] == {"name": "gui", "save_precision": "fp16"}
    assert _unmapped(text) == []  # LoHa's factor -1 is LyCORIS' default (and LoKr's only): off
    assert "network_args factor" in next(ln for ln in text.splitlines() if ln.startswith("# Off"))
    gui = next(ln for ln in text.splitlines() if ln.startswith("# Settings with no effect on the LoRA"))
    assert all(k in gui for k in ("output_dir", "num_cpu_threads_per_process", "use_wandb", "cache_latents"))
    empty = next(ln for ln in text.splitlines() if ln.startswith("# Left empty"))
    assert empty.endswith("block_alphas, lora_network_weights, lr_scheduler_num_cycles, max_train_epochs, "
                          "max_train_steps, seed")
    assert "  epochs: 12  # kohya_ss: epoch" in text and "bucket_reso_steps = 1" in text
    assert "validated ws/projects/p.yaml: no problems" in proc.stdout


AITOOLKIT = """---
job: extension
config:
  name: "my_sdxl_lora"
  process:
    - type: 'sd_trainer'
      training_folder: "output"
      device: cuda:0
      trigger_word: "p3r5on"
      network:
        type: "lora"
        linear: 16
        linear_alpha: 8
      save:
        dtype: float16
        save_every: 250
        max_step_saves_to_keep: 4
      datasets:
        - folder_path: "imgs"
          caption_ext: "txt"
          caption_dropout_rate: 0.05
          shuffle_tokens: false
          cache_latents_to_disk: true
          resolution: [ 512, 768, 1024 ]
      train:
        batch_size: 1
        steps: 2000
        train_unet: true
        train_text_encoder: false
        gradient_checkpointing: true
        optimizer: "adamw8bit"
        lr: 1e-4
        ema_config:
          use_ema: true
        dtype: bf16
      model:
        name_or_path: "models/sdxl.safetensors"
        is_xl: true
      sample:
        sampler: "euler_a"
        sample_every: 250
        width: 1024
        height: 1024
        prompts:
          - "p3r5on playing chess at the park"
        neg: "blurry"
        seed: 42
        guidance_scale: 4
        sample_steps: 20
meta:
  name: "[name]"
"""


def test_an_ai_toolkit_job(tmp_path):
    (tmp_path / "ws" / "imgs").mkdir(parents=True)
    (tmp_path / "ws" / "models").mkdir()
    (tmp_path / "ws" / "models" / "sdxl.safetensors").write_bytes(b"x")
    doc, text, proc = _import(tmp_path, "job.yaml", AITOOLKIT, "--root", str(tmp_path / "ws"), out="ws/p.yaml")
    assert (doc["base_model"], doc["model_type"]) == ("models/sdxl.safetensors", "sdxl")
    assert doc["dataset"] == {"concepts": [{"path": "imgs", "repeats": 1, "caption_extension": ".txt",
                                            "captions": {"dropout": 0.05, "shuffle": False}}]}
    assert doc["captions"] == {"prepend": ["p3r5on"]} and doc["bucket"] == {"resolution": [512, 768, 1024]}
    assert doc["network"] == {"dim": 16, "alpha": 8.0, "train_text_encoder": False}
    assert doc["train"] == {"save_every_n_steps": 250, "mixed_precision": "bf16", "batch_size": 1, "max_steps": 2000,
                            "gradient_checkpointing": True, "optimizer": "adamw8bit", "learning_rate": 1e-4,
                            "ema": {"decay": 0.99}}
    assert doc["sample"] == {"at_first": True, "every_n_steps": 250, "sampler": "euler_a",
                             "prompts": ["p3r5on playing chess at the park --w 1024 --h 1024 --s 20 --l 4 --d 42 --n blurry"]}
    assert doc["output"] == {"name": "my_sdxl_lora", "save_precision": "fp16", "keep_last": 4}
    assert "  ema: {decay: 0.99}  # ai-toolkit: train.ema_config\n" in text
    assert _unmapped(text) == []  # the resolution list is the project's (multi-resolution training)
    assert "  dim: 16  # ai-toolkit: network.linear\n" in text
    assert _validate(tmp_path / "ws" / "p.yaml").returncode == 0
    (tmp_path / "flux.yaml").write_text(AITOOLKIT.replace("is_xl: true", "is_flux: true"))
    _, text, _ = _import(tmp_path, "flux.yaml", AITOOLKIT.replace("is_xl: true", "is_flux: true"), out="f.yaml")
    assert _unmapped(text)[0].startswith("model.is_flux = true (lorabuild trains SD 1.x, 2.x and SDXL LoRAs")
    lokr = AITOOLKIT.replace('type: "lora"', 'type: "lokr"\n        lokr_factor: 4\n        lokr_full_rank: true')
    doc, text, _ = _import(tmp_path, "lokr.yaml", lokr, out="k.yaml")
    assert doc["network"]["type"] == "lokr" and doc["network"]["factor"] == 4
    assert any(u.startswith("network.lokr_full_rank = True") for u in _unmapped(text))


ONETRAINER = {
    "training_method": "LORA", "workspace_dir": "workspace/run", "tensorboard": True, "model_type": "STABLE_DIFFUSION_XL_10_BASE",
    "base_model_name": "models/xl.safetensors", "output_dtype": "FLOAT_16", "output_model_destination": "models/cat.safetensors",
    "concept_file_name": "training_concepts/concepts.json", "latent_caching": True, "optimizer": "ADAMW",
    "learning_rate_scheduler": "COSINE", "learning_rate": 0.0003, "learning_rate_warmup_steps": 200, "weight_decay": 0.01,
    "epochs": 20, "batch_size": 4, "ema": "OFF", "train_text_encoder": False, "text_encoder_layer_skip": 1,
    "train_unet_epochs": 100000, "offset_noise_weight": 0.05, "train_dtype": "BFLOAT_16", "resolution": "768,1024",
    "lora_rank": 16, "lora_alpha": 1.0, "attention_mechanism": "SDP",
    "sample_definition_file_name": "training_samples/samples.json", "sample_after": 2, "sample_after_unit": "EPOCH",
}


def test_a_onetrainer_preset_with_its_concepts_and_samples(tmp_path):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "xl.safetensors").write_bytes(b"x")
    for d, items in (("training_concepts/concepts.json", [{"name": "cat", "path": "data/cat", "repeats": 2.0},
                                                           {"name": "old", "path": "data/old", "enabled": False}]),
                     ("training_samples/samples.json", [{"prompt": "a cat", "negative_prompt": "blurry", "width": 768,
                                                         "height": 1024, "seed": 4, "diffusion_steps": 20}])):
        (tmp_path / d).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / d).write_text(json.dumps(items))
    doc, text, proc = _import(tmp_path, "preset.json", json.dumps(ONETRAINER), out="p.yaml")
    assert (doc["base_model"], doc["model_type"]) == ("models/xl.safetensors", "sdxl")
    assert doc["dataset"] == {"concepts": [{"path": "data/cat", "repeats": 2}]}
    assert doc["bucket"] == {"resolution": 1024} and doc["textemb"] == {"clip_skip": 2}
    assert doc["network"] == {"dim": 16, "alpha": 1.0, "train_text_encoder": False}
    assert doc["train"] == {"optimizer": "adamw", "lr_scheduler": "cosine", "learning_rate": 0.0003,
                            "lr_warmup_steps": 200, "optimizer_args": {"weight_decay": 0.01}, "epochs": 20,
                            "batch_size": 4, "noise_offset": 0.05, "mixed_precision": "bf16"}
    assert doc["sample"] == {"every_n_epochs": 2, "prompts": ["a cat --w 768 --h 1024 --d 4 --s 20 --n blurry"]}
    assert doc["output"] == {"save_precision": "fp16", "name": "cat"}
    assert _unmapped(text) == ["resolution = '768,1024' (OneTrainer trains at each; a project at one: 1024)",
                               "concept 'old': disabled in OneTrainer, left out"]
    assert "  dim: 16  # OneTrainer: lora_rank\n" in text
    assert _validate(tmp_path / "p.yaml").returncode == 0
    ema = {**ONETRAINER, "ema": "GPU", "ema_decay": 0.998, "ema_update_step_interval": 2}
    (tmp_path / "p.yaml").unlink()  # one project per output name in a folder
    doc, text, _ = _import(tmp_path, "ema.json", json.dumps(ema), out="ema.yaml")
    assert doc["train"]["ema"] == {"decay": 0.998, "every_n_steps": 2} and not any("ema" in u for u in _unmapped(text))
    assert "  ema: {decay: 0.998, every_n_steps: 2}  # OneTrainer: ema = GPU, ema_decay\n" in text
    assert _validate(tmp_path / "ema.yaml").returncode == 0


def test_a_gui_preset_with_nothing_known_is_not_an_empty_success(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"LoRA_type": "Standard", "epoch": 1, "weird_new_key": 3}))
    proc = subprocess.run([sys.executable, "-m", "lorabuild", "import-kohya", "x.json", "-o", "p.yaml"],
                          cwd=tmp_path, capture_output=True, text=True)
    text = (tmp_path / "p.yaml").read_text()
    assert "not mapped: weird_new_key = 3 (no equivalent in lorabuild)" in proc.stderr
    assert "no base model" in text and "no dataset found" in text


@pytest.mark.parametrize("key", ["max_train_epochs", "save_every_n_steps", "min_snr_gamma", "sample_every_n_epochs",
                                 "sample_every_n_steps", "vae_batch_size", "save_last_n_epochs",
                                 "save_every_n_epochs", "clip_skip", "max_token_length"])
def test_kohyas_zero_is_off(key):
    r = convert_full({key: 0, "max_train_steps": 100} if key != "max_train_steps" else {key: 0})
    assert r.off == [key] and r.unmapped == []
    assert key not in r.sources.values()


def test_unreadable_files_are_one_line(tmp_path):
    (tmp_path / "bad.toml").write_text("a = [1,\n")
    (tmp_path / "bad.json").write_text("{\"a\": }")
    (tmp_path / "bad.ps1").write_text("$a = 1\n")
    for name, msg in (("bad.toml", "not valid TOML"), ("bad.json", "bad.json:1:7: not valid JSON"),
                      ("bad.ps1", "no `accelerate launch")):
        proc = subprocess.run([sys.executable, "-m", "lorabuild", "import-kohya", name], cwd=tmp_path,
                              capture_output=True, text=True)
        assert proc.returncode == 1 and msg in proc.stderr and "Traceback" not in proc.stderr


def test_any_values_under_kohya_names_convert_without_an_exception(tmp_path):
    """Whatever a hand-edited config holds under kohya's names, the import lists or maps it, never raises."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from lorabuild.importers.datasets import CAPTIONS, ONCE
    from lorabuild.importers.options import SIMPLE
    from lorabuild.importers.write import fix_paths, render_yaml

    scalar = st.one_of(st.integers(-5, 5000), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                       st.text(max_size=12), st.sampled_from(["", "0", "1e-4", "512,768", "AdamW8bit", "$x", "a=b"]))
    value = st.one_of(scalar, st.lists(scalar, max_size=3))
    names = sorted(SIMPLE) + ["optimizer_type", "network_args", "network_module", "lr_warmup_steps", "unet_lr",
                              "text_encoder_lr", "bucket_reso_steps", "_script", "sdxl", "xformers"]
    subset = st.dictionaries(st.sampled_from(sorted(CAPTIONS) + ["image_dir", "num_repeats", "is_reg",
                                                                  "class_tokens", "flip_aug", "x"]), value, max_size=5)
    dataset = st.fixed_dictionaries({"subsets": st.lists(subset, max_size=2)},
                                    optional={k: value for k in sorted(ONCE)})
    dataset_cfg = st.one_of(st.none(), st.fixed_dictionaries({"datasets": st.lists(dataset, max_size=2)},
                                                             optional={"general": st.dictionaries(
                                                                 st.sampled_from(sorted(CAPTIONS)), value)}))

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.dictionaries(st.sampled_from(names), value, max_size=8), dataset_cfg)
    def check(cfg, ds):
        r = convert_full(cfg, ds)
        fix_paths(r, tmp_path, tmp_path)
        assert load(render_yaml(r)) == r.doc  # what is written reads back as the document
        assert set(r.sources) <= {".".join(p) for p in _paths(r.doc)}

    check()


def _paths(doc: dict, prefix: tuple = ()):
    for k, v in doc.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))


def test_a_script_launching_with_a_config_file(tmp_path):
    """lora-scripts' train_by_toml.ps1: the command line names a --config_file; its own flags win."""
    (tmp_path / "config").mkdir()
    (tmp_path / "train" / "aki" / "5_aki").mkdir(parents=True)
    (tmp_path / "config" / "prompts.txt").write_text("a cat --w 512\n")
    (tmp_path / "config" / "lora.toml").write_text(
        '[model]\npretrained_model_name_or_path = "builtin:tiny-sd1"\n[dataset]\ntrain_data_dir = "./train/aki"\n'
        '[additional_network]\nnetwork_dim = 8\n[training]\nmax_train_epochs = 2\n')
    ps1 = ('$config_file = "./config/lora.toml"\n$sample_prompts = "./config/prompts.txt"\n'
           '$launch_args = [System.Collections.ArrayList]::new()\n'
           'accelerate launch $launch_args "./sd-scripts/train_network.py" `\n'
           '  --config_file=$config_file `\n  --sample_prompts=$sample_prompts --max_train_epochs=3\n')
    doc, text, proc = _import(tmp_path, "train_by_toml.ps1", ps1, out="projects/p.yaml")
    assert doc["dataset"] == {"dirs": ["../train/aki"]} and doc["network"] == {"dim": 8}
    assert doc["train"] == {"epochs": 3} and doc["sample"] == {"prompt_file": "../config/prompts.txt"}
    assert "validated projects/p.yaml: no problems" in proc.stdout


def test_a_condition_the_reader_cannot_evaluate_is_said(tmp_path):
    text = SH.replace('if [[ $noise_offset != "0" ]]', 'if [ -f "$noise_offset" ]')
    doc, written, _ = _import(tmp_path, "train.sh", text)
    assert "noise_offset" not in doc["train"]
    assert "# Note: cannot evaluate the condition '[ -f \"$noise_offset\" ]': the script's branch under it is " \
           "taken as not run" in written
