"""`doit sample:NAME` end to end on builtin:tiny-sd3 (issue 25): the flow objective's training, CFG
sampling through StableDiffusion3Pipeline, kohya's SD3 names in the saved LoRA, and the same
incrementality counts as the SD builds. One workspace, built once for the module and changed in
steps (each test continues from the last one's build)."""
import pytest
from PIL import Image
from safetensors import safe_open

from conftest import init_workspace

STAGES = {"resize", "bucket", "latents", "textemb", "train", "sample"}


def _tiny_sd3(d: dict) -> None:
    d["base_model"] = "builtin:tiny-sd3"
    d["bucket"].update(step=16)  # SD3's own step: 8× VAE, 2×2 patches
    d["textemb"].update(t5_max_length=16)  # a short T5 sequence keeps the CPU build quick (keyed with each entry)
    d["train"].update(epochs=1, max_steps=3, save_every_n_epochs=1)
    d["sample"].update(steps=2, width=64, height=64, cfg=4.0)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = init_workspace(tmp_path_factory.mktemp("sd3") / "ws")
    ws.edit(_tiny_sd3)
    ws.cold = ws.doit("sample:demo", build="cold")
    return ws


def test_a_cold_build_trains_by_flow_and_samples_with_cfg(ws):
    assert ws.ran("cold") == STAGES
    assert ws.report("latents")["computed"] == 16 and ws.report("textemb")["computed"] == ws.report("textemb")["items"] > 0
    samples = sorted(p.name for p in (ws.root / "output" / "demo" / "samples").glob("*.png"))
    assert "grid.png" in samples and any(n.startswith("base-") for n in samples) and any(n.startswith("e000001-") for n in samples)
    with safe_open(str(ws.root / "output" / "demo" / "demo.safetensors"), "pt") as f:
        keys, md = set(f.keys()), f.metadata()
    names = {k.split(".")[0] for k in keys}
    # kohya's SD3 names (lora_sd3.py): SAI's MMDiT modules, q/k/v fused, SD3.5M's attn2; no diffusers paths
    assert {"lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_x_block_attn2_qkv",
            "lora_unet_joint_blocks_0_context_block_attn_proj", "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1",
            "lora_unet_joint_blocks_1_x_block_mlp_fc2"} <= names
    assert not any(n.startswith("lora_unet_transformer_blocks") for n in names) and len(names) == 19
    assert (md["ss_base_model_version"], md["modelspec.architecture"]) == ("5-medium", "stable-diffusion-3-5-medium/lora")
    assert md["ss_network_module"] == "networks.lora_sd3" and md["ss_discrete_flow_shift"] == "3.0"
    assert md["ss_timestep_sampling"] == "logit_normal"


def test_one_more_image_with_a_new_caption_is_one_latent_and_one_embedding(ws):
    src = ws.data / "10_redcircle shape"
    with Image.open(src / "redcircle_00.png") as im:  # a new picture: the same one would reuse its latent
        im.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(src / "redcircle_99.png")
    (src / "redcircle_99.txt").write_text("redcircle, shape, a new caption\n")
    ws.doit("sample:demo", build="one-more")
    assert ws.report("latents")["computed"] == 1 and ws.report("latents")["reused"] == 16
    assert ws.report("textemb")["computed"] == 1  # one new caption: one entry (CLIP-L, CLIP-G and T5 in it)
    assert {"train", "sample"} <= ws.ran("one-more")


def test_a_train_only_change_recomputes_no_cache(ws):
    ws.edit(lambda d: d["train"].update(learning_rate=0.001))
    ws.doit("sample:demo", build="lr")
    assert ws.ran("lr") == {"train", "sample"}  # resize, bucket, latents and textemb are up to date
    assert ws.report("train")["computed"] == 1


def test_output_format_diffusers_writes_peft_names_again_without_training(ws):
    """diffusers has no converter from kohya's SD3 names: the PEFT file is what its load_lora_weights
    reads (tests/test_sd3_lora.py loads one). An output setting: the saved weights are written again."""
    before = (ws.root / "output" / "demo" / "loss.csv").read_text()
    ws.edit(lambda d: d["output"].update(format="diffusers"))
    proc = ws.doit("sample:demo", build="peft")
    assert ws.ran("peft") == {"train", "sample"} and "LoRA modules" not in proc.stdout
    assert "wrote 1 saved file again from the full-precision weights" in " ".join(ws.report("train")["notes"])
    assert (ws.root / "output" / "demo" / "loss.csv").read_text() == before  # no step trained again
    with safe_open(str(ws.root / "output" / "demo" / "demo.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert "transformer.transformer_blocks.1.norm1_context.linear.lora_B.weight" in keys
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
