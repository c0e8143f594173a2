"""What each stage declares (its ``TASK``), so the build graph (tasks.py), ``lorabuild status``,
``lorabuild plan`` and the dashboard read one answer to "what does stage X depend on".

No torch and no stage module here: the stage modules import this to declare themselves, and
:mod:`lorabuild.stages.registry` lists them in build order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable

from .. import models
from ..config import Project
from ..dataset import Dataset
from ..workspace import Workspace

# what names the base model: a change reruns the stages that load it (they reuse what its
# identity, a content hash, says is unchanged)
MODEL = ("base_model",) + models.MODEL_OPTIONS


def plain(value):
    """Deep-thaw frozen config values into JSON-able lists and dicts."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "items"):
        return {k: plain(v) for k, v in value.items()}
    return value


def short(name: str) -> str:
    """``bucket.resolution`` → ``resolution``: how stages' ``run`` and doit's records name a parameter
    (kept as it was, so existing workspaces stay up to date; :meth:`Stage.full_name` maps it back)."""
    return name.rsplit(".", 1)[-1]


def params_of(project: Project, names: tuple[str, ...]) -> dict:
    """The values of full dotted ``names``, keyed by their last part."""
    return {short(k): plain(project.get(k)) for k in names}


def weight_files(project: Project, *components: str) -> list[str]:
    """Weight files of a real base model (and a separate VAE) as file_deps; a builtin model has
    none to watch. A single file is named as it is (converting it is the stage's work, not
    the task graph's)."""
    out = []
    spec = str(project.get("base_model"))
    vae = project.get("vae")
    if vae and "vae" in components:
        vpath = project.resolve(vae)
        out += [str(vpath)] if vpath.is_file() else [str(f) for f in models.weight_files(vpath, "")] + [
            str(f) for f in models.weight_files(vpath, "vae")]
        components = tuple(c for c in components if c != "vae")
    if "text_encoder" in components:  # a FLUX.1 / SD 3.5 single file's separate text encoders (separate.py)
        out += [str(project.resolve(p)) for p in (project.get("text_encoders") or {}).values()
                if p and project.resolve(p).is_file()]  # a missing one: the stage says which field
    if spec.startswith("builtin:"):
        return out
    path = project.resolve(spec)
    if path.is_file():
        return out + [str(path)]
    if not path.is_dir():
        return out  # the stage's action reports it
    # SDXL's second text encoder is read wherever the first is (a folder without one lists nothing)
    parts = [p for c in components for p in ((c, "text_encoder_2") if c == "text_encoder" else (c,))]
    return out + [str(f) for c in parts for f in models.weight_files(path, c)]


@dataclass(frozen=True)
class Inputs:
    """What a stage's files are listed from while doit loads the graph (nothing is read)."""

    ws: Workspace
    project: Project
    dataset: Dataset
    tagged: tuple[str, ...] = ()  # the tag stage's manifest, when the project has a tagger

    def manifest(self, stage: str) -> str:
        return str(self.ws.manifest(self.project.name, stage))

    def images(self) -> list[str]:
        return [str(im.path) for im in self.dataset.images]

    def captions(self) -> list[str]:
        return [str(c) for c in self.dataset.caption_files()]

    def weights(self, *components: str) -> list[str]:
        return weight_files(self.project, *components)

    def resolved(self, key: str) -> list[str]:
        """The file a project option names (``network.weights``), when it is set."""
        value = self.project.get(key)
        return [str(self.project.resolve(value))] if value else []

    @property
    def out_dir(self):
        return self.ws.output_dir(self.project.output_name)

    def lora(self) -> str:
        return str(self.out_dir / f"{self.project.output_name}.safetensors")


def _always(project: Project) -> bool:
    return True


def _none(inputs: Inputs) -> list:
    return []


@dataclass(frozen=True)
class Stage:
    """One stage, as the build graph and every command that explains it see it."""

    name: str
    version: int
    doc: str
    params: tuple[str, ...]  # full dotted names (whole sections by name) its task is keyed on
    deps: Callable[[Inputs], list[str]]  # the files it reads
    run: Callable  # run(ctx, dataset): the work of its task's action
    sections: tuple[str, ...] = ()  # sections its task is keyed on whole, under their own names
    extra: Callable[[Project, dict], dict] | None = None  # values that replace or join its task's record
    enabled: Callable[[Project], bool] = _always
    outputs: Callable[[Inputs], list[str]] = _none  # targets beside its manifest
    waits: Callable[[Inputs], list] = _none  # doit uptodate checks beside its parameters and manifest
    full_names: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        names = {short(k): k for k in self.params} | {s: s for s in self.sections}
        if len(names) != len(self.params) + len(self.sections):
            raise ValueError(f"stage {self.name}: two parameters share a last name part: {self.params}")
        object.__setattr__(self, "full_names", names)

    def config(self, project: Project) -> dict:
        """The dict doit's ``config_changed`` keys this stage's task on (and its report keeps)."""
        cfg = {s: plain(project.section(s)) for s in self.sections} | params_of(project, self.params)
        cfg["v"] = self.version
        return cfg | (self.extra(project, cfg) if self.extra else {})

    def full_name(self, key: str) -> str:
        """A key of :meth:`config` as the project names it: ``resolution`` → ``bucket.resolution``."""
        return self.full_names.get(key, key)
