"""``lorabuild validate [FILES…]``: each project file alone (:func:`lorabuild.config.check`), then
what only the workspace shows (a dataset folder that cannot be listed, an output name two projects
share). Above config and limits: it loads whole projects, which limits (config's own checks) cannot.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..config import Problem, check, load_project, parse
from ..dataset import DatasetError, UnusableFolder, from_project
from ..extras import missing
from ..limits import shared_outputs
from ..winenv import output_clashes


def _position(path: Path, display: str, key: tuple) -> tuple[int, int]:
    _, doc = parse(path.read_text(encoding="utf-8-sig"), display)
    return doc.values.get(key) or doc.keys.get(key) or doc.keys.get(key[:1]) or (1, 1)


def workspace_problems(valid: list[tuple[Path, str, dict]]) -> list:
    """What ``validate`` finds beyond each file alone (``valid``: (path, display, document)
    of the files that passed): a dataset folder that cannot be listed, and output names
    shared with another project of the same folder (the workspace doit builds)."""
    out = []
    for path, display, _ in valid:
        try:
            from_project(load_project(path))
        except UnusableFolder as exc:
            out.append(Problem(display, *_position(path, display, ("dataset",)), "dataset", str(exc)))
        except DatasetError:
            pass  # no images yet, say: the build reports it (and `watch` waits for them)
    names = {path.resolve(): (display, data) for path, display, data in valid}
    for folder in {path.resolve().parent for path, _, _ in valid}:
        for sibling in sorted(folder.glob("*.yaml")):
            if sibling.resolve() not in names:
                data, problems = check(sibling)
                if not problems:
                    names[sibling.resolve()] = (str(sibling), data)
    groups = [(str(p), p.stem, data["output"]["name"] or p.stem) for p, (_, data) in names.items()]
    asked = {path.resolve() for path, _, _ in valid}
    for file, message in sorted(shared_outputs(groups).items()):
        path = Path(file)
        if path in asked:  # a sibling's own problem is for its own validation
            display = names[path][0]
            out.append(Problem(display, *_position(path, display, ("output", "name")), "output.name", message))
    return out


def validate_files(files: list[str]) -> int:
    bad, names, valid = 0, [], []
    for f in files:
        data, problems = check(Path(f), f)
        for p in problems:
            print(p, file=sys.stderr)
        if data is not None:  # valid, but this Python may lack what its settings need
            for line in missing(data):
                print(f"{f}: warning: {line}", file=sys.stderr)
        bad += bool(problems)
        if data is not None:
            names.append((f, data["output"]["name"] or Path(f).stem))
        if not problems:
            valid.append((Path(f), f, data))
    for f, message in output_clashes(names).items():  # Demo vs demo: one folder on Windows
        print(f"{f}: output.name: {message}", file=sys.stderr)
        bad += 1
    more = workspace_problems(valid)  # datasets that cannot be listed, output names shared
    for p in more:
        print(p, file=sys.stderr)
    return 1 if bad or more else 0


def cmd_validate(files: list[str]) -> int:
    """``lorabuild validate [FILES…]``; default: every ``projects/*.yaml`` under the current folder."""
    if not files:
        files = [p.as_posix() for p in sorted(Path("projects").glob("*.yaml"))]
        if not files:
            print("lorabuild validate: no projects/*.yaml here; name the files to check", file=sys.stderr)
            return 1
    return validate_files(files)
