"""Captions: read a caption file, apply the fixed options, and (at training time) the random ones.

Fixed options (replace, underscores, prepend/append, exclude, de-duplicate) give one
text per image, which the text-embedding cache keys on. Random options (shuffle,
keep_tokens, tag dropout, caption dropout, wildcards, one random line of a multi-line
caption) are drawn per epoch from the project's seed at training time, as kohya does
(``train_util.BaseDataset.process_caption``).
"""
from __future__ import annotations

import random
import re
from collections.abc import Mapping
from pathlib import Path

_WILDCARD = re.compile(r"\{([^{}]*\|[^{}]*)\}")


class CaptionError(Exception):
    """A caption file that cannot be read as UTF-8 text; the message names it."""


def read_caption(path: Path) -> str:
    """The text of a caption file: UTF-8 with or without BOM, any line ending, outer blanks stripped."""
    data = path.read_bytes()
    if b"\x00" in data:
        raise UnicodeDecodeError("utf-8", data, data.index(b"\x00"), data.index(b"\x00") + 1, "NUL byte: a binary file")
    text = data.decode("utf-8-sig")
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def split_tags(text: str) -> list[str]:
    """Comma-separated tags, stripped; blank tags (trailing commas, ``a,,b``) dropped."""
    return [t.strip() for t in text.replace("\n", ",").split(",") if t.strip()]


def _fixed_line(line: str, opts: Mapping) -> str:
    for old, new in opts["replace"].items():
        line = line.replace(old, new)
    tags = split_tags(line)
    if opts["underscores_to_spaces"]:
        tags = [t.replace("_", " ") for t in tags]
    tags = list(opts["prepend"]) + tags + list(opts["append"])
    excluded = set(opts["exclude"])
    tags = [t for t in tags if t not in excluded]
    if opts["dedupe"]:
        seen: set[str] = set()
        tags = [t for t in tags if not (t in seen or seen.add(t))]
    return ", ".join(tags)


def fixed_caption(raw: str, opts: Mapping) -> str:
    """Apply the deterministic options of the ``captions`` section to one caption.

    With ``wildcards`` on, each line of a multi-line caption is a variant (kohya's
    ``enable_wildcard``) and is processed on its own; otherwise lines are joined as tags.
    """
    sep = opts["keep_tokens_separator"]
    if sep and not is_randomised(opts):
        raw = raw.replace(sep, ",")  # nothing is shuffled or dropped: the separator has no job left
    if opts["wildcards"] and "\n" in raw:
        return "\n".join(_fixed_line(line, opts) for line in raw.split("\n") if line.strip())
    return _fixed_line(raw, opts)


def is_randomised(opts: Mapping) -> bool:
    """Whether a caption can differ between epochs (then embeddings cannot be cached)."""
    return bool(opts["shuffle"] or opts["dropout"] > 0 or opts["tag_dropout"] > 0
                or opts["dropout_every_n_epochs"] or opts["wildcards"])


def random_caption(text: str, opts: Mapping, rng: random.Random, epoch: int = 1) -> str:
    """The caption one sample sees this epoch: kohya's order of operations.

    Whole-caption dropout (by rate, or every n-th epoch) → one random line → ``{a|b}``
    choices → shuffle the tags after the kept ones → drop tags at random.
    """
    n = opts["dropout_every_n_epochs"]
    if (n and epoch % n == 0) or (opts["dropout"] > 0 and rng.random() < opts["dropout"]):
        return ""
    if opts["wildcards"]:
        lines = [ln for ln in text.split("\n") if ln.strip()]
        text = rng.choice(lines) if lines else ""
        text = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), text)
    if not (opts["shuffle"] or opts["tag_dropout"] > 0):
        return text
    sep = opts["keep_tokens_separator"]
    if sep and sep in text:
        # kohya: tags before the separator are fixed, whatever keep_tokens says
        head, tail = text.split(sep, 1)
        keep, rest = split_tags(head), split_tags(tail)
    else:
        tags = split_tags(text)
        keep, rest = tags[: opts["keep_tokens"]], tags[opts["keep_tokens"]:]
    if opts["tag_dropout"] > 0:
        rest = [t for t in rest if rng.random() >= opts["tag_dropout"]]
    if opts["shuffle"]:
        rng.shuffle(rest)
    return ", ".join(keep + rest)


def dataset_captions(images, opts: Mapping, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """Image id → caption after the fixed options (``overrides``, e.g. the tagger's text,
    else the caption file, else the concept's tokens)."""
    out = {}
    for im in images:
        if overrides and im.id in overrides:
            raw = overrides[im.id]
        elif im.caption_path is None:
            raw = im.concept.tokens
        else:
            try:
                raw = read_caption(im.caption_path)
            except (OSError, UnicodeDecodeError) as exc:
                raise CaptionError(f"{im.caption_path}: not a UTF-8 text caption ({exc})") from None
        out[im.id] = fixed_caption(raw, concept_options(opts, im.concept))
    return out


def concept_options(opts: Mapping, concept) -> dict:
    """The project's caption options with the concept's own overrides on top."""
    return {**opts, **concept.captions}
