"""The demo's cache keys and doit task records, as recorded before the stage registry (issue 21).

What this guards: a refactor of how stages declare their parameters (tasks.py, the stage
modules) must leave every existing cache valid and every existing workspace up to date. So
it checks, on the suite's shared demo build (no build of its own):

- every stage's per-item keys, and the train run's and saved entries' keys, as the
  workspace's manifests name them (their sidecars hold the key dicts), against
  ``data/recorded_keys.json``. Values that depend on the installed torch/diffusers (model
  identities hash weight files and their configs; trained LoRA bytes) are replaced by names
  such as ``<vae>`` or ``<latents:ID>``, so a library upgrade does not fail this test while a
  changed key still does; keys free of them (resize, bucket) are compared hash for hash;
- each task's doit record (the dict ``config_changed`` hashes, its file_dep and targets):
  a changed one makes doit rerun a task for nothing on every existing workspace.

Regenerate (only for a deliberate key change, said so in its commit):
    python tests/test_recorded_keys.py WORKSPACE_WITH_BUILT_DEMO
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

RECORD = Path(__file__).parent / "data" / "recorded_keys.json"
STAGES = ("resize", "bucket", "latents", "textemb", "train", "sample")


def _sidecar_key(root: Path, stage: str, h: str) -> dict:
    side = json.loads((root / "cache" / "objects" / stage / h[:2] / f"{h[2:]}.json").read_text(encoding="utf-8"))
    return side["key"]


def _named(value, names: dict):
    if isinstance(value, dict):
        return {k: _named(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_named(v, names) for v in value]
    return names.get(value, value) if isinstance(value, str) else value


def cache_keys(root: Path) -> dict:
    """{stage: {item id: {"hash", "key"}}} from the manifests, environment-dependent values named."""
    from lorabuild.cache import FileHashes, key_hash

    manifests = {s: json.loads((root / "cache" / "manifests" / "demo" / f"{s}.json").read_text(encoding="utf-8"))
                 for s in STAGES}
    base = _sidecar_key(root, "sample", manifests["sample"]["items"][0]["hash"])["base"]
    names = {h: f"<{component}>" for component, h in base.items()}
    hashes = FileHashes(root / "cache" / "hashes.json")
    out: dict = {}
    for stage in STAGES:
        items = [(it["id"], it["hash"]) for it in manifests[stage]["items"]]
        if stage == "train":
            entry = manifests["train"]["items"][0]
            items += [(f"{kind}-{e}", h) for kind in ("epochs", "states") for e, h, *_ in entry[kind]]
        rows = out[stage] = {}
        for item_id, h in items:
            key = _sidecar_key(root, stage, h)
            assert key_hash(key) == h, f"{stage} {item_id}: its manifest hash is not its sidecar key's"
            named = _named(key, names)
            if named != key:  # hashed from a model identity or a trained LoRA: named, not compared by value
                names[h] = f"<{stage}:{item_id}>"
            rows[item_id] = {"hash": names.get(h, h), "key": named}
            store_file = next((root / "cache" / "objects" / stage / h[:2]).glob(f"{h[2:]}.safetensors"), None)
            if stage == "train" and store_file is not None:  # the sample stage keys on the LoRA's tensors
                names[hashes.sha256(store_file, tensors_only=True)] = f"<lora:{item_id}>"
    return out


def task_records(root: Path) -> dict:
    """{task name: {"config", "file_dep", "targets"}} as doit sees them for the demo project."""
    from lorabuild.tasks import Graph

    graph = Graph(root)
    out = {}
    for f, p, ds, error in graph.projects():
        assert not error, error
        for stage in STAGES:
            for t in graph.tasks(stage):
                out[f"{stage}:{t['name']}"] = {"config": t["uptodate"][0].config, "file_dep": sorted(t["file_dep"]),
                                               "targets": sorted(t["targets"])}
    return out


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, indent=1)  # as config_changed hashes it: 1, 1.0 and true differ


def test_cache_keys_are_the_recorded_ones(built_demo):
    recorded = json.loads(RECORD.read_text(encoding="utf-8"))
    now = cache_keys(built_demo.root)
    for stage in STAGES:
        assert _canonical(now[stage]) == _canonical(recorded["cache_keys"][stage]), f"{stage} keys changed"
    # resize and bucket depend on no model: their keys are compared as hashes too
    assert all(not r["hash"].startswith("<") for s in ("resize", "bucket") for r in now[s].values())


def test_doit_task_records_are_the_recorded_ones(built_demo):
    recorded = json.loads(RECORD.read_text(encoding="utf-8"))["tasks"]
    now = task_records(built_demo.root)
    assert sorted(now) == sorted(recorded)
    for name in recorded:
        assert _canonical(now[name]) == _canonical(recorded[name]), f"{name}: doit would rerun it for nothing"


if __name__ == "__main__":
    ws = Path(sys.argv[1]).resolve()
    RECORD.write_text(_canonical({"cache_keys": cache_keys(ws), "tasks": task_records(ws)}) + "\n", encoding="utf-8")
    print(f"wrote {RECORD}")
