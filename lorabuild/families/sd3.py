"""Stable Diffusion 3.5 (large, medium): a multimodal diffusion transformer (MMDiT, diffusers'
``SD3Transformer2DModel``) trained by rectified flow, three text encoders (CLIP-L and CLIP-G, both
with projections; T5-XXL), a 16-channel VAE whose latents are ``(z − shift)·scale``, patches of
2 latent pixels (buckets in steps of 16 px), 1024 px. SD3.5 Medium adds a second self-attention
(``attn2``) to the image stream of its first 13 blocks (``dual_attention_layers``); both have
RMS q/k norms.

Conditioning (diffusers' ``StableDiffusion3Pipeline.encode_prompt``, sd-scripts
``strategy_sd3``): each CLIP's penultimate hidden states (77 tokens) joined along the features
(768 + 1280 = 2048), zero-padded to T5's width (4096) and put before T5's last hidden states
along the sequence; the pooled text is both CLIPs' projected pooled outputs joined (2048).

Names from sd-scripts (``library/sd3_utils.py``, ``library/sai_model_spec.py``): the model type
is ``5-large`` / ``5-medium`` (``medium`` for SD3 Medium, which has no q/k norm), the ModelSpec
architecture ``stable-diffusion-3-<type>``; kohya's text-encoder prefixes ``lora_te1`` (CLIP-L),
``lora_te2`` (CLIG-G), ``lora_te3`` (T5).
"""
from __future__ import annotations

from pathlib import Path

from .base import CONFIGS_DIR, TOKENIZER_DIR, Family
from .flux import Flux, t5_states
from .sdxl import SDXL
from .t5_tokenizers import TINY_T5_DIR as T5_TOKENIZER_DIR  # the tiny models' (as FLUX's)
from .t5_tokenizers import source as t5_source

T5_LENGTH = 256  # sd-scripts --t5xxl_max_token_length and the pipeline's max_sequence_length default
CLIP_LENGTH = 77
ENCODERS = ("clip_l", "clip_g", "t5xxl")  # an SAI file's text encoders, under text_encoders.<name>.


def transformer_type(config: dict) -> str:
    """sd-scripts' model type of an SD3 transformer from its config (``sd3_utils.analyze_state_dict_state``):
    q/k norm and dual attention → ``5-medium``, q/k norm alone → ``5-large``, neither → ``medium`` (SD3 Medium)."""
    if not config.get("qk_norm"):
        return "medium"
    return "5-medium" if config.get("dual_attention_layers") else "5-large"


class SD3(Family):
    name = "sd3"
    title = "SD 3.5"
    tiny_models = {"tiny-sd3": "tiny_pipeline"}
    text_parts = ("text_encoder", "text_encoder_2", "text_encoder_3")
    pooled = True
    clip_skip = False  # both CLIPs give their penultimate layer, as SD3 was trained
    base_model_version = "5-large"
    modelspec_arch = "stable-diffusion-3-5-large"
    modelspec_implementation = "https://github.com/Stability-AI/generative-models"
    native_size = 1024
    bucket_step = 16  # latents are 1/8 of the pixels and the transformer patches them 2×2
    block_layout = (0, 0, 0)  # no UNet: kohya's block-wise lr weights do not apply
    unet_title = "SD 3.5 (MMDiT)"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_part = "transformer"
    denoiser_class = "SD3Transformer2DModel"
    separate_encoders = ENCODERS  # kohya's --clip_l, --clip_g, --t5xxl for a file without them
    # σ logit-normal (0, 1) as SD3's paper and diffusers' SD3 script draw it, shifted by 3.0 (the shift
    # of SD 3.5's own scheduler, which that script trains with), no loss weighting
    flow_defaults = {"timestep_sampling": "logit_normal", "discrete_flow_shift": 3.0, "weighting_scheme": "none"}
    # kohya's SD3 LoRA: every Linear of the joint blocks' x and context streams (its SingleDiTBlock)
    unet_targets = ("JointTransformerBlock",)
    network_module = "networks.lora_sd3"
    # a single file's keys: the MMDiT's joint blocks, with or without the SAI checkpoint's prefix
    JOINT = ("model.diffusion_model.joint_blocks.", "joint_blocks.")

    # --- detection ------------------------------------------------------------------------------
    def claims(self, parts: set[str], te_config: dict) -> bool:
        return "text_encoder_3" in parts or ("transformer" in parts and "text_encoder_2" in parts
                                             and te_config.get("architectures") == ["CLIPTextModelWithProjection"])

    def claims_checkpoint(self, keys) -> bool:
        return any(k.startswith(self.JOINT) for k in keys)

    @property
    def configs(self) -> Path:
        return CONFIGS_DIR / self.name / "large"

    def checkpoint_configs(self, keys) -> Path:
        """SD3.5 Medium's configs for a file with dual attention (``x_block.attn2``), else Large's."""
        dual = any(".x_block.attn2." in k for k in keys if k.startswith(self.JOINT))
        return CONFIGS_DIR / self.name / ("medium" if dual else "large")

    def pads_with_bang(self, tokenizer: str) -> bool:
        return tokenizer == "tokenizer_2"  # CLIP-G pads with "!" (id 0), as sd-scripts' strategy_sd3 sets

    def text_encoder_class(self, which: str) -> str:
        return "T5EncoderModel" if which == "text_encoder_3" else "CLIPTextModelWithProjection"

    def tokenizer_class(self, which: str) -> str:
        return "T5TokenizerFast" if which == "tokenizer_3" else "CLIPTokenizer"

    def tokenizer_source(self, which: str, text_config: dict | None = None) -> Path:
        """The shipped tokenizer files a single file's conversion copies into ``which``: T5 v1.1's
        own for the real T5-XXL (by ``text_config``'s vocabulary), the tiny models' for theirs."""
        return t5_source(text_config or {}) if which == "tokenizer_3" else TOKENIZER_DIR

    # --- metadata and LoRA names -----------------------------------------------------------------
    def model_metadata(self, denoiser_config: dict) -> dict:
        """kohya's model type (``5-large``, ``5-medium``) and ModelSpec architecture of this transformer."""
        kind = transformer_type(denoiser_config)
        return {"ss_base_model_version": kind, "modelspec.architecture": f"stable-diffusion-3-{kind}/lora"}

    metadata_extra = Flux.metadata_extra  # the flow objective's settings, T5's, in kohya's names

    def te_prefixes(self, n: int) -> list[str]:
        return ["lora_te1", "lora_te2", "lora_te3"][:n]  # CLIP-L, CLIP-G, T5 (kohya lora_sd3.py)

    def saved_layout(self, tensors: dict, denoiser_config: dict) -> dict:
        from .sd3_names import to_sai

        return to_sai(tensors, denoiser_config)

    def trained_layout(self, tensors: dict, denoiser_config: dict, wanted: set[str]) -> dict:
        """kohya's SAI names, or PEFT's (an ``output.format: diffusers`` file), back to the modules trained."""
        from .peft_names import is_peft
        from .sd3_names import from_peft, from_sai

        if is_peft(tensors):
            return from_peft(tensors)
        return from_sai(tensors, denoiser_config, wanted)

    def fused_parts(self, denoiser_config: dict) -> dict[str, str]:
        from .sd3_names import fused_parts

        return fused_parts(denoiser_config)

    def file_modules(self, denoiser_config: dict) -> dict[str, tuple[str, int, int, bool]]:
        from .sd3_names import file_modules

        return file_modules(denoiser_config)

    peft_format = True

    def peft_layout(self, tensors: dict, denoiser_config: dict) -> dict:
        """``output.format: diffusers``: the trained tensors in PEFT's names (families/sd3_names.py)."""
        from .sd3_names import to_peft

        return to_peft(tensors, denoiser_config)

    # --- the objective --------------------------------------------------------------------------
    def objective(self, scheduler_config: dict) -> str:
        return "flow"

    def predict(self, denoiser, noisy, t, hidden, added):
        """The MMDiT's velocity at σ = ``t`` (it takes the timestep as σ·1000, as the pipeline
        passes its scheduler's timesteps) with the pooled text as ``pooled_projections``."""
        return denoiser(hidden_states=noisy, timestep=t * 1000, encoder_hidden_states=hidden,
                        pooled_projections=added["pooled"], return_dict=False)[0]

    def added_inputs(self, pooled, time_ids: list) -> dict | None:
        return {"pooled": pooled}

    # --- building and loading -------------------------------------------------------------------
    def _pipeline_extras(self, load: bool = False, make: bool = False) -> dict:
        return {}

    def from_single_file(self, src: str, config: str, torch_dtype):
        """An SAI file with its three text encoders (``text_encoders.clip_l`` / ``clip_g`` / ``t5xxl``);
        one without them (SAI's ``sd3.5_large.safetensors`` holds the MMDiT and VAE) is converted with
        the project's ``text_encoders`` files (lorabuild/separate.py) and never reaches here: refused by
        name if it does."""
        from safetensors import safe_open

        with safe_open(src, "pt") as f:
            keys = list(f.keys())
        missing = [e for e in ENCODERS if not any(k.startswith(f"text_encoders.{e}.") for k in keys)]
        if missing:
            raise ValueError(f"the file has no {', '.join(missing)} text encoder (text_encoders.{missing[0]}.…): "
                             "use a file that includes them (SAI's *_incl_clips_t5xxl*) or the diffusers folder")
        return super().from_single_file(src, config, torch_dtype)

    def make_pipeline(self, transformer, vae, text_encoders: list, tokenizers: list, scheduler):
        from diffusers import StableDiffusion3Pipeline

        te = list(text_encoders) + [None] * (3 - len(text_encoders))
        tok = list(tokenizers) + [None] * (3 - len(tokenizers))
        pipe = StableDiffusion3Pipeline(transformer=transformer, vae=vae, scheduler=scheduler,
                                        text_encoder=te[0], text_encoder_2=te[1], text_encoder_3=te[2],
                                        tokenizer=tok[0], tokenizer_2=tok[1], tokenizer_3=tok[2])
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # --- text conditioning -----------------------------------------------------------------------
    def text_options(self, textemb: dict, model_dir) -> dict:
        """T5's length (null: 256, sd-scripts' default for SD3) and whether its padding is masked."""
        return {"t5_max_length": textemb.get("t5_max_length") or T5_LENGTH,
                "apply_t5_attn_mask": bool(textemb.get("apply_t5_attn_mask"))}

    def condition(self, tokenizers: list, text_encoders: list, captions: list[str], clip_skip: int = 1,
                  max_token_length: int = 75, t5_max_length: int = T5_LENGTH, apply_t5_attn_mask: bool = False,
                  t5_hidden=None):
        """(hidden ``[B, 77 + t5_max_length, W_t5]``, pooled ``[B, P_l + P_g]``) as SD3's pipeline makes
        them; ``clip_skip`` and ``max_token_length`` do not apply (77 CLIP tokens, penultimate layers);
        ``t5_hidden``: T5's states already encoded, and then only the CLIPs are given."""
        parts = [encode_part(i, tok, te, captions, t5_max_length, apply_t5_attn_mask)
                 for i, (tok, te) in enumerate(zip(tokenizers, text_encoders))]
        if t5_hidden is not None:  # T5's states cached while the CLIPs train (encode_frozen)
            parts = [*parts[:2], {"hidden": t5_hidden}]
        return join_parts(parts, _t5_width(text_encoders), t5_max_length)

    def frozen_text_parts(self, net: dict) -> tuple[int, ...]:
        return () if net.get("train_t5xxl") else (2,)  # T5 trains only with network.train_t5xxl

    def encode_frozen(self, tokenizer, text_encoder, captions: list[str], t5_max_length: int = T5_LENGTH,
                      apply_t5_attn_mask: bool = False):
        return encode_part(2, tokenizer, text_encoder, captions, t5_max_length, apply_t5_attn_mask)["hidden"]

    prompt_arguments = SDXL.prompt_arguments  # the same keywords: hidden states and a pooled text embedding

    def tiny_pipeline(self):
        """SD 3.5's architecture in miniature (after diffusers' own SD3 tests): an MMDiT of two
        joint blocks, the first with SD3.5 Medium's dual attention, both with RMS q/k norms, the
        last one's context stream ending early as in every SD3; a 16-channel VAE with SD3's shift
        and scale and its 8× downsampling; CLIP-L (its projection the identity, as SAI's files
        leave it and diffusers' single-file reader loads it) and a wider CLIP-G, both with
        projections; a two-layer gated-GELU T5 as wide as the MMDiT's context input. Each module
        is seeded on its own."""
        import torch
        from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                               StableDiffusion3Pipeline)
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

        t5, t5_tok = _tiny_t5()
        width = t5.config.d_model
        torch.manual_seed(5)
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=width, pooled_projection_dim=72,
            pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm")
        torch.manual_seed(5)
        vae = AutoencoderKL(
            block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, layers_per_block=1, norm_num_groups=8,
            sample_size=128, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
            use_post_quant_conv=False)
        te_cfg = dict(vocab_size=49408, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                      max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
        torch.manual_seed(5)
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**te_cfg, hidden_size=32, projection_dim=32,
                                                            pad_token_id=49407))
        with torch.no_grad():
            clip_l.text_projection.weight.copy_(torch.eye(32))
        torch.manual_seed(6)
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**{**te_cfg, "intermediate_size": 48}, hidden_size=40,
                                                            projection_dim=40, pad_token_id=0, hidden_act="gelu"))
        return StableDiffusion3Pipeline(
            transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            text_encoder=clip_l, text_encoder_2=clip_g, text_encoder_3=t5,
            tokenizer=CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR)),
            tokenizer_2=CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token="!"), tokenizer_3=t5_tok)


def _tiny_t5():
    """A two-layer T5 v1.1-shaped encoder (gated GELU, relative attention) over the shipped tiny vocabulary."""
    import torch
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(str(T5_TOKENIZER_DIR))
    torch.manual_seed(7)
    t5 = T5EncoderModel(T5Config(
        d_model=80, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=32, vocab_size=len(tok), feed_forward_proj="gated-gelu",
        dense_act_fn="gelu_new", is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False))
    return t5, tok


def _t5_width(text_encoders: list) -> int | None:
    return text_encoders[2].config.d_model if len(text_encoders) > 2 and text_encoders[2] is not None else None


def encode_part(index: int, tokenizer, text_encoder, captions: list[str], t5_length: int = T5_LENGTH,
                mask: bool = False) -> dict:
    """One encoder's output for ``captions``: a CLIP's (``index`` 0, 1) penultimate hidden states and
    projected pooled output, or T5's (2) last hidden states at ``t5_length`` tokens (with ``mask``,
    T5 attends to the caption's tokens only and the padding's states are zeros, as sd-scripts'
    ``apply_t5_attn_mask``)."""
    from ..precision import to_device

    if index == 2:
        return {"hidden": t5_states(tokenizer, text_encoder, captions, t5_length, mask)}
    ids = tokenizer(captions, padding="max_length", max_length=CLIP_LENGTH, truncation=True,
                    return_tensors="pt").input_ids
    out = text_encoder(to_device(ids, text_encoder.device), output_hidden_states=True)
    return {"hidden": out.hidden_states[-2], "pooled": out.text_embeds}


def join_parts(parts: list[dict], t5_width: int | None = None, t5_length: int = T5_LENGTH):
    """SD3's (hidden, pooled) from the encoders' outputs (:func:`encode_part`): the CLIP states joined
    along the features, zero-padded to T5's width, then T5's states after them along the sequence
    (zeros of ``t5_length`` tokens without T5, as the pipeline does)."""
    import torch

    clip = torch.cat([p["hidden"] for p in parts[:2]], dim=-1)
    pooled = torch.cat([p["pooled"] for p in parts[:2]], dim=-1)
    if len(parts) > 2:
        t5 = parts[2]["hidden"].to(clip.dtype)
    else:
        t5 = clip.new_zeros((clip.shape[0], t5_length, t5_width or clip.shape[-1]))
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), pooled


FAMILY = SD3()
