"""``lorabuild tag NAME [--write [--force]]``: run the tag stage, show each image's caption, write them for review.

The tag stage runs through ``doit`` (so the build afterwards agrees it is up to date);
its manifest holds the caption text the tagger gives each image, which is exactly what
textemb and train use. ``--write`` puts that text beside the images as caption files,
so a user can review and edit it; a caption file that exists and differs is only
overwritten with ``--force``, and the ones left alone are named.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ..cache import atomic_write, read_json
from ..captions import read_caption
from ..workspace import Workspace


def write_captions(entries: list[dict], project_root: Path, force: bool) -> dict[str, list[Path]]:
    """Write each tagged caption beside its image: ``{"written", "unchanged", "skipped"}`` paths."""
    done: dict[str, list[Path]] = {"written": [], "unchanged": [], "skipped": []}
    for e in entries:
        if e.get("caption") is None:
            continue  # nothing above the thresholds: the image keeps what it had
        path = project_root / e["caption_file"]
        if path.exists():
            try:
                same = read_caption(path) == e["caption"]
            except (OSError, UnicodeDecodeError):
                same = False
            if same:
                done["unchanged"].append(path)
                continue
            if not force:
                done["skipped"].append(path)
                continue
        with atomic_write(path, "w") as fh:
            fh.write(e["caption"] + "\n")
        done["written"].append(path)
    return done


def cmd_tag(root: Path, name: str, write: bool, force: bool) -> int:
    from ..config import load_named
    from ..stages import tag

    project = load_named(Workspace(root).projects, name)
    if project is None:
        return 1
    if not tag.enabled(project):
        print(f"lorabuild tag: {project.file} has no tagger section; add one, e.g.\n"
              "tagger:\n  model: wd-swinv2-tagger-v3   # a folder with model.onnx and selected_tags.csv", file=sys.stderr)
        return 1
    if not (root / "dodo.py").is_file():
        print(f"lorabuild tag: no dodo.py in {root}: run it inside a workspace (lorabuild init DIR makes one)", file=sys.stderr)
        return 1
    proc = subprocess.run([sys.executable, "-m", "doit", f"tag:{project.name}"], cwd=root)
    if proc.returncode:
        return proc.returncode
    entries = (read_json(Workspace(root).manifest(project.name, "tag"), {}) or {}).get("items", [])
    for e in entries:
        print(f"{e['id']}: {e['caption'] if e['caption'] is not None else '(no tag above the thresholds: keeps its caption)'}")
    if not write:
        print(f"{len(entries)} image(s) tagged; lorabuild tag {project.name} --write puts the captions beside them")
        return 0
    done = write_captions(entries, project.root, force)
    print(f"wrote {len(done['written'])} caption file(s); {len(done['unchanged'])} already said the same")
    if done["skipped"]:
        print(f"skipped {len(done['skipped'])} existing caption file(s) that differ (--force overwrites them): "
              + ", ".join(Workspace(root).relative(p) for p in done["skipped"]))
    return 0
