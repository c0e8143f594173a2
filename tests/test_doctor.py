"""`lorabuild doctor`: its report on this machine, and with the GPU, packages or privileges absent."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import torch

from lorabuild import winenv
from lorabuild.commands import doctor
from conftest import init_workspace


def _text(lines) -> str:
    return "\n".join(map(str, lines))


def test_doctor_on_this_machine(tmp_path):
    root = tmp_path / "ws"
    init_workspace(root)
    proc = subprocess.run([sys.executable, "-m", "lorabuild", "doctor"], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    v = sys.version_info
    assert out.startswith(f"lorabuild doctor (workspace {root})\n")
    assert f"ok    Python {v.major}.{v.minor}.{v.micro}" in out and f"ok    torch {torch.__version__}" in out
    gpu = torch.cuda.is_available() or torch.backends.mps.is_available()
    assert ("CUDA device 0:" in out or "Apple MPS" in out) if gpu else "FIX   no GPU" in out
    free = shutil.disk_usage(root).free / 2**30
    assert f"GiB free at {root}" in out and abs(float(out.split(" GiB free at")[0].split()[-1]) - free) < 1
    for name in ("xformers", "bitsandbytes", "onnxruntime"):
        assert (f"ok    {name} " if importlib.util.find_spec(name) else f"note  {name} not installed") in out
    assert ("ok    lycoris-lora " if importlib.util.find_spec("lycoris") else "note  lycoris-lora not installed") in out
    assert "library versions match the tested set (ci.txt)" in out or "versions differ from the tested set" in out
    fixes = out.count("\nFIX ")
    assert out.rstrip().endswith(f"{fixes} thing(s) to fix" if fixes else "nothing to fix")


def test_doctor_without_gpu_or_optional_packages(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("xformers", "bitsandbytes", "onnxruntime", "lycoris")
                        else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    monkeypatch.setattr(shutil, "which", lambda c: "/usr/bin/nvidia-smi" if c == "nvidia-smi" else None)
    text = _text(doctor.check_torch() + doctor.check_optional())
    assert "FIX   no GPU: CUDA is not available and there is no MPS" in text
    assert "fix: this torch is a CPU build but an NVIDIA driver is installed: pip install torch --index-url" in text
    for name, hint in (("xformers", "lorabuild[xformers]"), ("bitsandbytes", "lorabuild[bnb]"), ("onnxruntime", "lorabuild[tagger]"),
                       ("lycoris-lora", "lorabuild[lycoris]")):
        assert f"note  {name} not installed" in text and f'pip install "{hint}"' in text
    monkeypatch.setattr(shutil, "which", lambda c: None)  # no driver either: no CUDA-build hint
    assert "training runs on the CPU" in _text(doctor.check_torch())

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # no torch at all
    lines = doctor.check_torch()
    assert lines[0].level == "FIX" and lines[0].fatal and "torch is not installed" in str(lines[0])


def test_doctor_reports_the_gpu_and_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA GeForce RTX 2080")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=8 * 2**30))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    text = _text(doctor.check_torch())
    assert "ok    CUDA device 0: NVIDIA GeForce RTX 2080, 8.0 GiB" in text
    assert "note  no bf16 on this GPU: use train.mixed_precision: fp16" in text
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert "ok    bf16 supported" in _text(doctor.check_torch())


def test_doctor_compares_versions_with_the_tested_set(tmp_path):
    import diffusers

    ci = tmp_path / "ci.txt"
    ci.write_text(f"# comment\ndiffusers==0.41.0\ntorch=={torch.__version__.split('+')[0]}\nnumpy==1.0.0 ; python_version<'4'\n")
    text = _text(doctor.check_versions(ci))
    assert f"FIX   versions differ from the tested set: diffusers {diffusers.__version__} (tested: 0.41.0), numpy" in text
    assert f'fix: pip install -c "{ci}" diffusers==0.41.0 numpy==1.0.0' in text and "torch" not in text.split("fix:")[0]
    assert "no constraints/ci.txt found" in _text(doctor.check_versions(None))


def test_doctor_on_windows_without_symlinks_long_paths_or_disk(tmp_path, monkeypatch):
    import winsim

    deep = tmp_path / ("x" * 130)
    deep.mkdir()
    winsim.install(no_symlink=True, monkeypatch=monkeypatch)
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(winenv, "long_paths_enabled", lambda: False)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=100 * 2**30, used=97 * 2**30, free=3 * 2**30))
    text = _text(doctor.check_filesystem(deep))
    assert "note  no symlink privilege: vae:/prediction_type: use hard links instead" in text
    assert f"FIX   the workspace path {deep} is {len(str(deep))} characters long" in text
    assert "fix: enable LongPathsEnabled" in text
    assert f"FIX   3.0 GiB free at {deep}" in text and f"fix: free at least {doctor.MIN_FREE_GIB} GiB" in text
    assert not [p for p in os.listdir(deep) if p.startswith(".symlink-probe")]
