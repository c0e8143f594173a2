"""`lorabuild import-kohya` on sd-scripts' FLUX.1 and SD 3.5 configs (flux_train_network.py,
sd3_train_network.py): the objective as kohya trains it (its defaults, not lorabuild's family
defaults, written out), the T5 settings, and networks.lora_flux / lora_sd3's network_args."""
from __future__ import annotations

import subprocess
import sys
import tomllib

import yaml

from lorabuild.importers.convert import convert, convert_full
from lorabuild.importers.read import parse_command_line

# a kohya_ss GUI FLUX LoRA config (its TOML, as the GUI saves it), the model-file options left out
FLUX_TOML = """
pretrained_model_name_or_path = "builtin:tiny-flux"
train_data_dir = "img"
output_name = "flux_lora"
network_module = "networks.lora_flux"
network_dim = 16
network_alpha = 16
network_args = [ "train_double_block_indices=0-1", "train_single_block_indices=none", "train_t5xxl=True", "split_qkv=True" ]
learning_rate = 0.0001
text_encoder_lr = [ 5e-5, 1e-5 ]
max_train_epochs = 4
train_batch_size = 1
mixed_precision = "bf16"
timestep_sampling = "shift"
discrete_flow_shift = 3.1582
sigmoid_scale = 1.0
model_prediction_type = "raw"
guidance_scale = 1.0
t5xxl_max_token_length = 512
apply_t5_attn_mask = true
cache_text_encoder_outputs = false
loss_type = "l2"
resolution = "512,512"
"""


def test_a_kohya_ss_flux_config_maps_its_objective_t5_and_network_args():
    r = convert_full(tomllib.loads(FLUX_TOML))
    doc = r.doc
    assert doc["network"] == {"dim": 16, "alpha": 16.0, "train_double_block_indices": "0-1",
                              "train_single_block_indices": "none", "train_t5xxl": True, "split_qkv": True}
    assert {k: doc["train"][k] for k in ("timestep_sampling", "discrete_flow_shift", "sigmoid_scale", "guidance_scale")} \
        == {"timestep_sampling": "shift", "discrete_flow_shift": 3.1582, "sigmoid_scale": 1.0, "guidance_scale": 1.0}
    assert "weighting_scheme" not in doc["train"]  # FLUX with raw predictions: kohya weights nothing
    assert doc["train"]["text_encoder_2_lr"] == 1e-5  # kohya's second text-encoder rate: T5's
    assert doc["textemb"] == {"t5_max_length": 512, "apply_t5_attn_mask": True}
    assert "model_type" not in doc  # FLUX.1 is known by its weights
    assert r.unmapped == []
    assert r.sources["network.split_qkv"] == "network_args split_qkv"
    assert r.sources["network.train_double_block_indices"] == "network_args train_double_block_indices"
    assert r.sources["train.discrete_flow_shift"] == "discrete_flow_shift"


def test_a_flux_command_line_with_kohyas_defaults_states_them():
    """kohya's FLUX defaults: timestep_sampling sigma (σ by the weighting scheme's density, shifted by 3.0),
    guidance 3.5, sigma_scaled predictions (listed: lorabuild trains raw). σ runs from 1 down in
    kohya's scheduler, so a logit-normal mean m there is −m here."""
    doc, unmapped, _ = convert(parse_command_line(
        "accelerate launch flux_train_network.py --pretrained_model_name_or_path builtin:tiny-flux "
        "--train_data_dir img --max_train_epochs 1 --weighting_scheme logit_normal --logit_mean 0.5 --logit_std 1.2 "
        "--sigmoid_scale 2 --network_args in_dims=[4,0,0,0,4]"))
    assert {k: doc["train"][k] for k in ("timestep_sampling", "logit_mean", "logit_std", "discrete_flow_shift",
                                         "guidance_scale")} == {
        "timestep_sampling": "logit_normal", "logit_mean": -0.5, "logit_std": 1.2, "discrete_flow_shift": 3.0,
        "guidance_scale": 3.5}
    assert "sigmoid_scale" not in doc["train"]
    assert sorted(unmapped) == sorted([
        "model_prediction_type = 'sigma_scaled' (default) (lorabuild trains the velocity as the model predicts it, "
        "kohya's raw)",
        "sigmoid_scale = '2' (kohya does not use it with timestep_sampling sigma)"])
    assert doc["network"]["in_dims"] == [4, 0, 0, 0, 4]  # kohya's LoRAs on img_in and txt_in
    # kohya's split_qkv default (False: one LoRA on each fused qkv) is lorabuild's split_qkv: false
    r = convert_full(parse_command_line("flux_train_network.py --network_dim 8"))
    assert r.doc["network"]["split_qkv"] is False and not [n for n in r.notes if "split_qkv" in n]
    assert r.sources["network.split_qkv"] == "split_qkv (unset: kohya's default False)"
    r = convert_full(parse_command_line("sd3_train_network.py --network_args split_qkv=False"))
    assert r.doc["network"]["split_qkv"] is False
    # with kohya's dropouts too: they are drawn once per fused layer here as there, so split_qkv stays false
    r = convert_full(parse_command_line("flux_train_network.py --network_dropout 0.1 --network_args rank_dropout=0.2 "
                                        "module_dropout=0.1"))
    assert r.doc["network"]["split_qkv"] is False and not [n for n in r.notes if "split_qkv" in n]
    assert (r.doc["network"]["dropout"], r.doc["network"]["rank_dropout"], r.doc["network"]["module_dropout"]) == \
        (0.1, 0.2, 0.1)
    # uniform and sigmoid are not shifted by kohya: lorabuild's shift is 1 there, and the flag is listed
    doc, unmapped, _ = convert(parse_command_line(
        "flux_train_network.py --timestep_sampling sigmoid --discrete_flow_shift 3.1582 --model_prediction_type raw "
        "--weighting_scheme sigma_sqrt --network_train_unet_only --network_args train_t5xxl=True"))
    assert doc["train"]["timestep_sampling"] == "sigmoid" and doc["train"]["discrete_flow_shift"] == 1.0
    assert "discrete_flow_shift = '3.1582' (kohya does not use it with timestep_sampling sigmoid)" in unmapped
    assert any(u.startswith("weighting_scheme = 'sigma_sqrt' (kohya weights the FLUX loss") for u in unmapped)
    assert "train_t5xxl" not in doc["network"]  # T5 trains with the text encoders only
    assert "network_args train_t5xxl=True (the text encoders do not train here: network_train_unet_only)" in unmapped


def test_an_sd3_config_maps_the_density_scheme_training_shift_and_block_indices():
    doc, unmapped, _ = convert(parse_command_line(
        "sd3_train_network.py --pretrained_model_name_or_path builtin:tiny-sd3 --weighting_scheme logit_normal "
        "--logit_mean 0.5 --training_shift 3.0 --t5xxl_max_token_length 154 --network_module networks.lora_sd3 "
        "--network_args train_block_indices=0,1"))
    assert doc["model_type"] == "sd3" and doc["network"] == {"train_block_indices": "0,1", "split_qkv": False}
    assert {k: doc["train"][k] for k in ("timestep_sampling", "logit_mean", "logit_std", "discrete_flow_shift",
                                         "weighting_scheme")} == {
        "timestep_sampling": "logit_normal", "logit_mean": 0.5, "logit_std": 1.0, "discrete_flow_shift": 3.0,
        "weighting_scheme": "none"}
    assert doc["textemb"] == {"t5_max_length": 154} and unmapped == []
    # kohya's SD3 emb_dims (6 entries) maps; FLUX's in_dims with the wrong count is listed with the reason
    doc, unmapped, _ = convert(parse_command_line("sd3_train_network.py --network_args emb_dims=0,0,4,0,0,2"))
    assert doc["network"]["emb_dims"] == [0, 0, 4, 0, 0, 2] and unmapped == []
    doc, unmapped, _ = convert(parse_command_line("flux_train_network.py --network_args in_dims=[4,0] emb_dims=[a]"))
    assert "in_dims" not in doc["network"] and "emb_dims" not in doc["network"]
    assert "network_args in_dims=[4,0] (takes 5 dims, one per entry in kohya's order (img_in, time_in, vector_in, " \
           "guidance_in, txt_in; 0: not trained))" in unmapped
    assert "network_args emb_dims=[a] (not a list of whole numbers)" in unmapped
    # kohya's SD3 defaults (uniform density, shift 1.0) are not lorabuild's SD 3.5 defaults: written out
    doc, unmapped, _ = convert(parse_command_line("sd3_train_network.py --weighting_scheme cosmap --guidance_scale 2"))
    assert {k: doc["train"][k] for k in ("timestep_sampling", "discrete_flow_shift", "weighting_scheme")} == {
        "timestep_sampling": "uniform", "discrete_flow_shift": 1.0, "weighting_scheme": "cosmap"}
    assert unmapped == ["guidance_scale = '2' (kohya does not use it for SD 3.5 (sd3_train_network.py))"]


def test_flow_options_in_an_sd_config_are_listed():
    doc, unmapped, _ = convert(parse_command_line("train_network.py --timestep_sampling shift --apply_t5_attn_mask"))
    assert "timestep_sampling" not in doc.get("train", {}) and "textemb" not in doc
    assert sorted(unmapped) == [
        "apply_t5_attn_mask = True (a FLUX.1 / SD 3.5 option; this is an SD script's config)",
        "timestep_sampling = 'shift' (a FLUX.1 / SD 3.5 option; this is an SD script's config)"]


def test_the_imported_flux_project_validates(tmp_path):
    (tmp_path / "config.toml").write_text(FLUX_TOML.replace('train_data_dir = "img"', 'train_data_dir = "img"\n'
                                                            'network_train_unet_only = false'))
    ws = tmp_path / "ws"
    (ws / "projects" / "img" / "10_thing").mkdir(parents=True)
    out = ws / "projects" / "flux.yaml"
    proc = subprocess.run([sys.executable, "-m", "lorabuild", "import-kohya", str(tmp_path / "config.toml"), "-o",
                           str(out), "--root", str(ws / "projects")], capture_output=True, text=True)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    doc = yaml.safe_load(out.read_text())
    assert doc["network"]["train_t5xxl"] is True and doc["train"]["timestep_sampling"] == "shift"
    val = subprocess.run([sys.executable, "-m", "lorabuild", "validate", str(out)], capture_output=True, text=True)
    assert val.returncode == 0, val.stdout + val.stderr
