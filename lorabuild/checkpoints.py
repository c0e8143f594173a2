"""Reading single-file checkpoints without a model: a safetensors header's keys, shapes and
dtypes, a pickle checkpoint's tensors only on request (weights_only), and the offline switches
every loader sets first. Below models.py and separate.py, which both read files this way."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def offline() -> None:
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


def checkpoint_tensors(path: Path, allow_pickle: bool) -> dict:
    """{key: (shape, dtype name)} of a single-file checkpoint without loading its tensors
    (safetensors header); a pickle checkpoint only with ``allow_pickle``, via weights_only."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelError(
                f"{path} is a pickle checkpoint ({path.suffix}): unpickling can run code hidden in the file. "
                "Use a .safetensors copy of it, or set 'allow_pickle: true' in the project to load it with "
                "torch.load(weights_only=True), which refuses anything but tensors")
        return {k: (tuple(v.shape), str(v.dtype)) for k, v in pickle_state_dict(path).items()}
    if path.suffix.lower() != ".safetensors":
        raise ModelError(f"{path}: a single-file checkpoint must be .safetensors "
                         f"(or {'/'.join(PICKLE_SUFFIXES)} with allow_pickle: true)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise ModelError(f"{path} is not a readable safetensors file ({exc})") from None


def pickle_state_dict(path: Path) -> dict:
    import pickle

    import torch

    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as exc:
        raise ModelError(f"{path} cannot be loaded with weights_only=True ({str(exc).splitlines()[0]})") from None
    while isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        ckpt = ckpt["state_dict"]
    return {k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}
