"""Base models: the built-in tiny models, diffusers folders, single-file checkpoints,
identities and loaders: what is the same for every model family. What differs (configs,
how a tiny model is built, which pipeline class converts a single file, text encoder
classes) each family answers (``lorabuild/families/``).

Offline by design: every loader passes ``local_files_only=True``, and a built-in model
is written once as a real diffusers folder and then loaded through the same code path
as any user's folder. A single-file checkpoint (the .safetensors most users have) is
converted once, with the configs that ship in ``lorabuild/data/configs/``, into a
diffusers folder under ``cache/models/single-file/`` (in the file's own precision), keyed
on the file's sha256: every stage then loads it as fast as any folder, and touching the
file without changing its bytes changes nothing. No torch/diffusers import at module level: this module is
imported when doit loads the task graph.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from .families import FAMILIES, builtin_family, builtin_models, detect, detect_checkpoint, family, family_of
from .precision import to_device  # noqa: F401 - the trainer and benches read it here
from .families.base import CONFIGS_DIR, TOKENIZER_DIR  # noqa: F401 - CONFIGS_DIR: scripts and tests read it here
from .families.t5_tokenizers import KEY as T5_KEY, install as install_tokenizer
from .errors import ModelError  # its home is errors.py (folders.py raises it too); callers read it here
from . import separate
from .checkpoints import PICKLE_SUFFIXES, checkpoint_tensors, offline, pickle_state_dict  # noqa: F401 - read here by config, importers, bench
from .folders import atomic_dir, link_tree
from .resources import DATA_DIR

BUILTIN_MODELS = builtin_models()  # tiny-sd1, tiny-sd2, tiny-sdxl, world-sd1: each family's
SHIPPED_DIR = DATA_DIR / "models"  # pretrained built-ins (fp16), each with the record of the run that made it
SHIPPED_RECORD = "pretrain.json"  # recipe, figures and sha256 of every file, written by scripts/pretrain_world.py
BUILTIN_VERSION = 1  # bump when a builtin model's configs or init change: stale folders are rebuilt
BUILTIN_MARKER = "lorabuild_builtin.json"  # {"name", "version"} inside a built-in model's folder
COMPONENTS = ("unet", "vae", "text_encoder")
ARCHS = tuple(FAMILIES)  # sd1, sd2, sdxl: the model families (lorabuild/families/)
CONVERT_VERSION = 1  # bump when the conversion of single files changes: they are converted again
# project keys beside base_model that decide which model a project trains on
MODEL_OPTIONS = ("model_type", "prediction_type", "base_model_config", "vae", "allow_pickle")
# the separate files of a FLUX.1 / SD 3.5 single file (separate.py): not among the stages' parameters (adding
# one would rerun every existing task once); their files are the stages' file_deps instead (stages/spec.py)
PART_OPTIONS = ("text_encoders",)
DEVICES = ("auto", "cpu", "cuda", "mps")


def world_pipeline(src: Path):
    """A pretrained built-in (``lorabuild/data/models/<name>``) as an SD1 pipeline in fp32 (scripts/ and bench/ use it)."""
    return family("sd1").load_shipped(src)


def _shipped_digest(name: str) -> str | None:
    """sha256 of a pretrained built-in's record (which lists its files' hashes): new weights, new folder."""
    record = SHIPPED_DIR / name / SHIPPED_RECORD
    return hashlib.sha256(record.read_bytes()).hexdigest() if record.is_file() else None


def _add_slow_tokenizer_files(folder: Path) -> None:
    # transformers 5 saves only tokenizer.json; transformers 4's slow CLIPTokenizer (the
    # class model_index.json names) needs vocab.json + merges.txt, as in SD 1.5's folder.
    index = _read_json(folder / "model_index.json", {})
    for tok in ("tokenizer", "tokenizer_2"):
        if (folder / tok).is_dir() and index.get(tok, [None, "CLIPTokenizer"])[1] == "CLIPTokenizer":
            for fname in ("vocab.json", "merges.txt"):
                if not (folder / tok / fname).is_file():
                    shutil.copyfile(TOKENIZER_DIR / fname, folder / tok / fname)


def _write_builtin(name: str, folder: Path) -> None:
    import torch

    offline()
    # fork_rng: a fixed seed for a reproducible init without moving the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        fam = builtin_family(name)
        if name in fam.tiny_models:
            pipe = fam.build_tiny(name)
        elif _shipped_digest(name):
            pipe = fam.load_shipped(SHIPPED_DIR / name)
        else:
            raise ModelError(f"built-in model 'builtin:{name}': its weights are missing from {SHIPPED_DIR / name} "
                             "(scripts/pretrain_world.py writes them)")
    pipe.save_pretrained(str(folder), safe_serialization=True)
    _add_slow_tokenizer_files(folder)
    marker = {"name": name, "version": BUILTIN_VERSION}
    if _shipped_digest(name):
        marker["source"] = _shipped_digest(name)
    marker = json.dumps(marker) + "\n"
    (folder / BUILTIN_MARKER).write_text(marker, encoding="utf-8")


def _builtin_ok(folder: Path) -> bool:
    marker = _read_json(folder / BUILTIN_MARKER)
    ok = isinstance(marker, dict) and marker.get("version") == BUILTIN_VERSION
    ok = ok and marker.get("source") == _shipped_digest(folder.name)  # shipped weights replaced: rebuild
    return ok and (folder / "model_index.json").is_file()


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
    with atomic_dir(folder, _builtin_ok, f"the built-in model builtin:{name}") as tmp:
        _write_builtin(name, tmp)
    return folder


def resolve_base_model(spec: str, project_root: Path, cache_root: Path, opts: dict | None = None,
                       hashes=None) -> Path:
    """The diffusers folder that ``base_model: spec`` names, as lorabuild uses it.

    Built-in models are written first; a single-file checkpoint is converted once (see the
    module docstring); ``opts`` (the project's ``model_type``, ``prediction_type``,
    ``base_model_config``, ``vae``, ``allow_pickle``) apply on top. A relative path is taken
    from the project file's folder, so a project can be built from any working directory.
    """
    opts = dict(opts or {})
    if any((opts.get("text_encoders") or {}).values()) and (spec.startswith("builtin:") or not (
            Path(project_root) / Path(spec).expanduser()).is_file()):
        raise ModelError("text_encoders: separate text encoder files go with a FLUX.1 or SD 3.5 single-file base_model; "
                         f"{spec} has its own")
    if spec.startswith("builtin:"):
        folder = ensure_builtin(spec.split(":", 1)[1], cache_root)
    else:
        path = (Path(project_root) / Path(spec).expanduser()).resolve()
        if path.is_file():
            folder = _single_file(path, Path(project_root), Path(cache_root), opts, hashes)
        elif not path.is_dir():
            raise ModelError(f"{path} does not exist")
        else:
            folder = _diffusers_folder(path)
    return _compose(folder, Path(project_root), Path(cache_root), opts, hashes)


def _diffusers_folder(path: Path) -> Path:
    index = _read_json(path / "model_index.json")
    if not isinstance(index, dict):
        raise ModelError(f"{path} is not a diffusers model folder: model_index.json is missing or unreadable")
    # Only the parts lorabuild loads: a folder whose safety_checker/ was deleted is fine.
    needed = ("unet", "transformer", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2",
              "text_encoder_3", "tokenizer_3")
    missing = [c for c in needed if _listed(index, c) and not (path / c).is_dir()]
    if missing:
        folders = ", ".join(c + "/" for c in missing)
        raise ModelError(f"{path} is an incomplete diffusers model folder: missing {folders}")
    return path


def _sha256(path: Path, cache_root: Path, hashes) -> str:
    """A file's sha256 through ``hashes`` (a FileHashes), or the workspace's own memo, saved, when none is given."""
    from .cache import FileHashes

    if hashes is not None:
        return hashes.sha256(path)
    own = FileHashes(Path(cache_root) / "hashes.json")
    digest = own.sha256(path)
    own.save()
    return digest


def _still(path: Path, sha: str) -> None:
    """Check that a file converted under the key of its sha256 still has those bytes: a
    checkpoint rewritten while it was converted must not leave new weights under the old
    file's key. Converting reads the file through diffusers, so it cannot be decoded from the
    bytes hashed; hashing it again afterwards costs one more read, once per conversion."""
    with open(path, "rb") as fh:
        if hashlib.file_digest(fh, "sha256").hexdigest() != sha:
            raise ModelError(f"{path} changed while it was being converted; run the build again once it is written")


def legacy_hash(path: Path) -> str:
    """A1111's old 8-hex model hash (kohya ``model_hash``): sha256 of the 64 KiB at offset 1 MiB."""
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]


def checkpoint_arch(tensors: dict) -> str | None:
    """sd1 / sd2 / sdxl from a single file's keys: which text encoder it carries (CLIP ViT-L,
    OpenCLIP, or SDXL's conditioner), else the UNet's cross-attention width (each family's facts)."""
    return detect_checkpoint(tensors)


# Marker tensors a checkpoint carries to say how it was trained (NoobAI-XL V-pred and other
# SDXL fine-tunes); ComfyUI reads the same two (comfy/supported_models.py, SDXL.model_type
# @a125cd8): ``v_pred`` → v-prediction, and with it ``ztsnr`` → the zero-terminal-SNR schedule.
MARKERS = {"v_pred": "v-prediction", "ztsnr": "zero terminal SNR"}


def checkpoint_markers(tensors: dict, arch: str | None, opts: dict) -> dict:
    """What the marker keys of a single file's ``tensors`` decide, given the project's ``opts``:
    {"prediction_type": ... (only when ``prediction_type: auto``), "zero_terminal_snr": bool,
    "why": [a line per decision, for ``plan``]}. SDXL only, as ComfyUI reads them."""
    out: dict = {"zero_terminal_snr": False, "why": []}
    if arch not in FAMILIES or not family(arch).reads_checkpoint_markers or "v_pred" not in tensors:
        return out
    if opts.get("prediction_type", "auto") == "auto":
        out["prediction_type"] = "v_prediction"
        out["why"].append("v-prediction: the checkpoint has a v_pred key (set prediction_type: epsilon to override)")
    else:
        out["why"].append(f"the checkpoint has a v_pred key, but prediction_type: {opts['prediction_type']} is set")
    if "ztsnr" in tensors:
        out["zero_terminal_snr"] = True
        out["why"].append("zero terminal SNR: the checkpoint has a ztsnr key (the noise schedule is rescaled for "
                          "training, and samplers step from the last timestep)")
    return out


def single_file_markers(spec: str, project_root: Path, opts: dict) -> list[str]:
    """The lines ``plan`` prints about a single-file base model's marker keys (none for a folder,
    a built-in model, or a file that cannot be read: the build reports that)."""
    if spec.startswith("builtin:"):
        return []
    path = (Path(project_root) / Path(spec).expanduser()).resolve()
    if not path.is_file():
        return []
    if path.suffix.lower() != ".safetensors":
        return []  # a pickle is read only by the build (weights_only), never to make a plan
    try:  # the header alone, without torch: ``plan`` loads no model
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n)) if n <= 100 << 20 else {}  # safetensors' own header limit
        tensors = {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    arch = opts.get("model_type") if opts.get("model_type", "auto") != "auto" else checkpoint_arch(tensors)
    return checkpoint_markers(tensors, arch, opts)["why"]


def _config_dir(opts: dict, arch: str, project_root: Path, keys=()) -> Path:
    if opts.get("base_model_config"):
        cfg = (project_root / Path(opts["base_model_config"]).expanduser()).resolve()
        if not (cfg / "model_index.json").is_file():
            raise ModelError(f"base_model_config: {cfg} is not a diffusers model folder (no model_index.json)")
        return cfg
    return family(arch).checkpoint_configs(keys)


def _tree_digest(folder: Path) -> str:
    """sha256 over a folder's JSON configs (no weights): a config's part in a cache key."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).rglob("*.json")):
        if f.name != BUILTIN_MARKER and f.stat().st_size < 1 << 20:
            h.update(f.relative_to(folder).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _marker_ok(folder: Path) -> bool:
    marker = _read_json(folder / BUILTIN_MARKER)
    return isinstance(marker, dict) and (folder / "model_index.json").is_file()


def _single_file(path: Path, project_root: Path, cache_root: Path, opts: dict, hashes) -> Path:
    """Convert a single-file checkpoint once into a diffusers folder under cache/models/single-file/."""
    tensors = checkpoint_tensors(path, bool(opts.get("allow_pickle")))
    detected = checkpoint_arch(tensors)
    arch = opts.get("model_type") if opts.get("model_type", "auto") != "auto" else detected
    if arch is None:
        names = list(FAMILIES)
        raise ModelError(f"{path}: cannot tell {' / '.join(n.upper() for n in names)} from its keys (no known text "
                         f"encoder or UNet layout); set model_type: {', '.join(names[:-1])} or {names[-1]}")
    if separate.needs_parts(family(arch), tensors, opts):
        return _from_parts(path, tensors, family(arch), project_root, cache_root, opts, hashes)
    if any((opts.get("text_encoders") or {}).values()):
        raise ModelError(f"text_encoders: {path.name} is a {family(arch).title} checkpoint, which holds its own text "
                         "encoders; separate files go with a FLUX.1 or SD 3.5 single file")
    if not family(arch).single_file:
        raise ModelError(f"{path}: a {family(arch).title} single file cannot be a base_model yet (its text encoders and "
                         "VAE are separate files); use the model's diffusers folder")
    cfg_dir = _config_dir(opts, arch, project_root, tensors.keys())
    marked = checkpoint_markers(tensors, arch, opts)
    pred = marked.get("prediction_type", opts.get("prediction_type", "auto"))
    if pred == "auto":  # a single file has no scheduler config: the shipped one's (SD2 → 768-v, as diffusers)
        pred = _config(cfg_dir, "scheduler").get("prediction_type", "epsilon")
    ztsnr = marked["zero_terminal_snr"]
    sha = _sha256(path, cache_root, hashes)
    unet_dtypes = [d for k, (_, d) in sorted(tensors.items()) if k.startswith("model.diffusion_model.")]
    dtype = unet_dtypes[0] if unet_dtypes else "F32"
    key = {"sha256": sha, "arch": arch, "prediction_type": pred, "config": _tree_digest(cfg_dir),
           "v": CONVERT_VERSION, **({"ztsnr": True} if ztsnr else {}),
           **(T5_KEY if "T5EncoderModel" in map(family(arch).text_encoder_class, family(arch).text_parts) else {})}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_root / "models" / "single-file" / f"{path.stem[:40]}-{digest}"
    if _marker_ok(folder):
        return folder
    with atomic_dir(folder, _marker_ok, f"the diffusers conversion of {path.name}") as tmp:
        _convert(path, cfg_dir, arch, pred, dtype, tmp, bool(opts.get("allow_pickle")), ztsnr)
        _still(path, sha)
        marker = {"name": "single-file", "source": str(path), "sha256": sha, "legacy_hash": legacy_hash(path),
                  "arch": arch, "prediction_type": pred, "detected": detected, "v": CONVERT_VERSION}
        (tmp / BUILTIN_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    return folder


def _from_parts(path: Path, tensors: dict, fam, project_root: Path, cache_root: Path, opts: dict, hashes) -> Path:
    """A FLUX.1 / SD 3.5 file with its VAE and text encoders from separate files (separate.py),
    converted once into one folder keyed on every file's sha256. The VAE file is taken here, so
    ``opts`` (resolve_base_model's own copy) loses ``vae`` and no composed folder repeats it."""
    parts = separate.part_files(fam, tensors, path, opts, project_root)
    opts.pop("vae", None)
    cfg_dir = _config_dir(opts, fam.name, project_root, tensors.keys())
    files = {"vae": parts["vae"], **{f"text_encoders.{n}": p for n, p in parts["text_encoders"].items()}}
    shas = {field: _sha256(p, cache_root, hashes) for field, p in files.items() if p is not None}
    sha = _sha256(path, cache_root, hashes)
    key = {"sha256": sha, "parts": shas, "arch": fam.name, "config": _tree_digest(cfg_dir), "v": CONVERT_VERSION,
           **T5_KEY}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_root / "models" / "single-file" / f"{path.stem[:40]}-{digest}"
    if _marker_ok(folder):
        return folder
    with atomic_dir(folder, _marker_ok, f"the diffusers conversion of {path.name} and its parts") as tmp:
        separate.convert(fam, path, parts, cfg_dir, tmp, _copy_configs)
        _add_slow_tokenizer_files(tmp)
        for field, p in [("base_model", path), *((f, p) for f, p in files.items() if p is not None)]:
            _still(p, shas.get(field, sha))
        marker = {"name": "single-file", "source": str(path), "sha256": sha, "legacy_hash": legacy_hash(path),
                  "arch": fam.name, "prediction_type": "auto", "detected": fam.name, "v": CONVERT_VERSION,
                  "vae": str(parts["vae"]) if parts["vae"] else None, "vae_sha256": shas.get("vae"),
                  "vae_legacy_hash": legacy_hash(parts["vae"]) if parts["vae"] else None,
                  "parts": {field: {"path": str(p), "sha256": shas[field]} for field, p in files.items() if p}}
        (tmp / BUILTIN_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    return folder


def _copy_configs(cfg_dir: Path, fam, work: Path) -> None:
    """``cfg_dir``'s configs (no weights) into ``work``, with lorabuild's tokenizer files where it has none."""
    shutil.copytree(cfg_dir, work, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.ckpt", BUILTIN_MARKER))
    for tok in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        if _listed(_read_json(work / "model_index.json"), tok) and not any(
                (work / tok / f).is_file() for f in ("vocab.json", "tokenizer.json", "spiece.model")):
            te_config = _read_json(work / tok.replace("tokenizer", "text_encoder") / "config.json", {})
            install_tokenizer(fam.tokenizer_source(tok, te_config), work / tok)
            if fam.pads_with_bang(tok):  # OpenCLIP's tokenizer pads with "!"
                tc = _read_json(work / tok / "tokenizer_config.json", {})
                (work / tok / "tokenizer_config.json").write_text(json.dumps({**tc, "pad_token": "!"}, indent=2))


def _convert(path: Path, cfg_dir: Path, arch: str, pred: str, dtype: str, out: Path, allow_pickle: bool,
             ztsnr: bool = False) -> None:
    import torch

    offline()
    fam = family(arch)
    work = out.with_name(out.name + "-config")
    try:
        _copy_configs(cfg_dir, fam, work)  # the configs diffusers reads, our tokenizer files; then the prediction type
        sched = _read_json(work / "scheduler" / "scheduler_config.json")
        # a ztsnr checkpoint: the rescaled betas (training's DDPMScheduler and the samplers read them), and
        # sampling from the last timestep, which only then is pure noise (Lin et al. 2024, arXiv:2305.08891 §3.3)
        zsnr = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if ztsnr else {}
        (work / "scheduler" / "scheduler_config.json").write_text(json.dumps({**sched, "prediction_type": pred, **zsnr}))
        src = path
        if path.suffix.lower() in PICKLE_SUFFIXES:  # weights_only-loaded tensors, re-saved for diffusers' reader
            from safetensors.torch import save_file

            src = work / "checkpoint.safetensors"
            save_file({k: v.contiguous().clone() for k, v in pickle_state_dict(path).items()}, str(src))
        torch_dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "float16": torch.float16,
                       "torch.float16": torch.float16, "torch.bfloat16": torch.bfloat16}.get(dtype, torch.float32)
        try:
            pipe = fam.from_single_file(str(src), str(work), torch_dtype)
        except Exception as exc:  # diffusers raises ValueError/KeyError/RuntimeError on a mismatched layout
            raise ModelError(f"{path} cannot be read as an {arch.upper()} checkpoint with the configs in "
                             f"{cfg_dir} ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); if it is a "
                             "different architecture set model_type, or point base_model_config at a diffusers "
                             "folder whose configs match it") from None
        pipe.save_pretrained(str(out), safe_serialization=True)
        # the pipeline's tensors may still map work/checkpoint.safetensors, and Windows cannot
        # delete a mapped file: drop them before the temp folder goes (a leftover: `lorabuild gc`)
        del pipe
        _add_slow_tokenizer_files(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _compose(folder: Path, project_root: Path, cache_root: Path, opts: dict, hashes) -> Path:
    """``folder`` with a separate VAE (``vae:``) and/or another prediction type: a folder under
    cache/models/composed/ whose other components link to the original's (no copies)."""
    vae = opts.get("vae")
    pred = opts.get("prediction_type", "auto")
    own_pred = _config(folder, "scheduler").get("prediction_type", "epsilon")
    if not vae and pred in ("auto", own_pred):
        return folder
    key = {"base": str(folder), "prediction_type": pred, "v": CONVERT_VERSION}
    vae_path = None
    if vae:
        vae_path = (project_root / Path(vae).expanduser()).resolve()
        if not vae_path.exists():
            raise ModelError(f"vae: {vae_path} does not exist")
        if vae_path.is_file():
            key["vae"] = _sha256(vae_path, cache_root, hashes)
        else:
            vdir = vae_path if (vae_path / "config.json").is_file() else vae_path / "vae"
            if not (vdir / "config.json").is_file():
                raise ModelError(f"vae: {vae_path} is neither a VAE folder (config.json) nor a model folder with vae/")
            vae_path = vdir
            key["vae"] = str(vdir)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    out = cache_root / "models" / "composed" / digest
    if _marker_ok(out):
        return out
    what = f"{folder.name} with {'vae: ' + str(vae_path) if vae_path else 'prediction_type: ' + pred}"
    with atomic_dir(out, _marker_ok, what) as tmp:
        tmp.mkdir()
        shutil.copyfile(folder / "model_index.json", tmp / "model_index.json")
        for part in sorted(p for p in folder.iterdir() if p.is_dir()):
            if part.name == "vae" and vae_path is not None:
                continue
            if part.name == "scheduler":
                shutil.copytree(part, tmp / "scheduler")
                cfg = _config(tmp, "scheduler")
                if pred != "auto":
                    cfg["prediction_type"] = pred
                (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg, indent=2))
                continue
            link_tree(part, tmp / part.name)
        if vae_path is not None and vae_path.is_dir():
            link_tree(vae_path, tmp / "vae")
        elif vae_path is not None:
            _convert_vae(vae_path, folder, tmp / "vae", bool(opts.get("allow_pickle")))
            _still(vae_path, key["vae"])
        marker = {"name": "composed", "base": str(folder), "vae": str(vae_path) if vae_path else None,
                  "vae_sha256": key.get("vae") if vae_path and vae_path.is_file() else None,
                  "vae_legacy_hash": legacy_hash(vae_path) if vae_path and vae_path.is_file() else None,
                  "prediction_type": pred}
        base_marker = _read_json(folder / BUILTIN_MARKER)
        if isinstance(base_marker, dict) and base_marker.get("name") == "single-file":
            marker.update(source=base_marker["source"], sha256=base_marker["sha256"],
                          legacy_hash=base_marker["legacy_hash"])
        (tmp / BUILTIN_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    return out


def _convert_vae(path: Path, base: Path, out: Path, allow_pickle: bool) -> None:
    """A VAE single file (original layout, e.g. vae-ft-mse-840000-ema-pruned.safetensors) as a diffusers vae/."""
    from diffusers import AutoencoderKL

    offline()
    tensors = checkpoint_tensors(path, allow_pickle)
    src = pickle_state_dict(path) if path.suffix.lower() in PICKLE_SUFFIXES else str(path)
    try:
        vae = AutoencoderKL.from_single_file(src, config=str(base), subfolder="vae", local_files_only=True)
    except Exception as exc:
        raise ModelError(f"vae: {path} cannot be read as a VAE for this model ({len(tensors)} tensors; "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None
    vae.save_pretrained(str(out), safe_serialization=True)


def source_info(model_dir: Path) -> dict:
    """What a converted or composed folder remembers of its origin (file hashes for the LoRA's metadata)."""
    marker = _read_json(Path(model_dir) / BUILTIN_MARKER)
    return marker if isinstance(marker, dict) else {}


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
    if component == "unet":  # the denoiser, whatever its folder (a flow model's transformer/)
        component = family_of(model_info(model_dir)).denoiser_part
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


def read_config(model_dir: Path, component: str) -> dict:
    """A component's JSON config (``unet``, ``transformer``, ``vae``, …, ``scheduler``)."""
    return _config(model_dir, component)


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
    vae, te, sched = _config(model_dir, "vae"), _config(model_dir, "text_encoder"), _config(model_dir, "scheduler")
    arch = detect({c for c in index if _listed(index, c)}, te).name
    return {
        "arch": arch,
        "prediction_type": sched.get("prediction_type", "epsilon"),
        "zero_terminal_snr": bool(sched.get("rescale_betas_zero_snr")),  # a ztsnr checkpoint's schedule
        "latent_scale": vae.get("scaling_factor", 0.18215),
        "latent_shift": vae.get("shift_factor"),  # FLUX.1's VAE: latents are (x − shift)·scale
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
    # fp32 unless asked: a folder saved in fp16 (a converted checkpoint) is not computed in fp16 by accident
    model.to(dtype=dtype or torch.float32)
    return model.to(device=device).eval()


# Loaders: ``dtype=None`` means fp32 (torch is not imported at module level to name it).
# Attention stays diffusers'/transformers' default, PyTorch SDPA.

def load_vae(model_dir: Path, device="cpu", dtype=None):
    from diffusers import AutoencoderKL

    offline()
    return _frozen(AutoencoderKL.from_pretrained(str(model_dir), subfolder="vae", local_files_only=True), device, dtype)


def load_unet(model_dir: Path, device="cpu", dtype=None):
    """The denoiser: the UNet, or a flow family's transformer (``Family.denoiser_part``/``denoiser_class``)."""
    import diffusers

    offline()
    fam = family_of(model_info(model_dir))
    unet = getattr(diffusers, fam.denoiser_class).from_pretrained(str(model_dir), subfolder=fam.denoiser_part,
                                                                  local_files_only=True)
    return _frozen(unet, device, dtype)


def load_text_encoder(model_dir: Path, device="cpu", dtype=None, which: str = "text_encoder"):
    """A text encoder of the model's family: ``text_encoder`` (CLIP), or SDXL's ``text_encoder_2`` (with its projection)."""
    import transformers

    offline()
    cls = getattr(transformers, family_of(model_info(model_dir)).text_encoder_class(which))
    te = cls.from_pretrained(str(model_dir), subfolder=which, local_files_only=True)
    return _frozen(te, device, dtype)


def load_tokenizer(model_dir: Path, device=None, dtype=None, which: str = "tokenizer"):
    """The CLIP tokenizer, SDXL's ``tokenizer_2``, FLUX's T5 one: the family's class (``device``/``dtype``:
    a uniform loader signature, unused)."""
    import transformers

    offline()
    cls = getattr(transformers, family_of(model_info(model_dir)).tokenizer_class(which))
    return cls.from_pretrained(str(model_dir), subfolder=which, local_files_only=True)


def text_parts(model_dir: Path) -> tuple[str, ...]:
    """The text encoders a model has: ("text_encoder",) or SDXL's ("text_encoder", "text_encoder_2")."""
    index = _read_json(Path(model_dir) / "model_index.json", {})
    return tuple(p for p in family_of(model_info(model_dir)).text_parts if _listed(index, p)) or ("text_encoder",)


NOISE_KEYS = ("prediction_type", "beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "trained_betas",
              "rescale_betas_zero_snr", "timestep_spacing", "steps_offset")


def noise_schedule(model_dir: Path) -> dict:
    """The parts of the scheduler config that shape training (a cache-key input beside the UNet's identity)."""
    cfg = _config(model_dir, "scheduler")
    return {k: cfg[k] for k in NOISE_KEYS if k in cfg}


def load_noise_scheduler(model_dir: Path, device=None, dtype=None):
    """The training noise schedule: a DDPMScheduler built from ``scheduler/`` (whatever class is saved there)."""
    from diffusers import DDPMScheduler

    offline()
    return DDPMScheduler.from_pretrained(str(model_dir), subfolder="scheduler", local_files_only=True)


def load_sampling_scheduler(model_dir: Path):
    """The scheduler saved with the model, as its own class: what ``load_pipeline`` gives a pipeline."""
    import json

    import diffusers

    offline()
    cls_name = json.loads((Path(model_dir) / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    return getattr(diffusers, cls_name).from_pretrained(str(model_dir), subfolder="scheduler", local_files_only=True)


def load_pipeline(model_dir: Path, device="cpu", dtype=None):
    """The sampling pipeline of the folder's family (SD or SDXL), safety checker off, every model frozen."""
    offline()
    fam = family_of(model_info(model_dir))
    pipe = fam.from_pretrained(model_dir)
    for part in (getattr(pipe, fam.denoiser_part), pipe.vae, *fam.encoders_of(pipe)):
        _frozen(part, device, dtype)
    return pipe.to(device)
