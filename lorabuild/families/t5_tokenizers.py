"""The T5 tokenizers lorabuild ships, and which one a model folder gets.

- ``data/t5xxl_tokenizer``: T5 v1.1's own (32 100 pieces; Google, Apache-2.0; see its NOTICE and
  scripts/fetch_t5_tokenizer.py), the one FLUX.1's and SD 3.5's T5-XXL read. Its tokenizer.json is
  shipped gzipped (0.6 MB instead of 2.4 MB) and written out where a model folder is laid out, so
  transformers' ``from_pretrained`` reads it as any diffusers folder's.
- ``data/t5_tokenizer``: the tiny built-in models' (scripts/make_t5_tokenizer.py), whose T5 has a
  vocabulary of a few hundred rows.

A T5 config's ``vocab_size`` tells them apart: the real T5-XXL's embedding has 32 128 rows (the
tokenizer's 32 100 padded to a multiple of 128), the tiny ones far fewer.
"""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

from ..resources import DATA_DIR

TINY_T5_DIR = DATA_DIR / "t5_tokenizer"
T5XXL_DIR = DATA_DIR / "t5xxl_tokenizer"
T5XXL_PIECES = 32100
# a convert key's entry for the folders a T5 tokenizer is laid into: folders converted before the
# real tokenizer shipped (a real-size T5 with the tiny one) are converted again
KEY = {"t5_tokenizer": "t5-v1_1"}


def source(text_config: dict) -> Path:
    """The shipped tokenizer for a T5 of config ``text_config``: T5 v1.1's own for a T5 with at
    least its 32 100 rows, else the tiny models'."""
    return T5XXL_DIR if text_config.get("vocab_size", 0) >= T5XXL_PIECES else TINY_T5_DIR


def install(src: Path, dst: Path) -> None:
    """The tokenizer folder ``src`` into ``dst``: its files, each ``*.gz`` decompressed, no NOTICE."""
    from ..cache import atomic_write

    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.suffix == ".gz":
            with gzip.open(f, "rb") as fin, atomic_write(dst / f.stem) as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        elif f.is_file() and f.name != "NOTICE":
            with atomic_write(dst / f.name) as fout:
                fout.write(f.read_bytes())
