"""The manifest as untrusted JSON: field validation, version rules, safe paths, merging ranks.

Every refusal must be a CorruptCacheError naming the manifest and the field.
"""

from __future__ import annotations

import copy
import json

import pytest

from logitcache import (
    CacheError,
    CacheWriter,
    CorruptCacheError,
    IncompatibleVersionError,
    NoCacheError,
    open_cache,
)
from logitcache.format import FORMAT_VERSION, MANIFEST_NAME
from logitcache.manifest import Manifest, merge_partials, partial_manifest_name
from logitcache.storage import check_relative_path
from tests.conftest import SMALL_K, SMALL_VOCAB, assert_record_equal, make_records


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
    assert [s["path"] for s in shards] == [f"shards/{i:05d}.lgc" for i in range(len(shards))]
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
    ("shards.1.path", "shards/00000.lgc", "same path"),
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
    assert manifest.shards[0].path == "shards/00000.lgc"


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


# -- distributed writers ---------------------------------------------------------------------


def _write_rank(url: str, rank: int, records: list[dict], **kwargs) -> Manifest:
    with CacheWriter(
        url,
        k=SMALL_K,
        vocab_size=SMALL_VOCAB,
        rank=rank,
        chunk_bytes=1000,
        shard_bytes=2500,
        teacher={"name": "synthetic", "revision": "1"},
        **kwargs,
    ) as writer:
        for record in records:
            writer.add(**record)
    return writer.manifest


def test_merge_partials_joins_ranks_in_rank_order(tmp_path):
    url = str(tmp_path / "cache")
    rank0, rank1 = make_records(7, seed=10), make_records(9, seed=11)
    # Rank 1 finishes first: the order must still be rank 0, then rank 1.
    part1 = _write_rank(url, 1, rank1)
    with pytest.raises(NoCacheError):
        open_cache(url)
    part0 = _write_rank(url, 0, rank0)
    assert (tmp_path / "cache" / partial_manifest_name(0)).exists()
    assert not (tmp_path / "cache" / MANIFEST_NAME).exists()
    assert all(s.path.startswith("shards/r00001-") for s in part1.shards)
    assert len(part0.shards) >= 2 and len(part1.shards) >= 2

    merged = merge_partials(url)
    assert [s.path for s in merged.shards] == [s.path for s in part0.shards + part1.shards]
    assert merged.records == 16
    assert merged.metadata["ranks"] == 2
    assert merged.teacher == {"name": "synthetic", "revision": "1"}
    with open_cache(url) as cache:
        assert len(cache) == 16
        for i, (got, want) in enumerate(zip(cache, rank0 + rank1, strict=True)):
            assert_record_equal(got, want, where=f"record {i}")
        assert cache.verify() == []


def test_merge_partials_refuses_ranks_that_disagree(tmp_path):
    url = str(tmp_path / "cache")
    _write_rank(url, 0, make_records(3, seed=1))
    with CacheWriter(url, k=SMALL_K, vocab_size=SMALL_VOCAB, rank=1, positions="all") as writer:
        for record in make_records(3, seed=2, positions="all"):
            writer.add(**record)
    with pytest.raises(CacheError, match="positions") as info:
        merge_partials(url)
    assert partial_manifest_name(1) in str(info.value)
    assert not (tmp_path / "cache" / MANIFEST_NAME).exists()


def test_merge_partials_without_partials(tmp_path):
    with pytest.raises(NoCacheError, match="no partial manifests"):
        merge_partials(str(tmp_path))


def test_rerunning_one_rank_replaces_only_its_own_shards(tmp_path):
    url = str(tmp_path / "cache")
    _write_rank(url, 0, make_records(4, seed=1))
    part1 = _write_rank(url, 1, make_records(4, seed=2))
    rerun = make_records(5, seed=3)
    part0 = _write_rank(url, 0, rerun, overwrite=True)
    merged = merge_partials(url)
    assert merged.records == 9
    on_disk = sorted(p.name for p in (tmp_path / "cache" / "shards").iterdir())
    assert on_disk == sorted(s.path.split("/")[1] for s in part0.shards + part1.shards)
    with open_cache(url) as cache:
        for got, want in zip(cache, rerun, strict=False):
            assert_record_equal(got, want)
