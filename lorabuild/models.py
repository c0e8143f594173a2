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
BUILTIN_VERSION = 1  # bump when a builtin model's configs or init change: stale folders are rebuilt
BUILTIN_MARKER = "lorabuild_builtin.json"  # {"name", "version"} inside a built-in model's folder
COMPONENTS = ("unet", "vae", "text_encoder")
TOKENIZER_DIR = DATA_DIR / "clip_tokenizer"
DEVICES = ("auto", "cpu", "cuda", "mps")

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


def _tiny_sd1_pipeline():
    """A randomly initialised SD1-architecture pipeline, small enough for CPU tests.

    Real classes, real geometry: the VAE has 4 blocks (downsampling ×8, like SD's), the
    UNet has cross-attention in Transformer2D blocks with 1×1-conv proj_in/out (SD1),
    and the text encoder is a CLIP text model with the full 49408-token vocabulary.
    ``attention_head_dim=8`` means 8 heads, as in SD 1.5's own unet/config.json
    (diffusers' historical naming). Each module is seeded on its own, so changing one
    leaves the others' weights as they were.
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR)),
        unet=unet,
        scheduler=DDPMScheduler(**SD1_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _write_builtin(name: str, folder: Path) -> None:
    import torch

    _offline()
    # fork_rng: a fixed seed for a reproducible init without moving the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        pipe = _tiny_sd1_pipeline()
    pipe.save_pretrained(str(folder), safe_serialization=True)
    # transformers 5 saves only tokenizer.json; transformers 4's slow CLIPTokenizer (the
    # class model_index.json names) needs vocab.json + merges.txt, as in SD 1.5's folder.
    for fname in ("vocab.json", "merges.txt"):
        if not (folder / "tokenizer" / fname).is_file():
            shutil.copyfile(TOKENIZER_DIR / fname, folder / "tokenizer" / fname)
    marker = json.dumps({"name": name, "version": BUILTIN_VERSION}) + "\n"
    (folder / BUILTIN_MARKER).write_text(marker, encoding="utf-8")


def _builtin_ok(folder: Path) -> bool:
    marker = _read_json(folder / BUILTIN_MARKER)
    ok = isinstance(marker, dict) and marker.get("version") == BUILTIN_VERSION
    return ok and (folder / "model_index.json").is_file()


def _install(tmp: Path, folder: Path) -> None:
    """Rename ``tmp`` to ``folder``: keep a current one another process installed first, set a stale one aside."""
    for _ in range(3):
        try:
            os.replace(tmp, folder)  # atomic: a half-written model is never visible
            return
        except OSError:
            if _builtin_ok(folder):
                return  # another process won the race: keep theirs (same bytes)
            if not folder.exists():
                continue
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                os.replace(folder, old)
            except OSError as exc:
                raise ModelError(f"{folder} is an outdated or broken built-in model and cannot be replaced ({exc}); "
                                 "delete it and run again") from None
            shutil.rmtree(old, ignore_errors=True)
    raise ModelError(f"could not install the built-in model at {folder}")


def ensure_builtin(name: str, cache_root: Path) -> Path:
    """The diffusers folder of built-in model ``name``, written on first use under ``cache/models/``.

    Built in a temp sibling and renamed into place, so a killed run or a concurrent one
    never sees a partial model. The bytes are the same on every machine with the same
    torch/diffusers/transformers versions (fixed seeds, CPU init, safetensors), so the
    content hashes in cache keys agree.
    """
    if name not in BUILTIN_MODELS:
        known = ", ".join("builtin:" + n for n in BUILTIN_MODELS)
        raise ModelError(f"unknown built-in model 'builtin:{name}' (known: {known})")
    folder = Path(cache_root) / "models" / name
    if _builtin_ok(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        _write_builtin(name, tmp)
        _install(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_base_model(spec: str, project_root: Path, cache_root: Path) -> Path:
    """The diffusers folder that ``base_model: spec`` names (built-in models are written first).

    A relative path is taken from the project file's folder, so a project can be built
    from any working directory.
    """
    if spec.startswith("builtin:"):
        return ensure_builtin(spec.split(":", 1)[1], cache_root)
    path = (Path(project_root) / Path(spec).expanduser()).resolve()
    if path.is_file():
        raise ModelError(f"{path}: single-file checkpoints are not supported yet; "
                         "give a diffusers model folder (with model_index.json)")
    if not path.is_dir():
        raise ModelError(f"{path} does not exist")
    index = _read_json(path / "model_index.json")
    if not isinstance(index, dict):
        raise ModelError(f"{path} is not a diffusers model folder: model_index.json is missing or unreadable")
    # Only the parts lorabuild loads: a folder whose safety_checker/ was deleted is fine.
    needed = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2")
    missing = [c for c in needed if _listed(index, c) and not (path / c).is_dir()]
    if missing:
        folders = ", ".join(c + "/" for c in missing)
        raise ModelError(f"{path} is an incomplete diffusers model folder: missing {folders}")
    return path


def weight_files(model_dir: Path, component: str) -> list[Path]:
    """The weight files the loader reads for ``component``: file_deps and identity inputs.

    Like diffusers' loader, safetensors win over .bin, and variant files
    (``*.fp16.safetensors``) are skipped unless they are all there is, so a repo that
    ships both formats or an fp16 copy is not hashed twice.
    """
    files = sorted(p for p in (Path(model_dir) / component).glob("*") if p.is_file())
    for ext in (".safetensors", ".bin"):
        found = [p for p in files if p.suffix == ext]
        plain = [p for p in found if "." not in p.stem]  # shards "x-00001-of-00002" count as plain
        if found:
            return plain or found
    return []


def component_identity(model_dir: Path, component: str, hashes) -> str:
    """sha256 over a component's name, its JSON configs and the sha256 of each weight file.

    ``hashes`` (a :class:`lorabuild.cache.FileHashes`) remembers file digests by
    path+size+mtime, so a multi-GB UNet is read once, not on every build. File names
    are hashed with their content, not their folder, so a moved model keeps its identity.
    """
    folder = Path(model_dir) / component
    files = weight_files(model_dir, component)
    if not files:
        raise ModelError(f"{folder} has no weight files (*.safetensors or *.bin)")
    h = hashlib.sha256(component.encode() + b"\0")
    for cfg in sorted(folder.glob("*.json")):
        h.update(cfg.name.encode() + b"\0" + cfg.read_bytes() + b"\0")
    for f in files:
        h.update(f.name.encode() + b"\0" + hashes.sha256(f).encode() + b"\0")
    return h.hexdigest()


def _listed(index: dict, component: str) -> bool:
    """Whether model_index.json names a component; it maps each to [library, class], [null, null] for none."""
    value = index.get(component)
    return isinstance(value, list) and value[:1] != [None]


def _read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def _config(model_dir: Path, component: str) -> dict:
    path = Path(model_dir) / component / ("scheduler_config.json" if component == "scheduler" else "config.json")
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise ModelError(f"{path} is missing or unreadable")
    return cfg


def model_info(model_dir: Path) -> dict:
    """Architecture facts read from the JSON configs alone (no weights, no torch).

    SD2's text encoder (OpenCLIP ViT-H) is 1024 wide, SD1's (CLIP ViT-L) 768; SDXL is
    the one with a second text encoder. The latent scale comes from the VAE config
    (0.18215 SD1/2, 0.13025 SDXL) rather than being hard-coded.
    """
    index = _read_json(Path(model_dir) / "model_index.json")
    if not isinstance(index, dict):
        raise ModelError(f"{model_dir}: model_index.json is missing or unreadable")
    vae, te = _config(model_dir, "vae"), _config(model_dir, "text_encoder")
    if _listed(index, "text_encoder_2"):
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

    def has_mps() -> bool:
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())

    if name not in DEVICES:
        raise ModelError(f"device: '{name}' is not one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("device: cuda was asked for but torch sees no CUDA GPU (a CPU-only torch build?)")
    if name == "mps" and not has_mps():
        raise ModelError("device: mps was asked for but this torch has no Apple MPS backend")
    return torch.device(name)


def _frozen(model, device, dtype):
    """Inference copies: eval mode, no gradients; stored fp32, cast only when asked."""
    import torch

    model.requires_grad_(False)
    if dtype is not None and dtype != torch.float32:
        model.to(dtype=dtype)
    return model.to(device=device).eval()


# Loaders: ``dtype=None`` means fp32 (torch is not imported at module level to name it).
# Attention stays diffusers'/transformers' default, PyTorch SDPA.

def load_vae(model_dir: Path, device="cpu", dtype=None):
    from diffusers import AutoencoderKL

    _offline()
    return _frozen(AutoencoderKL.from_pretrained(str(model_dir), subfolder="vae", local_files_only=True), device, dtype)


def load_unet(model_dir: Path, device="cpu", dtype=None):
    from diffusers import UNet2DConditionModel

    _offline()
    unet = UNet2DConditionModel.from_pretrained(str(model_dir), subfolder="unet", local_files_only=True)
    return _frozen(unet, device, dtype)


def load_text_encoder(model_dir: Path, device="cpu", dtype=None):
    from transformers import CLIPTextModel

    _offline()
    te = CLIPTextModel.from_pretrained(str(model_dir), subfolder="text_encoder", local_files_only=True)
    return _frozen(te, device, dtype)


def load_tokenizer(model_dir: Path, device=None, dtype=None):
    """The CLIP tokenizer (``device``/``dtype`` accepted for a uniform loader signature, unused)."""
    from transformers import CLIPTokenizer

    _offline()
    return CLIPTokenizer.from_pretrained(str(model_dir), subfolder="tokenizer", local_files_only=True)


def load_noise_scheduler(model_dir: Path, device=None, dtype=None):
    """The training noise schedule: a DDPMScheduler built from ``scheduler/`` (whatever class is saved there)."""
    from diffusers import DDPMScheduler

    _offline()
    return DDPMScheduler.from_pretrained(str(model_dir), subfolder="scheduler", local_files_only=True)


def load_sampling_scheduler(model_dir: Path):
    """The scheduler saved with the model, as its own class: what ``load_pipeline`` gives a pipeline."""
    import json

    import diffusers

    _offline()
    cls_name = json.loads((Path(model_dir) / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    return getattr(diffusers, cls_name).from_pretrained(str(model_dir), subfolder="scheduler", local_files_only=True)


def load_pipeline(model_dir: Path, device="cpu", dtype=None):
    """A StableDiffusionPipeline for sampling, safety checker off, every model frozen."""
    from diffusers import StableDiffusionPipeline

    _offline()
    pipe = StableDiffusionPipeline.from_pretrained(
        str(model_dir), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        _frozen(part, device, dtype)
    return pipe.to(device)
