"""Find a project's images and captions in kohya-style dataset folders (no image decoding).

A dataset folder is the parent of concept folders named ``<repeats>_<tokens>``; kohya
(``library/config_util.py:generate_dreambooth_subsets_config_by_subdirs``) splits the
name at the first ``_``: ``10_sks dog`` → 10 repeats, default caption ``sks dog``.
This module only lists files (``os.scandir``), so it is cheap enough to run every time
doit loads the task graph.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})


class DatasetError(Exception):
    """A dataset layout problem the user must fix; the message says how."""


@dataclass(frozen=True)
class Concept:
    folder: Path  # absolute
    repeats: int
    tokens: str  # the caption of images without a caption file


@dataclass(frozen=True)
class ImageFile:
    id: str  # path relative to the project folder, POSIX style: the item's name everywhere
    path: Path  # absolute
    concept: Concept
    caption_path: Path | None  # None: the concept's tokens are the caption


@dataclass(frozen=True)
class Dataset:
    concepts: tuple[Concept, ...]
    images: tuple[ImageFile, ...]
    warnings: tuple[str, ...]

    def caption_files(self) -> list[Path]:
        return [im.caption_path for im in self.images if im.caption_path is not None]


def parse_concept_name(name: str) -> tuple[int, str] | None:
    """``"5_kamisato_ayaka 1girl"`` → ``(5, "kamisato_ayaka 1girl")``; None if no leading number."""
    head, sep, tail = name.partition("_")
    if not sep or not head.isdigit():
        return None
    return int(head), tail


def _is_image(entry: os.DirEntry) -> bool:
    return entry.is_file() and not entry.name.startswith(".") and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS


def _relative_id(path: Path, project_root: Path) -> str:
    try:
        return path.relative_to(project_root).as_posix()
    except ValueError:  # a dataset outside the project folder keeps its absolute path
        return path.as_posix()


def scan(dirs: list[Path], project_root: Path, caption_extension: str) -> Dataset:
    """List concepts, images and caption files under the dataset folders ``dirs``."""
    concepts: list[Concept] = []
    images: list[ImageFile] = []
    warnings: list[str] = []
    for ds in dirs:
        if not ds.is_dir():
            raise DatasetError(f"dataset folder {ds} does not exist")
        with os.scandir(ds) as it:
            entries = sorted(it, key=lambda e: e.name)
        loose = [e.name for e in entries if _is_image(e)]
        subdirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
        found_concept = False
        for sub in subdirs:
            parsed = parse_concept_name(sub.name)
            if parsed is None:
                warnings.append(
                    f"{Path(sub.path)}: skipped: the folder name does not start with '<repeats>_' "
                    f"(rename it to e.g. '10_{sub.name}')"
                )
                continue
            found_concept = True
            concept = Concept(Path(sub.path), parsed[0], parsed[1])
            concepts.append(concept)
            images.extend(_concept_images(concept, project_root, caption_extension))
        if not found_concept:
            parsed_self = parse_concept_name(ds.name)
            if loose and parsed_self is not None:
                raise DatasetError(
                    f"dataset folder {ds} looks like a concept folder ('{ds.name}' holds the images): "
                    f"dataset.dirs must name its parent, {ds.parent}"
                )
            if loose:
                raise DatasetError(
                    f"dataset folder {ds} holds images but no concept folders: move the images into a "
                    f"sub-folder named '<repeats>_<trigger> <class>', e.g. {ds / '10_mychar person'}"
                )
            raise DatasetError(f"dataset folder {ds} has no concept folders named '<repeats>_<tokens>'")
        if loose:
            warnings.append(f"{ds}: {len(loose)} image(s) directly in the dataset folder are not used (only concept sub-folders are)")
    if not images:
        raise DatasetError("the dataset has no images (" + ", ".join(str(d) for d in dirs) + ")")
    return Dataset(tuple(concepts), tuple(images), tuple(warnings))


def _concept_images(concept: Concept, project_root: Path, caption_extension: str) -> list[ImageFile]:
    with os.scandir(concept.folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    names = {e.name for e in entries if e.is_file()}
    out = []
    for entry in entries:
        if not _is_image(entry):
            continue
        stem = os.path.splitext(entry.name)[0]
        cap_name = stem + caption_extension
        cap = concept.folder / cap_name if cap_name in names else None
        path = Path(entry.path)
        out.append(ImageFile(_relative_id(path, project_root), path, concept, cap))
    return out
