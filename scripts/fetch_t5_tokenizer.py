"""Re-derive lorabuild/data/t5xxl_tokenizer/tokenizer.json.gz, T5 v1.1's own tokenizer (Google,
Apache-2.0; the tokenizer.json FLUX.1's and SD 3.5's ``tokenizer_2`` / ``tokenizer_3`` folders and
ComfyUI's comfy/text_encoders/t5_tokenizer hold), from where PyPI has it: leejet's
stable-diffusion.cpp (MIT), vendored in the sdist of stable-diffusion-cpp-python 0.4.7, embeds it
as the C byte array ``t5_tokenizer_json_str[]`` in src/tokenizers/vocab/clip_t5.hpp.

Provenance only: tests never download, and the shipped file is checked against the same sha256.
``python scripts/fetch_t5_tokenizer.py`` (needs pip and PyPI); ``--check`` only compares.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "stable-diffusion-cpp-python==0.4.7"
SDIST_SHA256 = "998d1957260dd5ae4e18a8acc0c14b0a8757aaa9f96515197b6d5bbf46df9282"
MEMBER = "vendor/stable-diffusion.cpp/src/tokenizers/vocab/clip_t5.hpp"
ARRAY = "t5_tokenizer_json_str"
JSON_SHA256 = "fe2ebbbbde2985be723e0ce18217853e4020c5e9d35bd07be2c27ab9d3ead57a"  # 2 424 064 bytes
OUT = Path(__file__).resolve().parents[1] / "lorabuild" / "data" / "t5xxl_tokenizer" / "tokenizer.json.gz"


def extract(header: str) -> bytes:
    """The bytes of the C array ``ARRAY`` (``static const unsigned char NAME[] = { 0x7b, … };``)."""
    start = header.index(f"{ARRAY}[]")
    body = header[header.index("{", start) + 1:header.index("}", start)]
    return bytes(int(h, 16) for h in re.findall(r"0x([0-9a-fA-F]{1,2})", body))


def fetch() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST,
                        "-d", tmp], check=True)
        sdist = next(Path(tmp).glob("*.tar.gz"))
        got = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if got != SDIST_SHA256:
            sys.exit(f"{sdist.name}: sha256 {got}, expected {SDIST_SHA256}")
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(MEMBER))
            return extract(tar.extractfile(member).read().decode("utf-8"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check the shipped file's sha256")
    args = ap.parse_args()
    data = gzip.decompress(OUT.read_bytes()) if args.check else fetch()
    got = hashlib.sha256(data).hexdigest()
    if got != JSON_SHA256:
        sys.exit(f"tokenizer.json: sha256 {got}, expected {JSON_SHA256}")
    if not args.check:
        OUT.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))  # mtime 0: the same bytes every run
    print(f"{OUT}: {len(data)} bytes of tokenizer.json, sha256 {got}")


if __name__ == "__main__":
    main()
