"""open_cache and LogitCache: lookup, iteration, truncation to K' < K, chunk caching, verify.

Reads a small multi-shard cache written once per module; tests that damage a cache write
their own.
"""

from __future__ import annotations

import mmap

import numpy as np
import pytest

from logitcache import CorruptCacheError, open_cache
from logitcache import shard as shard_module
from logitcache.shard import ShardFile
from tests.conftest import (
    SMALL_K,
    SMALL_VOCAB,
    assert_record_equal,
    make_records,
    write_cache,
)


@pytest.fixture
def cache(shared_small_cache):
    with open_cache(str(shared_small_cache.path)) as opened:
        yield opened


def test_len_and_getitem(cache, shared_small_cache):
    records = shared_small_cache.records
    assert len(cache) == len(records)
    for i in (0, 1, len(records) // 2, len(records) - 1):
        assert_record_equal(cache[i], records[i], where=f"record {i}")
    assert_record_equal(cache[-1], records[-1])
    assert_record_equal(cache[np.int64(3)], records[3])


@pytest.mark.parametrize("index", [30, 31, -31, 10**12])
def test_index_out_of_range(cache, index):
    with pytest.raises(IndexError, match="out of range"):
        cache[index]


@pytest.mark.parametrize("index", [1.0, "3", slice(0, 2), None])
def test_index_must_be_an_integer(cache, index):
    with pytest.raises(TypeError):
        cache[index]


def test_records_are_read_only_numpy_arrays(cache):
    record = cache[5]
    for array in (record.input_ids, record.loss_mask, record.topk_ids, record.topk_logprobs):
        assert isinstance(array, np.ndarray)
        with pytest.raises(ValueError):
            array[0] = array[0]
    assert record.num_tokens == record.input_ids.shape[0]
    assert record.num_targets == record.topk_ids.shape[0]
    np.testing.assert_array_equal(record.target_positions(), np.flatnonzero(record.loss_mask))


def test_locate_follows_the_manifest(cache, shared_small_cache):
    manifest = shared_small_cache.manifest
    expected = [
        (s, c, i)
        for s, entry in enumerate(manifest.shards)
        for c, count in enumerate(entry.chunk_records)
        for i in range(count)
    ]
    assert [cache.locate(i) for i in range(len(cache))] == expected


@pytest.mark.parametrize("start, stop", [(0, None), (0, 0), (3, 4), (2, 17), (13, 30), (29, 99)])
def test_iter_records_ranges(cache, shared_small_cache, start, stop):
    records = shared_small_cache.records
    got = list(cache.iter_records(start, stop))
    want = records[start:stop]
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_record_equal(g, w, where=f"record {start + i}")


def test_iter_records_every_range_across_chunks_and_shards(cache, shared_small_cache):
    ids = [r["sample_id"] for r in shared_small_cache.records]
    assert len(cache.manifest.shards) > 1
    for start in range(len(ids) + 1):
        for stop in range(start, len(ids) + 2):
            got = [r.sample_id for r in cache.iter_records(start, stop)]
            assert got == ids[start:stop], (start, stop)


class _MadviseSpy:
    """A shard's map that records madvise calls (start, length) and passes them on."""

    def __init__(self, real: mmap.mmap):
        self.real, self.calls = real, []

    def madvise(self, option: int, start: int, length: int) -> None:
        self.calls.append((start, length))
        self.real.madvise(option, start, length)

    def close(self) -> None:
        self.real.close()


@pytest.mark.skipif(shard_module._POPULATE_READ is None, reason="no MADV_POPULATE_READ")
def test_a_scan_maps_the_pages_ahead_in_few_calls(shared_small_cache, monkeypatch):
    monkeypatch.setattr(shard_module, "PREFAULT_BYTES", 2000)
    with open_cache(str(shared_small_cache.path)) as cache:
        shard = cache.shard_file(0)
        spy = shard._mmap = _MadviseSpy(shard._mmap)
        for _ in cache.iter_records(0, int(cache.shard_starts[1]), read_ahead=0):
            pass
        assert 0 < len(spy.calls) < len(shard.chunks)  # a call per window, not per chunk
        starts = [start for start, _ in spy.calls]
        assert starts == sorted(starts) and starts[0] < mmap.PAGESIZE
        assert all(start % mmap.PAGESIZE == 0 for start in starts)
        last_start, last_length = spy.calls[-1]
        assert last_start + last_length == shard.footer_start  # every chunk, not the footer
        cache[0]  # a random read maps nothing ahead
        assert len(spy.calls) == len(starts)


@pytest.mark.skipif(shard_module._POPULATE_READ is None, reason="no MADV_POPULATE_READ")
def test_a_scan_from_the_middle_of_a_shard_maps_pages_from_there(tmp_path, monkeypatch):
    monkeypatch.setattr(shard_module, "PREFAULT_BYTES", 2000)
    records = make_records(60, seed=5)
    write_cache(str(tmp_path / "c"), records, k=SMALL_K, vocab_size=SMALL_VOCAB, chunk_bytes=1500)
    with open_cache(str(tmp_path / "c")) as cache:
        shard = cache.shard_file(0)
        spy = shard._mmap = _MadviseSpy(shard._mmap)
        middle = len(shard.chunks) // 2
        offset = int(shard.chunks.blocks[middle, :, 0].max())
        assert offset > 2 * mmap.PAGESIZE
        first = int(cache._chunk_starts[0][middle])
        got = next(cache.iter_records(first, first + 1))
        assert got.sample_id == records[first]["sample_id"]
        start, length = spy.calls[0]
        assert offset - mmap.PAGESIZE - 1500 < start <= offset < start + length


def test_a_scan_reading_ahead_leaves_the_pages_to_its_threads(shared_small_cache):
    # madvise holds the GIL for as long as it maps: the decoding threads would wait on it.
    with open_cache(str(shared_small_cache.path)) as cache:
        shard = cache.shard_file(0)
        spy = shard._mmap = _MadviseSpy(shard._mmap)
        got = [r.sample_id for r in cache.iter_records(read_ahead=2)]
        assert got == [r["sample_id"] for r in shared_small_cache.records]
        assert spy.calls == []


def test_a_scan_goes_on_where_pages_cannot_be_mapped_ahead(shared_small_cache, monkeypatch):
    monkeypatch.setattr(shard_module, "_POPULATE_READ", -12345)  # refused by any kernel
    ids = [r["sample_id"] for r in shared_small_cache.records]
    with open_cache(str(shared_small_cache.path)) as cache:
        assert [r.sample_id for r in cache.iter_records(read_ahead=0)] == ids
    assert shard_module._POPULATE_READ is None  # tried once, then left to page faults


def test_iteration_decodes_each_chunk_once(shared_small_cache, monkeypatch):
    calls: list[tuple[str, int]] = []
    original = ShardFile.decode_chunk

    def counting(self, index, rows_on_demand=False):
        calls.append((self.name, index))
        return original(self, index, rows_on_demand)

    monkeypatch.setattr(ShardFile, "decode_chunk", counting)
    with open_cache(str(shared_small_cache.path), chunk_cache_size=1) as cache:
        assert len(list(cache)) == len(shared_small_cache.records)
    chunks = [
        (s.path, c) for s in shared_small_cache.manifest.shards for c in range(len(s.chunk_records))
    ]
    assert sorted(calls) == sorted(chunks)  # read-ahead threads may finish out of order


def test_one_record_decodes_one_chunk_and_the_lru_keeps_recent_chunks(
    shared_small_cache, monkeypatch
):
    calls: list[tuple[str, int]] = []
    original = ShardFile.decode_chunk

    def counting(self, index, rows_on_demand=False):
        calls.append((self.name, index))
        return original(self, index, rows_on_demand)

    monkeypatch.setattr(ShardFile, "decode_chunk", counting)
    shards = shared_small_cache.manifest.shards
    first, second = shards[0].path, shards[-1].path
    chunk1_start = shards[0].chunk_records[0]  # first record of shard 0, chunk 1
    assert chunk1_start >= 2
    with open_cache(str(shared_small_cache.path), chunk_cache_size=2) as cache:
        last = len(cache) - 1
        last_chunk = cache.locate(last)[1]
        cache[last]
        assert calls == [(second, last_chunk)]
        cache[0]
        cache[1]  # same chunk as record 0
        cache[last]  # still cached; now the most recently used
        assert calls == [(second, last_chunk), (first, 0)]
        cache[chunk1_start]  # a third chunk evicts the least recently used: record 0's
        cache[last]
        assert len(calls) == 3
        cache[0]
        assert calls[3:] == [(first, 0)]


def test_local_shards_are_memory_mapped(cache):
    cache[0]
    shard = cache.shard_file(0)
    assert isinstance(shard._mmap, mmap.mmap)


def test_truncation_to_top_k_prime_keeps_the_largest_values(shared_small_cache):
    records = shared_small_cache.records
    for k_prime in (1, 3, SMALL_K - 1, SMALL_K):
        with open_cache(str(shared_small_cache.path), k=k_prime) as cache:
            assert cache.k == k_prime
            for i in (0, 7, len(cache) - 1):
                got, full = cache[i], records[i]
                assert got.topk_ids.shape == (full["topk_ids"].shape[0], k_prime)
                assert got.topk_ids.flags.c_contiguous and got.topk_logprobs.flags.c_contiguous
                np.testing.assert_array_equal(got.topk_ids, full["topk_ids"][:, :k_prime])
                np.testing.assert_array_equal(
                    got.topk_logprobs.view(np.uint16),
                    full["topk_logprobs"][:, :k_prime].view(np.uint16),
                )
                # By value: the kept columns are the k' largest of each full row.
                lp = full["topk_logprobs"].astype(np.float32)
                top = -np.sort(-lp, axis=1)[:, :k_prime]
                np.testing.assert_array_equal(got.topk_logprobs.astype(np.float32), top)


def test_truncation_of_rows_written_out_of_order(tmp_path):
    """The writer sorts rows, so truncation keeps the top k' even of unsorted input."""
    ids = np.array([[4, 9, 1, 7, 3]], dtype=np.int32)
    logprobs = np.array([[-5.0, -0.2, -9.0, -2.5, -2.5]], dtype=np.float16)
    write_cache(
        tmp_path,
        [
            {
                "input_ids": np.array([0, 1], np.int32),
                "loss_mask": np.array([False, True]),
                "topk_ids": ids,
                "topk_logprobs": logprobs,
            }
        ],
        k=5,
        vocab_size=10,
    )
    with open_cache(str(tmp_path), k=3) as cache:
        record = cache[0]
    np.testing.assert_array_equal(record.topk_ids, [[9, 3, 7]])  # tie at -2.5: id 3 first
    np.testing.assert_array_equal(record.topk_logprobs, np.array([[-0.2, -2.5, -2.5]], np.float16))


@pytest.mark.parametrize("k", [0, SMALL_K + 1, -1, 2.0])
def test_truncation_k_out_of_range(shared_small_cache, k):
    with pytest.raises(ValueError, match="k="):
        open_cache(str(shared_small_cache.path), k=k)


def test_positions_all_records(tmp_path):
    records = make_records(6, positions="all")
    write_cache(tmp_path, records, k=SMALL_K, vocab_size=1000, positions="all", chunk_bytes=500)
    with open_cache(str(tmp_path)) as cache:
        assert cache.manifest.positions == "all"
        for i, record in enumerate(cache):
            assert_record_equal(record, records[i])
            assert record.num_targets == record.num_tokens - 1
            np.testing.assert_array_equal(
                record.target_positions("all"), np.arange(1, record.num_tokens)
            )


def test_file_url_and_repr(shared_small_cache):
    with open_cache(f"file://{shared_small_cache.path}") as cache:
        assert len(cache) == len(shared_small_cache.records)
        assert_record_equal(cache[2], shared_small_cache.records[2])
        assert "records=30" in repr(cache) and "k=8" in repr(cache)


def test_empty_cache(tmp_path):
    manifest = write_cache(tmp_path, [], k=4, vocab_size=10)
    assert manifest.shards == []
    with open_cache(str(tmp_path)) as cache:
        assert len(cache) == 0
        assert list(cache) == []
        assert cache.verify() == []
        with pytest.raises(IndexError):
            cache[0]


def test_verify_passes_on_a_sound_cache(cache):
    assert cache.verify() == []
    assert cache.verify(raise_errors=False) == []


def test_verify_names_every_damaged_shard_and_chunk(small_cache):
    shards = small_cache.manifest.shards
    opened = ShardFile(
        str(small_cache.shard_path(0)),
        name=shards[0].path,
        k=SMALL_K,
        vocab_size=small_cache.vocab_size,
        positions="supervised",
    )
    offset = opened.chunks[1]["blocks"]["topk_ids"][0]
    opened.close()
    # A data byte of shard 0 chunk 1, and a reserved header byte of shard 2 that reads
    # never look at: only the whole-file checksum sees the second.
    for path, at in ((small_cache.shard_path(0), offset + 3), (small_cache.shard_path(2), 14)):
        data = bytearray(path.read_bytes())
        data[at] ^= 0x20
        path.write_bytes(bytes(data))
    with open_cache(str(small_cache.path)) as cache:
        assert_record_equal(cache[0], small_cache.records[0])  # chunk 0 is intact
        with pytest.raises(CorruptCacheError, match=f"shard {shards[0].path} chunk 1 "):
            cache[shards[0].chunk_records[0]]
        problems = cache.verify(raise_errors=False)
        assert len(problems) == 3, problems
        assert any(f"shard {shards[0].path}: file checksum mismatch" in p for p in problems)
        assert any(f"shard {shards[0].path} chunk 1 column topk_ids" in p for p in problems)
        assert any(f"shard {shards[2].path}: file checksum mismatch" in p for p in problems)
        with pytest.raises(CorruptCacheError, match="3 problem") as info:
            cache.verify()
        assert shards[2].path in str(info.value)


def test_open_cache_takes_a_path_object(shared_small_cache):
    with open_cache(shared_small_cache.path) as cache:
        assert len(cache) == len(shared_small_cache.records)
        assert cache[3].input_ids.tolist() == list(shared_small_cache.records[3]["input_ids"])
