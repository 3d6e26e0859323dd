"""Code SFT rows from real Python: exact prompt/body cuts, the fixed module split, HumanEval."""

from __future__ import annotations

import ast
import json

from kd.codedata import (
    functions_in_source,
    humaneval_rows,
    module_split,
    stdlib_functions,
    write_jsonl,
)

SOURCE = '''
import functools


@functools.cache
def area(w, h):
    """Area of a rectangle."""
    return w * h


def undocumented(x):
    return x


def only_doc():
    """Nothing else."""


class Shape:
    def scale(self, k,
              clamp=False):
        """Scale by k.

        Clamps at 10 when asked.
        """
        value = self.size * k

        if clamp:
            value = min(value, 10)
        return value
'''


def test_functions_are_cut_at_the_docstring_and_dedented():
    found = {f.qualname: f for f in functions_in_source(SOURCE, "geo")}
    assert sorted(found) == ["Shape.scale", "area"]
    area = found["area"]
    assert area.prompt == 'def area(w, h):\n    """Area of a rectangle."""\n'
    assert area.response == "    return w * h\n"
    scale = found["Shape.scale"]
    assert scale.prompt.startswith("def scale(self, k,\n          clamp=False):\n")
    assert scale.response.startswith("    value = self.size * k\n\n    if clamp:\n")
    assert scale.id == "geo:Shape.scale"
    for fn in found.values():
        ast.parse(fn.prompt + fn.response)  # the two halves make the function again


def test_unparsable_source_gives_nothing():
    assert list(functions_in_source("def broken(:\n", "m")) == []


def test_the_split_is_by_top_level_module_and_fixed():
    assert module_split("email.utils") == module_split("email.parser") == module_split("email")
    splits = {module_split(name) for name in ("os", "json", "email", "glob", "ast", "re", "csv")}
    assert splits == {"train", "heldout"}
    assert module_split("glob") == "heldout" and module_split("json") == "train"


def test_stdlib_selection_is_disjoint_and_deterministic():
    train = stdlib_functions("train", limit=60, per_module=4)
    heldout = stdlib_functions("heldout", limit=30, per_module=4)
    assert len(train) == 60 and len(heldout) == 30
    top = lambda fns: {f.module.split(".")[0] for f in fns}  # noqa: E731
    assert not top(train) & top(heldout)
    assert len(top(train)) >= 15  # spread over many modules
    assert [f.id for f in stdlib_functions("train", limit=60, per_module=4)] == [
        f.id for f in train
    ]
    for fn in train + heldout:
        assert fn.response.count("\n") >= 2
        ast.parse(fn.prompt + fn.response)


def test_humaneval_rows_and_jsonl(tmp_path):
    rows = humaneval_rows()
    assert len(rows) == 164
    assert rows[0]["id"] == "HumanEval/0" and rows[0]["response"].startswith("    ")
    path = write_jsonl(rows[:3], str(tmp_path / "he.jsonl"))
    with open(path) as f:
        assert [json.loads(line)["id"] for line in f] == [
            "HumanEval/0",
            "HumanEval/1",
            "HumanEval/2",
        ]
