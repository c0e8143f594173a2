"""Base models: the shipped CLIP tokenizer, the built-in tiny model, resolution, identity, loaders."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorabuild import models
from lorabuild.cache import FileHashes

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" with OpenAI CLIP's tokenizer


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return models.ensure_builtin("tiny-sd1", tmp_path_factory.mktemp("cache"))


def test_shipped_tokenizer_gives_clip_ids():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(models.TOKENIZER_DIR))
    assert tok("a photo of a cat").input_ids == CAT_IDS
    assert len(tok) == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.model_max_length) == (49406, 49407, 49407, 77)
    vocab = json.loads((models.TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert sorted(vocab.values()) == list(range(49408))
    assert (models.TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")


def test_models_module_imports_no_torch():
    code = "import sys, lorabuild.models; sys.exit('torch' in sys.modules or 'diffusers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_builtin_is_byte_identical_across_cache_roots(tiny, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    other = models.ensure_builtin("tiny-sd1", tmp_path / "cache with spaces é")
    assert torch.equal(torch.rand(1), expected)  # building does not move the caller's RNG
    assert _digests(other) == _digests(tiny)
    must = {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "tokenizer/vocab.json"}
    assert must <= set(_digests(tiny))
    assert [p.name for p in other.parent.iterdir()] == ["tiny-sd1"]  # no temp folder left behind


def test_builtin_second_call_returns_at_once_and_stale_is_rebuilt(tmp_path):
    folder = models.ensure_builtin("tiny-sd1", tmp_path)
    stamp = (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert models.ensure_builtin("tiny-sd1", tmp_path) == folder
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    before = _digests(folder)
    (folder / models.BUILTIN_MARKER).write_text('{"name": "tiny-sd1", "version": 0}')  # an older build
    assert models.ensure_builtin("tiny-sd1", tmp_path) == folder
    assert _digests(folder) == before
    assert sorted(p.name for p in tmp_path.joinpath("models").iterdir()) == ["tiny-sd1"]


def test_unknown_builtin(tmp_path):
    with pytest.raises(models.ModelError, match="builtin:nope.*builtin:tiny-sd1"):
        models.ensure_builtin("nope", tmp_path)


def test_pipeline_loads_offline_and_makes_a_64px_image(tiny):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None
    out = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)
    assert torch.isfinite(torch.from_numpy(out.images)).all()


def test_model_info(tiny):
    assert models.model_info(tiny) == {
        "arch": "sd1",
        "prediction_type": "epsilon",
        "latent_scale": 0.18215,
        "vae_scale_factor": 8,
        "latent_channels": 4,
        "te_max_length": 77,
        "zero_terminal_snr": False,  # a single file with ComfyUI's ztsnr key says True
        "latent_shift": None,  # the SD VAEs have no shift factor (FLUX.1's and SD 3.5's do)
    }


def test_model_info_arch_from_configs(tiny, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny, folder, ignore=shutil.ignore_patterns("*.safetensors", "tokenizer"))
    te_cfg = folder / "text_encoder" / "config.json"
    te_cfg.write_text(json.dumps({**json.loads(te_cfg.read_text()), "hidden_size": 1024}))
    assert models.model_info(folder)["arch"] == "sd2"
    index = folder / "model_index.json"
    sdxl = {**json.loads(index.read_text()), "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    index.write_text(json.dumps(sdxl))
    assert models.model_info(folder)["arch"] == "sdxl"


def test_vae_downsamples_by_8(tiny):
    vae = models.load_vae(tiny)
    with torch.no_grad():
        z = vae.encode(torch.rand(2, 3, 64, 96) * 2 - 1).latent_dist.mean
        assert z.shape == (2, 4, 8, 12)
        assert vae.decode(z).sample.shape == (2, 3, 64, 96)


def test_loaders_are_frozen_fp32(tiny):
    unet, te = models.load_unet(tiny), models.load_text_encoder(tiny)
    for m in (unet, te, models.load_vae(tiny)):
        assert not m.training
        assert all(not p.requires_grad and p.dtype == torch.float32 for p in m.parameters())
    assert models.load_tokenizer(tiny)("a photo of a cat").input_ids == CAT_IDS
    sched = models.load_noise_scheduler(tiny)
    assert type(sched).__name__ == "DDPMScheduler"
    assert (sched.config.beta_schedule, sched.config.beta_start, sched.config.beta_end,
            sched.config.num_train_timesteps, sched.config.prediction_type) == (
        "scaled_linear", 0.00085, 0.012, 1000, "epsilon")
    with torch.no_grad():
        hidden = te(torch.tensor([CAT_IDS])).last_hidden_state
        pred = unet(torch.randn(4, 4, 16, 16), torch.tensor([1, 10, 100, 999]),
                    encoder_hidden_states=hidden.expand(4, -1, -1)).sample
    assert hidden.shape == (1, 7, 32) and pred.shape == (4, 4, 16, 16)


def test_load_pipeline_is_frozen(tiny):
    pipe = models.load_pipeline(tiny)
    assert pipe.safety_checker is None and not pipe.config.requires_safety_checker
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_resolve_base_model(tiny, tmp_path):
    cache = tmp_path / "cache"
    assert models.resolve_base_model(tiny.name, tiny.parent, cache) == tiny.resolve()
    assert models.resolve_base_model("builtin:tiny-sd1", tmp_path, cache) == cache / "models" / "tiny-sd1"

    with pytest.raises(models.ModelError, match=r"nowhere.*does not exist"):
        models.resolve_base_model("nowhere", tmp_path, cache)
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 8)
    with pytest.raises(models.ModelError, match=r"model\.safetensors is not a readable safetensors file"):
        models.resolve_base_model("model.safetensors", tmp_path, cache)
    from safetensors.torch import save_file

    save_file({"some.other.weight": torch.zeros(2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(models.ModelError, match=r"lora\.safetensors: cannot tell SD1 / SD2 / SDXL.*model_type"):
        models.resolve_base_model("lora.safetensors", tmp_path, cache)
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(models.ModelError, match=r"model\.onnx: a single-file checkpoint must be \.safetensors"):
        models.resolve_base_model("model.onnx", tmp_path, cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelError, match=r"empty.*model_index\.json is missing"):
        models.resolve_base_model("empty", tmp_path, cache)
    partial = tmp_path / "partial"
    shutil.copytree(tiny, partial, ignore=shutil.ignore_patterns("unet", "vae"))
    with pytest.raises(models.ModelError, match=r"partial.*missing unet/, vae/"):
        models.resolve_base_model("partial", tmp_path, cache)


def test_component_identity(tiny, tmp_path):
    hashes = FileHashes(tmp_path / "hashes.json")
    ids = {c: models.component_identity(tiny, c, hashes) for c in models.COMPONENTS}
    assert len(set(ids.values())) == 3
    copy = shutil.copytree(tiny, tmp_path / "elsewhere" / "copy")
    fresh = FileHashes(tmp_path / "other.json")
    assert {c: models.component_identity(copy, c, fresh) for c in models.COMPONENTS} == ids  # moved ≠ changed
    cfg = copy / "vae" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "scaling_factor": 0.13025}))
    assert models.component_identity(copy, "vae", fresh) != ids["vae"]
    with pytest.raises(models.ModelError, match="no weight files"):
        models.component_identity(copy, "tokenizer", fresh)


def test_weight_files_prefer_plain_safetensors(tmp_path):
    unet = tmp_path / "unet"
    unet.mkdir()
    names = ("config.json", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors",
             "diffusion_pytorch_model.safetensors.index.json")
    for name in names:
        (unet / name).write_text("x")
    assert [p.name for p in models.weight_files(tmp_path, "unet")] == [
        "diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    for p in unet.glob("diffusion_pytorch_model-*"):
        p.unlink()
    assert [p.name for p in models.weight_files(tmp_path, "unet")] == ["diffusion_pytorch_model.fp16.safetensors"]
    (unet / "diffusion_pytorch_model.fp16.safetensors").unlink()
    assert [p.name for p in models.weight_files(tmp_path, "unet")] == ["diffusion_pytorch_model.bin"]
    assert models.weight_files(tmp_path, "vae") == []


def test_pick_device():
    assert models.pick_device("cpu") == torch.device("cpu")
    assert models.pick_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        assert models.pick_device("auto") != torch.device("cuda")
        with pytest.raises(models.ModelError, match="cuda"):
            models.pick_device("cuda")
    with pytest.raises(models.ModelError, match="'tpu' is not one of"):
        models.pick_device("tpu")

