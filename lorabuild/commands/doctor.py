"""``lorabuild doctor``: what this machine can do for lorabuild, and what will go wrong.

One line per check: ``ok``, ``note`` (an option that is off; nothing breaks) or ``FIX`` (something
will fail or be slow), and for each FIX the one command or setting that fixes it. Exit code 1
when something must be fixed before a build can work (Python too old, torch missing).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

MIN_PYTHON = (3, 11)
MIN_FREE_GIB = 10  # an SD 1.5 conversion and its caches; SDXL wants about 20
# the libraries whose versions decide lorabuild's behaviour (module paths, loaders, doit internals)
CORE = ("torch", "diffusers", "transformers", "tokenizers", "huggingface-hub", "safetensors", "accelerate",
        "doit", "numpy")
OPTIONAL = {"xformers": ("xformers", "memory-efficient attention (train.attention: xformers)", 'pip install "lorabuild[xformers]"'),
            "bitsandbytes": ("bitsandbytes", "8-bit optimizers (AdamW8bit)", 'pip install "lorabuild[bnb]"'),
            "lycoris-lora": ("lycoris", "LyCORIS network types (network.type: loha, lokr, dora, ia3, full, diag-oft)", 'pip install "lorabuild[lycoris]"'),
            "onnxruntime": ("onnxruntime", "the WD14 tagger (tagger:)", 'pip install "lorabuild[tagger]"')}


@dataclass
class Line:
    level: str  # "ok", "note", "FIX"
    what: str
    fix: str = ""
    fatal: bool = False

    def __str__(self) -> str:
        return f"{self.level:<4}  {self.what}" + (f"\n      fix: {self.fix}" if self.fix else "")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_python() -> list[Line]:
    v = sys.version_info
    text = f"Python {v.major}.{v.minor}.{v.micro} ({sys.platform})"
    if (v.major, v.minor) < MIN_PYTHON:
        return [Line("FIX", text, "install Python 3.11 or newer and make a new virtual environment with it", True)]
    return [Line("ok", text)]


def check_torch() -> list[Line]:
    if importlib.util.find_spec("torch") is None:
        return [Line("FIX", "torch is not installed",
                     "pip install torch (for a CUDA build: the command pytorch.org/get-started gives)", True)]
    import torch

    lines = [Line("ok", f"torch {torch.__version__}")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(Line("ok", f"CUDA device {i}: {torch.cuda.get_device_name(i)}, {props.total_memory / 2**30:.1f} GiB"))
        bf16 = torch.cuda.is_bf16_supported()
        lines.append(Line("ok" if bf16 else "note", "bf16 supported" if bf16 else
                          "no bf16 on this GPU: use train.mixed_precision: fp16 (bf16 needs an Ampere card or newer)"))
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        lines.append(Line("ok", "Apple MPS available (fp32 and fp16; no bf16 mixed precision)"))
    else:
        cpu_build = "+cpu" in torch.__version__ or torch.version.cuda is None
        nvidia = shutil.which("nvidia-smi") is not None
        fix = ("this torch is a CPU build but an NVIDIA driver is installed: pip install torch --index-url "
               "https://download.pytorch.org/whl/cu128 (pick the CUDA version your driver supports)"
               if cpu_build and nvidia else
               "training runs on the CPU (fine for the demo, far too slow for real models): use a machine "
               "with an NVIDIA GPU and a CUDA build of torch, or Apple silicon")
        lines.append(Line("FIX", "no GPU: CUDA is not available and there is no MPS", fix))
    return lines


def check_optional() -> list[Line]:
    lines = []
    for name, (module, purpose, install) in OPTIONAL.items():
        if importlib.util.find_spec(module) is None:
            lines.append(Line("note", f"{name} not installed: no {purpose} (install: {install})"))
        else:
            lines.append(Line("ok", f"{name} {_version(name) or '?'}"))
    return lines


def check_filesystem(root: Path) -> list[Line]:
    from ..winenv import long_paths_enabled, long_root_warning, symlinks_allowed

    lines = []
    probe_dir = root if root.is_dir() else Path.cwd()
    if symlinks_allowed(probe_dir):
        lines.append(Line("ok", "symlinks allowed"))
    else:
        lines.append(Line("note", "no symlink privilege: vae:/prediction_type: use hard links instead (on another "
                                  "drive than the cache they are copied; Windows Developer Mode allows symlinks)"))
    if sys.platform == "win32":
        if long_paths_enabled():
            lines.append(Line("ok", "Windows long paths enabled"))
        else:
            warning = long_root_warning(probe_dir)
            lines.append(Line("FIX" if warning else "note", warning or
                              "Windows long paths are off (fine for this workspace path; keep it short)",
                              "enable LongPathsEnabled (gpedit: Enable Win32 long paths) or move the workspace to a "
                              "shorter path" if warning else ""))
    free = shutil.disk_usage(probe_dir).free / 2**30
    if free < MIN_FREE_GIB:
        lines.append(Line("FIX", f"{free:.1f} GiB free at {probe_dir}",
                          f"free at least {MIN_FREE_GIB} GiB there (a converted checkpoint, its caches and LoRAs)"))
    else:
        lines.append(Line("ok", f"{free:.1f} GiB free at {probe_dir}"))
    return lines


def tested_versions(path: Path | None) -> dict[str, str]:
    """{distribution name (normalised): version} from a constraints file."""
    if path is None:
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Za-z0-9._-]+)==([^\s;#]+)", line.strip())
        if m:
            out[_norm(m.group(1))] = m.group(2)
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check_versions(constraints: Path | None) -> list[Line]:
    tested = tested_versions(constraints)
    if not tested:
        return [Line("note", "no constraints/ci.txt found: cannot compare library versions with the tested set")]
    lines, off = [], []
    for dist in CORE:
        have = _version(dist)
        want = tested.get(_norm(dist))
        if have is None or want is None:
            continue
        if have.split("+", 1)[0] != want.split("+", 1)[0]:  # a local label (+cu128) is the same release
            off.append(f"{dist} {have} (tested: {want})")
    if off:
        lines.append(Line("FIX", "versions differ from the tested set: " + ", ".join(off),
                          f'pip install -c "{constraints}" ' + " ".join(f"{d.split()[0]}=={tested[_norm(d.split()[0])]}"
                                                                       for d in off)))
    else:
        lines.append(Line("ok", f"library versions match the tested set ({constraints.name})"))
    return lines


def report(root: Path, constraints: Path | None) -> list[Line]:
    return (check_python() + check_torch() + check_optional() + check_filesystem(root)
            + check_versions(constraints))


def cmd_doctor(root: Path) -> int:
    from ..resources import constraints_file

    lines = report(root, constraints_file())
    print(f"lorabuild doctor (workspace {root})")
    for line in lines:
        print(line)
    fixes = [line for line in lines if line.level == "FIX"]
    print(f"{len(fixes)} thing(s) to fix" if fixes else "nothing to fix")
    return 1 if any(line.fatal for line in lines) else 0
