"""Figures tests record (how many kill points, bad inputs, examples): printed at the end of the run."""
from __future__ import annotations

from collections import Counter

FIGURES: list[str] = []
COUNTS: Counter = Counter()  # inputs tried, by kind


def record(line: str) -> None:
    FIGURES.append(line)
