"""Captions: read a caption file, apply the fixed options, and (at training time) the random ones.

Fixed options (prepend/append, exclude, de-duplicate, underscores) give one text per
image, which the text-embedding cache keys on. Random options (shuffle, tag dropout,
caption dropout) are drawn per epoch from the project's seed at training time, as in
kohya (``train_util.BaseDataset.process_caption``).
"""
from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path


def read_caption(path: Path) -> str:
    """The text of a caption file: UTF-8 with or without BOM, any line ending."""
    text = path.read_bytes().decode("utf-8-sig")
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def split_tags(text: str) -> list[str]:
    """Comma-separated tags, stripped; blank tags (trailing commas, ``a,,b``) dropped."""
    return [t.strip() for t in text.replace("\n", ",").split(",") if t.strip()]


def fixed_caption(raw: str, opts: Mapping) -> str:
    """Apply the deterministic options of the ``captions`` section to one caption."""
    tags = split_tags(raw)
    if opts["underscores_to_spaces"]:
        tags = [t.replace("_", " ") for t in tags]
    tags = list(opts["prepend"]) + tags + list(opts["append"])
    excluded = set(opts["exclude"])
    tags = [t for t in tags if t not in excluded]
    if opts["dedupe"]:
        seen: set[str] = set()
        tags = [t for t in tags if not (t in seen or seen.add(t))]
    return ", ".join(tags)


def is_randomised(opts: Mapping) -> bool:
    return bool(opts["shuffle"] or opts["dropout"] > 0 or opts["tag_dropout"] > 0)


def random_caption(text: str, opts: Mapping, rng: random.Random) -> str:
    """Apply shuffle (after the first ``keep_tokens`` tags), tag dropout and caption dropout."""
    if opts["dropout"] > 0 and rng.random() < opts["dropout"]:
        return ""
    tags = split_tags(text)
    keep, rest = tags[: opts["keep_tokens"]], tags[opts["keep_tokens"]:]
    if opts["tag_dropout"] > 0:
        rest = [t for t in rest if rng.random() >= opts["tag_dropout"]]
    if opts["shuffle"]:
        rng.shuffle(rest)
    return ", ".join(keep + rest)


class CaptionError(Exception):
    """A caption file that cannot be read as UTF-8 text; the message names it."""


def dataset_captions(images, opts: Mapping) -> dict[str, str]:
    """Image id → caption after the fixed options (caption file, else the concept's tokens)."""
    out = {}
    for im in images:
        if im.caption_path is None:
            raw = im.concept.tokens
        else:
            try:
                raw = read_caption(im.caption_path)
            except (OSError, UnicodeDecodeError) as exc:
                raise CaptionError(f"{im.caption_path}: not a UTF-8 text caption ({exc})") from None
        out[im.id] = fixed_caption(raw, opts)
    return out
