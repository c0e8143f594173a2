"""Workspace.relative: the string fast path gives exactly what os.path.relpath gives."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from lorabuild.workspace import Workspace


@pytest.mark.parametrize("rel", [
    "projects/a/1_x/img.png", "cache/manifests/p/train.json", "projects/a/../b/c.txt", "projects/./a.txt",
    "projects//a.txt", "projects/.hidden/a.png", "x",
])
def test_relative_matches_relpath(tmp_path, rel):
    ws = Workspace(tmp_path)
    path = str(tmp_path) + "/" + rel
    assert ws.relative(path) == Path(os.path.relpath(path, tmp_path)).as_posix()
    assert ws.relative(Path(path)) == ws.relative(path)


def test_relative_outside_and_relative_inputs(tmp_path):
    ws = Workspace(tmp_path / "ws")
    assert ws.relative(tmp_path / "other" / "a.png") == "../other/a.png"
    assert ws.relative(str(tmp_path / "wsx" / "a.png")) == "../wsx/a.png"  # a sibling sharing the prefix
    assert ws.relative(tmp_path / "ws") == "."
