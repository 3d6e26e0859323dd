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
LEGACY = os.path.join(VECTORS, "legacy-1.0")  # written by 1.0 writers; 1.1 readers read them


def _names(folder: str) -> list[str]:
    return sorted(
        n
        for n in os.listdir(folder)
        if os.path.isdir(os.path.join(folder, n))
        and os.path.exists(os.path.join(folder, f"{n}.json"))
    )


NAMES = _names(VECTORS)
LEGACY_NAMES = _names(LEGACY)
ALL = [(VECTORS, n) for n in NAMES] + [(LEGACY, n) for n in LEGACY_NAMES]
ALL_IDS = NAMES + [f"legacy-1.0/{n}" for n in LEGACY_NAMES]
EXACT_FIELDS = ("input_ids", "loss_mask", "topk_ids", "topk_logprobs_bits", "sample_id")


def _expected(name: str, folder: str = VECTORS) -> dict:
    with open(os.path.join(folder, f"{name}.json")) as f:
        return json.load(f)


def test_there_are_vectors_of_both_versions():
    assert len(NAMES) >= 3 and len(LEGACY_NAMES) >= 3
    for name in NAMES:
        with open(os.path.join(VECTORS, name, "manifest.json")) as f:
            assert json.load(f)["format_version"] == "1.1"
    for name in LEGACY_NAMES:
        with open(os.path.join(LEGACY, name, "manifest.json")) as f:
            assert json.load(f)["format_version"] == "1.0"


@pytest.mark.parametrize("folder, name", ALL, ids=ALL_IDS)
def test_library_decodes_vector(folder, name):
    from tools.make_spec_vectors import decoded_json

    assert decoded_json(os.path.join(folder, name)) == _expected(name, folder)


@pytest.mark.parametrize("folder, name", ALL, ids=ALL_IDS)
def test_spec_only_decoder_agrees(folder, name):
    expected = _expected(name, folder)
    got = decode_cache(os.path.join(folder, name))
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
        # Fixed generation and timestamp: the files themselves are identical too.
        for rel in ["manifest.json", *os.listdir(os.path.join(VECTORS, name, "shards"))]:
            rel = rel if rel == "manifest.json" else f"shards/{rel}"
            with open(os.path.join(VECTORS, name, rel), "rb") as f:
                assert (tmp_path / name / rel).read_bytes() == f.read(), f"{name}/{rel}"


def test_spec_only_decoder_rejects_what_the_spec_rejects(tmp_path):
    """The second decoder is a real check: it refuses a flipped manifest and moved shards."""
    import shutil

    root = tmp_path / "v"
    shutil.copytree(os.path.join(VECTORS, "supervised-k8-v70000-sharded"), root)
    manifest = (root / "manifest.json").read_bytes()
    (root / "manifest.json").write_bytes(manifest.replace(b'"k": 8', b'"k": 9'))
    with pytest.raises(AssertionError):
        decode_cache(str(root))
    (root / "manifest.json").write_bytes(manifest)
    first, second = sorted((root / "shards").iterdir())
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b), second.write_bytes(a)
    with pytest.raises(AssertionError):
        decode_cache(str(root))
