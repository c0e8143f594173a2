"""A running training's progress, for anyone watching: ``cache/live/<project>/train.json``.

The train stage rewrites this file atomically at most once a second (and at every
validation point and at the end), whoever started the build (``doit``, ``lorabuild train``,
``watch`` or the dashboard), so ``lorabuild serve`` shows a CLI-started run live. It holds
the same rows as ``loss.csv`` and ``val_loss.csv`` (which are written only at the end).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from .cache import read_json, write_json

INTERVAL = 1.0  # seconds between rewrites: a modest rate, a few kB per write for short runs


def live_path(cache: Path, project: str) -> Path:
    return Path(cache) / "live" / project / "train.json"


class LiveLog:
    """Feeds on the trainer's scalar hook; ``rows``/``val`` are the trainer's own log lists."""

    def __init__(self, path: Path, plan, rows: list, val: list, build: str, chain=None):
        self.path, self.plan, self.rows, self.val, self.chain = Path(path), plan, rows, val, chain
        self.info = {"pid": os.getpid(), "build": build, "started": time.time(), "total_steps": plan.total_steps,
                     "epochs": plan.epochs, "steps_per_epoch": plan.steps_per_epoch}
        self._last = 0.0
        self.write("running")

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.chain is not None:
            self.chain(tag, value, step)
        # "lr" is the last scalar of an optimizer step; a validation point is rare and wanted at once
        if tag == "loss/validation" or (tag == "lr" and time.monotonic() - self._last >= INTERVAL):
            self.write("running")

    def write(self, state: str) -> None:
        self._last = time.monotonic()
        last = self.rows[-1] if self.rows else (0, 0, None, None, 0.0)
        write_json(self.path, {**self.info, "state": state, "updated": time.time(), "step": last[0], "epoch": last[1],
                               "seconds": last[4], "loss": [list(r) for r in self.rows],
                               "val": [list(r) for r in self.val]})


def read_live(cache: Path, project: str) -> dict | None:
    data = read_json(live_path(cache, project))
    return data if isinstance(data, dict) and "state" in data else None
