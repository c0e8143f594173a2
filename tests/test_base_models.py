"""Real base models: the shipped configs, single-file checkpoints (SD1, SD2-v) in the original
layout, pickle refusal, identity by content, kohya's model hashes, and SD 2.x end to end."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from ldm_layout import pipeline_to_ldm
from lora_check import unet_outputs
from lorabuild import models
from lorabuild.cache import FileHashes

PUBLISHED = {  # parameter counts of the released models
    "sd1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd2": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_shipped_configs_build_the_published_architectures(arch):
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = models.CONFIGS_DIR / arch
    index = json.loads((folder / "model_index.json").read_text())
    counts = {}
    with torch.device("meta"):
        counts["unet"] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        counts["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        for te in ("text_encoder", "text_encoder_2"):
            if te in index:
                cls = getattr(transformers, index[te][1])
                counts[te] = cls(transformers.CLIPTextConfig.from_pretrained(folder / te))
    assert {k: sum(p.numel() for p in m.parameters()) for k, m in counts.items()} == PUBLISHED[arch]
    expected_pred = "v_prediction" if arch == "sd2" else "epsilon"
    assert models.noise_schedule(folder)["prediction_type"] == expected_pred


def _write_single_file(folder: Path, dest: Path, scale: float = 1.0) -> Path:
    sd = {k: (v * scale).half() for k, v in pipeline_to_ldm(folder).items()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.suffix == ".ckpt":
        torch.save({"state_dict": sd, "global_step": 1}, dest)
    else:
        save_file(sd, str(dest))
    return dest


def _configs_only(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dest


@pytest.mark.parametrize("name,arch,pred", [("tiny-sd1", "sd1", "epsilon"), ("tiny-sd2", "sd2", "v_prediction"),
                                            ("tiny-sdxl", "sdxl", "epsilon")])
def test_a_single_file_loads_to_the_folders_weights(tmp_path, name, arch, pred):
    cache = tmp_path / "cache"
    folder = models.ensure_builtin(name, cache)
    f = _write_single_file(folder, tmp_path / f"{name}.safetensors")
    assert models.checkpoint_arch(models.checkpoint_tensors(f, False)) == arch
    opts = {"base_model_config": str(_configs_only(folder, tmp_path / "cfg"))}
    out = models.resolve_base_model(str(f), tmp_path, cache, opts)
    info = models.model_info(out)
    assert (info["arch"], info["prediction_type"]) == (arch, pred)
    loaders = [models.load_unet, models.load_vae] + [
        lambda f, p=p: models.load_text_encoder(f, which=p) for p in models.text_parts(folder)]
    assert models.text_parts(out) == models.text_parts(folder)
    for part, loader in enumerate(loaders):
        want, got = loader(folder).state_dict(), loader(out).state_dict()
        assert want.keys() == got.keys()
        for k in want:  # the file is fp16: the folder's weights rounded to fp16, exactly
            assert torch.equal(got[k], want[k].half().float()), (part, k)
    for which in ("tokenizer", "tokenizer_2")[: len(models.text_parts(folder))]:
        tok_a, tok_b = models.load_tokenizer(folder, which=which), models.load_tokenizer(out, which=which)
        assert tok_a("a cat", padding="max_length").input_ids == tok_b("a cat", padding="max_length").input_ids
    # converted once: a second resolve is the same folder, not a new conversion
    stamp = (out / "model_index.json").stat().st_mtime_ns
    assert models.resolve_base_model(str(f), tmp_path, cache, opts) == out
    assert (out / "model_index.json").stat().st_mtime_ns == stamp
    # a prediction type set in the project wins over the config
    other = {"epsilon": "v_prediction", "v_prediction": "epsilon"}[pred]
    forced = models.resolve_base_model(str(f), tmp_path, cache, {**opts, "prediction_type": other})
    assert models.model_info(forced)["prediction_type"] == other


def test_pickle_checkpoints_need_allow_pickle_and_load_weights_only(tmp_path):
    cache = tmp_path / "cache"
    folder = models.ensure_builtin("tiny-sd1", cache)
    ckpt = _write_single_file(folder, tmp_path / "model.ckpt")
    opts = {"base_model_config": str(_configs_only(folder, tmp_path / "cfg"))}
    with pytest.raises(models.ModelError, match=r"model\.ckpt is a pickle checkpoint.*allow_pickle: true"):
        models.resolve_base_model(str(ckpt), tmp_path, cache, opts)
    out = models.resolve_base_model(str(ckpt), tmp_path, cache, {**opts, "allow_pickle": True})
    want = models.load_unet(folder).state_dict()
    got = models.load_unet(out).state_dict()
    assert all(torch.equal(got[k], want[k].half().float()) for k in want)


def test_a_separate_vae_replaces_only_the_vae(tmp_path):
    from ldm_layout import vae_to_ldm

    cache = tmp_path / "cache"
    folder = models.ensure_builtin("tiny-sd1", cache)
    vae_sd = models.load_vae(folder).state_dict()
    cfg = json.loads((folder / "vae" / "config.json").read_text())
    # a standalone VAE file (like vae-ft-mse-840000-ema-pruned.safetensors): original layout, no prefix
    ldm = {k.removeprefix("first_stage_model."): (v * 1.01) for k, v in vae_to_ldm(vae_sd, cfg).items()}
    save_file(ldm, str(tmp_path / "better-vae.safetensors"))
    out = models.resolve_base_model("builtin:tiny-sd1", tmp_path, cache, {"vae": "better-vae.safetensors"})
    assert out != folder
    got = models.load_vae(out).state_dict()
    assert all(torch.allclose(got[k], vae_sd[k] * 1.01) for k in vae_sd)
    hashes = FileHashes(tmp_path / "h.json")
    same = [c for c in ("unet", "text_encoder", "vae")
            if models.component_identity(out, c, hashes) == models.component_identity(folder, c, hashes)]
    assert same == ["unet", "text_encoder"]
    src = models.source_info(out)
    assert src["vae_sha256"] == hashlib.sha256((tmp_path / "better-vae.safetensors").read_bytes()).hexdigest()


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_allow_pickle_still_refuses_code_in_the_file(tmp_path):
    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Evil()}, bad)
    with pytest.raises(models.ModelError, match="weights_only=True"):
        models.resolve_base_model(str(bad), tmp_path, tmp_path / "cache", {"allow_pickle": True})


def _stage(ws, stage: str) -> dict:
    return json.loads((ws.root / "cache" / "reports" / "demo" / f"{stage}.json").read_text())


def _computed(ws, build: str) -> dict:
    """{stage: items computed} for the stages that ran in ``build``."""
    return {s: _stage(ws, s)["computed"] for s in ws.ran(build)}


def test_single_file_base_model_end_to_end(demo):
    demo.shorten()  # 4 steps an epoch: this test trains six times
    demo.doit("train:demo", build="short")
    tiny = demo.root / "cache" / "models" / "tiny-sd1"
    models_dir = demo.root / "projects" / "models"
    f = _write_single_file(tiny, models_dir / "anime-merge.safetensors")
    _configs_only(tiny, models_dir / "tiny-config")
    demo.edit(lambda d: d.update(base_model="models/anime-merge.safetensors", base_model_config="models/tiny-config"))
    demo.doit("train:demo", build="file")
    ran = _computed(demo, "file")
    assert ran.get("resize", 0) == 0 and ran.get("bucket", 0) == 0
    n_images = len(demo.manifest("latents")["items"])
    assert ran["train"] == 1

    lora = demo.root / "output" / "demo" / "demo.safetensors"
    with safe_open(str(lora), "pt") as fh:
        md = fh.metadata()
    raw = f.read_bytes()
    assert md["ss_sd_model_name"] == "anime-merge.safetensors"
    assert md["ss_new_sd_model_hash"] == hashlib.sha256(raw).hexdigest()
    assert md["ss_sd_model_hash"] == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    # the LoRA's own hashes, computed the way kohya and A1111's additional-networks do
    blob = lora.read_bytes()
    assert md["sshs_model_hash"] == hashlib.sha256(blob[8 + int.from_bytes(blob[:8], "little"):]).hexdigest()
    ss_only = save(load_file(str(lora)), {k: v for k, v in md.items() if k.startswith("ss_")})
    assert md["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]

    # touching the file changes nothing
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**10))
    demo.doit("train:demo", build="touch")
    assert sum(_computed(demo, "touch").values()) == 0

    # a different checkpoint: latents and text embeddings again, resize and bucket kept
    _write_single_file(tiny, models_dir / "other.safetensors", scale=1.01)
    demo.edit(lambda d: d.update(base_model="models/other.safetensors"))
    demo.doit("train:demo", build="other")
    ran = _computed(demo, "other")
    assert ran.get("resize", 0) == 0 and ran.get("bucket", 0) == 0
    assert ran["latents"] == n_images and ran["textemb"] >= 1 and ran["train"] == 1

    # the same weights as a pickle: refused with the field named, then loaded weights-only with
    # allow_pickle; its conversion equals the .safetensors one, so no latent is encoded again
    _write_single_file(tiny, models_dir / "anime-merge.ckpt")
    demo.edit(lambda d: d.update(base_model="models/anime-merge.ckpt"))
    proc = demo.doit("train:demo", build="pickle", check=False)
    assert proc.returncode != 0 and "allow_pickle" in proc.stdout + proc.stderr
    demo.edit(lambda d: d.update(allow_pickle=True))
    demo.doit("train:demo", build="pickle2")
    ran = _computed(demo, "pickle2")
    assert ran.get("latents", 0) == 0 and ran.get("textemb", 0) == 0

    # a separate VAE: new latents, the text embeddings kept; its hashes go into the metadata
    from ldm_layout import vae_to_ldm

    vae_sd = models.load_vae(tiny).state_dict()
    cfg = json.loads((tiny / "vae" / "config.json").read_text())
    save_file({k: v * 1.01 for k, v in vae_to_ldm(vae_sd, cfg).items()}, str(models_dir / "vae-ft.safetensors"))
    demo.edit(lambda d: d.update(vae="models/vae-ft.safetensors"))
    demo.doit("train:demo", build="vae")
    ran = _computed(demo, "vae")
    assert ran["latents"] == n_images and ran.get("textemb", 0) == 0 and ran["train"] == 1
    with safe_open(str(lora), "pt") as fh:
        md = fh.metadata()
    assert md["ss_vae_name"] == "vae-ft.safetensors"
    assert md["ss_new_vae_hash"] == hashlib.sha256((models_dir / "vae-ft.safetensors").read_bytes()).hexdigest()


def test_sd2_v_prediction_end_to_end(demo):
    demo.edit(lambda d: d.update(base_model="builtin:tiny-sd2"))
    demo.doit("sample:demo", build="sd2")
    ran = _computed(demo, "sd2")
    # tiny-sd2 shares tiny-sd1's VAE: its latents are reused; the text encoder is new
    assert ran.get("latents", 0) == 0 and ran["textemb"] > 0 and ran["train"] == 1 and ran["sample"] > 0
    lora = demo.root / "output" / "demo" / "demo.safetensors"
    with safe_open(str(lora), "pt") as fh:
        md = fh.metadata()
    assert (md["ss_v2"], md["ss_base_model_version"], md["modelspec.prediction_type"]) == ("True", "sd_v2_v", "v")
    assert md["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert md["ss_zero_terminal_snr"] == "False"

    ours, plain, theirs = unet_outputs(demo.root / "cache" / "models" / "tiny-sd2", lora, "sd2", 48)
    assert (ours - plain).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, atol=2e-3, rtol=2e-3)

    # zero terminal SNR (v-prediction's companion), with Min-SNR weighting: trains to a finite, different LoRA
    demo.edit(lambda d: d["train"].update(zero_terminal_snr=True, min_snr_gamma=5))
    demo.doit("train:demo", build="ztsnr")
    assert demo.report("train")["computed"] == 1
    with safe_open(str(lora), "pt") as fh:
        assert fh.metadata()["ss_zero_terminal_snr"] == "True"
        assert all(torch.isfinite(fh.get_tensor(k)).all() for k in fh.keys())


def test_zero_terminal_snr_schedule_ends_in_pure_noise(tmp_path):
    from lorabuild.train.losses import debiased_weights, min_snr_weights
    from lorabuild.train.loop import TrainInputs, _load_models
    from lorabuild.train.plan import make_plan

    folder = models.ensure_builtin("tiny-sd2", tmp_path / "cache")
    cfg = {"train": {"mixed_precision": "no", "zero_terminal_snr": True}}
    inp = TrainInputs(model_dir=folder, arch="sd2", device=torch.device("cpu"), samples=[], latent_path={},
                      pixels=None, caption={}, caption_opts={}, embedding_path={}, cfg=cfg, plan=make_plan([], 1, 1, 1))
    sched = _load_models(inp)[-1]
    plain = models.load_noise_scheduler(folder)
    assert float(sched.alphas_cumprod[-1]) == 0.0 < float(plain.alphas_cumprod[-1])
    t = torch.tensor([0, 500, 999])
    for v in (True, False):
        assert torch.isfinite(min_snr_weights(sched.alphas_cumprod, t, 5.0, v)).all()
        assert torch.isfinite(debiased_weights(sched.alphas_cumprod, t, v)).all()


def test_sdxl_end_to_end_with_both_text_encoders(demo):
    demo.edit(lambda d: d.update(base_model="builtin:tiny-sdxl"))
    demo.doit("sample:demo", build="xl")
    ran = _computed(demo, "xl")
    assert ran["latents"] > 0 and ran["textemb"] > 0 and ran["train"] == 1 and ran["sample"] > 0
    emb = demo.manifest("textemb")["items"][0]["hash"]
    stored = load_file(str(demo.root / "cache" / "objects" / "textemb" / emb[:2] / f"{emb[2:]}.safetensors"))
    assert stored["hidden"].shape == (77, 32 + 40) and stored["pooled"].shape == (32,)  # both encoders; pooled

    # the text encoders train too (their own rates), and the size/crop conditioning sees mirrored images
    demo.edit(lambda d: (d["network"].update(train_text_encoder=True), d["latents"].update(flip=True),
                         d["train"].update(text_encoder_lr=0.001, text_encoder_2_lr=0.0005)))
    demo.doit("sample:demo", build="xl-te")
    lora = demo.root / "output" / "demo" / "demo.safetensors"
    with safe_open(str(lora), "pt") as fh:
        md, keys = fh.metadata(), list(fh.keys())
    assert (md["ss_base_model_version"], md["modelspec.architecture"]) == ("sdxl_base_v1-0",
                                                                           "stable-diffusion-xl-v1-base/lora")
    prefixes = {re.match(r"lora_(unet_[a-z]+_blocks?|te\d?)_", k).group(1) for k in keys}
    assert prefixes == {"unet_input_blocks", "unet_middle_block", "unet_output_blocks", "te1", "te2"}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.lora_down.weight" in keys  # kohya's SGM names
    ours, plain, theirs = unet_outputs(demo.root / "cache" / "models" / "tiny-sdxl", lora, "sdxl", 72, pooled=32)
    assert (ours - plain).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, atol=2e-3, rtol=2e-3)


def test_sdxl_network_names_and_rates(tmp_path):
    from lorabuild.lora.network import LoRANetwork

    folder = models.ensure_builtin("tiny-sdxl", tmp_path / "cache")
    tes = [models.load_text_encoder(folder, which=p) for p in models.text_parts(folder)]
    net = LoRANetwork(models.load_unet(folder), tes, dim=4, alpha=4, arch="sdxl", conv_dim=2)
    names = [m.lora_name for m in net.loras]
    assert net.te_counts == [30, 30]  # 5 layers each × (q, k, v, out, fc1, fc2)
    # LoCon's ResNet convs and resamplers in the original layout as well
    for name in ("lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_3_0_op",
                 "lora_unet_output_blocks_2_2_conv", "lora_unet_middle_block_0_emb_layers_1",
                 "lora_te2_text_model_encoder_layers_4_mlp_fc2"):
        assert name in names
    groups = net.param_groups(1e-4, 2e-5, te2_lr=1e-5)
    assert [g["lr"] for g in groups] == [1e-4, 2e-5, 1e-5]
    assert [len(g["params"]) for g in groups] == [2 * net.n_unet, 60, 60]


def test_an_sdxl_folders_second_text_encoder_is_a_dependency(tmp_path):
    from lorabuild.config import load_project
    from lorabuild.stages.spec import weight_files

    xl = tmp_path / "projects" / "xl"
    shutil.copytree(models.ensure_builtin("tiny-sdxl", tmp_path / "cache"), xl)
    (tmp_path / "projects" / "data" / "1_x").mkdir(parents=True)
    (tmp_path / "projects" / "p.yaml").write_text("base_model: xl\ndataset: {dirs: [data]}\n")
    project = load_project(tmp_path / "projects" / "p.yaml")
    deps = {Path(d).relative_to(xl).parent.as_posix() for d in weight_files(project, "text_encoder")}
    assert deps == {"text_encoder", "text_encoder_2"}
    deps = {Path(d).relative_to(xl).parent.as_posix() for d in weight_files(project, "unet")}
    assert deps == {"unet"}
