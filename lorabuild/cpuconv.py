"""The faster of PyTorch's two CPU convolutions, per layer shape, measured once per machine.

PyTorch runs a float32 convolution on the CPU through oneDNN (``mkldnn``) whenever it is built
in, and otherwise through its own im2col + matrix-multiply kernels (``thnn``). Neither is faster
everywhere: on the 2-core AMD EPYC this project is measured on, oneDNN runs the SD 1.5 UNet's
1280-channel 3×3 convolutions at 8×8 at a third of the other path's rate (33 against 103
GFLOP/s), while at 32×32 with 320 channels it is the faster one (116 against 72); the backward
pass does not always prefer what the forward pass does. Which one wins depends on the CPU, so
it is measured, like cuDNN's ``benchmark`` mode does on a GPU: the first time a layer shape is
seen, the forward (and, on the first backward pass, the input/weight gradients) run on each
path, timed, and the faster one is used from then on. Both paths compute the same convolution
(they differ in summation order, at float32 rounding).

The choices are written to a small JSON file per machine (CPU model, torch version, threads) in
the user's cache folder (``tuning_dir``), shared by every workspace: the next run on the same
machine times nothing and makes exactly the same choices, so a resumed run computes what the
uninterrupted one did, and two workspaces building the same project on one machine get the same
bits. (Kept per workspace, as at first, each new workspace timed again, and timing noise could
choose the other path for a shape whose two paths run about as fast: the same project then
trained to weights a float32 rounding apart.) A process that meets a shape not yet in the file
times it holding the file's lock, after reading the file again: processes starting together (the
ranks of a distributed run, parallel builds) time each shape once and all use that one choice.
Convolutions too small to matter (tiny test models, LoCon's rank-sized ones) and every case but a float32 ``zeros``-padded 2-D convolution on the
CPU outside autocast keep PyTorch's own path, as do GPUs (cuDNN chooses there).

Only the trainer's UNet is routed: the SD 1.5 VAE's encoder, measured the same way (256 px, one
image), gained nothing (6.16 s CPU on PyTorch's path, 6.37 routed), so caching keeps PyTorch's.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

# below this a convolution keeps PyTorch's path: timing it would cost more than it could save
def _min_flop(default: float = 50e6) -> float:
    try:
        return float(os.environ.get("LORABUILD_CPU_CONV_MIN_FLOP", default))
    except ValueError:  # a mistyped value keeps the default rather than stopping every build
        return default


MIN_FLOP = _min_flop()
PATHS = ("mkldnn", "thnn")
LOCK_WAIT = 300.0  # seconds to wait for another process timing shapes (a whole SD 1.5 step's shapes take ~20 s)


def tuning_dir() -> Path:
    """Where the choices live: ``LORABUILD_TUNING_DIR``, else the user's cache folder
    (``%LOCALAPPDATA%\\lorabuild\\tuning`` on Windows, ``~/Library/Caches/lorabuild/tuning`` on macOS,
    ``$XDG_CACHE_HOME/lorabuild/tuning`` or ``~/.cache/lorabuild/tuning`` elsewhere)."""
    if os.environ.get("LORABUILD_TUNING_DIR"):
        return Path(os.environ["LORABUILD_TUNING_DIR"]).expanduser()
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        base = Path(os.environ["LOCALAPPDATA"])
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lorabuild" / "tuning"


def choices_file() -> Path:
    """This machine's file in :func:`tuning_dir` (one per machine id: a home folder shared between
    machines keeps each one's own choices)."""
    digest = hashlib.sha256(machine_id().encode()).hexdigest()[:16]
    return tuning_dir() / f"cpu-conv-{digest}.json"


def machine_id() -> str:
    """What the choices depend on: the CPU, PyTorch's version and its thread count."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:  # Linux names the CPU model in /proc/cpuinfo; platform.processor() is often empty there
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} | torch {torch.__version__} | {torch.get_num_threads()} threads"


class Chooser:
    """Per-shape choices of the convolution path, read from and written to ``path``."""

    def __init__(self, path: Path | None, clock=time.perf_counter):
        self.path, self.clock = path, clock
        self.machine = machine_id()
        self.choices: dict[str, str] = {}
        self.timed = 0  # shapes timed in this process (the tests count them)
        self._lock = threading.Lock()
        self._read()

    def _read(self) -> None:
        """Adopt the file's choices (another process may have added some since)."""
        if self.path is None:
            return
        try:
            saved = json.loads(Path(self.path).read_text(encoding="utf-8"))
            if saved.get("machine") == self.machine:
                self.choices.update({k: v for k, v in saved.get("choices", {}).items() if v in PATHS})
        except (OSError, ValueError, AttributeError):
            pass  # absent or unreadable: measured again and rewritten

    def _file_lock(self):
        """The file's lock across processes (released by the OS if its holder is killed); a folder
        that cannot hold one (read-only) times without it."""
        import contextlib

        if self.path is None:
            return contextlib.nullcontext()
        from filelock import FileLock

        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            return FileLock(f"{self.path}.lock", timeout=LOCK_WAIT)
        except OSError:
            return contextlib.nullcontext()

    def choose(self, key: str, run):
        """The result of ``run(path)`` on the chosen path for ``key``; the first time on this
        machine, both paths run, timed, and the faster one's result is returned."""
        known = self.choices.get(key)
        if known is not None:
            return run(known)
        import contextlib

        from filelock import Timeout

        with self._lock, contextlib.ExitStack() as held:
            try:
                held.enter_context(self._file_lock())
            except (Timeout, OSError):  # a lock held too long, or unusable: time it here, unshared
                pass
            return self._choose_locked(key, run)

    def _choose_locked(self, key: str, run):
        self._read()  # another process may have timed it meanwhile: its choice is the machine's
        known = self.choices.get(key)
        if known is not None:
            return run(known)
        results, seconds = {}, {}
        # oneDNN's first call for a shape also builds its kernel (kept for later calls): run once
        # untimed, then time each path once
        run(PATHS[0])
        for p in PATHS[::-1]:
            t = self.clock()
            results[p] = run(p)
            seconds[p] = self.clock() - t
        best = min(PATHS, key=lambda p: seconds[p])
        self.choices[key] = best
        self.timed += 1
        self._save()
        return results[best]

    def _save(self) -> None:
        if self.path is None:
            return
        from .cache import atomic_write

        doc = {"machine": self.machine, "choices": dict(sorted(self.choices.items()))}
        try:
            with atomic_write(Path(self.path), "w") as fh:
                fh.write(json.dumps(doc, indent=1))
        except OSError:
            pass  # a read-only cache only costs the next run its timing


def _on_path(path: str, fn):
    """``fn()`` with oneDNN convolutions on (``mkldnn``) or off (``thnn``), restored after."""
    import torch

    prev = torch.backends.mkldnn.enabled
    torch._C._set_mkldnn_enabled(path == "mkldnn")
    try:
        return fn()
    finally:
        torch._C._set_mkldnn_enabled(prev)


def _conv_function():
    import torch
    import torch.nn.functional as F

    class ChosenConv(torch.autograd.Function):
        """conv2d whose forward and backward each run on the path the chooser picked for them."""

        @staticmethod
        def forward(ctx, x, weight, bias, conv, chooser, key):
            stride, padding, dilation, groups = conv
            y = chooser.choose(f"fwd {key}", lambda p: _on_path(p, lambda: F.conv2d(x, weight, bias, stride, padding,
                                                                                       dilation, groups)))
            # a frozen weight's backward (the input's gradient) reads only the input's shape: the
            # input is not kept for it, so it is freed after the forward (at 512 px on the SD 1.5
            # UNet about 150 MB of activations nothing else holds: the SiLU and GroupNorm outputs)
            keep = ctx.needs_input_grad[1]
            ctx.save_for_backward(x if keep else None, weight)
            ctx.x_meta = None if keep else (x.shape, x.dtype, x.device)
            ctx.conv, ctx.chooser, ctx.key, ctx.has_bias = conv, chooser, key, bias is not None
            return y

        @staticmethod
        def backward(ctx, grad):
            x, weight = ctx.saved_tensors
            if x is None:  # a stand-in of the input's shape: no memory of its own, values never read
                shape, dtype, device = ctx.x_meta
                x = torch.zeros((), dtype=dtype, device=device).expand(shape)
            stride, padding, dilation, groups = ctx.conv
            need = ctx.needs_input_grad
            mask = [need[0], need[1], ctx.has_bias and need[2]]

            def run(p):
                return _on_path(p, lambda: torch.ops.aten.convolution_backward(
                    grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, stride, padding, dilation,
                    False, [0, 0], groups, mask))
            gx, gw, gb = ctx.chooser.choose(f"bwd {''.join('1' if m else '0' for m in mask)} {ctx.key}", run)
            return gx, gw, gb, None, None, None

    return ChosenConv


def install(model, chooser: Chooser) -> int:
    """Route ``model``'s 2-D convolutions through ``chooser``; returns how many were routed. The
    module keeps its own ``forward`` (LoRA's and LoCon's wrappers, hooks): only the convolution
    it calls (``_conv_forward``) is replaced, and only where the case is one the chooser handles."""
    import torch
    from torch import nn

    from .precision import autocast_on

    fn = _conv_function()
    n = 0
    for mod in model.modules():
        if type(mod) is not nn.Conv2d or mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            continue
        own = mod._conv_forward

        def conv_forward(x, weight, bias, _mod=mod, _own=own):
            if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.ndim != 4
                    or autocast_on("cpu")):
                return _own(x, weight, bias)
            b, c, h, w = x.shape
            kh, kw = _mod.kernel_size
            flop = 2 * b * c * _mod.out_channels * kh * kw * h * w / (_mod.stride[0] * _mod.stride[1] * _mod.groups)
            if flop < MIN_FLOP:  # read at each call: the tests lower it
                return _own(x, weight, bias)
            conv = (_mod.stride, _mod.padding, _mod.dilation, _mod.groups)
            key = f"{tuple(x.shape)} {tuple(weight.shape)} {conv}"
            if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad))):
                return chooser.choose(f"fwd {key}", lambda p: _on_path(p, lambda: _own(x, weight, bias)))
            return fn.apply(x, weight, bias, conv, chooser, key)

        mod._conv_forward = conv_forward
        n += 1
    return n


def uninstall(model) -> None:
    """Back to PyTorch's own path for every convolution ``install`` routed."""
    for mod in model.modules():
        if "_conv_forward" in mod.__dict__:
            del mod._conv_forward


def enabled(device) -> bool:
    """Whether to route at all: on the CPU, unless LORABUILD_CPU_CONV=native asks for PyTorch's path."""
    return getattr(device, "type", str(device)) == "cpu" and os.environ.get("LORABUILD_CPU_CONV", "auto") != "native"
