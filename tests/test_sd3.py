"""Stable Diffusion 3.5 as a model family (lorabuild/families/sd3.py): the built-in tiny model, how
SD3 folders and single files are recognised, its text conditioning against diffusers' own
pipeline, and SAI's single-file layout read through lorabuild's real conversion path."""
import json

import pytest
import torch
from safetensors.torch import save_file

from ldm_layout import mmdit_to_sai, sd3_to_sai
from lorabuild import families, models
from lorabuild.families.base import CONFIGS_DIR
from lorabuild.families.sd3 import FAMILY as SD3, transformer_type
from lorabuild.families.sd3_names import mmdit_layout

PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """builtin:tiny-sd3 written once for this module, through the same path a project's build takes."""
    cache = tmp_path_factory.mktemp("sd3cache")
    return models.ensure_builtin("tiny-sd3", cache), cache


@pytest.fixture(scope="module")
def tiny_pipe(tiny):
    return models.load_pipeline(tiny[0])


def _state(pipe, part):
    return getattr(pipe, part).state_dict()


def test_tiny_sd3_is_an_sd35_medium_in_miniature(tiny, tiny_pipe):
    folder, _ = tiny
    info = models.model_info(folder)
    assert info["arch"] == "sd3" and info["latent_channels"] == 16 and info["vae_scale_factor"] == 8
    assert (info["latent_scale"], info["latent_shift"]) == (1.5305, 0.0609)  # SD3's VAE: (z − shift)·scale
    t = tiny_pipe.transformer
    assert type(t).__name__ == "SD3Transformer2DModel" and t.config.patch_size == 2
    # block 0 has SD3.5M's second self-attention, block 1 not; the last block's context stream ends early
    assert [b.attn2 is not None for b in t.transformer_blocks] == [True, False]
    assert t.transformer_blocks[-1].context_pre_only and t.transformer_blocks[-1].ff_context is None
    assert transformer_type(dict(t.config)) == "5-medium"
    assert [type(e).__name__ for e in SD3.encoders_of(tiny_pipe)] == [
        "CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"]
    assert tiny_pipe.tokenizer_2.pad_token == "!" and tiny_pipe.tokenizer.pad_token == "<|endoftext|>"
    # the MMDiT takes both CLIPs' pooled projections joined, and T5's width as its context
    assert t.config.pooled_projection_dim == sum(e.config.projection_dim for e in SD3.encoders_of(tiny_pipe)[:2])
    assert t.config.joint_attention_dim == tiny_pipe.text_encoder_3.config.d_model
    assert models.text_parts(folder) == SD3.text_parts


def test_conditioning_is_what_diffusers_sd3_pipeline_encodes(tiny_pipe):
    """One function for the cache, training and sampling (Family.condition) against the pipeline's own
    encode_prompt: the CLIP states joined and zero-padded to T5's width, T5's after them, pooled joined."""
    captions = ["a red circle on a white background", "x"]
    hidden, pooled = SD3.condition(SD3.tokenizers_of(tiny_pipe), SD3.encoders_of(tiny_pipe), captions, t5_max_length=40)
    ref_hidden, _, ref_pooled, _ = tiny_pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False,
                                                           max_sequence_length=40)
    assert hidden.shape == (2, 77 + 40, 80) and pooled.shape == (2, 72)
    assert torch.equal(hidden, ref_hidden) and torch.equal(pooled, ref_pooled)
    # T5's attention mask: the caption's own states change, the padding's are zeros
    masked, _ = SD3.condition(SD3.tokenizers_of(tiny_pipe), SD3.encoders_of(tiny_pipe), captions, t5_max_length=40,
                              apply_t5_attn_mask=True)
    assert torch.equal(masked[:, :77], hidden[:, :77]) and masked[1, 77 + 2:].abs().max() == 0
    assert not torch.allclose(masked[0, 77:80], hidden[0, 77:80])


@pytest.mark.parametrize("variant", ["large", "medium"])
def test_shipped_sd35_configs_are_recognised_and_are_sd35s(variant):
    cfg = CONFIGS_DIR / "sd3" / variant
    assert models.model_info(cfg)["arch"] == "sd3"
    tr = json.loads((cfg / "transformer" / "config.json").read_text())
    assert transformer_type(tr) == "5-" + variant
    assert tr["num_attention_heads"] * tr["attention_head_dim"] == tr["caption_projection_dim"]
    # SD 3.5 Large: 38 blocks of 2432; Medium: 24 of 1536, dual attention in its first 13
    assert (tr["num_layers"], tr.get("dual_attention_layers")) == ((38, None) if variant == "large" else (24, list(range(13))))


def test_a_folder_with_t5_and_a_transformer_is_sd3_not_sdxl():
    clip_l = json.loads((SD3.configs / "text_encoder" / "config.json").read_text())
    sd3 = {"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "scheduler"}
    assert families.detect(sd3, clip_l).name == "sd3"
    assert families.detect(sd3 - {"text_encoder_3"}, clip_l).name == "sd3"  # SD3 without T5 (diffusers allows it)
    assert families.detect({"unet", "vae", "text_encoder", "text_encoder_2"}, {}).name == "sdxl"


def test_an_sai_single_file_is_told_by_its_joint_blocks_and_medium_by_its_dual_attention():
    large = {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": ((3, 1), "BF16"),
             "text_encoders.clip_g.transformer.text_model.embeddings.position_embedding.weight": ((77, 1280), "F16")}
    medium = {**large, "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight": ((3, 1), "BF16")}
    comfy = {"joint_blocks.0.x_block.attn.qkv.weight": ((3, 1), "BF16")}  # a bare transformer file
    assert families.detect_checkpoint(large) == families.detect_checkpoint(comfy) == "sd3"
    assert SD3.checkpoint_configs(large) == CONFIGS_DIR / "sd3" / "large"
    assert SD3.checkpoint_configs(medium) == CONFIGS_DIR / "sd3" / "medium"


def test_the_mmdit_table_covers_every_transformer_weight_once(tiny_pipe):
    """lorabuild's SAI ↔ diffusers table (used for single files and kohya's LoRA names) names every
    module of the tiny model with weights exactly once."""
    t = tiny_pipe.transformer
    layout = mmdit_layout(t.config.num_layers, t.config.dual_attention_layers)
    named = [m for parts, _ in layout.values() for m in parts]
    with_weights = {k.rsplit(".", 1)[0] for k in t.state_dict() if k != "pos_embed.pos_embed"}
    assert len(named) == len(set(named)) and set(named) == with_weights
    assert layout["joint_blocks.0.x_block.attn2.qkv"][0] == tuple(f"transformer_blocks.0.attn2.to_{p}" for p in "qkv")
    assert layout["joint_blocks.1.context_block.adaLN_modulation.1"][1]  # the last block's (shift, scale) swap
    assert "joint_blocks.1.context_block.attn.proj" not in layout and "joint_blocks.1.context_block.mlp.fc1" not in layout


def test_an_sai_single_file_written_from_the_tiny_model_loads_to_identical_weights(tiny, tiny_pipe, tmp_path):
    """SAI's layout (fused qkv, the MMDiT's own names, an LDM VAE, the three text encoders under
    ``text_encoders.``) written with lorabuild's table, read back through lorabuild's single-file
    conversion (diffusers' converter: an independent implementation), gives every tensor unchanged;
    q/k/v in the wrong order, or the adaLN halves unswapped, would not."""
    folder, cache = tiny
    sd = sd3_to_sai(folder)
    assert "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight" in sd
    assert "text_encoders.t5xxl.transformer.shared.weight" in sd and "first_stage_model.encoder.conv_in.weight" in sd
    path = tmp_path / "sd3.5_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    out = models.resolve_base_model(str(path), tmp_path, cache, {"base_model_config": str(folder)})
    assert models.model_info(out)["arch"] == "sd3" and models.source_info(out)["arch"] == "sd3"
    back = models.load_pipeline(out)
    for part in PARTS:
        a, b = _state(back, part), _state(tiny_pipe, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    # the same file with q and k swapped in one block loads, but not to the same weights
    qkv = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"
    q, k, v = sd[qkv].chunk(3)
    swapped = tmp_path / "swapped.safetensors"
    save_file({**{n: t.contiguous() for n, t in sd.items()}, qkv: torch.cat([k, q, v])}, str(swapped))
    bad = models.load_unet(models.resolve_base_model(str(swapped), tmp_path, cache, {"base_model_config": str(folder)}))
    assert not torch.equal(bad.transformer_blocks[0].attn.to_q.weight, tiny_pipe.transformer.transformer_blocks[0].attn.to_q.weight)


def test_the_mmdit_writer_fails_on_a_weight_its_table_does_not_name(tiny_pipe):
    sd = {**tiny_pipe.transformer.state_dict(), "transformer_blocks.0.extra.weight": torch.zeros(1)}
    with pytest.raises(AssertionError, match="unmapped transformer keys"):
        mmdit_to_sai(sd, dict(tiny_pipe.transformer.config))


def test_an_sai_file_without_its_text_encoders_is_refused_naming_the_field(tiny, tmp_path):
    folder, cache = tiny
    path = tmp_path / "sd3.5_mmdit_only.safetensors"
    save_file({k: v.contiguous() for k, v in sd3_to_sai(folder, encoders=False).items()}, str(path))
    with pytest.raises(models.ModelError, match=r"text_encoders.clip_l: sd3.5_mmdit_only.safetensors holds no clip_l "
                       r"text encoder.*kohya: --clip_l"):
        models.resolve_base_model(str(path), tmp_path, cache, {"base_model_config": str(folder)})


def test_an_sai_file_and_separate_clip_l_clip_g_t5xxl_files_load_to_identical_weights(tiny, tiny_pipe, tmp_path):
    """sd3.5_large.safetensors' layout (MMDiT + VAE, no text encoders) with clip_l, clip_g and t5xxl as
    ComfyUI's separate files: one conversion, every tensor of the built-in model; CLIP-G given as
    clip_l is an error naming the field and both widths, before anything is converted."""
    from ldm_layout import encoder_files

    folder, cache = tiny
    path = tmp_path / "sd3.5_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sd3_to_sai(folder, encoders=False).items()}, str(path))
    files = encoder_files(folder, tmp_path / "te", {"clip_l": "text_encoder", "clip_g": "text_encoder_2",
                                                    "t5xxl": "text_encoder_3"})
    opts = {"base_model_config": str(folder), "text_encoders": {k: str(v) for k, v in files.items()}}
    out = models.resolve_base_model(str(path), tmp_path, cache, opts)
    assert models.source_info(out)["parts"].keys() == {"text_encoders.clip_l", "text_encoders.clip_g",
                                                       "text_encoders.t5xxl"}
    back = models.load_pipeline(out)
    for part in PARTS:
        a, b = _state(back, part), _state(tiny_pipe, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert models.resolve_base_model(str(path), tmp_path, cache, opts) == out  # converted once
    converted = sorted((cache / "models" / "single-file").iterdir())
    swapped = {**opts, "text_encoders": {**opts["text_encoders"], "clip_l": str(files["clip_g"])}}
    with pytest.raises(models.ModelError, match=r"text_encoders.clip_l: .*clip_g.safetensors is a CLIP text encoder "
                       r"40 wide, but this model's clip_l is a CLIP text encoder 32 wide"):
        models.resolve_base_model(str(path), tmp_path, cache, swapped)
    assert sorted((cache / "models" / "single-file").iterdir()) == converted  # nothing left of the failed one


def test_encoder_files_are_told_apart_by_their_headers_with_real_sizes():
    """The checks a separate encoder file gets before its weights are read, on real-size headers
    (no weights): CLIP-L vs CLIP-G by width, T5 by its blocks, ComfyUI's scaled fp8 refused by name."""
    from lorabuild.separate import check_encoder, encoder_kind

    clip_g = {"text_model.embeddings.token_embedding.weight": ((49408, 1280), "F16"),
              "text_model.encoder.layers.0.mlp.fc1.weight": ((5120, 1280), "F16")}
    t5 = {"shared.weight": ((32128, 4096), "F8_E4M3"), "encoder.block.0.layer.0.SelfAttention.q.weight": ((4096, 4096), "F8_E4M3")}
    assert encoder_kind(clip_g) == ("clip", 1280) and encoder_kind(t5) == ("t5", 4096)
    assert encoder_kind({"first_stage_model.encoder.conv_in.weight": ((128, 3, 3, 3), "F32")}) == (None, None)
    check_encoder("text_encoders.t5xxl", t5, "", "t5", 4096, "t5xxl_fp8_e4m3fn.safetensors")  # the right one passes
    with pytest.raises(models.ModelError, match="text_encoders.clip_l: clip_g.safetensors is CLIP-G, but this model's "
                                                "clip_l is CLIP-L"):
        check_encoder("text_encoders.clip_l", clip_g, "", "clip", 768, "clip_g.safetensors")
    with pytest.raises(models.ModelError, match="text_encoders.t5xxl: ae.safetensors is not a text encoder file"):
        check_encoder("text_encoders.t5xxl", {"encoder.conv_in.weight": ((128, 3, 3, 3), "F32")}, "", "t5", 4096,
                      "ae.safetensors")
    scaled = {**t5, "scaled_fp8": ((0,), "F8_E4M3"), "encoder.block.0.layer.0.SelfAttention.q.scale_weight": ((), "F32")}
    with pytest.raises(models.ModelError, match="text_encoders.t5xxl: .* is a ComfyUI 'scaled fp8' file"):
        check_encoder("text_encoders.t5xxl", scaled, "", "t5", 4096, "t5xxl_fp8_e4m3fn_scaled.safetensors")
