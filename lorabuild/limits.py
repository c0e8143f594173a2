"""Checks for values the schema lets through but training (or the file system) then chokes on.

JSON Schema's numeric bounds compare with ``<``/``>``, and every comparison with NaN is
false, so ``learning_rate: .nan`` passes "greater than 0", and ``.inf`` passes any bound
with no maximum. Names become folders and files (``cache/manifests/<name>/``,
``output/<name>/<name>-000001.safetensors``): most file systems refuse a name over 255
bytes. An optimizer's keyword arguments are only known to its constructor. A
``network.weights`` file is opened at the first training step; its safetensors header is
read here, at validation, for a few kilobytes. Only stdlib here: this runs every time doit
loads the task graph (the optimizer check, which imports its library, only when a project
sets ``optimizer_args`` and its file is validated anew).
"""
from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

# A project's name (its file's stem) and output.name each name a folder and, with a suffix of up
# to 30 characters (``-step00000500.safetensors``, ``.tmp-<pid>-<thread>-<uuid>``), a file in
# it; 128 keeps both far under the usual 255-byte limit and leaves room in a Windows path.
MAX_NAME = 128

# safetensors' dtype names and their sizes in bytes (the format's README, huggingface/safetensors)
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100 << 20  # the reference reader's own limit on a header's size


def non_finite(data, doc, path: tuple = ()) -> None:
    """Every NaN or infinite number anywhere in the document, at its place."""
    from .yamlio import dotted

    if isinstance(data, dict):
        for k, v in data.items():
            non_finite(v, doc, path + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            non_finite(v, doc, path + (i,))
    elif isinstance(data, float) and not math.isfinite(data):
        doc.problem(doc.values.get(path, (1, 1)), dotted(path), f"{data} is not a finite number")


def name_problem(name: str, what: str) -> str | None:
    if len(name) > MAX_NAME:
        return (f"{what} is {len(name)} characters; at most {MAX_NAME} (it names folders and files under cache/ and "
                "output/, and most file systems refuse names over 255 bytes)")
    return None


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable safetensors file (None when its header is sound).

    Reads the 8-byte header length and the JSON header only, and checks each tensor's
    byte range against its shape and the file's size, as the format defines them.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
            return (f"{path} is a pickle (torch.save) file, not safetensors: unpickling can run code; "
                    "convert it to .safetensors")
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > _MAX_HEADER or 8 + n > size:
            return f"{path} is not a safetensors file (no valid header: it would be {n} bytes in a {size}-byte file)"
        try:
            header = json.loads(fh.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            return f"{path} is not a safetensors file (its header is not JSON: {exc})"
    if not isinstance(header, dict):
        return f"{path} is not a safetensors file (its header is not a JSON object)"
    room = size - 8 - n
    for key, t in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = t["data_offsets"]
            count = math.prod(t["shape"])
            ok = 0 <= begin <= end <= room and end - begin == count * _DTYPE_BYTES[t["dtype"]]
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            return f"{path} is damaged: the header's entry for tensor {key!r} does not match the file"
    return None


def file_problems(data: dict, doc, pos, root: Path) -> None:
    """network.weights' header and output.name's length (``pos(*path)``: a field's place)."""
    nw = data["network"]["weights"]
    if nw and (root / nw).is_file():
        bad = safetensors_problem((root / nw).resolve())
        if bad:
            doc.problem(pos("network", "weights"), "network.weights", bad)
    out_name = data["output"]["name"]
    if out_name and name_problem(out_name, "the name"):
        doc.problem(pos("output", "name"), "output.name", name_problem(out_name, "the name"))


def library_problems(data: dict, doc) -> None:
    """optimizer_args against the optimizer's constructor (imports its library)."""
    from .yamlio import dotted

    tr = data["train"]
    for key, msg in optimizer_arg_problems(tr["optimizer"], tr["optimizer_args"]):
        path = ("train", "optimizer_args", key)
        doc.problem(doc.keys.get(path) or doc.values.get(path[:-1], (1, 1)), dotted(path), msg)


def _optimizer_class(name: str):
    """The constructor ``train.optimizer`` names, or None when its library is not installed."""
    try:
        if name == "adamw":
            from torch.optim import AdamW as cls
        elif name == "sgd":
            from torch.optim import SGD as cls
        elif name == "lion":
            from lion_pytorch import Lion as cls
        elif name == "prodigy":
            from prodigyopt import Prodigy as cls
        elif name == "adafactor":
            from transformers.optimization import Adafactor as cls
        elif name in ("adamw8bit", "lion8bit"):
            import bitsandbytes.optim as bnb

            cls = bnb.AdamW8bit if name == "adamw8bit" else bnb.Lion8bit
        else:
            return None
    except ImportError:
        return None  # training says which package to install
    return cls


def optimizer_arg_problems(name: str, args: dict) -> list[tuple[str, str]]:
    """(argument, message) for each of ``optimizer_args`` the optimizer's constructor does not take."""
    if not args:
        return []
    out = [(k, f"'{k}' is set by train.learning_rate (and unet_lr, text_encoder_lr), not here")
           for k in ("lr", "params") if k in args]
    cls = _optimizer_class(name)
    if cls is None:
        return out
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return out
    known = [k for k in params if k not in ("self", "params", "lr")]
    for k in args:
        if k not in params and k not in ("lr", "params"):
            out.append((k, f"{cls.__name__} takes no argument '{k}' (it takes: {', '.join(known)})"))
    return out


def shared_outputs(projects: list[tuple[str, str, str]]) -> dict[str, str]:
    """{file: message} for the projects that cannot have their output name: ``projects`` are
    (file, project name, output name). Two projects writing one ``output/<name>/`` would
    overwrite each other's LoRA (and doit refuses two tasks with one target). The project
    whose own name it is keeps it; the others (all of them when no project has that name) fail.
    """
    by_output: dict[str, list[tuple[str, str]]] = {}
    for file, name, output in projects:
        by_output.setdefault(output, []).append((file, name))
    out = {}
    for output, group in by_output.items():
        if len(group) < 2:
            continue
        owner = next((f for f, n in group if n == output), None)
        for file, _ in group:
            if file != owner:
                others = ", ".join(f for f, _ in group if f != file)
                out[file] = (f"'{output}' is also the output of {others}: each project needs its own "
                             f"output/{output}/ folder (set another output.name)")
    return out
