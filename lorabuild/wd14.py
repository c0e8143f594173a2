"""WD14 tagging: SmilingWolf's ONNX taggers read from a local folder, as kohya and toriato run them.

A tagger folder holds the two files those models ship with: ``model.onnx`` (input
``[batch, S, S, 3]`` float32, BGR, 0–255, no normalisation; output ``[batch, n_tags]``
sigmoid probabilities) and ``selected_tags.csv`` (``tag_id,name,category,count``; one row
per output, category 9 = rating, 4 = character, anything else general). Facts from kohya
``finetune/tag_images_by_wd14_tagger.py`` and toriato ``tagger/interrogator.py`` (see
shared/ANCHORS.md 2.11). numpy, PIL and onnxruntime only, and onnxruntime only when a
model is opened: this module is imported when a project is validated.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
LAYOUT = (f"a tagger folder holds {MODEL_FILE} and {TAGS_FILE} (tag_id,name,category,count), "
          "as SmilingWolf's WD14 taggers ship them (e.g. wd-swinv2-tagger-v3)")
INSTALL = 'pip install -e ".[tagger]" in a clone of lorabuild, or pip install "lorabuild[tagger]"'
RATING, CHARACTER = 9, 4
# kohya's --remove_underscore keeps tags of 3 characters or fewer ("^_^", "o_o", ">_<"); the
# longer kaomoji below come from toriato's exclusion list, so "(o)_(o)" is not spaced either.
LONG_KAOMOJI = frozenset({"(o)_(o)", "<o>_<o>", "<|>_<|>", "||_||"})


class TaggerError(Exception):
    """The tagger cannot run; the message names the file or what to install."""


def folder_problem(folder: Path) -> str | None:
    """What is wrong with a tagger folder, or None when both files are there."""
    if not folder.is_dir():
        return f"folder {folder} does not exist: {LAYOUT}"
    for name in (MODEL_FILE, TAGS_FILE):
        if not (folder / name).is_file():
            return f"{folder / name} is missing: {LAYOUT}"
    return None


@dataclass(frozen=True)
class Labels:
    names: tuple[str, ...]
    categories: tuple[int, ...]


def read_labels(path: Path) -> Labels:
    """The rows of ``selected_tags.csv``, one per model output, in order."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise TaggerError(f"{path}: cannot be read ({exc})") from None
    if not rows or [c.strip() for c in rows[0][:3]] != ["tag_id", "name", "category"]:
        raise TaggerError(f"{path}: the header must start with tag_id,name,category (found {rows[0] if rows else 'nothing'})")
    names, cats = [], []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            cats.append(int(row[2]))
        except (IndexError, ValueError):
            raise TaggerError(f"{path}:{line}: expected tag_id,name,category,count, found {row}") from None
        names.append(row[1])
    return Labels(tuple(names), tuple(cats))


def spaced(tag: str) -> str:
    """``long_hair`` → ``long hair``, kaomoji such as ``^_^`` kept (kohya's and toriato's rule)."""
    return tag if len(tag) <= 3 or tag in LONG_KAOMOJI else tag.replace("_", " ")


def select(probs, labels: Labels, settings: dict) -> list[tuple[str, float]]:
    """The tags of one image with their confidences: general tags at ``general_threshold``,
    character tags at ``character_threshold``, by confidence (highest first), then the top
    rating first or last if ``rating`` asks; ``exclude_tags`` removed, underscores spaced,
    duplicates dropped."""
    picked, ratings = [], []
    for i, (name, cat) in enumerate(zip(labels.names, labels.categories)):
        p = float(probs[i])
        if cat == RATING:
            ratings.append((p, name))
            continue
        limit = settings["character_threshold"] if cat == CHARACTER else settings["general_threshold"]
        if p >= limit:
            picked.append((name, p))
    picked.sort(key=lambda t: -t[1])  # stable: equal confidences keep the CSV's order
    if ratings and settings["rating"] != "none":
        top = max(ratings, key=lambda r: r[0])  # one rating: the most likely (kohya: argmax)
        entry = (top[1], top[0])
        picked = [entry] + picked if settings["rating"] == "first" else picked + [entry]
    excluded = {normal(t, settings) for t in settings["exclude_tags"]}
    out, seen = [], set()
    for name, p in picked:
        tag = spaced(name) if settings["underscores_to_spaces"] else name
        if normal(tag, settings) in excluded or tag in seen:
            continue
        seen.add(tag)
        out.append((tag, round(p, 4)))
    return out


def normal(tag: str, settings: dict) -> str:
    """The form two tags are compared in: with ``underscores_to_spaces``, ``long_hair`` equals ``long hair``."""
    tag = tag.strip()
    return spaced(tag) if settings["underscores_to_spaces"] else tag


def combine(existing: list[str] | None, tags: list[str], settings: dict) -> list[str] | None:
    """An image's caption tags from its caption file's tags (None: no file) and the tagger's.

    ``additional_tags`` come first (the trigger word; toriato prepends them, kohya's
    ``--always_first_tags`` moves them to the front), then by ``mode``: ``missing`` keeps
    an existing caption as it is, ``merge`` keeps its tags and adds the tagger's not
    already there (kohya ``--append_tags``), ``replace`` uses the tagger's alone. None:
    the caption stays as it is (a kept file, or an image with no tag above the thresholds).
    """
    if not tags or (existing is not None and settings["mode"] == "missing"):
        return None
    keep = existing if existing is not None and settings["mode"] == "merge" else []
    out, seen = [], set()
    for t in [*settings["additional_tags"], *keep, *tags]:
        n = normal(t, settings)
        if n and n not in seen:  # the first place a tag appears wins: an additional tag moves to the front
            seen.add(n)
            out.append(t.strip())
    return out


def preprocess(image, size: int):
    """One RGB PIL image → the tagger's input: padded to a square on white, resized to
    ``size`` (area-averaged down, bicubic up, as kohya does with cv2), BGR float32 0–255."""
    import numpy as np
    from PIL import Image

    w, h = image.size
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    if side != size:
        resample = Image.Resampling.BOX if side > size else Image.Resampling.BICUBIC
        canvas = canvas.resize((size, size), resample)
    return np.asarray(canvas, dtype=np.float32)[:, :, ::-1].copy()


class Tagger:
    """An onnxruntime session on a tagger folder, checked against its tag list."""

    def __init__(self, folder: Path, device: str = "auto"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise TaggerError(f"the tagger needs onnxruntime, which is not installed: {INSTALL}") from None
        problem = folder_problem(folder)
        if problem:
            raise TaggerError(problem)
        self.labels = read_labels(folder / TAGS_FILE)
        wanted = ["CPUExecutionProvider"] if device == "cpu" else ["CUDAExecutionProvider", "CPUExecutionProvider"]
        providers = [p for p in wanted if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(folder / MODEL_FILE), providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            raise TaggerError(f"{folder / MODEL_FILE}: onnxruntime cannot load it ({exc})") from None
        # the provider really used: ONNX's CUDA provider is known to fall back to CPU silently
        self.provider = self.session.get_providers()[0]
        inp = self.session.get_inputs()[0]
        shape = list(inp.shape)
        if len(shape) != 4 or shape[3] != 3 or inp.type != "tensor(float)":
            raise TaggerError(f"{folder / MODEL_FILE}: input {inp.name} is {inp.type} {shape}; "
                              "a WD14 tagger takes float [batch, size, size, 3] (NHWC, BGR)")
        self.input = inp.name
        self.size = shape[1] if isinstance(shape[1], int) and shape[1] > 0 else 448  # WD14's size when dynamic
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.model_path = folder / MODEL_FILE
        self._check_width(self.session.get_outputs()[0].shape[-1])

    def _check_width(self, width) -> None:
        if isinstance(width, int) and width > 0 and width != len(self.labels.names):
            raise TaggerError(f"{self.model_path.parent / TAGS_FILE} lists {len(self.labels.names)} tags but "
                              f"{self.model_path} outputs {width} probabilities: the two files are from different models")

    def predict(self, batch):
        """Probabilities ``[n, n_tags]`` for a stack of preprocessed images (at most
        ``fixed_batch`` of them when the model was exported for one batch size)."""
        import numpy as np

        n = len(batch)
        if self.fixed_batch and n < self.fixed_batch:
            batch = np.concatenate([batch, np.full((self.fixed_batch - n, *batch.shape[1:]), 255, batch.dtype)])
        out = self.session.run(None, {self.input: batch})[0][:n]
        self._check_width(out.shape[-1])
        return out
