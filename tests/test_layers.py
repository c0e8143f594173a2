"""The module map of ARCHITECTURE.md, checked against the imports (ast only: no torch, no import).

A module may import its own layer and the layers below it, never one above; and no set of
modules may import each other in a circle (function-level imports count: they are imports
all the same, only later). ``LAYERS`` is the one table; ARCHITECTURE.md mirrors it. The
``KNOWN_*`` lists are debts with an owner: the test fails when one is paid and still listed,
so they only shrink.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lorabuild"

# low → high; a name ending in "." is a package prefix (every module under it)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("lorabuild", "commands", "importers", "lora", "train", "errors", "cache", "workspace",
                    "resources", "yamlio", "winenv", "precision", "progress", "faults", "images", "buckets",
                    "multires", "captions", "dataset", "prompts", "extras", "hints", "train.optimizers", "wd14",
                    "train.plan", "train.losses", "train.preserve", "train.ema", "lora.lyco_options", "gallery", "leftovers", "world",
                    "train.dist", "importers.scripts", "flow", "objective", "pixels", "train.lossplot", "cpuconv", "lora.flow_select")),
    ("text and layout", ("textenc", "lora.layout")),  # what the families build their conditioning and names from
    ("families", ("families", "families.")),  # one module per model family (SD1, SD2, SDXL, …): issue 21
    ("model", ("models", "separate", "checkpoints", "folders", "lora.blocks", "lora.network", "lora.lyco_fused", "lora.lyco", "lora.adapter", "lora.metadata",
               "detector")),
    ("config", ("config", "limits")),
    # publish: the run's saved files (kohya metadata) and their publishing
    ("training", ("train.loop", "train.publish")),
    ("stages", ("stages.",)),  # stages/preview.py: what a build will train on, by the stages' own rules
    ("build", ("tasks",)),
    ("commands", ("commands.status", "commands.report", "commands.watch", "commands.tag", "commands.doctor",
                  "train.worker", "serve", "serve.", "commands.validate", "importers.common", "importers.read",
                  "importers.options", "importers.datasets", "importers.convert", "importers.write",
                  "importers.aitoolkit", "importers.onetrainer", "importers.flow")),
    ("cli", ("cli", "__main__")),
]

# imports of a higher layer that exist today, each to be removed by the named work (none left: keep it so)
KNOWN_UPWARD: set[tuple[str, str]] = set()
# circles that exist today (as the sorted modules of each), each to be broken by the named work (none left)
KNOWN_CIRCLES: set[tuple[str, ...]] = set()


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "lorabuild"


def import_graph() -> dict[str, set[str]]:
    """Module (without ``lorabuild.``) → the lorabuild modules it imports anywhere in its file."""
    paths = {_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for mod, path in paths.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: max(len(pkg.split(".")) - node.level + 1, 0)] if pkg else []
                    target = ".".join([p for p in base if p] + ([node.module] if node.module else []))
                elif (node.module or "").startswith("lorabuild"):
                    target = node.module.removeprefix("lorabuild").lstrip(".")
                else:
                    continue
                subs = [f"{target}.{a.name}".lstrip(".") for a in node.names]
                found |= {s for s in subs if s in paths} or {target or "lorabuild"}
            elif isinstance(node, ast.Import):
                found |= {a.name.removeprefix("lorabuild").lstrip(".") or "lorabuild"
                          for a in node.names if a.name.split(".")[0] == "lorabuild"}
        graph[mod] = {m for m in found if m in paths and m != mod}
    return graph


def layer_of(mod: str) -> int:
    best = None
    for i, (_, names) in enumerate(LAYERS):
        for n in names:
            if mod == n or (n.endswith(".") and mod.startswith(n)):
                best = i
    if best is None:
        raise AssertionError(f"lorabuild/{mod.replace('.', '/')}.py is in no layer: add it to LAYERS (and ARCHITECTURE.md)")
    return best


def circles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), set()

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.add(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer_and_imports_no_higher_one():
    graph = import_graph()
    upward = {(m, d) for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m)}
    new = sorted(upward - KNOWN_UPWARD)
    assert not new, "imports of a higher layer (see ARCHITECTURE.md): " + ", ".join(f"{m} → {d}" for m, d in new)
    paid = sorted(KNOWN_UPWARD - upward)
    assert not paid, f"no longer imported upward, remove from KNOWN_UPWARD: {paid}"


def test_no_import_circles():
    found = circles(import_graph())
    assert not found - KNOWN_CIRCLES, f"import circles: {sorted(found - KNOWN_CIRCLES)}"
    assert not KNOWN_CIRCLES - found, f"broken circles, remove from KNOWN_CIRCLES: {sorted(KNOWN_CIRCLES - found)}"


def test_the_checker_sees_a_circle_and_an_upward_import():
    # the checks above pass on an empty finding: this shows they find one
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {("a", "b", "c")}
    assert layer_of("tasks") > layer_of("stages.bucket") > layer_of("config") > layer_of("models")
    assert layer_of("families.sdxl") == [n for n, _ in LAYERS].index("families")
    graph = import_graph()
    assert "stages.registry" in graph["tasks"] and "stages.base" in graph["train.worker"]  # function-level imports count


def test_no_module_imports_another_ones_private_names():
    graph_paths = {_name(p): p for p in PACKAGE.rglob("*.py")}
    private = []
    for mod, path in graph_paths.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("lorabuild")):
                private += [f"{mod}: {a.name}" for a in node.names if a.name.startswith("_") and a.name != "__version__"]
    known: set[str] = set()  # a debt with an owner, as KNOWN_*: none left
    assert set(private) - known == set(), sorted(set(private) - known)
    assert known <= set(private), f"fixed, remove from known: {sorted(known - set(private))}"
