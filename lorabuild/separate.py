"""Base models from separate files: a FLUX.1 or SD 3.5 single file that holds the denoiser (and
maybe its VAE) plus the VAE and text encoders as files of their own, the way ComfyUI, Forge and
kohya's ``flux_train_network.py`` / ``sd3_train_network.py`` users keep them (``flux1-dev.safetensors``
+ ``ae.safetensors`` + ``clip_l.safetensors`` + ``t5xxl_fp16.safetensors``; ``sd3.5_large.safetensors``
+ ``clip_l`` / ``clip_g`` / ``t5xxl``). The project names them with ``vae:`` and
``text_encoders: {clip_l, clip_g, t5xxl}`` (kohya's ``--ae``, ``--clip_l``, ``--clip_g``, ``--t5xxl``).

They are converted once, together, into one diffusers folder under ``cache/models/single-file/``
keyed on every file's sha256, the architecture and the configs (``models._single_file``), as a
single SD file is. A part the main file carries itself is read from it (ComfyUI's bundled FLUX
"checkpoint": ``vae.``, ``text_encoders.clip_l.transformer.``, …; SAI's ``first_stage_model.``),
a separate file taking precedence. Each text encoder file is checked against the model's config
before anything heavy is read: its kind (CLIP or T5, by its keys) and width (by its token
embedding), so a CLIP-G given as ``clip_l`` is an error naming the field.

Precision: each part is saved in its file's own dtype (fp16, bf16, fp32); fp8 files (e4m3fn,
e5m2; ``t5xxl_fp8_e4m3fn.safetensors`` is common) are upcast to bf16 on load, exactly (every fp8
value is a bf16 value). ComfyUI's "scaled" fp8 files (a ``scaled_fp8`` key and per-weight
``scale_weight``) are refused by name: their weights are not the stored numbers.

No torch import at module level (doit imports models, which imports this).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .checkpoints import checkpoint_tensors, offline
from .errors import ModelError

FP8 = ("F8_E4M3", "F8_E5M2", "float8_e4m3fn", "float8_e5m2")
KINDS = {"clip": "a CLIP text encoder", "t5": "a T5 encoder"}
# real widths, to name a wrong file: CLIP-L 768, CLIP-G 1280 (OpenCLIP bigG), T5-XXL 4096
KNOWN_WIDTHS = {("clip", 768): "CLIP-L", ("clip", 1280): "CLIP-G", ("t5", 4096): "T5-XXL", ("t5", 768): "T5-base"}
# where a bundled checkpoint keeps each text encoder (ComfyUI's and SAI's prefix)
BUNDLED = "text_encoders.{}.transformer."


def header(path: Path) -> dict:
    """{key: (shape, dtype)} from a safetensors header, or a ModelError naming the file."""
    return checkpoint_tensors(path, allow_pickle=False)


def needs_parts(fam, tensors: dict, opts: dict) -> bool:
    """Whether a single file of family ``fam`` is converted with separate files: it lacks a part it
    needs (its VAE or a text encoder), the project names some (``text_encoders:``), or it is BFL's
    FLUX.1 layout, which no diffusers pipeline reads; SD 1/2/XL files hold everything."""
    if not fam.separate_encoders:
        return False
    if any((opts.get("text_encoders") or {}).values()):
        return True
    keys = tensors.keys()
    has_vae = any(k.startswith(("first_stage_model.", "vae.")) for k in keys)
    has_tes = all(any(k.startswith(BUNDLED.format(n)) for k in keys) for n in fam.separate_encoders)
    return not (has_vae and has_tes) or fam.denoiser_reader == "bfl"


def part_files(fam, tensors: dict, main: Path, opts: dict, project_root: Path) -> dict:
    """{"vae": path or None, "text_encoders": {name: path or None}}: where each part comes from
    (None: the main file), every path resolved from the project's folder and checked to exist;
    a part neither the main file nor the project gives is an error naming the field."""
    keys = tensors.keys()
    out = {"vae": None, "text_encoders": {}}
    given = opts.get("text_encoders") or {}
    unknown = sorted(set(given) - set(fam.separate_encoders))
    if unknown:
        raise ModelError(f"text_encoders.{unknown[0]}: a {fam.title} model has no such text encoder "
                         f"(it takes {', '.join(fam.separate_encoders)})")
    for name in fam.separate_encoders:
        if given.get(name):
            out["text_encoders"][name] = _existing(project_root, given[name], f"text_encoders.{name}")
        elif any(k.startswith(BUNDLED.format(name)) for k in keys):
            out["text_encoders"][name] = None
        else:
            flag = f"--{name}"
            raise ModelError(f"text_encoders.{name}: {main.name} holds no {name} text encoder; name its file, "
                             f"e.g. text_encoders: {{{name}: {name}.safetensors}} (kohya: {flag})")
    if opts.get("vae"):
        out["vae"] = _existing(project_root, opts["vae"], "vae")
    elif not any(k.startswith(("first_stage_model.", "vae.")) for k in keys):
        raise ModelError(f"vae: {main.name} holds no VAE; name its file, e.g. vae: ae.safetensors "
                         "(the FLUX.1 VAE; kohya: --ae)" if fam.name == "flux" else
                         f"vae: {main.name} holds no VAE; name its file (kohya: --vae)")
    return out


def _existing(project_root: Path, value: str, field: str) -> Path:
    path = (Path(project_root) / Path(value).expanduser()).resolve()
    if not path.is_file():
        raise ModelError(f"{field}: {path} does not exist" if not path.exists() else
                         f"{field}: {path} is not a file (a .safetensors text encoder or VAE)")
    return path


def encoder_kind(tensors: dict, prefix: str = "") -> tuple[str | None, int | None]:
    """("clip" | "t5" | None, width) of a text encoder's tensors (under ``prefix``): CLIP by its
    ``encoder.layers.`` and token embedding, T5 by ``encoder.block.`` and ``shared``."""
    keys = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    plain = {k.removeprefix("text_model."): v for k, v in keys.items()}
    if "embeddings.token_embedding.weight" in plain and any(k.startswith("encoder.layers.") for k in plain):
        return "clip", plain["embeddings.token_embedding.weight"][0][1]
    if "shared.weight" in keys and any(k.startswith("encoder.block.") for k in keys):
        return "t5", keys["shared.weight"][0][1]
    return None, None


def check_encoder(field: str, tensors: dict, prefix: str, kind: str, width: int, source: str) -> None:
    """A ModelError naming ``field`` when ``tensors`` are not a ``kind`` encoder ``width`` wide."""
    if "scaled_fp8" in tensors or any(k.endswith(".scale_weight") for k in tensors):
        raise ModelError(f"{field}: {source} is a ComfyUI 'scaled fp8' file (weights × scale_weight); use the "
                         "plain fp16 or fp8_e4m3fn file")
    got, got_width = encoder_kind(tensors, prefix)
    want = KNOWN_WIDTHS.get((kind, width), f"{KINDS[kind]} {width} wide")
    if got is None:
        raise ModelError(f"{field}: {source} is not a text encoder file (no CLIP or T5 keys); it needs {want}")
    if got != kind or got_width != width:
        what = KNOWN_WIDTHS.get((got, got_width), f"{KINDS[got]} {got_width} wide")
        raise ModelError(f"{field}: {source} is {what}, but this model's {field.rsplit('.', 1)[-1]} is {want}")


def load_dtype(dtypes, torch):
    """The dtype a part is kept in: its file's, fp8 upcast to bf16 (exact), anything else fp32."""
    names = {str(d).removeprefix("torch.") for d in dtypes}
    table = {"F16": torch.float16, "float16": torch.float16, "BF16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if names & set(FP8):
        return torch.bfloat16
    found = [table[n] for n in sorted(names) if n in table]
    return found[0] if found else torch.float32


# keys a text encoder file may hold that its model does not use: a CLIP-L file's projection (FLUX
# takes the pooled output unprojected), CLIP's logit scale and position ids
UNUSED = ("text_projection.weight", "logit_scale", "position_ids")


def read_encoder(cls_name: str, config_dir: Path, path: Path, prefix: str):
    """A transformers text encoder (``cls_name``, its config in ``config_dir``) with the weights
    of ``path`` (under ``prefix``), built on the meta device so nothing is initialised twice;
    every weight of the model must be in the file (a CLIP-L file's extra ``text_projection``
    and a T5's missing tied ``encoder.embed_tokens`` are the known differences)."""
    import torch
    import transformers
    from safetensors import safe_open

    config = transformers.AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    with safe_open(str(path), "pt") as f:
        sd = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    dtype = load_dtype({t.dtype for t in sd.values()}, torch)
    with torch.device("meta"):
        model = getattr(transformers, cls_name)(config)
    wanted = {k.removeprefix("text_model."): k for k in model.state_dict()}
    got, extra = {}, []
    for k, v in sd.items():
        name = wanted.get(k.removeprefix("text_model."))
        if name is not None:
            got[name] = v.to(dtype)
        elif not k.endswith(UNUSED):
            extra.append(k)
    if extra:  # e.g. a 12-layer CLIP for a config of fewer: never load half of it
        raise ValueError(f"{len(extra)} weights this model's config has no place for, e.g. {extra[0]}")
    if "shared.weight" in got and "encoder.embed_tokens.weight" in wanted:
        got.setdefault("encoder.embed_tokens.weight", got["shared.weight"])  # tied: one tensor
    missing = sorted(set(wanted.values()) - set(got) - {k for k in wanted.values() if k.endswith("position_ids")})
    if missing:
        raise ValueError(f"{len(missing)} weights missing, e.g. {missing[0]}")
    model.load_state_dict(got, strict=False, assign=True)  # T5's embed_tokens is shared's module: one tensor
    return _materialized(model)


def _materialized(model):
    """``model`` with no tensor left on the meta device: CLIP's ``position_ids`` (a buffer no file
    holds) made as transformers makes it; any other is a weight the file lacked, an error."""
    import torch

    for name, buf in list(model.named_buffers()):
        if buf.is_meta and name.endswith("position_ids"):
            owner, _, last = name.rpartition(".")
            model.get_submodule(owner)._buffers[last] = torch.arange(buf.shape[-1]).expand(buf.shape).clone()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{len(left)} tensors missing, e.g. {left[0]}")
    return model


def read_flux_transformer(config_dir: Path, path: Path):
    """FLUX.1's transformer from BFL's layout (``flux1-dev.safetensors``, bare or under ComfyUI's
    ``model.diffusion_model.``): our reader (families/flux_checkpoint.py), because diffusers'
    hard-codes the real model's width (3072) and could not read any other."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors import safe_open

    from .families.flux_checkpoint import from_bfl

    config = FluxTransformer2DModel.load_config(str(config_dir), subfolder="transformer", local_files_only=True)
    with safe_open(str(path), "pt") as f:
        prefix = "model.diffusion_model." if any(k.startswith("model.diffusion_model.") for k in f.keys()) else ""
        sd = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)
              and k[len(prefix):].split(".", 1)[0] in BFL_TOP}
    dtype = load_dtype({t.dtype for t in sd.values()}, torch)
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    model.load_state_dict({k: v.to(dtype) for k, v in from_bfl(sd, config).items()}, strict=True, assign=True)
    return _materialized(model)


# BFL's top-level modules (a bundled checkpoint also holds vae. and text_encoders.)
BFL_TOP = {"double_blocks", "single_blocks", "time_in", "vector_in", "guidance_in", "txt_in", "img_in", "final_layer"}


def check_tokenizer(fam, work: Path, encoders: dict, field_of: dict) -> None:
    """A T5 needs a tokenizer with as many pieces as its embedding has rows (less T5's padding to 128):
    lorabuild ships T5 v1.1's (32 100 pieces, FLUX.1's and SD 3.5's) and the tiny models' one, so a T5
    of another vocabulary (an mT5 or UMT5, 250 k) is refused before any weights are read, saying what to pass."""
    for name, part in encoders.items():
        tok = part.replace("text_encoder", "tokenizer")
        cfg = json.loads((work / part / "config.json").read_text(encoding="utf-8"))
        if "d_model" not in cfg or (work / tok / "spiece.model").is_file() or not (work / tok / "tokenizer.json").is_file():
            continue  # a CLIP, or a tokenizer from a diffusers folder (base_model_config): T5's own
        vocab = json.loads((work / tok / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
        if not 0 <= cfg.get("vocab_size", 0) - len(vocab) < 128:  # T5's 100 extra ids and padding to 128
            raise ModelError(f"{field_of[name]}: a {cfg['vocab_size']}-token T5 needs a tokenizer lorabuild does "
                             f"not ship (it has T5 v1.1's, {len(vocab)} pieces here); set base_model_config to a "
                             f"diffusers {fam.title} folder (its configs and {tok}/ are read, no weights)")


def convert(fam, main: Path, parts: dict, cfg_dir: Path, out: Path, copy_configs) -> None:
    """Write the diffusers folder ``out`` from the main file and the separate ``parts``
    (:func:`part_files`): ``copy_configs(cfg_dir, fam, out)`` lays out every config and tokenizer
    first; every separate encoder file is checked (kind, width) before any weights are read; then
    each component is read and saved over its config folder."""
    import diffusers

    offline()
    copy_configs(cfg_dir, fam, out)
    encoders = dict(zip(fam.separate_encoders, fam.text_parts))
    check_tokenizer(fam, out, encoders, {n: f"text_encoders.{n}" for n in encoders})
    for name, part in encoders.items():
        if parts["text_encoders"][name] is not None:  # a single file's own encoders: one model, no check
            _check_file(f"text_encoders.{name}", parts["text_encoders"][name], out / part)
    for name, part in encoders.items():
        src = parts["text_encoders"][name]
        path, prefix = (src, "") if src is not None else (main, BUNDLED.format(name))
        try:
            model = read_encoder(fam.text_encoder_class(part), out / part, path, prefix)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise ModelError(f"text_encoders.{name}: {path} cannot be read as this model's {name} "
                             f"({str(exc).splitlines()[0][:200]})") from None
        _save(model, out / part)
    try:
        if fam.denoiser_reader == "bfl":
            model = read_flux_transformer(out, main)
        else:
            model = getattr(diffusers, fam.denoiser_class).from_single_file(
                str(main), config=str(out), subfolder=fam.denoiser_part, local_files_only=True)
            model.to(load_dtype({d for k, (_, d) in header(main).items() if k.startswith("model.diffusion_model.")},
                                _torch()))
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(f"{main} cannot be read as a {fam.title} {fam.denoiser_part} with the configs in {cfg_dir} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); if its shape differs, point "
                         "base_model_config at a diffusers folder whose configs match it") from None
    _save(model, out / fam.denoiser_part)
    _save(read_vae(parts["vae"] or main, out, own=parts["vae"] is None), out / "vae")


def _check_file(field: str, path: Path, config_dir: Path) -> None:
    """A separate encoder file against its part's config: CLIP or T5 as the config is, as wide."""
    cfg = json.loads((config_dir / "config.json").read_text(encoding="utf-8"))
    kind, width = ("t5", cfg["d_model"]) if "d_model" in cfg else ("clip", cfg["hidden_size"])
    try:
        tensors = header(path)
    except ModelError as exc:
        raise ModelError(f"{field}: {exc}") from None
    check_encoder(field, tensors, "", kind, width, str(path))


def read_vae(src: Path, config_dir: Path, own: bool):
    """The VAE of file ``src`` (ae.safetensors, or the main file's own ``first_stage_model.`` / ``vae.``
    when ``own``) through diffusers' reader, kept in its weights' dtype."""
    import diffusers

    try:
        vae = diffusers.AutoencoderKL.from_single_file(str(src), config=str(config_dir), subfolder="vae",
                                                       local_files_only=True)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(f"vae: {src} cannot be read as this model's VAE ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:300]})") from None
    dtypes = {d for k, (_, d) in header(src).items() if not own or k.startswith(("first_stage_model.", "vae."))}
    return vae.to(load_dtype(dtypes, _torch()))


def _torch():
    import torch

    return torch


def _save(model, folder: Path) -> None:
    """A component saved over its config folder (its own config.json, the weights beside it)."""
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(str(folder), safe_serialization=True)
