"""Optional packages a project's settings need, checked before anything runs.

kohya setups default to AdamW8bit and xformers; without their packages training would stop
only after every cache was built. ``validate`` and ``plan`` name what is missing, the build
says it before the first stage, and the stage that needs the package refuses to start: one
line each, naming the setting, the package and how to install it in a clone and in an
installed lorabuild. Only ``importlib.util.find_spec`` is used: nothing is imported.
"""
from __future__ import annotations

import importlib.util
from typing import Mapping, NamedTuple


class Need(NamedTuple):
    setting: str  # dotted project field
    value: object
    module: str  # what is imported
    package: str  # what pip installs
    extra: str  # lorabuild's optional-dependency group
    stage: str  # the stage that imports it


def needs(cfg: Mapping) -> list[Need]:
    """The optional packages the settings of a (defaults-filled) project use."""
    train = cfg.get("train") or {}
    out = []
    opt = train.get("optimizer")
    if opt in ("adamw8bit", "lion8bit"):
        out.append(Need("train.optimizer", opt, "bitsandbytes", "bitsandbytes", "bnb", "train"))
    if opt == "prodigy":
        out.append(Need("train.optimizer", opt, "prodigyopt", "prodigyopt", "prodigy", "train"))
    if opt == "lion":
        out.append(Need("train.optimizer", opt, "lion_pytorch", "lion-pytorch", "lion", "train"))
    if train.get("attention") == "xformers":
        out.append(Need("train.attention", "xformers", "xformers", "xformers", "xformers", "train"))
    kind = (cfg.get("network") or {}).get("type")
    from .lora.lyco_options import LYCO_TYPES

    if kind in LYCO_TYPES:
        out.append(Need("network.type", kind, "lycoris", "lycoris-lora", "lycoris", "train"))
    if cfg.get("tagger"):
        out.append(Need("tagger", "a WD14 tagger", "onnxruntime", "onnxruntime", "tagger", "tag"))
    if "lms" in _samplers(cfg.get("sample") or {}):
        out.append(SCIPY)
    return out


# diffusers' LMSDiscreteScheduler imports scipy when it is made, not when diffusers is imported
SCIPY = Need("sample.sampler", "lms", "scipy", "scipy", "lms", "sample")


def _samplers(sample: Mapping) -> set[str]:
    """The samplers the project file names (its default and its inline prompts; a prompt file is
    checked by the sample stage, which reads it)."""
    from .prompts import parse_line

    found = {sample.get("sampler")}
    for p in sample.get("prompts") or []:
        found.add((parse_line(p) or {}).get("sampler") if isinstance(p, str) else (p or {}).get("sampler"))
    return found


def sampler_problem(settings: list[dict]) -> str | None:
    """The line for resolved sample settings (prompt files included) that need a missing package."""
    if any(s.get("sampler") == "lms" for s in settings) and not installed(SCIPY.module):
        return message(SCIPY)
    return None


def install_hint(extra: str) -> str:
    """Both ways to install an extra; double quotes, so it also works in Windows' cmd."""
    return f'pip install -e ".[{extra}]" in a clone of lorabuild, or pip install "lorabuild[{extra}]"'


def message(n: Need) -> str:
    return f"{n.setting}: {n.value} needs {n.package}, which is not installed: {install_hint(n.extra)}"


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing(cfg: Mapping, stage: str | None = None) -> list[str]:
    """One line per optional package the project needs and this Python lacks (for ``stage`` only, if given)."""
    return [message(n) for n in needs(cfg) if (stage is None or n.stage == stage) and not installed(n.module)]
