"""What every importer reader gives and raises: the :class:`Source` (a file read as kohya's
option names) and :class:`ImportError_`. Here, below the readers, so ``importers.read`` can dispatch
to the ai-toolkit and OneTrainer readers without them importing it back.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class ImportError_(ValueError):
    """A kohya file that cannot be read (reported as one line, never a traceback)."""


@dataclass
class Source:
    kind: str  # what the file was read as
    options: dict  # kohya option → value (dataset configs aside)
    dataset: dict | None = None  # a dataset config's tables
    notes: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)  # values that cannot be carried over, with why
    gui_only: list[str] = field(default_factory=list)  # GUI settings with no effect on what is trained
    empty: list[str] = field(default_factory=list)  # GUI fields left empty: kohya's default
    renamed: dict = field(default_factory=dict)  # the sd-scripts option → the GUI field it came from


def to_bool(v) -> bool:
    """A kohya config's boolean as GUIs write it (an empty field of a store_true flag is on)."""
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "")


def flag(v: str) -> bool:
    """A network_args boolean (``true``/``false``, ``1``/``0``, ``yes``/``no``); ValueError otherwise."""
    if v.strip().lower() in ("true", "1", "yes"):
        return True
    if v.strip().lower() in ("false", "0", "no", ""):
        return False
    raise ValueError(v)
