"""The stage declarations (stages/registry.py) against the schema: fast, no build, no torch."""
from __future__ import annotations

import json

from lorabuild.resources import schema_path
from lorabuild.stages.registry import NAMES, STAGES


def _field(schema: dict, dotted: str):
    node = schema
    for part in dotted.split("."):
        node = (node.get("properties") or {}).get(part)
        if node is None:
            return None
    return node


def test_every_declared_parameter_is_a_project_field():
    # a stage keyed on a name the schema does not have would never see that option change
    schema = json.loads(schema_path().read_text(encoding="utf-8"))
    missing = [f"{s.name}: {p}" for s in STAGES for p in s.params + s.sections if _field(schema, p) is None]
    assert not missing, missing


def test_status_names_a_parameter_with_its_section():
    by = dict(zip(NAMES, STAGES))
    assert by["bucket"].full_name("resolution") == "bucket.resolution"
    assert by["train"].full_name("train") == "train" and by["train"].full_name("clip_skip") == "textemb.clip_skip"
    assert NAMES == ("resize", "tag", "bucket", "latents", "textemb", "train", "sample")
