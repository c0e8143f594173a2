"""kohya's LoRA layout at full size: the real SD 1.5 UNet and text encoder, built on the meta device.

No weights exist for the base model (meta tensors); the LoRA itself is real and saved, so
the module count and the file size are what a user of sd-scripts would get.
"""
from __future__ import annotations

import pytest
import torch

from lorabuild.lora.network import LoRANetwork

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)


@pytest.fixture(scope="module")
def sd15():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        te = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    return unet, te


def test_the_configs_are_sd15(sd15):
    unet, te = sd15
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in te.parameters()) == 123_060_480


@pytest.mark.parametrize("dim,mib", [(8, 9), (32, 36), (128, 144)])
def test_default_lora_has_kohyas_module_count_and_file_size(sd15, tmp_path, dim, mib):
    unet, te = sd15
    net = LoRANetwork(unet, [te], dim=dim, alpha=dim / 2)
    assert net.module_count() == (192, 72)
    names = [m.lora_name for m in net.loras]
    # kohya's names: the diffusers module path, dots → underscores
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in names
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k" in names
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in names
    path = tmp_path / "full.safetensors"
    net.save(path, dtype=torch.float16)
    # The tensor data is kohya's nominal size; the JSON header adds ~0.1 MiB (264 modules × 3 keys).
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    data = (path.stat().st_size - header) / 2**20
    assert abs(data - mib) / mib < 0.01, f"{data:.3f} MiB of tensors"
    assert header < 0.15 * 2**20
