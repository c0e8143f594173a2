"""``train.base_precision``: the dtype the frozen base model is stored in, apart from the dtype it
computes in (kohya ``--fp8_base``: UNet and text encoder weights held in float8_e4m3fn, each layer
upcast to the training dtype for its own forward pass).

Built on diffusers' layerwise casting (``diffusers.hooks.apply_layerwise_casting``): every Linear,
Conv and Embedding weight is stored in the low dtype and cast to the compute dtype only while its
layer runs; normalisation layers keep the compute dtype. The LoRA modules are not part of the base
model's module tree and stay fp32.
"""
from __future__ import annotations

STORAGE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp8": "float8_e4m3fn"}


def _dtype(name: str):
    import torch

    return getattr(torch, STORAGE[name])


def load_dtype(base_precision: str, compute):
    """The dtype to load the frozen model in: the compute dtype (``auto``, or a storage dtype below
    it, which ``store`` then applies), or fp32 kept whole (autocast still computes in the training
    dtype)."""
    import torch

    return torch.float32 if base_precision == "fp32" else compute


def store(module, base_precision: str, compute) -> bool:
    """Hold ``module``'s weights in ``base_precision`` when that differs from the dtype it was loaded
    in (``load_dtype``); True when it did."""
    if base_precision in ("auto", "fp32") or _dtype(base_precision) == compute:
        return False
    from diffusers.hooks import apply_layerwise_casting

    apply_layerwise_casting(module, storage_dtype=_dtype(base_precision), compute_dtype=compute)
    return True


def stored_bytes(module) -> int:
    """Bytes the module's parameters and buffers take as stored now."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def to_device(tensor, device):
    """``tensor`` (on the CPU) on ``device``. To a CUDA GPU through pinned memory without waiting:
    a plain ``.to("cuda")`` from pageable memory waits for every kernel already queued, so each
    batch's inputs would stall the GPU between steps (PyTorch's "pin_memory and non_blocking"
    advice). The values are the same either way."""
    if getattr(device, "type", device) == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` ("cpu", "cuda", ...), on every torch lorabuild supports."""
    import torch

    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch before 2.4 asks per device kind
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()
