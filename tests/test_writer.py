"""CacheWriter: the commit protocol, chunk and shard rolling, determinism, options.

Input validation errors are tested in test_faults.py; bit-exact round trips in test_roundtrip.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from logitcache import CacheError, CacheWriter, NoCacheError, open_cache
from logitcache.format import MANIFEST_NAME
from logitcache.manifest import Manifest
from logitcache.shard import ShardFile
from tests.conftest import (
    SMALL_K,
    SMALL_VOCAB,
    assert_record_equal,
    make_records,
    write_cache,
)


@pytest.fixture(scope="module")
def records():
    return make_records(24, seed=4)


def shard_bytes_on_disk(cache_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((cache_dir / "shards").iterdir())}


def all_files(cache_dir) -> list[str]:
    return sorted(str(p.relative_to(cache_dir)) for p in cache_dir.rglob("*") if p.is_file())


def test_manifest_is_written_last(tmp_path, records):
    cache_dir = tmp_path / "cache"
    writer = CacheWriter(
        str(cache_dir), k=SMALL_K, vocab_size=SMALL_VOCAB, chunk_bytes=1000, shard_bytes=3000
    )
    with writer:
        for record in records:
            writer.add(**record)
        assert not (cache_dir / MANIFEST_NAME).exists()
        with pytest.raises(NoCacheError):
            open_cache(str(cache_dir))
    manifest = writer.manifest
    on_disk = Manifest.loads((cache_dir / MANIFEST_NAME).read_bytes())
    assert [s.path for s in on_disk.shards] == [s.path for s in manifest.shards]
    # Nothing but the manifest and the listed shards: no temporary files left behind.
    assert all_files(cache_dir) == sorted([MANIFEST_NAME, *(s.path for s in manifest.shards)])


def test_close_returns_the_committed_manifest(tmp_path, records):
    writer = CacheWriter(str(tmp_path), k=SMALL_K, vocab_size=SMALL_VOCAB)
    for record in records[:3]:
        writer.add(**record)
    manifest = writer.close()
    on_disk = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert on_disk.pop("manifest_checksum").startswith("xxh3_64:")
    assert manifest.to_json() == on_disk
    with pytest.raises(CacheError, match="closed"):
        writer.add(**records[3])
    with pytest.raises(CacheError, match="already closed"):
        writer.close()


@pytest.mark.parametrize("shard_bytes", [1, 3000, 9000])
def test_shards_roll_at_the_size_limit(tmp_path, records, shard_bytes):
    manifest = write_cache(
        tmp_path,
        records,
        k=SMALL_K,
        vocab_size=SMALL_VOCAB,
        chunk_bytes=800,
        shard_bytes=shard_bytes,
    )
    sizes = [s.bytes for s in manifest.shards]
    # A shard closes at the first chunk boundary at or past the limit.
    assert all(size >= shard_bytes for size in sizes[:-1])
    if shard_bytes == 1:
        assert all(len(s.chunk_records) == 1 for s in manifest.shards)
    assert len(manifest.shards) > 1
    assert manifest.records == len(records)
    generation = manifest.shards[0].path[len("shards/g") :][:12]
    assert [s.path for s in manifest.shards] == [
        f"shards/g{generation}-{i:05d}.lgc" for i in range(len(manifest.shards))
    ]


@pytest.mark.parametrize(
    "chunk_bytes, expect",
    [(1, "one record per chunk"), (2 << 20, "one chunk"), (2000, "several records per chunk")],
)
def test_chunks_roll_at_the_size_limit(tmp_path, records, chunk_bytes, expect):
    manifest = write_cache(
        tmp_path, records, k=SMALL_K, vocab_size=SMALL_VOCAB, chunk_bytes=chunk_bytes
    )
    chunks = [c for s in manifest.shards for c in s.chunk_records]
    assert sum(chunks) == len(records)
    if expect == "one record per chunk":
        assert chunks == [1] * len(records)
    elif expect == "one chunk":
        assert chunks == [len(records)]
    else:
        assert 1 < len(chunks) < len(records)
        # A chunk closes once its raw size (5 B a token + 6 B a logit) reaches the limit.
        raw = [5 * len(r["input_ids"]) + 6 * r["topk_ids"].size for r in records]
        start = 0
        for count in chunks[:-1]:
            assert sum(raw[start : start + count]) >= chunk_bytes
            assert sum(raw[start : start + count - 1]) < chunk_bytes
            start += count


def test_output_is_deterministic_across_thread_counts_and_add_batch(tmp_path, records):
    # One generation token for all three, so that their shard names and footers agree.
    options = {
        "k": SMALL_K,
        "vocab_size": SMALL_VOCAB,
        "chunk_bytes": 700,
        "shard_bytes": 5000,
        "generation": "0123456789ab",
    }
    write_cache(tmp_path / "one", records, threads=1, **options)
    write_cache(tmp_path / "four", records, threads=4, **options)
    with CacheWriter(str(tmp_path / "batch"), threads=2, **options) as writer:
        for start in range(0, len(records), 5):
            batch = records[start : start + 5]
            writer.add_batch(
                input_ids=[r["input_ids"] for r in batch],
                loss_mask=[r["loss_mask"] for r in batch],
                topk_ids=[r["topk_ids"] for r in batch],
                topk_logprobs=[r["topk_logprobs"] for r in batch],
                sample_ids=[r["sample_id"] for r in batch],
            )
    reference = shard_bytes_on_disk(tmp_path / "one")
    assert len(reference) > 1
    assert shard_bytes_on_disk(tmp_path / "four") == reference
    assert shard_bytes_on_disk(tmp_path / "batch") == reference


def test_add_batch_checks_lengths(tmp_path, records):
    with CacheWriter(str(tmp_path), k=SMALL_K, vocab_size=SMALL_VOCAB) as writer:
        with pytest.raises(ValueError, match="add_batch: topk_ids has 1 entries, input_ids has 2"):
            writer.add_batch(
                input_ids=[r["input_ids"] for r in records[:2]],
                loss_mask=[r["loss_mask"] for r in records[:2]],
                topk_ids=[records[0]["topk_ids"]],
                topk_logprobs=[r["topk_logprobs"] for r in records[:2]],
            )
        writer.add_batch(  # no sample_ids at all
            input_ids=[r["input_ids"] for r in records[:2]],
            loss_mask=[r["loss_mask"] for r in records[:2]],
            topk_ids=[r["topk_ids"] for r in records[:2]],
            topk_logprobs=[r["topk_logprobs"] for r in records[:2]],
        )
    with open_cache(str(tmp_path)) as cache:
        assert [r.sample_id for r in cache] == [None, None]


def test_rows_are_sorted_without_touching_the_callers_arrays(tmp_path):
    rng = np.random.default_rng(0)
    record = make_records(1, seed=6)[0]
    order = np.argsort(rng.random(record["topk_ids"].shape), axis=1)
    shuffled_ids = np.take_along_axis(record["topk_ids"], order, axis=1)
    shuffled_lp = np.take_along_axis(record["topk_logprobs"], order, axis=1)
    ids_before, lp_before = shuffled_ids.copy(), shuffled_lp.copy()
    write_cache(
        tmp_path,
        [{**record, "topk_ids": shuffled_ids, "topk_logprobs": shuffled_lp}],
        k=SMALL_K,
        vocab_size=SMALL_VOCAB,
    )
    np.testing.assert_array_equal(shuffled_ids, ids_before)
    np.testing.assert_array_equal(shuffled_lp.view(np.uint16), lp_before.view(np.uint16))
    with open_cache(str(tmp_path)) as cache:
        assert_record_equal(cache[0], record)  # synthetic rows are already canonical


def test_integer_loss_mask_is_accepted(tmp_path):
    record = make_records(1, seed=8)[0]
    as_int = {**record, "loss_mask": record["loss_mask"].astype(np.int64)}
    write_cache(tmp_path, [as_int], k=SMALL_K, vocab_size=SMALL_VOCAB)
    with open_cache(str(tmp_path)) as cache:
        assert_record_equal(cache[0], record)


def test_existing_cache_needs_overwrite(tmp_path, records):
    write_cache(tmp_path, records[:4], k=SMALL_K, vocab_size=SMALL_VOCAB, shard_bytes=1)
    with pytest.raises(CacheError, match="overwrite=True"):
        CacheWriter(str(tmp_path), k=SMALL_K, vocab_size=SMALL_VOCAB)
    manifest = write_cache(
        tmp_path, records[4:6], k=SMALL_K, vocab_size=SMALL_VOCAB, overwrite=True
    )
    assert all_files(tmp_path) == sorted([MANIFEST_NAME, *(s.path for s in manifest.shards)])
    with open_cache(str(tmp_path)) as cache:
        assert len(cache) == 2
        assert_record_equal(cache[0], records[4])


def test_leftovers_of_an_uncommitted_run_are_cleared_but_nothing_else(tmp_path, records):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "g0123456789ab-00000.lgc").write_bytes(b"half a shard")
    (shards / f"g0123456789ab-00009.lgc.tmp-{'0' * 32}").write_bytes(b"a temporary file")
    foreign = [
        "r00002-g0123456789ab-00000.lgc",  # another rank's shard
        "00000.lgc",  # a format 1.0 name: not this writer's naming
        "model-00001.safetensors",  # not logitcache's at all
    ]
    for name in foreign:
        (shards / name).write_bytes(b"not mine")
    manifest = write_cache(tmp_path, records[:3], k=SMALL_K, vocab_size=SMALL_VOCAB)
    assert sorted(p.name for p in shards.iterdir()) == sorted(
        [*foreign, *(s.path.split("/")[1] for s in manifest.shards)]
    )
    with open_cache(str(tmp_path)) as cache:
        assert len(cache) == 3


def test_custom_codec_pipelines_are_recorded_and_used(tmp_path, records):
    codecs = {
        "input_ids": [{"id": "int_delta"}, {"id": "varint"}, {"id": "zstd", "level": 9}],
        "record_lengths": [{"id": "varint"}],
        "topk_ids": [{"id": "zstd", "level": 1}],
        "topk_logprobs": [{"id": "shuffle", "elementsize": 2}, {"id": "zstd", "level": 1}],
    }
    manifest = write_cache(tmp_path, records, k=SMALL_K, vocab_size=SMALL_VOCAB, codecs=codecs)
    for name, config in codecs.items():
        assert manifest.columns[name]["codecs"] == config
    shard = ShardFile(
        str(tmp_path / manifest.shards[0].path),
        name=manifest.shards[0].path,
        entry=manifest.shards[0],
        k=SMALL_K,
        vocab_size=SMALL_VOCAB,
        positions="supervised",
    )
    try:
        for name, config in codecs.items():
            assert shard.pipelines[name].get_config() == config
    finally:
        shard.close()
    with open_cache(str(tmp_path)) as cache:
        for i, record in enumerate(cache):
            assert_record_equal(record, records[i], where=f"record {i}")


def test_identity_and_metadata_reach_the_manifest(tmp_path, records):
    teacher = {"name": "tiny-llama", "revision": "abc123", "dtype": "bfloat16"}
    tokenizer = {"name": "tiny-llama", "vocab_fingerprint": "sha256:00ff"}
    write_cache(
        tmp_path,
        records[:2],
        k=SMALL_K,
        vocab_size=SMALL_VOCAB,
        teacher=teacher,
        tokenizer=tokenizer,
        metadata={"dataset": "synthetic", "split": "train"},
    )
    with open_cache(str(tmp_path)) as cache:
        assert cache.manifest.teacher == teacher
        assert cache.manifest.tokenizer == tokenizer
        assert cache.manifest.metadata == {"dataset": "synthetic", "split": "train"}
        assert cache.manifest.created_by.startswith("logitcache ")


def test_sample_ids_present_absent_and_mixed(tmp_path):
    records = make_records(9, seed=12)
    for i in (1, 2, 5):
        records[i] = {key: v for key, v in records[i].items() if key != "sample_id"}
    records[3]["sample_id"] = ""
    records[4]["sample_id"] = "ünïcode ✓"
    # One record per chunk: chunks with and without the sample_id columns. One big chunk:
    # present, empty and absent ids side by side.
    for chunk_bytes in (1, 2 << 20):
        target = tmp_path / str(chunk_bytes)
        write_cache(target, records, k=SMALL_K, vocab_size=SMALL_VOCAB, chunk_bytes=chunk_bytes)
        with open_cache(str(target)) as cache:
            for i, record in enumerate(cache):
                assert_record_equal(record, records[i], where=f"record {i}")


def test_writer_refuses_a_pipeline_no_reader_can_decode(tmp_path, records):
    codecs = {
        "input_ids": [
            {"id": "zstd", "level": 1},
            {"id": "byte_bit_shuffle", "elementsize": 4, "byte_planes": 2},
        ]
    }
    with (
        pytest.raises(ValueError, match="input_ids"),
        CacheWriter(str(tmp_path), k=SMALL_K, vocab_size=SMALL_VOCAB, codecs=codecs) as writer,
    ):
        for record in records:
            writer.add(**record)
