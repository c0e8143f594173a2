"""``lorabuild validate``'s hints for people coming from kohya: option names and enum spellings.

The schema's descriptions already say which kohya option each field is ("kohya: network_dim");
an unknown field named like one is pointed at its lorabuild field. An enum value that differs
from the schema's only in case (``AdamW8bit``), or is kohya's name for it (``SGDNesterov``),
is read as the schema spells it; a near miss gets the right spelling as a hint.
"""
from __future__ import annotations

import difflib
import re

_CLAUSE = re.compile(r"kohya:\s*([^.;(]*)")
_NAME = re.compile(r"-{0,2}([a-z][a-z0-9_]*)")
# words of a "kohya: …" clause that are prose, not option names
_PROSE = {"scripts", "the", "of", "as", "a", "is", "and", "or", "in", "this", "inverts", "given", "float",
          "first", "word", "second", "value", "whose", "default", "s", "network_args", "lora", "networks"}

# kohya options without an underscore (other such words in a clause are prose)
_PLAIN_NAMES = {"vae", "sdxl", "sdpa", "xformers", "resolution", "seed"}
# names kohya users write that the schema's descriptions do not carry (GUI and script spellings)
ALIASES = {
    "max_train_epoches": "train.epochs",  # lora-scripts' train.ps1/train.sh variable
    "epoch": "train.epochs",  # kohya_ss GUI
    "lr": "train.learning_rate",
    "batch_size": "train.batch_size",  # a dataset config's; the tagger's is tagger.batch_size
    "optimizer_args": "train.optimizer_args",
    "max_resolution": "bucket.resolution",  # kohya_ss GUI
    "lora_network_weights": "network.weights",  # kohya_ss GUI
    "pretrained_model": "base_model",
    "pretrained_model_name_or_path": "base_model",
    "train_data_dir": "dataset.dirs",
    "reg_data_dir": "dataset.reg_dirs",
    "image_dir": "dataset.concepts.N.path",
    "num_repeats": "dataset.concepts.N.repeats",
    "class_tokens": "dataset.concepts.N.trigger",
    "optimizer_type": "train.optimizer",
    "lr_warmup": "train.lr_warmup_ratio",
    "lr_restart_cycles": "train.lr_scheduler_num_cycles",
    "enable_bucket": "bucket (always on)",
    "debiased_estimation_loss": "train.debiased_estimation",
    "save_last_n_epochs": "output.keep_last",
    "save_model_as": "output (always .safetensors)",
}


def _walk(node: dict, path: tuple, out: list) -> None:
    for key, sub in node.get("properties", {}).items():
        out.append((path + (key,), sub))
        _walk(sub, path + (key,), out)
    if isinstance(node.get("items"), dict):
        _walk(node["items"], path + ("N",), out)


def kohya_index(schema: dict) -> dict[str, str]:
    """kohya option name → the dotted lorabuild field whose description names it."""
    fields: list = []
    _walk(schema, (), fields)
    index: dict[str, tuple[int, str]] = {}
    for path, sub in fields:
        m = _CLAUSE.search(sub.get("description", ""))
        if not m:
            continue
        names = [n for n in _NAME.findall(m.group(1))
                 if n not in _PROSE and ("_" in n or any(c.isdigit() for c in n) or n in _PLAIN_NAMES)]
        for rank, name in enumerate(names):
            dotted = ".".join(path)
            score = (rank > 0, dotted.count("."))  # the clause's first name, then the shortest path
            if name not in index or score < index[name][0]:
                index[name] = (score, dotted)
    return {k: v for k, (_, v) in index.items()}


_INDEX: dict | None = None


def unknown_field(key: str, section: tuple, known: list[str], schema: dict) -> str:
    """The hint for an unknown field ``key`` inside ``section`` (a JSON path)."""
    global _INDEX
    if _INDEX is None:
        _INDEX = kohya_index(schema)
    target = ALIASES.get(key) or _INDEX.get(key)
    if target is None:
        fields: list = []
        _walk(schema, (), fields)
        same = sorted({".".join(p) for p, _ in fields if p[-1] == key and "N" not in p}, key=len)
        if same:
            return f" (it is {same[0]})"
    elif target.split(".")[-1] == key and target == ".".join(map(str, section + (key,))):
        target = None  # named exactly like ours, where it already is: nothing to point at
    if target is not None:
        return f" (kohya's {key} is {target})"
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"


def _squash(v: str) -> str:
    return re.sub(r"[\s_\-]", "", v.casefold())


def _enum_aliases(path: tuple) -> dict[str, str]:
    if path[-1:] == ("optimizer",):
        from .train.optimizers import KOHYA_NAMES

        return KOHYA_NAMES
    if path[-1:] == ("sampler",):
        from .prompts import SAMPLER_ALIASES

        return SAMPLER_ALIASES
    return {}


def enum_value(value: str, allowed: list, path: tuple) -> str | None:
    """The schema's spelling of ``value`` when it is unambiguous (case, or kohya's name), else None."""
    strings = [a for a in allowed if isinstance(a, str)]
    same_case = [a for a in strings if a.casefold() == value.casefold()]
    if len(same_case) == 1:
        return same_case[0]
    alias = _enum_aliases(path).get(_squash(value)) or _enum_aliases(path).get(value.lower())
    return alias if alias in strings else None


def enum_hint(value, allowed: list) -> str:
    """' (did you mean …?)' for a value that matches once spaces, '-' and '_' are ignored."""
    if not isinstance(value, str):
        return ""
    near = [a for a in allowed if isinstance(a, str) and _squash(a) == _squash(value)]
    return f" (did you mean {' or '.join(repr(a) for a in near)}?)" if near else ""


def normalize_enums(data, schema: dict, path: tuple = ()) -> None:
    """Rewrite, in place, enum values given in another case or under kohya's name."""
    if isinstance(data, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in data:
                continue
            value = data[key]
            allowed = sub.get("enum")
            if allowed and isinstance(value, str) and value not in allowed:
                fixed = enum_value(value, allowed, path + (key,))
                if fixed is not None:
                    data[key] = fixed
            normalize_enums(value, sub, path + (key,))
    elif isinstance(data, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(data):
            normalize_enums(item, schema["items"], path + (i,))
