"""SD 3.5 LoRA files (families/sd3_names.py): kohya's SAI names with q/k/v fused, checked against
diffusers' own single-file converter (an independent reading of SAI's rows), and the
``output.format: diffusers`` (PEFT) file, loaded by diffusers' ``load_lora_weights`` with every
key used, giving lorabuild's own transformer output with the LoRA."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm_layout import mmdit_to_sai
from lorabuild import models
from lorabuild.families.sd3 import FAMILY as SD3
from lorabuild.families.sd3_names import from_peft, from_sai, mmdit_layout, to_peft, to_sai
from lorabuild.lora.network import LoRANetwork


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return models.ensure_builtin("tiny-sd3", tmp_path_factory.mktemp("sd3lora"))


def _network(folder, with_te: bool = False, seed: int = 3):
    """A LoRA on the tiny model with random ups (a fresh one's are zeros: no row could be told apart)."""
    transformer = models.load_unet(folder)
    tes = [models.load_text_encoder(folder, which=p) for p in SD3.text_parts] if with_te else []
    net = LoRANetwork(transformer, tes, dim=4, alpha=2, train_text_encoder=with_te, arch="sd3",
                      unet_targets=SD3.unet_targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.1)
    return net, transformer, tes


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.3, 0.8]), torch.randn(2, 29, 80, generator=g),
            {"pooled": torch.randn(2, 72, generator=g)})


def _forward(transformer, inputs):
    x, t, hidden, added = inputs
    with torch.no_grad():
        return SD3.predict(transformer, x, t, hidden, added)


def test_kohya_names_fuse_qkv_and_read_back_to_the_same_modules(tiny):
    net, transformer, _ = _network(tiny)
    mine = net.state_dict_kohya()
    cfg = dict(transformer.config)
    saved = to_sai(mine, cfg)
    qkv = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    assert saved[f"{qkv}.lora_down.weight"].shape == (12, 32) and saved[f"{qkv}.lora_up.weight"].shape == (96, 12)
    assert float(saved[f"{qkv}.alpha"]) == 6.0  # 3·α over rank 3r: alpha/rank stays α/r
    back = from_sai(saved, cfg, {m.lora_name for m in net.loras})
    assert back.keys() == mine.keys() and all(torch.equal(back[k], mine[k]) for k in mine)


def test_the_kohya_file_merged_into_sais_weights_gives_our_lora_output(tiny, tmp_path):
    """Merge the saved file's ΔW = up·down·alpha/rank into SAI's own layout (fused qkv, (shift, scale)
    adaLN) and read that through diffusers' single-file converter: it must compute what our network
    computes on the split modules. Rows of q and k swapped, or the last adaLN's halves unswapped,
    would not."""
    net, transformer, _ = _network(tiny)
    inputs = _inputs()
    net.apply()
    ours = _forward(transformer, inputs)
    saved = to_sai(net.state_dict_kohya(), dict(transformer.config))
    sai = mmdit_to_sai(load_file(str(next((tiny / "transformer").glob("*.safetensors")))), dict(transformer.config))
    sai_of = {"lora_unet_" + m.replace(".", "_"): m for m in mmdit_layout(2, (0,))}
    for key in saved:
        if key.endswith(".lora_down.weight"):
            name = key.split(".")[0]
            down, up, alpha = saved[key], saved[f"{name}.lora_up.weight"], float(saved[f"{name}.alpha"])
            target = f"model.diffusion_model.{sai_of[name]}.weight"
            sai[target] = sai[target] + (up @ down) * alpha / down.shape[0]
    path = tmp_path / "merged.safetensors"
    save_file({k: v.contiguous() for k, v in sai.items()}, str(path))
    from diffusers import SD3Transformer2DModel

    merged = SD3Transformer2DModel.from_single_file(str(path), config=str(tiny), subfolder="transformer",
                                                    local_files_only=True)
    theirs = _forward(merged.eval(), inputs)
    assert (ours - _forward(models.load_unet(tiny), inputs)).abs().max() > 1e-3  # the LoRA changes the output
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-4)


def test_the_diffusers_format_loads_in_load_lora_weights_with_every_key_used(tiny, tmp_path):
    net, transformer, tes = _network(tiny, with_te=True)
    names = [m.lora_name for m in net.loras]
    assert any(n.startswith("lora_te1_") for n in names) and any(n.startswith("lora_te2_") for n in names)
    assert not any(n.startswith("lora_te3_") for n in names)  # T5 trains only when asked (kohya train_t5xxl)
    inputs = _inputs()
    peft = to_peft(net.state_dict_kohya(), dict(transformer.config))
    assert from_peft(peft).keys() == net.state_dict_kohya().keys()  # an exported file reads back (the sample stage)
    path = tmp_path / "peft.safetensors"
    save_file({k: v.contiguous() for k, v in peft.items()}, str(path))
    net.apply()
    ours = _forward(transformer, inputs)
    ids = torch.tensor([[49406, 320, 1000, 49407] + [49407] * 73])
    with torch.no_grad():
        ours_te = [te(ids, output_hidden_states=True).hidden_states[-2] for te in tes[:2]]

    pipe = models.load_pipeline(tiny)
    pipe.load_lora_weights(str(path))
    theirs = _forward(pipe.transformer, inputs)
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        theirs_te = [te(ids, output_hidden_states=True).hidden_states[-2] for te in (pipe.text_encoder, pipe.text_encoder_2)]
    for a, b in zip(theirs_te, ours_te):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    # every key of the file is a LoRA weight diffusers put in place, with its value, and no other was made
    placed = {}
    for head, part in (("transformer.", pipe.transformer), ("text_encoder.", pipe.text_encoder),
                       ("text_encoder_2.", pipe.text_encoder_2)):
        for key, value in part.state_dict().items():
            if ".lora_A." in key or ".lora_B." in key:
                path, kind, _adapter, last = key.rsplit(".", 3)
                placed[f"{head}{path}.{kind}.{last}"] = value
    assert placed.keys() == peft.keys() and len(peft) == 2 * len(net.loras)
    assert all(torch.equal(placed[k], peft[k]) for k in peft)
