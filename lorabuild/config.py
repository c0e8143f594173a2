"""Project files: safe YAML with positions → schema and semantic checks → a frozen Project.

Every problem is reported as ``FILE:LINE:COL: field: message`` (1-based), pointing at
the key of an unknown field, at the value of a wrong one, and at the parent mapping of a
missing one. Only stdlib + PyYAML here (jsonschema is imported when a file must really be
validated): this module runs every time doit loads the task graph.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from . import __version__, limits
from .cache import without_newer  # noqa: F401 - its home is cache.py; stages/train.py reads it here
from .captions import is_randomised
from .models import BUILTIN_MODELS, PICKLE_SUFFIXES
from .resources import schema_path
from .hints import enum_hint, normalize_enums, unknown_field
from .yamlio import Loader, dotted

MAX_BYTES = 1 << 20  # a project file is a few KB; refuse anything absurd before parsing
MAX_NODES = 100_000  # expanded nodes, so an alias bomb ("billion laughs") is refused
PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq")}


class Problem(NamedTuple):
    file: str
    line: int
    col: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}: "
        return where + (f"{self.field}: {self.message}" if self.field else self.message)


class ProjectError(Exception):
    def __init__(self, problems: list[Problem]):
        super().__init__("\n".join(map(str, problems)))
        self.problems = problems


Path_ = tuple  # a JSON path: keys and list indices


@dataclass(frozen=True)
class Project:
    name: str
    file: Path
    root: Path
    cfg: types.MappingProxyType

    def get(self, dotted: str) -> Any:
        node: Any = self.cfg
        for part in dotted.split("."):
            node = node[part]
        return node

    def section(self, name: str) -> dict:
        return thaw(self.cfg[name])

    def resolve(self, relpath: str) -> Path:
        return (self.root / relpath).resolve()

    @property
    def output_name(self) -> str:
        return self.cfg["output"]["name"] or self.name


def load_named(projects_dir: Path, name: str) -> "Project | None":
    """``projects/NAME.yaml`` (or a path to a YAML file) for a command; problems go to stderr."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else Path(projects_dir) / f"{name}.yaml"
    if not path.is_file():
        print(f"lorabuild: no project {path}", file=sys.stderr)
        return None
    try:
        return load_project(path, display=str(path))
    except ProjectError as exc:
        print(exc, file=sys.stderr)
        return None


def freeze(obj: Any) -> Any:
    if isinstance(obj, dict):
        return types.MappingProxyType({k: freeze(v) for k, v in obj.items()})
    if isinstance(obj, list):
        return tuple(freeze(v) for v in obj)
    return obj


def thaw(obj: Any) -> Any:
    if isinstance(obj, types.MappingProxyType | dict):
        return {k: thaw(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return [thaw(v) for v in obj]
    return obj


_SCHEMA: dict | None = None


def schema() -> dict:
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = json.loads(schema_path().read_text(encoding="utf-8"))
    return _SCHEMA


# --- YAML with positions -------------------------------------------------------------

class _Doc:
    """The parsed document plus the (line, col) of every key and value, by JSON path."""

    def __init__(self, display: str):
        self.display = display
        self.keys: dict[Path_, tuple[int, int]] = {}
        self.values: dict[Path_, tuple[int, int]] = {(): (1, 1)}
        self.problems: list[Problem] = []
        self.nodes = 0
        self._scalar = Loader("")  # YAML 1.2 floats: 1e-4 is a number

    def problem(self, pos: tuple[int, int], field: str, message: str) -> None:
        self.problems.append(Problem(self.display, pos[0], pos[1], field, message))

    def build(self, node: yaml.Node, path: Path_) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _TooBig()
        self.values[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if node.tag not in PLAIN_TAGS:
            # e.g. !!python/object: a project is plain data; never construct objects
            self.problem(self.values[path], dotted(path), f"YAML tag {node.tag} is not allowed")
            return None
        if isinstance(node, yaml.MappingNode):
            out: dict = {}
            self._scalar.flatten_mapping(node)  # merge keys (<<) as YAML defines them
            for knode, vnode in node.value:
                key = self._scalar.construct_object(knode) if isinstance(knode, yaml.ScalarNode) else None
                kpos = (knode.start_mark.line + 1, knode.start_mark.column + 1)
                if not isinstance(key, str):
                    self.problem(kpos, dotted(path), f"keys must be text, not {knode.value!r}")
                    continue
                if key in out:
                    self.problem(kpos, dotted(path + (key,)), "duplicate key (the first one is earlier in the file)")
                    continue
                self.keys[path + (key,)] = kpos
                out[key] = self.build(vnode, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(v, path + (i,)) for i, v in enumerate(node.value)]
        return self._scalar.construct_object(node)


class _TooBig(Exception):
    pass


def parse(text: str, display: str) -> tuple[Any, _Doc]:
    doc = _Doc(display)
    try:
        node = yaml.compose(text, Loader=Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        doc.problem((line, col), "", f"YAML syntax error: {exc.problem or exc}")
        return None, doc
    except yaml.YAMLError as exc:
        doc.problem((1, 1), "", f"YAML error: {exc}")
        return None, doc
    if node is None:
        doc.problem((1, 1), "", "the file is empty: a project is a mapping with at least base_model and dataset")
        return None, doc
    if not isinstance(node, yaml.MappingNode):
        pos = (node.start_mark.line + 1, node.start_mark.column + 1)
        doc.problem(pos, "", "a project file must be a mapping of sections (base_model:, dataset:, …)")
        return None, doc
    try:
        data = doc.build(node, ())
    except _TooBig:
        doc.problem((1, 1), "", f"the document expands to more than {MAX_NODES} nodes (an alias bomb?)")
        return None, doc
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        doc.problem((mark.line + 1, mark.column + 1) if mark else (1, 1), "", f"YAML error: {exc.problem}")
        return None, doc
    return data, doc


# --- schema checks -------------------------------------------------------------------

def _schema_problems(data: dict, doc: _Doc) -> None:
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema())
    for err in validator.iter_errors(data):
        _report(err, doc)


def _report(err, doc: _Doc) -> None:
    path = tuple(err.absolute_path)
    value_pos = doc.values.get(path, (1, 1))
    if err.validator == "additionalProperties":
        known = list(err.schema.get("properties", {}))
        for key in err.instance:
            if key in known:
                continue
            msg = f"unknown field '{key}'" + unknown_field(key, path, known, schema())
            doc.problem(doc.keys.get(path + (key,), value_pos), dotted(path + (key,)), msg)
    elif err.validator == "required":
        for key in err.validator_value:
            if key not in err.instance:
                doc.problem(value_pos, dotted(path + (key,)), "required field is missing")
    elif err.validator == "oneOf" and err.context:
        # A sample prompt: report what is wrong with the branch that fits the value's type.
        branch = 1 if isinstance(err.instance, dict) else 0
        sub = [e for e in err.context if e.relative_schema_path and e.relative_schema_path[0] == branch]
        if isinstance(err.instance, (dict, str)) and sub:
            for e in sub:
                _report(e, doc)
        else:
            doc.problem(value_pos, dotted(path), f"{err.instance!r} must be a prompt text or a mapping with 'prompt'")
    elif err.validator == "enum":
        doc.problem(value_pos, dotted(path), err.message + enum_hint(err.instance, err.validator_value))
    elif err.validator == "not" and isinstance(err.validator_value, dict) and "description" in err.validator_value:
        doc.problem(value_pos, dotted(path), f"{err.instance!r} is {err.validator_value['description']}")
    else:
        doc.problem(value_pos, dotted(path), err.message)


def _semantic_problems(data: dict, doc: _Doc, root: Path) -> None:
    """Checks the schema cannot express. Assumes the schema passed, with defaults filled."""
    pos = lambda *p: doc.values.get(p) or doc.values.get(p[:-1]) or (1, 1)  # noqa: E731
    base = data["base_model"]
    if base.startswith("builtin:"):
        if base.split(":", 1)[1] not in BUILTIN_MODELS:
            known = ", ".join("builtin:" + n for n in BUILTIN_MODELS)
            doc.problem(pos("base_model"), "base_model", f"unknown built-in model '{base}' (known: {known})")
    elif not (root / base).exists():
        doc.problem(pos("base_model"), "base_model", f"{(root / base).resolve()} does not exist")
    elif (root / base).is_file() and (root / base).suffix.lower() in PICKLE_SUFFIXES and not data["allow_pickle"]:
        doc.problem(pos("base_model"), "base_model",
                    f"{(root / base).resolve()} is a pickle checkpoint: unpickling can run code hidden in the file; "
                    "use a .safetensors copy, or set allow_pickle: true to load it with torch.load(weights_only=True)")
    for key in ("vae", "base_model_config"):
        if data[key] and not (root / data[key]).exists():
            doc.problem(pos(key), key, f"{(root / data[key]).resolve()} does not exist")
    for name, path in (data.get("text_encoders") or {}).items():
        if path and not (root / path).is_file():
            doc.problem(pos("text_encoders", name), f"text_encoders.{name}",
                        f"{(root / path).resolve()} " + ("is not a file" if (root / path).exists() else "does not exist"))
    ds = data["dataset"]
    from .dataset import dir_path

    for key in ("dirs", "reg_dirs", "val_dirs"):
        for i, d in enumerate(ds[key]):
            d = dir_path(d)  # a dirs entry may be {path, bucket}
            if not (root / d).is_dir():
                doc.problem(pos("dataset", key, i), f"dataset.{key}.{i}", f"folder {(root / d).resolve()} does not exist")
    for i, c in enumerate(ds["concepts"]):
        if not (root / c["path"]).is_dir():
            doc.problem(pos("dataset", "concepts", i, "path"), f"dataset.concepts.{i}.path",
                        f"folder {(root / c['path']).resolve()} does not exist")
        if c["is_reg"] and c["is_val"]:
            doc.problem(pos("dataset", "concepts", i, "is_val"), f"dataset.concepts.{i}.is_val",
                        "a concept is either regularization (is_reg) or validation (is_val) images, not both")
    if data["train"]["reg_target"] == "base" and not ds["reg_dirs"] and not any(c["is_reg"] for c in ds["concepts"]):
        doc.problem(pos("train", "reg_target"), "train.reg_target",
                    "base preserves the base model's predictions on the regularization images, and there are none: "
                    "give dataset.reg_dirs (or a concept with is_reg: true), or use noise")
    if not ds["dirs"] and not any(not c["is_reg"] and not c["is_val"] for c in ds["concepts"]):
        doc.problem(pos("dataset"), "dataset", "no training images: give dirs (parents of '<repeats>_<tokens>' folders) or concepts")
    pf = data["sample"]["prompt_file"]
    if pf and not (root / pf).is_file():
        doc.problem(pos("sample", "prompt_file"), "sample.prompt_file", f"{(root / pf).resolve()} does not exist")
    tagger = data.get("tagger")
    if tagger:
        from .wd14 import folder_problem

        problem = folder_problem((root / tagger["model"]).resolve())
        if problem:
            doc.problem(pos("tagger", "model"), "tagger.model", problem)
    nw = data["network"]["weights"]
    if nw and not (root / nw).is_file():
        doc.problem(pos("network", "weights"), "network.weights", f"{(root / nw).resolve()} does not exist")
    limits.file_problems(data, doc, pos, root)
    _network_problems(data, doc, pos)
    _noise_problems(data["train"], doc, pos)
    b = data["bucket"]
    if b["min_reso"] > b["max_reso"]:
        doc.problem(pos("bucket", "min_reso"), "bucket.min_reso", f"{b['min_reso']} is larger than bucket.max_reso ({b['max_reso']})")
    for k in ("min_reso", "max_reso"):
        if b[k] % b["step"]:
            doc.problem(pos("bucket", k), f"bucket.{k}", f"{b[k]} is not a multiple of bucket.step ({b['step']})")
    from .multires import problems as resolution_problems

    resolution_problems(b, "bucket", lambda *k: pos("bucket", *k), doc.problem)
    for key in ("concepts", "dirs"):
        for i, c in enumerate(ds[key]):
            if isinstance(c, dict) and c.get("bucket"):
                resolution_problems({**b, **c["bucket"]}, f"dataset.{key}.{i}.bucket",
                                    lambda *k, i=i, key=key: pos("dataset", key, i, "bucket", *k), doc.problem)
    # Latents are 1/8 of the pixels; the SD 1.x/2.x UNet halves them 3 times (sides divide by 64),
    # SDXL's twice (by 32). Checked where the architecture is known here (built-in model, model_type).
    fam = _known_family(data)
    if fam and b["step"] % fam.bucket_step:
        doc.problem(pos("bucket", "step"), "bucket.step",
                    f"{b['step']} is not a multiple of {fam.bucket_step}, which {fam.unet_title} needs")
    net = data["network"]
    if not net["train_unet"] and not net["train_text_encoder"]:
        doc.problem(pos("network"), "network", "train_unet and train_text_encoder are both false: nothing would train")
    cap = data["captions"]
    if data["textemb"]["cache"] is True:
        why = []
        if net["train_text_encoder"]:
            why.append("network.train_text_encoder is true (embeddings change as it trains)")
        if is_randomised(cap):
            why.append("captions are randomised per epoch (shuffle, dropout, tag_dropout, dropout_every_n_epochs or wildcards)")
        if why:
            doc.problem(pos("textemb", "cache"), "textemb.cache", "true is impossible: " + " and ".join(why) + "; use auto")


def _noise_problems(tr: dict, doc: _Doc, pos) -> None:
    """The timestep range and the options that refine another one, which alone would do nothing."""
    low, high = tr["min_timestep"], tr["max_timestep"]
    if low is not None and low >= (1000 if high is None else high):
        doc.problem(pos("train", "min_timestep"), "train.min_timestep",
                    f"{low} is not below train.max_timestep ({1000 if high is None else high}): timesteps are drawn "
                    "from [min_timestep, max_timestep)")
    for key, base in (("adaptive_noise_scale", "noise_offset"), ("noise_offset_random_strength", "noise_offset"),
                      ("ip_noise_gamma_random_strength", "ip_noise_gamma")):
        if tr[key] not in (None, False) and not tr[base]:  # kohya refuses adaptive_noise_scale alone too
            doc.problem(pos("train", key), f"train.{key}", f"is set but train.{base} is not, so it would do nothing")


def _known_family(data: dict):
    """The model family, where it is known before loading the model (a set model_type or a
    built-in model); otherwise it is found at train time."""
    from .families import FAMILIES, builtin_family

    if data.get("model_type") in FAMILIES:
        return FAMILIES[data["model_type"]]
    spec = data["base_model"]
    return builtin_family(spec.split(":", 1)[1]) if spec.startswith("builtin:") else None


def _network_problems(data: dict, doc: _Doc, pos) -> None:
    from .lora.blocks import length_problems

    net = data["network"]
    locon = net["conv_dim"] or net["conv_block_dims"]
    for key in ("conv_alpha", "conv_block_alphas"):
        if net[key] is not None and not locon:
            doc.problem(pos("network", key), f"network.{key}", "is set but network.conv_dim is not (LoCon is off)")
    for key in ("exclude_patterns", "include_patterns"):
        for i, p in enumerate(net[key]):
            try:
                re.compile(p)
            except re.error as exc:
                doc.problem(pos("network", key, i), f"network.{key}.{i}", f"{p!r} is not a regular expression ({exc})")
    fam = _known_family(data)
    for key, msg in length_problems(net, fam.name if fam else None):
        doc.problem(pos("network", key), f"network.{key}", msg)
    from .lora.lyco_options import option_problems

    for section, key, msg in option_problems(net, data.get("train")):
        doc.problem(pos(section, key), f"{section}.{key}", msg)
    from .lora.flow_select import format_problem, problems as selection_problems

    for key, msg in selection_problems(net, fam.name if fam else None):
        doc.problem(pos("network", key), f"network.{key}", msg)
    msg = format_problem(net, fam.name if fam else None, (data.get("output") or {}).get("format"))
    if msg:
        doc.problem(pos("output", "format"), "output.format", msg)


def apply_defaults(data: Any, sch: dict) -> Any:
    """Fill every missing optional field with its schema default, recursively."""
    if isinstance(data, list) and isinstance(sch.get("items"), dict):
        for item in data:
            apply_defaults(item, sch["items"])
        return data
    if not isinstance(data, dict):
        return data
    for key, sub in sch.get("properties", {}).items():
        if key not in data and "default" in sub:
            data[key] = copy.deepcopy(sub["default"])
        if key in data:
            apply_defaults(data[key], sub)
    return data


# --- loading -------------------------------------------------------------------------

def _memo_key(raw: bytes) -> str:
    h = hashlib.sha256(raw)
    h.update(schema_path().read_bytes())
    h.update(__version__.encode())
    return h.hexdigest()


def check(path: Path, display: str | None = None, memo_dir: Path | None = None) -> tuple[dict | None, list[Problem]]:
    """Parse and check one project file: (document with defaults, problems)."""
    display = display if display is not None else str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        return None, [Problem(display, 1, 1, "", f"cannot read the file ({exc.strerror or exc})")]
    if len(raw) > MAX_BYTES:
        return None, [Problem(display, 1, 1, "", f"the file is {len(raw)} bytes; project files are limited to {MAX_BYTES}")]
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return None, [Problem(display, 1, 1, "", f"not UTF-8 text ({exc})")]
    data, doc = parse(text, display)
    if data is None or doc.problems:
        return None, doc.problems
    normalize_enums(data, schema())  # AdamW8bit is adamw8bit: kohya's spellings are unambiguous
    limits.non_finite(data, doc)
    too_long = limits.name_problem(Path(path).stem, "the project's name (its file name without .yaml)")
    if too_long:
        doc.problem((1, 1), "", too_long)
    memo = Path(memo_dir) / _memo_key(raw) if memo_dir else None
    if memo is None or not memo.is_file() or doc.problems:
        found = len(doc.problems)  # a non-finite number or a long name leaves the document's shape as it is
        _schema_problems(data, doc)
        seen = {(p.line, p.col, p.field) for p in doc.problems[:found]}  # -inf is also "less than the minimum"
        doc.problems[found:] = [p for p in doc.problems[found:] if (p.line, p.col, p.field) not in seen]
        if len(doc.problems) > found:
            doc.problems.sort(key=lambda p: (p.line, p.col))
            return None, doc.problems
    apply_defaults(data, schema())
    _semantic_problems(data, doc, Path(path).resolve().parent)
    if memo is None or not memo.is_file():
        limits.library_problems(data, doc)  # imports the optimizer's library: not on every doit load
    if doc.problems:
        doc.problems.sort(key=lambda p: (p.line, p.col))
        return None, doc.problems
    if memo is not None and not memo.is_file():
        from .cache import write_json

        write_json(memo, {"file": str(path), "schema_valid": True})
    return data, []


def load_project(path: str | Path, display: str | None = None, memo_dir: Path | None = None) -> Project:
    path = Path(path)
    data, problems = check(path, display, memo_dir)
    if problems:
        raise ProjectError(problems)
    file = path.resolve()
    return Project(name=file.stem, file=file, root=file.parent, cfg=freeze(data))
