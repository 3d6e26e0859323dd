"""The manifest as untrusted JSON: field validation, version rules, safe paths, merging ranks.

Every refusal must be a CorruptCacheError naming the manifest and the field.
"""

from __future__ import annotations

import copy
import json

import pytest

from logitcache import (
    CacheError,
    CorruptCacheError,
    IncompatibleVersionError,
)
from logitcache.format import FORMAT_VERSION, MANIFEST_NAME
from logitcache.manifest import Manifest
from logitcache.storage import check_relative_path
from tests.conftest import SMALL_K, SMALL_VOCAB


@pytest.fixture(scope="module")
def manifest_obj(shared_small_cache) -> dict:
    return json.loads((shared_small_cache.path / MANIFEST_NAME).read_text())


def test_written_manifest_describes_the_cache(shared_small_cache, manifest_obj):
    records = shared_small_cache.records
    assert manifest_obj["format"] == "logitcache"
    assert manifest_obj["format_version"] == FORMAT_VERSION
    assert manifest_obj["k"] == SMALL_K and manifest_obj["vocab_size"] == SMALL_VOCAB
    assert manifest_obj["positions"] == "supervised"
    assert manifest_obj["checksum_algorithm"] == "xxh3_64"
    assert manifest_obj["records"] == len(records)
    assert manifest_obj["tokens"] == sum(len(r["input_ids"]) for r in records)
    assert manifest_obj["targets"] == sum(len(r["topk_ids"]) for r in records)
    shards = manifest_obj["shards"]
    generation = shards[0]["path"][len("shards/g") :][:12]
    assert [s["path"] for s in shards] == [
        f"shards/g{generation}-{i:05d}.lgc" for i in range(len(shards))
    ]
    assert manifest_obj["manifest_checksum"].startswith("xxh3_64:")
    for entry in shards:
        path = shared_small_cache.path / entry["path"]
        assert entry["bytes"] == path.stat().st_size
        assert entry["checksum"].startswith("xxh3_64:") and len(entry["checksum"]) == 24
        assert sum(entry["chunk_records"]) == entry["records"]
    assert manifest_obj["bytes"] == sum(s["bytes"] for s in shards)
    assert manifest_obj["columns"]["topk_logprobs"]["dtype"] == "<f2"


def test_json_roundtrip(manifest_obj):
    manifest = Manifest.from_json(manifest_obj)
    again = json.loads(manifest.dumps())
    assert again == manifest_obj


def _broken(obj: dict, edit) -> dict:
    obj = copy.deepcopy(obj)
    edit(obj)
    return obj


def _set(path: str, value):
    """An edit that sets a (dotted, with shard indices) field of a manifest object."""

    def edit(obj):
        *parents, last = path.split(".")
        node = obj
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        key = int(last) if last.isdigit() else last
        if value is _DELETE:
            del node[key]
        elif isinstance(value, str) and value.startswith("@"):  # the value of another field
            source = obj
            for part in value[1:].split("."):
                source = source[int(part)] if part.isdigit() else source[part]
            node[key] = source
        else:
            node[key] = value

    return edit


_DELETE = object()

INVALID = [
    ("format", "parquet", "'format'"),
    ("format", _DELETE, "'format'"),
    ("format_version", "1", "format_version"),
    ("format_version", 1.0, "format_version"),
    ("format_version", "1.0.0", "format_version"),
    ("format_version", _DELETE, "format_version"),
    ("k", 0, "'k'"),
    ("k", 4097, "'k'"),
    ("k", 8.0, "'k'"),
    ("k", True, "'k'"),
    ("k", "8", "'k'"),
    ("k", 1001, "exceeds 'vocab_size'"),
    ("vocab_size", 0, "'vocab_size'"),
    ("vocab_size", (1 << 24) + 1, "'vocab_size'"),
    ("positions", "every", "'positions'"),
    ("shards", {}, "'shards'"),
    ("shards", _DELETE, "'shards'"),
    ("shards.0", "shards/00000.lgc", "shard 0"),
    ("shards.0.records", -1, "shard 0: 'records'"),
    ("shards.0.records", 1.5, "shard 0: 'records'"),
    ("shards.0.tokens", (1 << 53) + 1, "shard 0: 'tokens'"),
    ("shards.0.bytes", 39, "shard 0: 'bytes'"),
    ("shards.0.bytes", "10259", "shard 0: 'bytes'"),
    ("shards.0.checksum", "md5:0123456789abcdef", "shard 0: 'checksum'"),
    ("shards.0.checksum", "xxh3_64:0123456789ABCDEF", "shard 0: 'checksum'"),
    ("shards.0.checksum", "xxh3_64:0123", "shard 0: 'checksum'"),
    ("shards.0.chunk_records", [1], "chunk_records"),
    ("shards.0.chunk_records", [0, 14], "chunk_records"),
    ("shards.0.chunk_records", "14", "chunk_records"),
    ("shards.0.chunk_records", [True] * 14, "chunk_records"),
    ("shards.1.path", "@shards.0.path", "same path"),
    ("shards.0.path", "../x.lgc", "shard 0 path"),
    ("records", 1, "'records'"),
    ("tokens", 0, "'tokens'"),
    ("bytes", 5, "'bytes'"),
    ("teacher", "llama", "'teacher'"),
    ("tokenizer", [1], "'tokenizer'"),
    ("metadata", [1], "'metadata'"),
    ("columns", [1], "'columns'"),
]


@pytest.mark.parametrize("field, value, match", INVALID, ids=[f"{f}={v!r}" for f, v, _ in INVALID])
def test_invalid_fields_are_refused_naming_them(manifest_obj, field, value, match):
    obj = _broken(manifest_obj, _set(field, value))
    if field == "shards.0.records":
        # Keep chunk_records consistent so the count itself is what is judged.
        obj["shards"][0]["chunk_records"] = [value]
    with pytest.raises(CorruptCacheError, match=match) as info:
        Manifest.from_json(obj, source="cache/manifest.json")
    assert "cache/manifest.json" in str(info.value)


def test_top_level_must_be_an_object():
    for data in (b"[]", b"null", b"42", b'"manifest"'):
        with pytest.raises(CorruptCacheError, match="JSON object"):
            Manifest.loads(data)
    for data in (b"", b"{", b"\xff\xfe{}", b'{"k": NaN'):
        with pytest.raises(CorruptCacheError, match="not valid UTF-8 JSON"):
            Manifest.loads(data)


@pytest.mark.parametrize("version", ["0.9", "2.0", "10.0", "01.0x"])
def test_major_version_rules(manifest_obj, version):
    obj = _broken(manifest_obj, _set("format_version", version))
    if version == "01.0x":
        with pytest.raises(CorruptCacheError, match="format_version"):
            Manifest.from_json(obj)
        return
    with pytest.raises(IncompatibleVersionError, match=f"format version {version}"):
        Manifest.from_json(obj)


def test_totals_are_optional_but_checked_when_present(manifest_obj):
    obj = copy.deepcopy(manifest_obj)
    for key in ("records", "tokens", "targets", "bytes"):
        del obj[key]
    manifest = Manifest.from_json(obj)
    assert manifest.records == manifest_obj["records"]
    assert manifest.bytes == manifest_obj["bytes"]


def test_minor_version_and_unknown_fields_are_accepted(manifest_obj):
    obj = copy.deepcopy(manifest_obj)
    obj["format_version"] = "1.42"
    obj["compression_stats"] = {"ratio": 3.1}
    obj["shards"][0]["row_group"] = 4
    manifest = Manifest.from_json(obj)
    assert manifest.format_version == "1.42"
    assert manifest.shards[0].path == manifest_obj["shards"][0]["path"]


@pytest.mark.parametrize(
    "path",
    [
        "shards/00000.lgc",
        "shards/r00003-00012.lgc",
        "a/b/c.lgc",
        "x",
        "shards/name with space.lgc",
        "shards/..hidden",
    ],
)
def test_safe_relative_paths_are_accepted(path):
    assert check_relative_path(path) == path


@pytest.mark.parametrize(
    "path",
    [
        "..",
        "../x",
        "a/../../x",
        "a/..",
        "/etc/passwd",
        "//server/share",
        "s3://other-bucket/x",
        "gs://bucket/x",
        "file:///etc/passwd",
        "C:/x",
        "c:x",
        "a\\..\\..\\x",
        "\\\\server\\share",
        "a//b",
        "./a",
        "a/.",
        "a/",
        "",
        "a\x00b",
        None,
        b"shards/00000.lgc",
    ],
)
def test_paths_escaping_the_root_are_refused(path):
    with pytest.raises(CacheError):
        check_relative_path(path)
