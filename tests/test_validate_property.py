"""Property: no project document makes validation crash; every outcome is a result or clear problems."""
from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from figures import COUNTS
from lorabuild import config

KEYS = ["base_model", "dataset", "dirs", "train", "epochs", "batch_size", "network", "dim", "bucket", "step", "sample",
        "prompts", "prompt", "textemb", "cache", "captions", "shuffle", "concepts", "path", "x", "", "ü"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["builtin:tiny-sd1", "auto", "data", "-1"]))
docs = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)),
                    max_leaves=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=docs)
def test_any_document_gives_a_result_or_problems(tmp_path, doc):
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    data, problems = config.check(path, "p.yaml")
    assert (data is None) == bool(problems)
    for p in problems:
        assert p.file == "p.yaml" and p.line >= 1 and p.col >= 1 and p.message
    COUNTS["generated project documents"] += 1


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_any_text_gives_a_result_or_problems(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8")
    data, problems = config.check(path, "p.yaml")
    assert (data is None) == bool(problems)
    COUNTS["generated texts as project files"] += 1

