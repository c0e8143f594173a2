"""The one YAML loader lorabuild reads with: PyYAML's safe loader with YAML 1.2's float rule.

PyYAML implements YAML 1.1, whose floats need a dot: ``1e-4`` and ``5e-5`` (how every kohya
user writes a learning rate) would be strings. YAML 1.2's core schema reads them as numbers;
only that one implicit resolver is replaced, so positions (marks) and every other type stay
as PyYAML gives them.
"""
from __future__ import annotations

import re

import yaml

FLOAT_TAG = "tag:yaml.org,2002:float"

# YAML 1.2 core schema floats (https://yaml.org/spec/1.2.2/#1023-core-schema), plus 1.1's
# underscores and sexagesimal forms, which PyYAML's constructor still understands.
FLOAT_12 = re.compile(r"""^(?:
     [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)


class Loader(yaml.SafeLoader):
    """SafeLoader whose implicit float resolver follows YAML 1.2."""


Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(FLOAT_TAG, FLOAT_12, list("-+0123456789."))


def load(text: str):
    """``yaml.safe_load`` with YAML 1.2 floats."""
    return yaml.load(text, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader


class Dumper(yaml.SafeDumper):
    """SafeDumper that quotes every string :class:`Loader` would read as a float (``'1e-4'``)."""


Dumper.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != FLOAT_TAG]
    for first, resolvers in yaml.SafeDumper.yaml_implicit_resolvers.items()
}
Dumper.add_implicit_resolver(FLOAT_TAG, FLOAT_12, list("-+0123456789."))


def dump(value, **kwargs) -> str:
    """``yaml.safe_dump`` whose output :func:`load` reads back as the same value."""
    return yaml.dump(value, Dumper=Dumper, **kwargs)


def dotted(path: tuple) -> str:
    """A place in a parsed document, ``("train", "optimizer_args", "lr")`` → ``train.optimizer_args.lr``."""
    return ".".join(str(p) for p in path)
