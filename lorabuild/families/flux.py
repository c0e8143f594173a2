"""FLUX.1 (Black Forest Labs; dev and schnell): a rectified-flow transformer (19 double-stream and
38 single-stream blocks in the real model) on a 16-channel VAE's latents packed 2×2 into tokens,
conditioned on CLIP-L's pooled output and T5-XXL's token sequence; dev is guidance-distilled (its
``guidance_embeds`` take a guidance value, no classifier-free guidance), schnell samples in 4 steps.

Facts: diffusers ``FluxTransformer2DModel``/``FluxPipeline`` (packing, image/text ids,
``calculate_shift``) and kohya sd-scripts ``flux_train_network.py``/``library/flux_utils.py``
(T5 max length 512 for dev and 256 for schnell, ``apply_t5_attn_mask``, guidance 1.0 in training).
"""
from __future__ import annotations

import json

from .base import CONFIGS_DIR, TOKENIZER_DIR, Family

from .t5_tokenizers import TINY_T5_DIR as T5_TOKENIZER_DIR  # the tiny models'
from .t5_tokenizers import source as t5_source


class Flux(Family):
    name = "flux"
    title = "FLUX.1"
    tiny_models = {"tiny-flux": "tiny_dev", "tiny-flux-schnell": "tiny_schnell"}
    text_parts = ("text_encoder", "text_encoder_2")  # CLIP-L (pooled), T5 (the sequence)
    pooled = True
    clip_skip = False  # the pooled output is the last layer's; T5 has no clip_skip
    base_model_version = "flux1"
    modelspec_arch = "flux-1-dev"
    modelspec_implementation = "https://github.com/black-forest-labs/flux"
    native_size = 1024
    bucket_step = 16  # the VAE's ×8 and the 2×2 packing
    pipeline_class = "FluxPipeline"
    denoiser_part = "transformer"
    single_file = False  # no pipeline reads BFL's file: its parts are converted one by one (separate.py)
    separate_encoders = ("clip_l", "t5xxl")  # kohya's --clip_l, --t5xxl; ComfyUI's text_encoders/ files
    denoiser_reader = "bfl"  # diffusers' reader hard-codes the real width (flux_checkpoint.from_bfl)
    denoiser_class = "FluxTransformer2DModel"
    # the resolution-dependent shift of BFL's own sampling; dev's guidance 1.0 while training (kohya's advice)
    flow_defaults = {"timestep_sampling": "flux_shift", "guidance_scale": 1.0}
    # kohya's default targets: every Linear of the double- and single-stream blocks
    unet_targets = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    network_module = "networks.lora_flux"

    # --- detection ------------------------------------------------------------------------------
    def claims(self, parts: set[str], te_config: dict) -> bool:
        return "transformer" in parts and "text_encoder_3" not in parts  # SD3 has three text encoders

    def claims_checkpoint(self, keys) -> bool:
        return any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys)

    @property
    def configs(self):
        return CONFIGS_DIR / "flux-dev"

    def text_encoder_class(self, which: str) -> str:
        return "T5EncoderModel" if which == "text_encoder_2" else "CLIPTextModel"

    def tokenizer_source(self, which: str, text_config: dict | None = None):
        return t5_source(text_config or {}) if which == "tokenizer_2" else TOKENIZER_DIR

    def tokenizer_class(self, which: str) -> str:
        return "T5TokenizerFast" if which == "tokenizer_2" else "CLIPTokenizer"

    def objective(self, scheduler_config: dict) -> str:
        return "flow"

    def _pipeline_extras(self, load: bool = False, make: bool = False) -> dict:
        return {}

    # --- LoRA names: kohya's (lora_unet_double_blocks_N_img_attn_qkv, lora_te1_ CLIP, lora_te3_ T5) ----------
    def te_prefixes(self, n: int) -> list[str]:
        return ["lora_te1", "lora_te3"][:n]

    def saved_layout(self, tensors: dict, denoiser_config: dict) -> dict:
        from .flux_names import fused_widths, to_bfl

        return to_bfl(tensors, fused_widths(denoiser_config))

    def trained_layout(self, tensors: dict, denoiser_config: dict, wanted: set[str]) -> dict:
        """BFL's names, or PEFT's (an ``output.format: diffusers`` file), back to the modules trained."""
        from .flux_names import PEFT_PREFIXES, from_bfl, fused_widths
        from .peft_names import from_peft, is_peft

        if is_peft(tensors):
            return from_peft(tensors, PEFT_PREFIXES, self.title)
        return from_bfl(tensors, fused_widths(denoiser_config), wanted)

    def fused_parts(self, denoiser_config: dict) -> dict[str, str]:
        from .flux_names import fused_parts

        return fused_parts(denoiser_config)

    def file_modules(self, denoiser_config: dict) -> dict[str, tuple[str, int, int, bool]]:
        from .flux_names import file_modules

        return file_modules(denoiser_config)

    peft_format = True

    def peft_layout(self, tensors: dict, denoiser_config: dict) -> dict:
        """``output.format: diffusers``: the trained (split) modules in PEFT's names, as diffusers'
        FluxPipeline.load_lora_weights reads them (families/flux_names.py peft_path)."""
        from .flux_names import peft_path
        from .peft_names import to_peft

        return to_peft(tensors, peft_path)

    def model_metadata(self, denoiser_config: dict) -> dict:
        """schnell's ModelSpec architecture (sd-scripts' sai_model_spec): a transformer without
        guidance embedding is schnell's."""
        kind = "dev" if denoiser_config.get("guidance_embeds") else "schnell"
        return {"modelspec.architecture": f"flux-1-{kind}/lora"}

    def metadata_extra(self, cfg: dict) -> dict:
        """kohya's FLUX metadata (flux_train_network.py update_metadata): the objective's settings as
        trained, raw prediction (target ε − x₀), the T5 settings."""
        from ..flow import FlowSettings

        s = FlowSettings.of(cfg["train"], self.flow_defaults)
        md = {f"ss_{k}": v for k, v in s.keyed().items()}
        md["ss_model_prediction_type"] = "raw"
        md["ss_apply_t5_attn_mask"] = bool(cfg["textemb"].get("apply_t5_attn_mask"))
        if cfg["textemb"].get("t5_max_length"):
            md["ss_t5xxl_max_token_length"] = cfg["textemb"]["t5_max_length"]
        return md

    # --- text conditioning -----------------------------------------------------------------------
    def text_options(self, textemb: dict, model_dir) -> dict:
        """The T5 settings textemb, training and sampling encode with: ``textemb.t5_max_length``
        (null: 512 for dev, 256 for schnell, as kohya) and ``textemb.apply_t5_attn_mask``."""
        n = textemb.get("t5_max_length")
        if n is None:
            n = 512 if guidance_embeds(model_dir) else 256
        return {"t5_max_length": int(n), "apply_t5_attn_mask": bool(textemb.get("apply_t5_attn_mask"))}

    def condition(self, tokenizers: list, text_encoders: list, captions: list[str], clip_skip: int = 1,
                  max_token_length: int = 75, t5_max_length: int = 512, apply_t5_attn_mask: bool = False,
                  t5_hidden=None):
        """(T5's last hidden states ``[B, L, D]``, CLIP's pooled output ``[B, P]``), as FluxPipeline
        encodes a prompt (CLIP cut at 77 tokens); ``t5_hidden``: T5's states already encoded
        (:meth:`encode_frozen`, cached while CLIP trains), and then only CLIP is given."""
        from ..precision import to_device

        clip_tok, clip = tokenizers[0], text_encoders[0]
        ids = clip_tok(captions, padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids
        pooled = clip(to_device(ids, clip.device), output_hidden_states=False).pooler_output
        if t5_hidden is None:
            t5_hidden = t5_states(tokenizers[1], text_encoders[1], captions, t5_max_length, apply_t5_attn_mask)
        return t5_hidden, pooled

    def frozen_text_parts(self, net: dict) -> tuple[int, ...]:
        return () if net.get("train_t5xxl") else (1,)  # T5 trains only with network.train_t5xxl

    def encode_frozen(self, tokenizer, text_encoder, captions: list[str], t5_max_length: int = 512,
                      apply_t5_attn_mask: bool = False):
        return t5_states(tokenizer, text_encoder, captions, t5_max_length, apply_t5_attn_mask)

    def added_inputs(self, pooled, time_ids: list) -> dict | None:
        return {"pooled": pooled}

    def prompt_arguments(self, pipe, hidden, pooled, negative: tuple | None) -> dict:
        return {"prompt_embeds": hidden, "pooled_prompt_embeds": pooled}

    def guidance_arguments(self, settings: dict) -> dict:
        """No classifier-free guidance: dev's embedded guidance is the prompt's ``--g`` (``guidance``;
        FluxPipeline's 3.5 unset), which schnell ignores (it has no guidance embedding)."""
        return {"guidance_scale": settings.get("guidance") or 3.5}

    def encodes_empty_negative(self, pipe) -> bool:
        return False  # no classifier-free guidance: no negative prompt

    # --- the denoiser ----------------------------------------------------------------------------
    def predict(self, denoiser, noisy, t, hidden, added):
        """FluxTransformer2DModel on latents packed 2×2 (diffusers' ``_pack_latents``), with the image
        tokens' (row, column) ids and all-zero text ids; ``t`` is σ (the transformer scales it by
        1000 itself) and dev gets the embedded guidance."""
        b, c, h, w = noisy.shape
        guidance = added.get("guidance") if denoiser.config.guidance_embeds else None
        out = denoiser(hidden_states=pack(noisy), timestep=t, guidance=None if guidance is None else guidance.to(noisy.device),
                       pooled_projections=added["pooled"], encoder_hidden_states=hidden,
                       txt_ids=hidden.new_zeros(hidden.shape[1], 3), img_ids=image_ids(h, w, noisy),
                       return_dict=False)[0]
        return unpack(out, h, w)

    def make_pipeline(self, unet, vae, text_encoders: list, tokenizers: list, scheduler):
        from diffusers import FluxPipeline

        pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizers[0],
                            text_encoder_2=text_encoders[1], tokenizer_2=tokenizers[1], transformer=unet)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # --- built-in tiny models --------------------------------------------------------------------
    def tiny_dev(self):
        return self._tiny(guidance=True)

    def tiny_schnell(self):
        return self._tiny(guidance=False)

    def _tiny(self, guidance: bool):
        """FLUX.1's architecture in miniature: 2 double- and 2 single-stream blocks of 2 heads × 16,
        rotary axes (4, 6, 6) as (16, 56, 56) split 128; a 16-channel, ×8 VAE with FLUX's scale and
        shift; a CLIP-L-shaped text encoder (its pooled output) and a small T5 encoder on lorabuild's
        T5-shaped tokenizer; dev's scheduler shifts by resolution, schnell's does not (their
        scheduler configs). Each module seeded on its own."""
        import torch
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

        t5_tok = T5TokenizerFast.from_pretrained(str(T5_TOKENIZER_DIR))
        torch.manual_seed(4)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance,
            axes_dims_rope=(4, 6, 6))
        torch.manual_seed(4)
        vae = AutoencoderKL(
            block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, layers_per_block=1, norm_num_groups=8,
            sample_size=128, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
            use_post_quant_conv=False, force_upcast=True)
        torch.manual_seed(4)
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=32))
        torch.manual_seed(5)
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
            is_gated_act=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
        sched = json.loads((CONFIGS_DIR / ("flux-dev" if guidance else "flux-schnell") / "scheduler"
                            / "scheduler_config.json").read_text(encoding="utf-8"))
        return FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(sched), vae=vae, text_encoder=clip,
            tokenizer=CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR)), text_encoder_2=t5, tokenizer_2=t5_tok,
            transformer=transformer)


def guidance_embeds(model_dir) -> bool:
    """Whether the model's transformer takes a guidance value (FLUX.1 dev), from its config."""
    from pathlib import Path

    cfg = json.loads((Path(model_dir) / "transformer" / "config.json").read_text(encoding="utf-8"))
    return bool(cfg.get("guidance_embeds"))


def pack(latents):
    """``[B, C, h, w]`` → ``[B, (h/2)(w/2), 4C]``: each 2×2 patch one token (diffusers' ``_pack_latents``)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens, h: int, w: int):
    """The inverse of :func:`pack`, back to ``[B, C, h, w]``."""
    b, n, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, like):
    """Each packed token's (0, row, column), ``[(h/2)(w/2), 3]`` (diffusers' ``_prepare_latent_image_ids``)."""
    import torch

    rows = torch.arange(h // 2, device=like.device).repeat_interleave(w // 2)
    cols = torch.arange(w // 2, device=like.device).repeat(h // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(like.dtype)


FAMILY = Flux()


def t5_states(tokenizer, t5, captions: list[str], length: int, mask: bool):
    """T5's last hidden states for ``captions`` at ``length`` tokens (FLUX.1's and SD 3.5's). With
    ``mask`` (kohya's ``apply_t5_attn_mask``) T5 attends only to the caption's tokens and the padding's
    outputs are zeros, so they carry nothing into the transformer (whose joint attention diffusers
    runs without a mask)."""
    from ..precision import to_device

    enc = tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    keep = to_device(enc.attention_mask, t5.device)
    hidden = t5(to_device(enc.input_ids, t5.device), attention_mask=keep if mask else None)[0]
    return hidden * keep[..., None].to(hidden.dtype) if mask else hidden
