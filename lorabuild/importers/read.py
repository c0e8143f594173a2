"""Reading a kohya setup, whatever form it has, into kohya's own option names.

Told apart by content, not by name: a lora-scripts ``train.ps1`` / ``train.sh``, a saved
command line, an sd-scripts ``--config_file`` TOML (sections flattened as sd-scripts does),
a dataset config (``[general]`` / ``[[datasets]]`` / ``[[datasets.subsets]]``), and a
kohya_ss GUI preset or saved config (JSON, or the GUI's TOML), whose keys are renamed to the
sd-scripts options the GUI passes on; an ai-toolkit job YAML (``importers.aitoolkit``) and a
OneTrainer preset (``importers.onetrainer``).
"""
from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from .aitoolkit import from_aitoolkit, is_aitoolkit
from .common import ImportError_, Source
from .onetrainer import from_onetrainer, is_onetrainer
from .scripts import ScriptError, read_ps1, read_sh, shell_words


def parse_words(tokens: list[str]) -> dict:
    """``--key value`` / ``--key=value`` / ``--flag`` options after the training script; the script as ``_script``."""
    scripts = [i for i, t in enumerate(tokens) if t.lower().endswith(".py")]
    out: dict = {}
    if scripts:  # what comes before the script is the launcher's (accelerate's) own options
        out["_script"] = re.split(r"[\\/]", tokens[scripts[-1]])[-1]
        tokens = tokens[scripts[-1] + 1:]
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--"):
            key, eq, val = tok[2:].partition("=")
            if eq:
                out[key] = val
            else:
                vals = []
                while i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                    vals.append(tokens[i + 1])
                    i += 1
                out[key] = True if not vals else vals[0] if len(vals) == 1 else vals
        i += 1
    return out


def parse_command_line(text: str) -> dict:
    """The options of a saved kohya command line (bash, cmd and PowerShell continuations allowed)."""
    text = re.sub(r"[\\^`]\r?\n", " ", text)
    text = "\n".join(line.split(" #", 1)[0] if not line.lstrip().startswith("#") else "" for line in text.splitlines())
    return parse_words(shell_words(text))


# --- TOML configs: sd-scripts flattens every table into one namespace ------------------

# lora-scripts' GUI keeps its tagger's settings in the same file; sd-scripts never reads them
TOOL_SECTIONS = {"wd14_caption", "tagger", "interrogate", "caption", "tag"}


def flatten_sections(cfg: dict, src: Source) -> dict:
    """sd-scripts' ``read_config_from_file``: tables flattened, a later key over an earlier one.

    A clash is never silent: it is noted, and an empty value does not wipe out a set one.
    """
    flat: dict = {}
    where: dict = {}
    for section, value in cfg.items():
        items = value.items() if isinstance(value, dict) else [(section, value)]
        label = f"[{section}]" if isinstance(value, dict) else "the top level"
        if isinstance(value, dict) and section.lower() in TOOL_SECTIONS:
            src.unmapped += [f"[{section}] {k} = {v!r} (a tagger setting of the GUI, not a training option; "
                             f"see lorabuild's tagger section)" for k, v in value.items()]
            continue
        for k, v in items:
            if k in flat and flat[k] != v:
                if v in ("", None, []):
                    src.notes.append(f"{k} is {flat[k]!r} in {where[k]} and empty in {label}: the empty one is ignored")
                    continue
                src.notes.append(f"{k} is {flat[k]!r} in {where[k]} and {v!r} in {label}: the later one is used, "
                                 "as sd-scripts does")
            flat[k], where[k] = v, label
    return flat


def is_dataset_config(cfg: dict) -> bool:
    return isinstance(cfg.get("datasets"), list) or isinstance(cfg.get("general"), dict) and not any(
        isinstance(v, dict) for k, v in cfg.items() if k != "general")


# --- kohya_ss GUI presets and saved configs --------------------------------------------

GUI_MARKERS = {"LoRA_type", "max_resolution", "epoch", "optimizer", "lr_warmup", "additional_parameters",
               "model_list", "noise_offset_type", "lora_network_weights"}
# the GUI's own settings: where it writes, how it launches and logs; nothing about the LoRA trained
GUI_ONLY = {"model_list", "output_dir", "logging_dir", "log_tracker_name", "log_tracker_config", "use_wandb",
            "wandb_api_key", "wandb_run_name", "num_cpu_threads_per_process", "num_processes", "num_machines",
            "multi_gpu", "gpu_ids", "main_process_port", "dynamo_backend", "dynamo_mode", "dynamo_use_fullgraph",
            "dynamo_use_dynamic", "extra_accelerate_launch_args", "save_model_as", "save_state", "save_state_on_train_end",
            "save_last_n_steps_state", "save_last_n_epochs_state", "resume", "save_as_bool", "save_every_n_steps_state",
            "huggingface_repo_id", "huggingface_token", "huggingface_repo_type", "huggingface_repo_visibility",
            "huggingface_path_in_repo", "save_state_to_huggingface", "resume_from_huggingface", "async_upload",
            "max_data_loader_n_workers", "persistent_data_loader_workers", "cache_latents", "cache_latents_to_disk",
            "mem_eff_attn", "lowram", "highvram", "sdxl_cache_text_encoder_outputs", "sdxl_no_half_vae", "no_half_vae",
            "log_with", "log_prefix", "log_config", "metadata_author", "metadata_description", "metadata_license",
            "metadata_tags", "metadata_title", "sample_prompts_file", "train_on_input", "vae_dir", "dataset_dir",
            "save_to", "weighting_scheme", "full_fp16", "full_bf16", "fp8_base", "fp8_base_unet", "skip_cache_check",
            "mixed_precision_type", "accelerator", "stop_text_encoder_training_pct", "caption_metadata_filename"}
# LyCORIS algorithm options: only read by the GUI when LoRA_type is a LyCORIS one
LYCORIS_ONLY = {"factor", "use_cp", "use_tucker", "use_scalar", "decompose_both", "train_norm", "rank_dropout_scale",
                "constrain", "rescaled", "bypass_mode", "dora_wd", "LyCORIS_preset", "unit", "conv_dims", "conv_alphas",
                "dim_from_weights", "train_on_input"}
GUI_RENAMED = {"max_resolution": "resolution", "optimizer": "optimizer_type", "lora_network_weights": "network_weights"}
LOCON_TYPES = {"Kohya LoCon", "LyCORIS/LoCon"}
# the GUI's LyCORIS types lorabuild trains: launched as network_module lycoris.kohya, network_args algo=…
LYCORIS_ALGO = {"LyCORIS/LoHa": "loha", "LyCORIS/LoKr": "lokr", "LyCORIS/iA3": "ia3",
                "LyCORIS/Native Fine-Tuning": "full", "LyCORIS/Diag-OFT": "diag-oft"}
LYCORIS_ARGS = {"factor": "factor", "use_tucker": "use_tucker", "use_cp": "use_tucker", "use_scalar": "use_scalar",
                "decompose_both": "decompose_both", "rank_dropout_scale": "rank_dropout_scale", "dora_wd": "dora_wd",
                "constrain": "constraint", "rescaled": "rescaled", "train_on_input": "train_on_input",
                "train_norm": "train_norm"}


def is_gui_config(cfg: dict) -> bool:
    return len(GUI_MARKERS & set(cfg)) >= 2


def _empty(v) -> bool:
    return v in ("", None) or v == []


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return 0.0


def from_gui(cfg: dict, src: Source) -> dict:
    """A kohya_ss GUI config → the sd-scripts options the GUI would launch with."""
    out: dict = {}
    kind = str(cfg.get("LoRA_type", "Standard"))
    lycoris = kind.startswith("LyCORIS") and kind not in LOCON_TYPES
    dora = kind == "LyCORIS/LoCon" and str(cfg.get("dora_wd", "")).lower() in ("true", "1")  # LyCORIS' DoRA
    if kind not in ("Standard", *LOCON_TYPES, *LYCORIS_ALGO):
        src.unmapped.append(f"LoRA_type = {kind!r} (lorabuild trains LoRA, LoCon and LyCORIS' LoHa, LoKr, iA3, Native "
                            "Fine-Tuning and Diag-OFT: this imports as a LoRA of the same dim and alpha, which is a "
                            "different network)")
    empty = []
    for key, value in cfg.items():
        if key == "LoRA_type":
            continue
        if key in GUI_ONLY:
            src.gui_only.append(key)
        elif key in LYCORIS_ARGS and (kind in LYCORIS_ALGO or (dora and key == "dora_wd")):
            if not _empty(value):
                out.setdefault("network_args", []).append(f"{LYCORIS_ARGS[key]}={value}")
        elif key in ("conv_dim", "conv_alpha") and kind in LYCORIS_ALGO:
            if not _empty(value):
                out.setdefault("network_args", []).append(f"{key}={value}")
        elif key in LYCORIS_ONLY and not lycoris:
            src.gui_only.append(key)
        elif key in LYCORIS_ONLY and not _empty(value):
            src.unmapped.append(f"{key} = {value!r} (a {kind} option: the imported LoRA has none)")
        elif key in ("conv_dim", "conv_alpha") and kind not in LOCON_TYPES and not lycoris:
            src.gui_only.append(f"{key} (unused with LoRA_type {kind})")
        elif key in ("conv_dim", "conv_alpha") and lycoris and not _empty(value):
            src.unmapped.append(f"{key} = {value!r} ({kind}'s convolution setting: the imported LoRA has none)")
        elif _empty(value):
            empty.append(key)
        elif key in ("conv_dim", "conv_alpha", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
                     "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold"):
            out.setdefault("network_args", []).append(f"{key}={value}")
        elif key == "xformers":
            mode = str(value).lower()
            if mode in ("xformers", "true"):
                out["xformers"] = True
            elif mode == "sdpa":
                out["sdpa"] = True
        elif key == "sample_prompts":  # the GUI holds the prompts themselves, not a file
            out["_sample_prompt_lines"] = [ln.strip() for ln in str(value).splitlines() if ln.strip()]
        elif key == "additional_parameters":
            try:
                extra = parse_command_line(str(value))
            except ScriptError as exc:
                src.unmapped.append(f"additional_parameters = {value!r} (not understood: {exc})")
                continue
            out.update(extra)
            src.notes.append(f"additional_parameters read as command-line options: {', '.join(extra) or 'none'}")
        else:
            out[GUI_RENAMED.get(key, key)] = value
    if kind in LYCORIS_ALGO or dora:
        out["network_module"] = "lycoris.kohya"
        out.setdefault("network_args", []).insert(0, f"algo={LYCORIS_ALGO.get(kind, 'locon')}")
    src.empty = empty
    src.renamed = {**{v: k for k, v in GUI_RENAMED.items()}, "_sample_prompt_lines": "sample_prompts"}
    _gui_length(cfg, out, src)
    warm, warm_steps = _num(cfg.get("lr_warmup")), _num(cfg.get("lr_warmup_steps"))
    out.pop("lr_warmup", None)
    if warm_steps > 0:
        out["lr_warmup_steps"] = int(warm_steps)
    elif warm > 0:  # the GUI's lr_warmup is a percentage of all steps
        out["lr_warmup_steps"] = warm / 100
        src.renamed["lr_warmup_steps"] = f"lr_warmup {cfg['lr_warmup']}%"
    noise = str(cfg.get("noise_offset_type", "Original"))
    out.pop("noise_offset_type", None)
    drop = ("multires_noise_iterations", "multires_noise_discount") if noise == "Original" else ("noise_offset",)
    for k in drop:
        if k in out and _num(out.pop(k)):
            src.gui_only.append(f"{k} (unused with noise_offset_type {noise})")
    return out


def _gui_length(cfg: dict, out: dict, src: Source) -> None:
    """The GUI's epoch field is the length unless max_train_epochs or max_train_steps is given."""
    epochs, steps = _num(cfg.get("max_train_epochs")), _num(cfg.get("max_train_steps"))
    out.pop("epoch", None)
    if not epochs and not steps and _num(cfg.get("epoch")):
        out["max_train_epochs"] = int(_num(cfg["epoch"]))
        src.renamed["max_train_epochs"] = "epoch"
    elif _num(cfg.get("epoch")):
        src.notes.append(f"epoch = {cfg['epoch']} is not used: the GUI trains max_train_"
                         f"{'epochs' if epochs else 'steps'} = {cfg['max_train_epochs' if epochs else 'max_train_steps']}")


# --- detection ------------------------------------------------------------------------

def read_source(path: Path, root: Path | None = None) -> Source:
    """Any supported file → its options (and dataset config), by what it contains; ``root``: where it ran."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ImportError_(f"{path}: cannot read it ({exc})") from None
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ImportError_(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
        if not isinstance(cfg, dict):
            raise ImportError_(f"{path}: a JSON config is an object of options, not {type(cfg).__name__}")
        if is_onetrainer(cfg):
            src = Source("OneTrainer JSON", {})
            src.options, src.dataset = from_onetrainer(cfg, src, root or path.parent)
            return src
        return _from_table(cfg, "kohya_ss JSON" if is_gui_config(cfg) else "JSON config")
    if path.suffix.lower() in (".yaml", ".yml") or re.search(r"^\s*process:", text, re.M):
        return _from_yaml(path, text)
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        if path.suffix.lower() == ".toml":
            raise ImportError_(f"{path}: not valid TOML ({exc})") from None
        cfg = None
    if cfg is not None and cfg:
        return _from_table(cfg, "dataset config" if is_dataset_config(cfg) else
                           "kohya_ss TOML" if is_gui_config(cfg) else "sd-scripts TOML config")
    try:
        if re.search(r"^\s*\$\w+\s*=", text, re.M) or path.suffix.lower() == ".ps1":
            words, notes = read_ps1(text)
            src = Source("lora-scripts PowerShell script", parse_words(words), notes=notes)
        elif re.search(r"^\s*\w+=\S", text, re.M) and re.search(r"^\s*(if|fi)\b", text, re.M) or path.suffix == ".sh":
            words, notes = read_sh(text)
            src = Source("lora-scripts bash script", parse_words(words), notes=notes)
        else:
            src = Source("command line", parse_command_line(text))
    except ScriptError as exc:
        raise ImportError_(f"{path}: {exc}") from None
    if not src.options:
        raise ImportError_(f"{path}: no kohya options found (a TOML or JSON config, a command line, "
                           "or a lora-scripts train.ps1/train.sh)")
    return src


def _from_yaml(path: Path, text: str) -> Source:
    import yaml

    from ..yamlio import load

    try:
        cfg = load(text)
    except yaml.YAMLError as exc:
        raise ImportError_(f"{path}: not valid YAML ({exc})") from None
    if not is_aitoolkit(cfg):
        raise ImportError_(f"{path}: a YAML file, but not an ai-toolkit job (config: process: [...]); a lorabuild "
                           "project needs no import: lorabuild validate it")
    src = Source("ai-toolkit YAML", {})
    src.options, src.dataset = from_aitoolkit(cfg, src)
    return src


def _from_table(cfg: dict, kind: str) -> Source:
    src = Source(kind, {})
    if not isinstance(cfg, dict):
        raise ImportError_("a config must be a table of options")
    if kind == "dataset config":
        src.dataset = cfg
    elif kind.startswith("kohya_ss"):
        src.options = from_gui(flatten_sections(cfg, src), src)
    else:
        src.options = flatten_sections(cfg, src)
    return src


def read_dataset_config(path: Path) -> dict:
    try:
        cfg = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ImportError_(f"{path}: cannot read it ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ImportError_(f"{path}: not valid TOML ({exc})") from None
    if not is_dataset_config(cfg):
        raise ImportError_(f"{path}: not a dataset config (no [[datasets]] or [general])")
    return cfg
