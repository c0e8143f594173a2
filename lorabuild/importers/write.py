"""``lorabuild import-kohya``: read a kohya setup, resolve its paths, write the project, validate it.

Paths are resolved as kohya resolves them, from the folder it runs in: the config's own folder
(where lora-scripts' scripts run), or ``--root``. They are written relative to the new project
file (which is how lorabuild reads them), and the ones that do not exist are named. Each
mapped field carries a comment naming its kohya source, and the header lists everything that
was not carried over.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import yaml

from .convert import convert_full, ordered
from .options import Result
from .read import ImportError_, Source, read_dataset_config, read_source
from ..models import PICKLE_SUFFIXES
from ..yamlio import dump, load


def _where(value: str, root: Path, out_dir: Path) -> tuple[str, Path]:
    """(the path as the project writes it, where it is)."""
    if os.name != "nt":
        value = value.replace("\\", "/")  # a script written on Windows
    p = Path(value).expanduser()
    absolute = Path(os.path.normpath(p if p.is_absolute() else root / p))
    try:
        rel = os.path.relpath(absolute, out_dir)
    except ValueError:  # another Windows drive: only an absolute path reaches it
        rel = str(absolute)
    return Path(rel).as_posix(), absolute


def fix_paths(r: Result, root: Path, out_dir: Path) -> list[str]:
    """Rewrite every path field relative to ``out_dir``; the ones that do not exist, as messages."""
    missing = []

    def fix(value: str, label: str) -> str:
        written, absolute = _where(str(value), root, out_dir)
        if not absolute.exists():
            hub = re.fullmatch(r"[\w.-]+/[\w.-]+", str(value)) and not str(value).startswith(".") \
                and Path(str(value)).suffix.lower() not in (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
            missing.append(f"{label}: {absolute} does not exist" + (
                " (a Hugging Face model id? lorabuild trains on a local file or folder: download it first)"
                if hub and label == "base_model" else ""))
        return written

    doc = r.doc
    for key in ("base_model", "vae"):
        if isinstance(doc.get(key), str) and not doc[key].startswith("builtin:"):
            doc[key] = fix(doc[key], key)
    for name, value in (doc.get("text_encoders") or {}).items():
        doc["text_encoders"][name] = fix(value, f"text_encoders.{name}")
    ds = doc.get("dataset", {})
    for key in ("dirs", "reg_dirs"):
        ds[key] = [fix(d, f"dataset.{key}") for d in ds.get(key, [])] or ds.pop(key, None) or []
        if not ds[key]:
            del ds[key]
    for i, c in enumerate(ds.get("concepts", [])):
        c["path"] = fix(c["path"], f"dataset.concepts.{i}.path")
    for section, key in (("network", "weights"), ("sample", "prompt_file")):
        if doc.get(section, {}).get(key):
            doc[section][key] = fix(doc[section][key], f"{section}.{key}")
    base = str(doc.get("base_model", ""))
    if Path(base).suffix.lower() in PICKLE_SUFFIXES:
        r.set("allow_pickle", True, "the base model is a pickle checkpoint")
        r.notes.append(f"base_model {base} is a pickle checkpoint ({Path(base).suffix}): kohya loads it as it is; "
                       "lorabuild only with allow_pickle: true (set here), because unpickling a file can run code "
                       "hidden in it. A .safetensors copy of the model is safer: use it and remove allow_pickle")
        r.doc = ordered(r.doc)
    return missing


def _flow(value) -> str:
    text = dump(value, default_flow_style=True, width=2 ** 31, allow_unicode=True, sort_keys=False)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _comment(source: str | None) -> str:
    return f"  # {source}" if source else ""


def render_yaml(r: Result) -> str:
    """The document in block style, one field a line, each with a comment naming its kohya source."""
    lines = []
    for key, value in r.doc.items():
        if not isinstance(value, dict):
            lines.append(f"{key}: {_flow(value)}{_comment(r.sources.get(key))}")
            continue
        lines.append(f"{key}:")
        for k2, v2 in value.items():
            src = r.sources.get(f"{key}.{k2}")
            if isinstance(v2, list) and v2 and all(isinstance(x, dict) for x in v2):
                lines.append(f"  {k2}:{_comment(src)}")
                lines += [f"    - {_flow(x)}" for x in v2]
            else:
                lines.append(f"  {k2}: {_flow(v2)}{_comment(src)}")
    text = "\n".join(lines) + "\n"
    try:
        same = load(text) == r.doc
    except yaml.YAMLError:  # PyYAML can emit unicode plain scalars (e.g. after a no-break space) it cannot read
        same = False
    # never write something that reads back differently: then plain YAML, non-ASCII escaped, without comments
    return text if same else dump(r.doc, sort_keys=False, allow_unicode=False)


def header(r: Result, src: Source, source: str, root: Path, missing: list[str]) -> list[str]:
    head = [f"# Imported by lorabuild import-kohya from {source} (read as: {src.kind})",
            f"# Paths are relative to this file; the source's were resolved from {root}",
            "# Check it with: lorabuild validate; lorabuild plan"]
    if r.unmapped:
        head.append("# Not mapped (no equivalent here, or not understood):")
        head += [f"#   {u}" for u in r.unmapped]
    if r.off:
        head.append(f"# Off (kohya's 0, false or empty; so is lorabuild's default): {', '.join(r.off)}")
    if r.not_needed:
        head.append(f"# Not needed here (kohya's own caching, bucketing, logging and file handling): "
                    f"{', '.join(r.not_needed)}")
    if src.gui_only:
        head.append(f"# Settings with no effect on the LoRA (outputs, devices, logging, the GUI's own): "
                    f"{', '.join(src.gui_only)}")
    if src.empty:
        head.append(f"# Left empty in the GUI, so kohya's default: {', '.join(src.empty)}")
    head += [f"# Missing: {m}" for m in missing]
    head += [f"# Note: {n}" for n in r.notes]
    return head


def cmd_import(config: Path, dataset_config: Path | None, out: Path | None, root: Path | None = None) -> int:
    """Write the project (or print it); say what was not carried over, which paths are missing, and validate."""
    root = (root or config.parent).resolve()
    try:
        src = read_source(config, root)
        if src.options.get("config_file"):  # a command line naming a --config_file: the command line wins
            inner = read_source(root / str(src.options["config_file"]), root)
            src.options = {**inner.options, **src.options}
            src.notes += inner.notes
            src.unmapped += inner.unmapped
        ds = src.dataset
        named = dataset_config or (Path(str(src.options["dataset_config"])) if src.options.get("dataset_config") else None)
        if named is not None and ds is None:
            ds = read_dataset_config(named if named.is_absolute() or dataset_config else root / named)
    except ImportError_ as exc:
        print(f"lorabuild import-kohya: {exc}", file=sys.stderr)
        return 1
    out_dir = (out.parent if out else Path.cwd()).resolve()
    try:
        r = convert_full(src.options, ds)
        missing = fix_paths(r, root, out_dir)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # a shape no kohya tool writes
        print(f"lorabuild import-kohya: {config}: cannot convert it ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 1
    tool = src.kind.split(" ")[0]  # kohya_ss, ai-toolkit or OneTrainer: where renamed settings came from
    r.sources = {k: (f"{tool}: {src.renamed[v]}" if v in src.renamed else f"kohya: {v}") for k, v in r.sources.items()}
    r.unmapped[:0] = src.unmapped
    r.notes[:0] = src.notes
    label = str(config) + (f" + {dataset_config}" if dataset_config else "")
    text = "\n".join(header(r, src, label, root, missing)) + "\n" + render_yaml(r)
    for u in r.unmapped:
        print(f"not mapped: {u}", file=sys.stderr)
    for m in missing:
        print(f"missing: {m}", file=sys.stderr)
    if out is None:
        sys.stdout.write(text)
        print("not validated: give -o FILE to write the project and check it", file=sys.stderr)
        return 0
    from ..cache import atomic_write

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "w") as fh:
        fh.write(text)
    print(f"wrote {out} ({len(r.sources)} kohya options mapped, {len(r.unmapped)} not mapped)")
    return _validate(out)


def _validate(out: Path) -> int:
    from ..config import check
    from ..extras import missing

    data, problems = check(out)
    if problems:
        print(f"validated {out}: {len(problems)} problem(s) to fix before building:")
        for p in problems:
            print(f"  {p}")
    else:
        print(f"validated {out}: no problems")
        for line in missing(data):
            print(f"  warning: {line}")
    return 0
