"""Speed options (issue 10): train.compile fails clearly where it cannot work."""
from __future__ import annotations

import os
import subprocess
import sys


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
