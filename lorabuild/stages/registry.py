"""Every stage, in build order: the one list the build graph (tasks.py), ``lorabuild status``,
``lorabuild plan`` and the dashboard go through. Each stage module declares itself as ``TASK``
(:class:`lorabuild.stages.spec.Stage`); importing them loads no torch."""
from __future__ import annotations

from . import bucket, latents, resize, sample, tag, textemb, train
from .spec import Inputs, Stage

STAGES: tuple[Stage, ...] = tuple(m.TASK for m in (resize, tag, bucket, latents, textemb, train, sample))
NAMES = tuple(s.name for s in STAGES)
BY_NAME = {s.name: s for s in STAGES}


def stages_of(project) -> tuple[Stage, ...]:
    """The stages a project has: ``tag`` only with a ``tagger`` section."""
    return tuple(s for s in STAGES if s.enabled(project))


def inputs(ws, project, dataset) -> Inputs:
    """What each of the project's stages lists its files from."""
    tagged = (str(ws.manifest(project.name, tag.STAGE)),) if tag.TASK.enabled(project) else ()
    return Inputs(ws, project, dataset, tagged)


def upstream(stage: Stage, t: Inputs) -> list[str]:
    """The stages whose manifests ``stage`` reads, from its declared files."""
    deps = set(stage.deps(t))
    return [s.name for s in STAGES if s is not stage and t.manifest(s.name) in deps]
