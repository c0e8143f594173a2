"""Stable Diffusion 2.x: SD 1.x's pipeline and conditioning with an OpenCLIP ViT-H text encoder
(1024 wide, gelu, padding with "!") and linear projections in the UNet; its shipped configs are
the 768-v model's, so a single file without a scheduler is taken as v-prediction."""
from __future__ import annotations

from .base import SD1_SCHEDULER, TOKENIZER_DIR
from .sd1 import SD1


class SD2(SD1):
    name = "sd2"
    title = "SD 2.x"
    tiny_models = {"tiny-sd2": "tiny_pipeline"}
    shipped_models = ()
    checkpoint_prefix = "cond_stage_model.model."
    cross_attention_width = 1024
    base_model_version = "sd_v2"
    modelspec_arch = "stable-diffusion-v2-512"
    ss_v2 = True

    def claims(self, parts: set[str], te_config: dict) -> bool:
        # OpenCLIP (SD2) vs CLIP ViT-L's quick_gelu
        return te_config.get("hidden_size") == 1024 or te_config.get("hidden_act") == "gelu"

    def pads_with_bang(self, tokenizer: str) -> bool:
        return True

    def metadata_version(self, prediction_type: str) -> str:
        return "sd_v2_v" if prediction_type == "v_prediction" else "sd_v2"

    def modelspec_architecture(self, prediction_type: str) -> str:
        return "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else self.modelspec_arch

    def sample_size(self, prediction_type: str) -> int:
        return 768 if prediction_type == "v_prediction" else 512

    def tiny_pipeline(self):
        """SD 2.x's architecture in miniature: an OpenCLIP-style text encoder (gelu, the layer
        that SD2 drops already gone), linear projections in the UNet's transformers, heads of a
        fixed width (SD2's attention_head_dim is a per-block list), v-prediction, and the
        tokenizer SD2 ships (padding with "!", id 0)."""
        import torch
        from diffusers import DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        pipe = super().tiny_pipeline()
        torch.manual_seed(1)
        pipe.unet = UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=48, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32,
        )
        torch.manual_seed(1)
        pipe.text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
            projection_dim=32,
        ))
        pipe.tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token="!")
        sched = dict(SD1_SCHEDULER, prediction_type="v_prediction", set_alpha_to_one=False)
        pipe.scheduler = DDIMScheduler(**sched)
        pipe.register_modules(unet=pipe.unet, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                              scheduler=pipe.scheduler)
        return pipe


FAMILY = SD2()
