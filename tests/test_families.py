"""The model-family registry (lorabuild/families/): each family recognises its own shipped configs
and single-file keys, answers the architecture metadata kohya writes, and no family import
pulls torch into the task graph."""
import json
import subprocess
import sys

import pytest

from lorabuild import families, models
from lorabuild.families.base import CONFIGS_DIR, Family

FAMILY_NAMES = ("sd1", "sd2", "sdxl", "flux", "sd3")


def test_the_registry_holds_each_family_once_under_its_name():
    assert tuple(families.FAMILIES) == FAMILY_NAMES == models.ARCHS
    assert all(isinstance(f, Family) and families.family(n) is f for n, f in families.FAMILIES.items())
    assert families.builtin_models() == models.BUILTIN_MODELS == ("tiny-flux", "tiny-flux-schnell", "tiny-sd1", "tiny-sd2",
                                                                 "tiny-sd3", "tiny-sdxl", "world-sd1")
    assert [families.builtin_family(n).name for n in models.BUILTIN_MODELS] == ["flux", "flux", "sd1", "sd2", "sd3",
                                                                                "sdxl", "sd1"]
    assert families.builtin_family("tiny-sd4") is None
    with pytest.raises(ValueError, match="unknown model architecture 'sd4'"):
        families.family("sd4")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_each_family_recognises_its_shipped_configs(name):
    """What model_info decides for a diffusers folder, from the configs a single file is converted with."""
    cfg = families.family(name).configs
    index = json.loads((cfg / "model_index.json").read_text())
    te = json.loads((cfg / "text_encoder" / "config.json").read_text())
    parts = {c for c, v in index.items() if isinstance(v, list) and v[:1] != [None]}
    assert cfg.is_relative_to(CONFIGS_DIR / {"flux": "flux-dev"}.get(name, name)) and families.detect(parts, te).name == name
    assert models.model_info(cfg)["arch"] == name


@pytest.mark.parametrize(("key", "width", "name"), [
    ("cond_stage_model.transformer.text_model.embeddings.position_ids", 768, "sd1"),
    ("cond_stage_model.model.positional_embedding", 1024, "sd2"),
    ("conditioner.embedders.1.model.positional_embedding", 2048, "sdxl"),
])
def test_a_single_file_is_told_by_its_text_encoder_keys_else_by_its_cross_attention_width(key, width, name):
    attn = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": ((320, width), "F16")}
    assert families.detect_checkpoint({key: ((1,), "F32"), **attn}) == name
    assert families.detect_checkpoint(attn) == name  # keys of the UNet alone: its cross-attention width
    assert families.detect_checkpoint({"first_stage_model.decoder.conv_in.weight": ((1,), "F32")}) is None


@pytest.mark.parametrize(("name", "pred", "version", "spec", "size"), [
    ("sd1", "epsilon", "sd_v1", "stable-diffusion-v1", 512),
    ("sd2", "epsilon", "sd_v2", "stable-diffusion-v2-512", 512),
    ("sd2", "v_prediction", "sd_v2_v", "stable-diffusion-v2-768-v", 768),
    ("sdxl", "epsilon", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base", 1024),
])
def test_architecture_metadata_is_kohyas_per_family_and_prediction_type(name, pred, version, spec, size):
    """kohya library/sai_model_spec.py and train_network.py's ss_base_model_version / ss_v2."""
    fam = families.family(name)
    assert (fam.metadata_version(pred), fam.modelspec_architecture(pred), fam.sample_size(pred)) == (version, spec, size)
    assert fam.ss_v2 == (name == "sd2")
    assert fam.modelspec_implementation == ("https://github.com/Stability-AI/generative-models" if name == "sdxl"
                                            else "diffusers")


def test_lora_names_follow_kohya_per_family():
    sd1, sdxl = families.family("sd1"), families.family("sdxl")
    assert sd1.te_prefixes(1) == ["lora_te"] and sdxl.te_prefixes(2) == ["lora_te1", "lora_te2"]
    assert sd1.unet_rename(object()) is None  # SD 1.x/2.x: diffusers' module paths, as kohya names them
    assert (sd1.clip_skip, sd1.pooled, sdxl.clip_skip, sdxl.pooled) == (True, False, False, True)


def test_importing_the_families_loads_no_torch():
    code = "import sys, lorabuild.families, lorabuild.models; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
