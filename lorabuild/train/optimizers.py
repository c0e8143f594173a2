"""Optimizers under the names kohya users know, each built from the well-kept library that owns it.

``train.optimizer`` picks one; ``train.optimizer_args`` passes keyword arguments on
unchanged (kohya's ``optimizer_args``), over the defaults below. ``weight_decay`` comes
from ``train.weight_decay`` unless the arguments set it.
"""
from __future__ import annotations

NAMES = ("adamw", "adamw8bit", "lion", "lion8bit", "prodigy", "adafactor", "sgd")

# kohya's optimizer_type spellings → ours (for import-kohya and forgiving prompts)
KOHYA_NAMES = {"adamw": "adamw", "adamw8bit": "adamw8bit", "lion": "lion", "lion8bit": "lion8bit",
               "prodigy": "prodigy", "adafactor": "adafactor", "sgdnesterov": "sgd", "sgd": "sgd"}

# Adafactor with its own step-size rule turned off, so the project's learning rate and
# schedule apply (what LoRA guides set; kohya's default relative_step=True ignores the lr).
_DEFAULTS = {
    "adafactor": {"scale_parameter": False, "relative_step": False, "warmup_init": False},
    "sgd": {"momentum": 0.9, "nesterov": True},
    "prodigy": {"decouple": True, "use_bias_correction": True, "safeguard_warmup": True},
}


class OptimizerError(Exception):
    pass


def _bnb(kind: str):
    try:
        import bitsandbytes.optim as bnb_optim
    except ImportError:
        from ..extras import install_hint

        raise OptimizerError(f"train.optimizer: {kind} needs bitsandbytes (CUDA only), which is not installed: "
                             f"{install_hint('bnb')}") from None
    return bnb_optim


def make(name: str, groups: list[dict], lr: float, weight_decay: float, args: dict | None = None):
    """The optimizer ``name`` over the parameter groups (each with its own ``lr``)."""
    import torch

    kwargs = {**_DEFAULTS.get(name, {}), "weight_decay": weight_decay, **(args or {})}
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **kwargs)
    if name == "adamw8bit":
        return _bnb(name).AdamW8bit(groups, lr=lr, **kwargs)
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(groups, lr=lr, **kwargs)
    if name == "lion8bit":
        return _bnb(name).Lion8bit(groups, lr=lr, **kwargs)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, lr=lr, **kwargs)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, **kwargs)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, **kwargs)
    raise OptimizerError(f"unknown optimizer {name!r}; one of {', '.join(NAMES)}")


def advice(name: str, lr: float) -> list[str]:
    """Warnings a first-time user of ``name`` needs (shown by `lorabuild plan`)."""
    out = []
    if name == "prodigy" and lr < 0.1:
        out.append(f"Prodigy finds its own step size; learning_rate is a multiplier and is usually 1.0 (is {lr})")
    if name in ("lion", "lion8bit") and lr > 3e-4:
        out.append(f"Lion usually wants a learning rate 3-10x smaller than AdamW's (is {lr})")
    return out
