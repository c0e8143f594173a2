"""Find a project's images and captions in kohya-style dataset folders (no image decoding).

A dataset folder is the parent of concept folders named ``<repeats>_<tokens>``; kohya
(``library/config_util.py:generate_dreambooth_subsets_config_by_subdirs``) splits the
name at the first ``_``: ``10_sks dog`` → 10 repeats, default caption ``sks dog``.
This module only lists files (``os.scandir``), so it is cheap enough to run every time
doit loads the task graph.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

# as the schema's dataset.concepts.repeats maximum: an epoch lists every image this many times
MAX_REPEATS = 10_000
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})


class DatasetError(Exception):
    """A dataset layout problem the user must fix; the message says how."""


class UnusableFolder(DatasetError):
    """A folder that cannot be listed (a symlink loop, no permission) or is named for absurd
    repeats: ``validate`` reports these, unlike a folder that simply has no images yet."""


@dataclass(frozen=True)
class Concept:
    folder: Path  # absolute
    repeats: int
    tokens: str  # the caption of images without a caption file
    is_reg: bool = False
    captions: dict = field(default_factory=dict, compare=False)  # caption options over the project's
    caption_extension: str = field(default=".txt", compare=False)  # where a caption file is (or is written)
    is_val: bool = False  # validation images: cached and measured every epoch, never trained on


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


def scan(dirs: list[Path], project_root: Path, caption_extension: str, reg_dirs: list[Path] = (),
         explicit: list[dict] = (), val_dirs: list[Path] = ()) -> Dataset:
    """List concepts, images and caption files.

    ``dirs``/``reg_dirs`` are parents of ``<repeats>_<tokens>`` folders; ``val_dirs`` too, or
    plain folders of images; ``explicit`` are concept dicts from the YAML (``path`` absolute,
    ``repeats``, ``trigger``, ``class``, ``caption_extension``, ``is_reg``, ``is_val``, ``captions``).
    """
    concepts: list[Concept] = []
    images: list[ImageFile] = []
    warnings: list[str] = []
    for is_reg, group in ((False, dirs), (True, reg_dirs)):
        for ds in group:
            for concept in _kohya_concepts(ds, is_reg, warnings, caption_extension):
                concepts.append(concept)
                images.extend(_concept_images(concept, project_root, caption_extension))
    for ds in val_dirs:
        for concept in _val_concepts(ds, warnings, caption_extension):
            concepts.append(concept)
            images.extend(_concept_images(concept, project_root, caption_extension))
    for c in explicit:
        folder = Path(c["path"])
        if not folder.is_dir():
            raise DatasetError(f"concept folder {folder} does not exist")
        tokens = " ".join(t for t in (c["trigger"], c["class"]) if t)
        ext = c["caption_extension"] or caption_extension
        concept = Concept(folder, c["repeats"], tokens, c["is_reg"], dict(c["captions"]), ext, c.get("is_val", False))
        concepts.append(concept)
        found = _concept_images(concept, project_root, ext)
        if not found:
            warnings.append(f"{folder}: no images in this concept folder")
        images.extend(found)
    seen: set[str] = set()
    for im in images:
        if im.id in seen:
            raise DatasetError(f"{im.path} is listed twice (two dataset entries name the same folder)")
        seen.add(im.id)
    if not any(not im.concept.is_reg and not im.concept.is_val for im in images):
        raise DatasetError("the dataset has no training images (" + ", ".join(str(d) for d in dirs) + ")")
    return Dataset(tuple(concepts), tuple(images), tuple(warnings))


def _kohya_concepts(ds: Path, is_reg: bool, warnings: list[str], caption_extension: str) -> list[Concept]:
    """The ``<repeats>_<tokens>`` sub-folders of one dataset folder, with clear errors for the usual mistakes."""
    if not ds.is_dir():
        raise DatasetError(f"dataset folder {ds} does not exist")
    with os.scandir(ds) as it:
        entries = sorted(it, key=lambda e: e.name)
    loose = [e.name for e in entries if _is_image(e)]
    out = []
    for sub in (e for e in entries if e.is_dir() and not e.name.startswith(".")):
        parsed = parse_concept_name(sub.name)
        if parsed is None:
            warnings.append(
                f"{Path(sub.path)}: skipped: the folder name does not start with '<repeats>_' "
                f"(rename it to e.g. '10_{sub.name}', or list it under dataset.concepts)"
            )
            continue
        if parsed[0] > MAX_REPEATS:
            raise UnusableFolder(f"{Path(sub.path)}: {parsed[0]} repeats is more than {MAX_REPEATS} "
                               "(each repeat is a pass over the folder's images in every epoch): rename the folder")
        out.append(Concept(Path(sub.path), parsed[0], parsed[1], is_reg, caption_extension=caption_extension))
    if not out:
        if loose and parse_concept_name(ds.name) is not None:
            raise DatasetError(
                f"dataset folder {ds} looks like a concept folder ('{ds.name}' holds the images): "
                f"dataset.dirs must name its parent, {ds.parent}"
            )
        if loose:
            raise DatasetError(
                f"dataset folder {ds} holds images but no concept folders: move the images into a "
                f"sub-folder named '<repeats>_<trigger> <class>', e.g. {ds / '10_mychar person'}, "
                f"or list the folder under dataset.concepts with its repeats"
            )
        raise DatasetError(f"dataset folder {ds} has no concept folders named '<repeats>_<tokens>'")
    if loose:
        warnings.append(f"{ds}: {len(loose)} image(s) directly in the dataset folder are not used (only concept sub-folders are)")
    return out


def _val_concepts(ds: Path, warnings: list[str], caption_extension: str) -> list[Concept]:
    """A validation folder: the parent of ``<repeats>_<tokens>`` folders like a dataset folder
    (repeats do not matter here), or itself a folder of images (their captions from caption
    files, else the folder's tokens when it is named ``<repeats>_<tokens>``, else empty)."""
    if not ds.is_dir():
        raise DatasetError(f"validation folder {ds} does not exist")
    with os.scandir(ds) as it:
        entries = sorted(it, key=lambda e: e.name)
    if any(_is_image(e) for e in entries):
        parsed = parse_concept_name(ds.name)
        return [Concept(ds, 1, parsed[1] if parsed else "", caption_extension=caption_extension, is_val=True)]
    return [replace(c, is_val=True) for c in _kohya_concepts(ds, False, warnings, caption_extension)]


def dir_path(entry) -> str:
    """A ``dataset.dirs`` entry's folder: the entry itself, or its ``path`` ({path, bucket})."""
    return entry if isinstance(entry, str) else entry["path"]


def from_project(project) -> Dataset:
    """The dataset a project describes (paths resolved against the project's folder).

    A folder that cannot be listed (a symlink loop, no permission) is a DatasetError naming
    it, so it fails this project's tasks alone and not the whole task graph.
    """
    d = project.section("dataset")
    try:
        explicit = [{**c, "path": project.resolve(c["path"])} for c in d["concepts"]]
        return scan([project.resolve(dir_path(x)) for x in d["dirs"]], project.root, d["caption_extension"],
                    [project.resolve(x) for x in d["reg_dirs"]], explicit, [project.resolve(x) for x in d["val_dirs"]])
    except OSError as exc:
        raise UnusableFolder(f"{exc.filename or 'a dataset folder'} cannot be read ({exc.strerror or exc})") from None
    except RuntimeError as exc:  # Path.resolve() on a symlink loop (Python < 3.13)
        if "Symlink loop" not in str(exc):
            raise
        raise UnusableFolder(f"{exc} (a symbolic link that points back at itself)") from None


def _concept_images(concept: Concept, project_root: Path, caption_extension: str) -> list[ImageFile]:
    with os.scandir(concept.folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    names = {e.name for e in entries if e.is_file()}
    # ids are the folder's id + the file name: one relative_to per folder, not per image
    # (this runs on every doit invocation, for every image)
    folder_id = _relative_id(concept.folder, project_root)
    prefix = "" if folder_id == "." else folder_id + "/"
    out = []
    for entry in entries:
        if not _is_image(entry):
            continue
        stem = os.path.splitext(entry.name)[0]
        cap_name = stem + caption_extension
        cap = concept.folder / cap_name if cap_name in names else None
        out.append(ImageFile(prefix + entry.name, Path(entry.path), concept, cap))
    return out
