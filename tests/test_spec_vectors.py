"""The golden caches of spec/vectors/ decode to their JSON, by the library and by a decoder
written from the spec alone; regenerating them gives the same contents."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.spec_decoder import decode_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VECTORS = os.path.join(ROOT, "spec", "vectors")
NAMES = sorted(n for n in os.listdir(VECTORS) if os.path.isdir(os.path.join(VECTORS, n)))
EXACT_FIELDS = ("input_ids", "loss_mask", "topk_ids", "topk_logprobs_bits", "sample_id")


def _expected(name: str) -> dict:
    with open(os.path.join(VECTORS, f"{name}.json")) as f:
        return json.load(f)


def test_there_are_at_least_three_vectors():
    assert len(NAMES) >= 3


@pytest.mark.parametrize("name", NAMES)
def test_library_decodes_vector(name):
    from tools.make_spec_vectors import decoded_json

    assert decoded_json(os.path.join(VECTORS, name)) == _expected(name)


@pytest.mark.parametrize("name", NAMES)
def test_spec_only_decoder_agrees(name):
    expected = _expected(name)
    got = decode_cache(os.path.join(VECTORS, name))
    for key in ("k", "vocab_size", "positions"):
        assert got[key] == expected[key]
    assert len(got["records"]) == len(expected["records"])
    for mine, theirs in zip(got["records"], expected["records"], strict=True):
        for field in EXACT_FIELDS:
            assert mine[field] == theirs[field], field


def test_regenerating_vectors_gives_same_contents(tmp_path):
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "make_spec_vectors.py"),
            "--out",
            str(tmp_path),
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    for name in NAMES:
        with open(tmp_path / f"{name}.json") as f:
            assert json.load(f) == _expected(name)
