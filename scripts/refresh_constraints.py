#!/usr/bin/env python3
"""Rewrite constraints/ci.txt: the exact versions of a fresh install that passed the tests.

    python scripts/refresh_constraints.py            # build a fresh venv, install, freeze
    python scripts/refresh_constraints.py --freeze   # freeze the current environment as it is

A fresh venv (``.venv-refresh/``) gets ``torch==<version> -e .[test]`` without constraints, so
pip resolves the newest versions the caps in pyproject.toml allow; the freeze, minus lorabuild
itself, becomes constraints/ci.txt. Run the suite with it (``.ci/run``) before committing the
new file: the file records what CI passed with. The torch version is taken from the current
file (``--torch`` to change it), and a local label (``+cpu``) is dropped so that the same line
matches the CUDA builds too (PEP 440 ignores local labels in ``==`` without one).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "constraints" / "ci.txt"
HEADER = ("# The versions CI passed with (pip freeze of a fresh install of .[test]).\n"
          "# Used by .ci/run and README: pip install torch==X -c constraints/ci.txt -e \".[test]\"\n"
          "# Regenerate with: python scripts/refresh_constraints.py\n")


def freeze_lines(python: str) -> list[str]:
    text = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                          capture_output=True, text=True).stdout
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-e ")) or " @ " in line:
            continue  # comments, editable and direct-URL installs (lorabuild itself)
        name = re.split(r"[=<>!~ ]", line, 1)[0]
        if name.lower().replace("_", "-") in ("lorabuild", "pip", "setuptools", "wheel"):
            continue
        out.append(re.sub(r"\+[A-Za-z0-9.]+$", "", line))  # torch==2.13.0+cpu -> torch==2.13.0
    return sorted(out, key=str.lower)


def current_torch() -> str | None:
    if OUT.is_file():
        m = re.search(r"^torch==(\S+)$", OUT.read_text(), re.M)
        return m.group(1) if m else None
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--freeze", action="store_true", help="freeze this environment instead of a fresh one")
    ap.add_argument("--torch", default=current_torch(), help="torch version to install (default: the file's)")
    ap.add_argument("--venv", default=str(ROOT / ".venv-refresh"))
    args = ap.parse_args()
    python = sys.executable
    if not args.freeze:
        venv.create(args.venv, with_pip=True, clear=True)
        python = str(Path(args.venv) / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python"))
        torch = [f"torch=={args.torch}"] if args.torch else ["torch"]
        subprocess.run([python, "-m", "pip", "install", "-q", *torch, "-e", f"{ROOT}[test]"], check=True)
    lines = freeze_lines(python)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(HEADER + "\n".join(lines) + "\n", encoding="utf-8")
    print(f"{OUT.relative_to(ROOT)}: {len(lines)} packages; now run .ci/run with it before committing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
