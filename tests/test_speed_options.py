"""Speed and memory options (issue 10): train.compile fails clearly where it cannot work;
train.lean_cpu_memory changes where memory comes from, never the weights."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest


@pytest.mark.skipif(sys.platform == "win32", reason="a symlinked python; Windows' check (MSVC) is in test_windows.py")
def test_compile_without_a_cpp_compiler_names_the_setting(demo, tmp_path):
    demo.edit(lambda d: d["train"].update(compile=True))
    # a PATH with python and nothing else: no g++ / clang++ / c++ to build inductor's CPU kernels
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": str(bindir), "CXX": "no-such-compiler", "LORABUILD_BUILD": "nocc"}
    proc = subprocess.run([sys.executable, "-m", "doit", "train:demo"], cwd=demo.root, env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "train.compile: torch.compile on CPU needs a C++ compiler" in out, out[-2000:]
    assert "Traceback" not in out
    assert "train" not in demo.ran("nocc")


def _glibc():
    import ctypes
    import platform

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "mallinfo2") else None


LEAN_PROBE = """
import ctypes, sys, torch
from lorabuild.train.loop import LeanHeap

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def mapped(phase, size, after_freeing=0):
    phase()
    del_me = torch.empty(after_freeing, dtype=torch.uint8)  # glibc's own threshold climbs to a freed mapping's size
    del del_me
    before = libc.mallinfo2().hblkhd
    t = torch.empty(size, dtype=torch.uint8)
    grown = libc.mallinfo2().hblkhd - before
    del t
    return grown

heap = LeanHeap(sys.argv[1] == "on", torch.device("cpu"))
print(mapped(heap.forward, 2 << 20, after_freeing=4 << 20), mapped(heap.backward, 8 << 20))
"""


def test_lean_heap_maps_forward_allocations_and_heaps_backward_ones():
    """train.lean_cpu_memory: a 2 MiB tensor made in the forward pass gets its own mapping (so freeing
    it returns it to the system at once), where glibc's climbing threshold would heap it; one of
    8 MiB made in the backward pass comes from the heap, where glibc would map it. In a new process:
    glibc serves a request from free heap space first, whatever the threshold."""
    import pytest
    import torch

    from lorabuild.train.loop import LeanHeap

    if _glibc() is None:
        pytest.skip("needs glibc (mallinfo2)")
    got = {}
    for mode in ("on", "off"):
        proc = subprocess.run([sys.executable, "-c", LEAN_PROBE, mode], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        got[mode] = tuple(map(int, proc.stdout.split()))
    forward, backward = got["on"]
    assert forward >= 2 << 20 and backward == 0, got
    assert got["off"][0] == 0 and got["off"][1] >= 8 << 20, got  # glibc's own way, for contrast
    assert LeanHeap(True, torch.device("meta")).libc is None  # not CPU training: no effect


def test_lean_cpu_memory_trains_the_same_weights_and_is_not_in_the_key(demo):
    import torch
    from safetensors.torch import load_file

    lora = demo.root / "output" / "demo" / "demo.safetensors"
    before = load_file(str(lora))
    demo.edit(lambda d: d["train"].update(lean_cpu_memory=True))
    demo.doit("train:demo", build="lean")
    assert demo.report("train")["computed"] == 0  # same key: the trained LoRA stands
    # retrain with it on: nothing trained before left in the cache
    shutil.rmtree(demo.root / "cache/objects/train")
    demo.doit("forget", "train:demo", build="lean-forget")
    proc = demo.doit("train:demo", build="lean2")
    assert demo.report("train")["computed"] == 1 and "LoRA modules" in proc.stdout
    after = load_file(str(lora))
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
