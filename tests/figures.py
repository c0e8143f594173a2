"""Figures tests record (how many kill points, bad inputs, examples): printed at the end of the run."""
from __future__ import annotations

from collections import Counter

FIGURES: list[str] = []
COUNTS: Counter = Counter()  # inputs tried, by kind


def record(line: str) -> None:
    FIGURES.append(line)

# Fault and bad-input cases by outcome: tried, clear (one line that names the cause, no traceback),
# traceback, lost (something cached, trained or published was damaged or gone afterwards).
OUTCOMES: Counter = Counter()


def outcome(output: str, clear: bool, lost: bool = False) -> None:
    """Count one case from the command's output and what the test found."""
    OUTCOMES["tried"] += 1
    OUTCOMES["traceback"] += "Traceback" in output
    OUTCOMES["clear"] += bool(clear) and "Traceback" not in output
    OUTCOMES["lost"] += bool(lost)


def outcome_lines() -> list[str]:
    if not OUTCOMES:
        return []
    o = OUTCOMES
    return [f"fault and bad-input cases: {o['tried']} tried, {o['clear']} clear, {o['traceback']} traceback, "
            f"{o['lost']} lost"]
