"""Base models: the built-in tiny models, diffusers folders, identities and loaders.

Offline by design: every loader passes ``local_files_only=True``, and a built-in model
is written once as a real diffusers folder and then loaded through the same code path
as any user's folder. No torch/diffusers import at module level: this module is
imported when doit loads the task graph.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from .resources import DATA_DIR

BUILTIN_MODELS = ("tiny-sd1",)
BUILTIN_VERSION = 1  # bump when a builtin model's configs or init change
COMPONENTS = ("unet", "vae", "text_encoder")
TOKENIZER_DIR = DATA_DIR / "clip_tokenizer"

# SD1's noise schedule (CompVis v1-inference.yaml; diffusers' SD 1.5 scheduler config).
SD1_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
}


class ModelError(Exception):
    """A base model that cannot be found or read; the message names the path and what is missing."""


def _offline() -> None:
    # Nothing is ever fetched from a hub: a missing file must be an error, not a download.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is first imported
    # Stage output is ours to print: no per-shard loading bars from the libraries.
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()


def _build_tiny_sd1(folder: Path) -> None:
    """A randomly initialised SD1-architecture pipeline, small enough for CPU tests.

    Real classes, real geometry: the VAE has 4 blocks (downsampling ×8, like SD's), the
    UNet has cross-attention in Transformer2D blocks with 1×1-conv proj_in/out (SD1),
    and the text encoder is a CLIP text model with the full 49408-token vocabulary.
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    _offline()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.18215,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=5,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            projection_dim=32,
        )
    )
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(**SD1_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)


def ensure_builtin(name: str, cache_root: Path) -> Path:
    """The diffusers folder of built-in model ``name``, written on first use under ``cache/models/``."""
    if name not in BUILTIN_MODELS:
        raise ModelError(f"unknown built-in model 'builtin:{name}' (known: {', '.join('builtin:' + n for n in BUILTIN_MODELS)})")
    folder = Path(cache_root) / "models" / name
    if (folder / "model_index.json").is_file():
        return folder
    tmp = folder.with_name(f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        _build_tiny_sd1(tmp)
        try:
            os.replace(tmp, folder)  # atomic: a half-written model is never visible
        except OSError:
            if not (folder / "model_index.json").is_file():
                raise  # not a lost race with another process: a real failure
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_base_model(spec: str, project_root: Path, cache_root: Path) -> Path:
    """The diffusers folder that ``base_model: spec`` names (built-in models are written first)."""
    if spec.startswith("builtin:"):
        return ensure_builtin(spec.split(":", 1)[1], cache_root)
    path = (Path(project_root) / spec).resolve()
    if path.is_file():
        raise ModelError(f"{path} is a single-file checkpoint; only diffusers model folders are supported so far")
    if not path.is_dir():
        raise ModelError(f"{path} does not exist")
    if not (path / "model_index.json").is_file():
        raise ModelError(f"{path} is not a diffusers model folder: model_index.json is missing")
    return path


def weight_files(model_dir: Path, component: str) -> list[Path]:
    folder = Path(model_dir) / component
    return sorted(p for p in folder.glob("*") if p.suffix in (".safetensors", ".bin") and p.is_file())


def component_identity(model_dir: Path, component: str, hashes) -> str:
    """sha256 over a component's config and the sha256 of each weight file.

    ``hashes`` (a :class:`lorabuild.cache.FileHashes`) remembers file digests by
    path+size+mtime, so a multi-GB UNet is read once, not on every build.
    """
    folder = Path(model_dir) / component
    files = weight_files(model_dir, component)
    if not files:
        raise ModelError(f"{folder} has no weight files (*.safetensors)")
    h = hashlib.sha256(component.encode())
    for cfg in sorted(folder.glob("*.json")):
        h.update(cfg.name.encode() + b"\0" + cfg.read_bytes())
    for f in files:
        h.update(f.name.encode() + b"\0" + hashes.sha256(f).encode())
    return h.hexdigest()


def _config(model_dir: Path, component: str) -> dict:
    path = Path(model_dir) / component / ("scheduler_config.json" if component == "scheduler" else "config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is missing or unreadable ({exc})") from None


def model_info(model_dir: Path) -> dict:
    """Architecture facts read from the JSON configs alone (no weights, no torch)."""
    index = json.loads((Path(model_dir) / "model_index.json").read_text(encoding="utf-8"))
    vae, te = _config(model_dir, "vae"), _config(model_dir, "text_encoder")
    if "text_encoder_2" in index:
        arch = "sdxl"
    elif te.get("hidden_size") == 1024:
        arch = "sd2"
    else:
        arch = "sd1"
    return {
        "arch": arch,
        "prediction_type": _config(model_dir, "scheduler").get("prediction_type", "epsilon"),
        "latent_scale": vae.get("scaling_factor", 0.18215),
        "vae_scale_factor": 2 ** (len(vae["block_out_channels"]) - 1),
        "latent_channels": vae.get("latent_channels", 4),
        "te_max_length": te.get("max_position_embeddings", 77),
    }


def pick_device(name: str):
    """``auto`` → cuda, else mps, else cpu; an explicit device that is not there is an error."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("device: cuda was asked for but torch sees no CUDA GPU")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelError("device: mps was asked for but this torch has no Apple MPS backend")
    return torch.device(name)


def _frozen(model, device, dtype):
    import torch

    model.requires_grad_(False)
    if dtype != torch.float32:  # weights are stored fp32; cast only when asked to
        model.to(dtype=dtype)
    return model.to(device=device).eval()


def load_vae(model_dir: Path, device="cpu", dtype=None):
    import torch
    from diffusers import AutoencoderKL

    _offline()
    return _frozen(AutoencoderKL.from_pretrained(str(model_dir), subfolder="vae", local_files_only=True), device, dtype or torch.float32)


def load_unet(model_dir: Path, device="cpu", dtype=None):
    import torch
    from diffusers import UNet2DConditionModel

    _offline()
    unet = UNet2DConditionModel.from_pretrained(str(model_dir), subfolder="unet", local_files_only=True)
    return _frozen(unet, device, dtype or torch.float32)


def load_text_encoder(model_dir: Path, device="cpu", dtype=None):
    import torch
    from transformers import CLIPTextModel

    _offline()
    te = CLIPTextModel.from_pretrained(str(model_dir), subfolder="text_encoder", local_files_only=True)
    return _frozen(te, device, dtype or torch.float32)


def load_tokenizer(model_dir: Path):
    from transformers import CLIPTokenizer

    _offline()
    return CLIPTokenizer.from_pretrained(str(model_dir), subfolder="tokenizer", local_files_only=True)


def load_noise_scheduler(model_dir: Path):
    from diffusers import DDPMScheduler

    _offline()
    return DDPMScheduler.from_pretrained(str(model_dir), subfolder="scheduler", local_files_only=True)


def load_pipeline(model_dir: Path, device="cpu", dtype=None):
    import torch
    from diffusers import StableDiffusionPipeline

    _offline()
    pipe = StableDiffusionPipeline.from_pretrained(
        str(model_dir), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    if dtype not in (None, torch.float32):
        pipe.to(dtype=dtype)
    return pipe.to(device)
