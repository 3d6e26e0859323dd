"""Format 1.1 integrity: the manifest's own checksum, strict JSON, footers bound to their
place, and the rules spec/FORMAT.md now states for what 1.0 left open."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import zstandard

from logitcache import CacheError, CacheWriter, CorruptCacheError, open_cache
from logitcache.codecs import CodecError, Pipeline
from logitcache.format import MANIFEST_NAME
from logitcache.manifest import Manifest
from logitcache.sealed_json import seal, strict_loads
from tests.conftest import SMALL_K, SMALL_VOCAB, make_records
from tests.test_faults import (
    append_block,
    block_checksum,
    flip_and_read,
    read_all,
    resync_manifest,
    split_shard,
    write_shard,
)


def manifest_text(cache) -> str:
    return (cache.path / MANIFEST_NAME).read_text()


@pytest.mark.parametrize("field", ["columns", "teacher", "tokenizer", "metadata"])
def test_a_flip_in_any_manifest_field_is_caught(tmp_path, field):
    root = tmp_path / "c"
    records = make_records(4, seed=1)
    with CacheWriter(
        str(root),
        k=SMALL_K,
        vocab_size=SMALL_VOCAB,
        teacher={"name": "teacher-x"},
        tokenizer={"name": "tok", "vocab_fingerprint": "xxh3_64:0123456789abcdef"},
        metadata={"note": "abc"},
    ) as writer:
        for record in records:
            writer.add(**record)
    text = (root / MANIFEST_NAME).read_bytes()
    start = text.index(f'"{field}"'.encode())
    stop = text.index(b'\n "', start + 1)
    for offset in range(start, stop):
        error = flip_and_read(root, root / MANIFEST_NAME, offset, 0x01, records)
        assert isinstance(error, CorruptCacheError), f"byte {offset} of '{field}' not caught"


def test_the_fingerprint_key_cannot_be_turned_off_by_one_bit(tmp_path):
    root = tmp_path / "c"
    with CacheWriter(
        str(root),
        k=SMALL_K,
        vocab_size=SMALL_VOCAB,
        tokenizer={"name": "tok", "vocab_fingerprint": "xxh3_64:0123456789abcdef"},
    ) as writer:
        writer.add(**make_records(1)[0])
    data = (root / MANIFEST_NAME).read_bytes()
    (root / MANIFEST_NAME).write_bytes(data.replace(b'"vocab_fingerprint"', b'"vocab_fingerprinu"'))
    with pytest.raises(CorruptCacheError, match="checksum mismatch"):
        open_cache(str(root))


def test_every_flipped_manifest_byte_is_caught(small_cache):
    rng = np.random.default_rng(11)
    path = small_cache.path / MANIFEST_NAME
    for offset in rng.choice(path.stat().st_size, size=120, replace=False).tolist():
        error = flip_and_read(
            small_cache.path, path, offset, 1 << int(rng.integers(8)), small_cache.records
        )
        assert isinstance(error, CacheError), f"byte {offset}"


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"format": "logitcache", "format": "logitcache"}', "duplicate key"),
        ('{"format": "logitcache", "k": NaN}', "NaN"),
        ('{"format": "logitcache", "k": -Infinity}', "Infinity"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_manifests_that_json_does_not_allow_are_refused(small_cache, text, match):
    (small_cache.path / MANIFEST_NAME).write_text(text)
    with pytest.raises(CorruptCacheError, match=match):
        open_cache(str(small_cache.path))


def test_only_xxh3_64_is_a_checksum_algorithm(small_cache):
    obj = json.loads(manifest_text(small_cache))
    obj["checksum_algorithm"] = "md5"
    (small_cache.path / MANIFEST_NAME).write_bytes(seal(obj))
    with pytest.raises(CorruptCacheError, match="checksum_algorithm"):
        open_cache(str(small_cache.path))


def test_swapped_shards_of_equal_size_are_caught_on_open(tmp_path):
    """Two one-record shards of identical size and counts, their paths swapped in a
    (re-sealed) manifest: the footers name their own path, so the swap cannot go unseen."""
    root = tmp_path / "c"
    base = make_records(1, seed=3)[0]
    records = [{**base, "sample_id": "a0"}, {**base, "sample_id": "a1"}]
    with CacheWriter(
        str(root), k=SMALL_K, vocab_size=SMALL_VOCAB, chunk_bytes=1, shard_bytes=1
    ) as writer:
        for record in records:
            writer.add(**record)
    obj = json.loads((root / MANIFEST_NAME).read_text())
    first, second = obj["shards"]
    assert (first["bytes"], first["records"]) == (second["bytes"], second["records"])
    first["path"], second["path"] = second["path"], first["path"]
    (root / MANIFEST_NAME).write_bytes(seal(obj))
    with pytest.raises(CorruptCacheError, match="renamed, swapped or copied"):
        read_all(root)
    # Swapping the whole entries instead is a legitimate reordering: each still names its file.
    first["path"], second["path"] = second["path"], first["path"]
    obj["shards"] = [second, first]
    (root / MANIFEST_NAME).write_bytes(seal(obj))
    assert [r.sample_id for r in read_all(root)] == ["a1", "a0"]


def test_header_and_footer_minor_versions_must_agree(small_cache):
    path = small_cache.shard_path(0)
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, 10, 7)
    path.write_bytes(bytes(data))
    resync_manifest(small_cache)
    with pytest.raises(CorruptCacheError, match="header minor version 7"):
        read_all(small_cache.path)


def test_a_1_1_footer_without_its_path_is_refused(small_cache):
    path = small_cache.shard_path(0)
    body, footer = split_shard(path)
    del footer["path"]
    write_shard(path, body, footer)
    resync_manifest(small_cache)
    with pytest.raises(CorruptCacheError, match="'path' is missing"):
        read_all(small_cache.path)


def _footer_text(footer: dict) -> str:
    return json.dumps(footer, separators=(",", ":"))


def _repeat_in_block(footer: dict) -> str:
    # The block's "length" again, first with another value: the parse would keep the last.
    text = _footer_text(footer)
    return text.replace('"length":', '"length":1,"length":', 1)


def _repeat_at_the_top(footer: dict) -> str:
    return _footer_text(footer).replace("{", '{"k":999999,', 1)


def _repeat_with_a_colon_in_a_string(footer: dict) -> str:
    # A colon inside a string adds one to the count a dropped member takes away.
    return _repeat_in_block({**footer, "note": "a:b"})


@pytest.mark.parametrize(
    "rewrite", [_repeat_in_block, _repeat_at_the_top, _repeat_with_a_colon_in_a_string]
)
def test_a_footer_with_a_repeated_name_is_refused(small_cache, rewrite):
    path = small_cache.shard_path(0)
    body, footer = split_shard(path)
    write_shard(path, body, rewrite(footer).encode())
    resync_manifest(small_cache)
    name = small_cache.manifest.shards[0].path
    with pytest.raises(CorruptCacheError, match=f"shard {name}.*duplicate key"):
        read_all(small_cache.path)


@pytest.mark.parametrize("extra", [{"note": "a:b"}, {"note": {"nested": [{"x": 1}]}}])
def test_a_footer_with_colons_in_strings_or_unknown_objects_still_reads(small_cache, extra):
    """Footers the quick duplicate check cannot vouch for are parsed with the full check."""
    path = small_cache.shard_path(0)
    body, footer = split_shard(path)
    write_shard(path, body, {**footer, **extra})
    resync_manifest(small_cache)
    got = read_all(small_cache.path)
    assert [r.sample_id for r in got] == [r["sample_id"] for r in small_cache.records]


def test_strict_loads_with_a_member_count_finds_every_repeated_name():
    docs = [
        '{"a":1,"a":2}',
        '{"a":{"b":1,"b":1}}',
        '[{"x":"1:2"},{"y":3,"y":3}]',
        '{"a":"::","b":{"c":[{"d":1,"d":2}]}}',
    ]

    def everything(obj) -> int:
        if isinstance(obj, dict):
            return len(obj) + sum(everything(v) for v in obj.values())
        if isinstance(obj, list):
            return sum(everything(v) for v in obj)
        return 0

    for doc in docs:
        for members in (everything, lambda obj: 0, None):
            with pytest.raises(CorruptCacheError, match="duplicate key"):
                strict_loads(doc.encode(), source="doc", members=members)
    clean = '{"a":"x:y","b":[{"c":1}],"d":{"e":null}}'
    for members in (everything, lambda obj: 0, None):
        assert strict_loads(clean.encode(), source="doc", members=members) == json.loads(clean)


def test_bytes_after_a_zstd_frame_are_refused(small_cache):
    path = small_cache.shard_path(0)
    body, footer = split_shard(path)
    body = bytearray(body)
    block = footer["chunks"][0]["blocks"]["record_lengths"]
    stored = bytes(body[block["offset"] : block["offset"] + block["length"]]) + b"\0\0\0"
    block["offset"], block["length"] = append_block(body, stored)
    block["checksum"] = block_checksum(stored)
    write_shard(path, body, footer)
    resync_manifest(small_cache)
    with pytest.raises(CorruptCacheError, match="exactly one frame"):
        read_all(small_cache.path)


def test_zstd_level_is_required_in_a_config():
    with pytest.raises(CodecError, match="level"):
        Pipeline.from_config([{"id": "zstd"}])


@pytest.mark.parametrize(
    "encoded",
    [b"\x80\x00", b"\x81\x80\x00", b"\xff\xff\xff\xff\x00"],
    ids=["zero-in-two-bytes", "one-in-three-bytes", "five-bytes-ending-in-zero"],
)
def test_non_minimal_varints_are_refused(encoded):
    pipeline = Pipeline.from_config([{"id": "varint"}])
    with pytest.raises(CodecError, match="varint"):
        pipeline.decode_bytes(np.frombuffer(encoded, np.uint8), 4)
    # The minimal forms decode.
    assert pipeline.decode_bytes(np.frombuffer(b"\x00", np.uint8), 4).view("<u4")[0] == 0


def test_ids_outside_the_vocabulary_are_refused_on_read(tmp_path):
    """A shard whose checksums are right but whose ids exceed the manifest's vocab_size."""
    root = tmp_path / "c"
    records = make_records(3, seed=5)
    with CacheWriter(str(root), k=SMALL_K, vocab_size=SMALL_VOCAB) as writer:
        for record in records:
            writer.add(**record)
    obj = json.loads((root / MANIFEST_NAME).read_text())
    footer_vocab = obj["vocab_size"]
    # Rewrite the footer and manifest to a smaller vocabulary than the stored ids.
    shard = root / obj["shards"][0]["path"]
    body, footer = split_shard(shard)
    small = int(max(r["topk_ids"].max() for r in records))  # the largest id is now out of range
    footer["vocab_size"] = small
    write_shard(shard, body, footer)
    manifest = Manifest.loads((root / MANIFEST_NAME).read_bytes())
    manifest.vocab_size = small
    (root / MANIFEST_NAME).write_bytes(manifest.dumps())
    resync_manifest(type("C", (), {"path": root})())
    assert small < footer_vocab
    with pytest.raises(CorruptCacheError, match="outside"):
        read_all(root)


def test_zstd_frames_with_a_checksum_are_one_frame(small_cache):
    frame = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(
        b"\x01\x00\x00\x00" * 3
    )
    out = Pipeline.from_config([{"id": "zstd", "level": 3}]).decode_bytes(
        np.frombuffer(frame, np.uint8), 12
    )
    assert out.view("<i4").tolist() == [1, 1, 1]
