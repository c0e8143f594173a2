"""Errors that more than one layer raises or names, in a module that imports nothing, so a
low module (train/dist.py) can raise what a stage reports without importing the stages."""
from __future__ import annotations


class StageError(Exception):
    """A stage cannot go on; the message names the file or field at fault."""


class ModelError(Exception):
    """A base model that cannot be found or read; the message names the path and what is missing.
    Here, not in models.py: folders.py (below models) raises it while installing a model folder."""
