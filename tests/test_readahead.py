"""Read-ahead: chunks decoded on background threads give the same records and errors as none.

Covers the ReadAhead queue itself, Pipeline.unpack/finish against decode_bytes for every
pipeline a writer makes, iter_records (read-ahead by default on two cores or more) and the
streaming dataset with read-ahead on and off (local and memory:// stores), and a corrupt block
met by a read-ahead thread.
"""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest

from logitcache import open_cache, readahead
from logitcache.codecs import (
    Pipeline,
    default_pipeline_configs,
    entropy_pipeline_configs,
)
from logitcache.format import CorruptCacheError
from logitcache.loader import LogitCacheDataset
from logitcache.readahead import ReadAhead
from logitcache.reader import LogitCache

from .conftest import SMALL_K, SMALL_VOCAB, assert_record_equal, make_records, write_cache


def _readahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("logitcache-readahead")]


def _same_records(got, want) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.sample_id == b.sample_id
        for field in ("input_ids", "loss_mask", "topk_ids", "topk_logprobs"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


# -- the queue ---------------------------------------------------------------------------
def test_keys_are_worked_in_order_and_never_more_than_depth_ahead():
    taken, started = [], []
    lock = threading.Lock()

    def work(key):
        with lock:
            started.append(key)
            lead = key - len(taken)  # how far ahead of the key being taken
        return key * 10, lead

    with ReadAhead(work, range(20), depth=3) as ahead:
        for key in range(20):
            value, lead = ahead.take(key)
            with lock:
                taken.append(key)
            assert value == key * 10
            assert lead <= 3
            assert started == list(range(len(started)))
    assert started == list(range(20))


def test_depth_zero_runs_nothing_and_returns_none():
    def work(key):
        raise AssertionError("depth 0 must not work")

    with ReadAhead(work, range(5), depth=0) as ahead:
        assert ahead.take(0) is None and ahead.take(3) is None
        assert ahead.pending() == []


def test_keys_taken_out_of_order_are_refused_by_name():
    with (
        ReadAhead(lambda k: k, ["a", "b"], depth=2) as ahead,
        pytest.raises(RuntimeError, match=r"asked for 'b', next in order is 'a'"),
    ):
        ahead.take("b")


def test_negative_depth_is_refused():
    with pytest.raises(ValueError, match="depth must be >= 0"):
        ReadAhead(lambda k: k, [], depth=-1)


def test_an_error_surfaces_when_its_key_is_taken_not_before():
    def work(key):
        if key == 2:
            raise CorruptCacheError(f"chunk {key} is bad")
        return key

    with ReadAhead(work, range(4), depth=4) as ahead:
        time.sleep(0.05)  # every key has been worked by now
        assert ahead.take(0) == 0 and ahead.take(1) == 1
        with pytest.raises(CorruptCacheError, match="chunk 2 is bad"):
            ahead.take(2)


def test_close_drops_what_is_pending_and_stops_the_thread():
    release = threading.Event()
    ran = []

    def work(key):
        ran.append(key)
        release.wait(5)
        return key

    ahead = ReadAhead(work, range(100), depth=8)
    assert _readahead_threads()
    release.set()
    ahead.close()
    assert not _readahead_threads()
    assert len(ran) <= 8


def test_close_from_another_thread_lets_a_waiting_take_finish_and_later_takes_return_none():
    started, release = threading.Event(), threading.Event()

    def work(key):
        started.set()
        release.wait(5)
        return key

    ahead = ReadAhead(work, range(10), depth=2)
    started.wait(5)
    results = []
    taker = threading.Thread(target=lambda: results.append(ahead.take(0)))
    taker.start()
    time.sleep(0.05)  # the taker now waits for key 0
    closer = threading.Thread(target=ahead.close)
    closer.start()
    release.set()
    taker.join(5)
    closer.join(5)
    assert results == [0]
    assert not _readahead_threads()
    assert ahead.take(1) is None and ahead.pending() == []
    ahead.close()  # twice is fine


# -- unpack then finish is decode --------------------------------------------------------
@pytest.mark.parametrize("family", ["default", "entropy"])
def test_finish_of_unpack_is_decode_for_every_column(family):
    configs = (default_pipeline_configs if family == "default" else entropy_pipeline_configs)(
        SMALL_K
    )
    rng = np.random.default_rng(0)
    records = make_records(6, seed=4)
    columns = {
        "record_lengths": np.array([len(r["input_ids"]) for r in records], dtype=np.int32),
        "input_ids": np.concatenate([r["input_ids"] for r in records]).astype(np.int32),
        "loss_mask": np.concatenate([r["loss_mask"] for r in records]).astype(np.uint8),
        "topk_ids": np.concatenate([r["topk_ids"] for r in records]).astype(np.int32),
        "topk_logprobs": np.concatenate([r["topk_logprobs"] for r in records]).astype(np.float16),
        "sample_id_lengths": rng.integers(0, 9, 6).astype(np.int32),
        "sample_id_bytes": rng.integers(0, 128, 40).astype(np.uint8),
    }
    for name, config in configs.items():
        pipeline = Pipeline.from_config(config)
        raw = np.ascontiguousarray(columns[name]).view(np.uint8).reshape(-1)
        stored = pipeline.encode(columns[name])
        whole = pipeline.decode_bytes(stored, raw.size)
        staged = pipeline.unpack(stored, raw.size)
        np.testing.assert_array_equal(pipeline.finish(staged, raw.size), whole, err_msg=name)
        np.testing.assert_array_equal(whole, raw, err_msg=name)


def test_a_pipeline_without_zstd_unpacks_to_its_input():
    pipeline = Pipeline.from_config([{"id": "int_delta"}])
    data = pipeline.encode(np.arange(10, dtype=np.int32))
    assert pipeline.unpack(data, 40) is not None
    np.testing.assert_array_equal(pipeline.unpack(data, 40), np.frombuffer(data, np.uint8))
    np.testing.assert_array_equal(
        pipeline.finish(pipeline.unpack(data, 40), 40).view(np.int32), np.arange(10)
    )


# -- scans -------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [1, 4])
def test_iter_records_with_read_ahead_reads_what_was_written(shared_small_cache, depth):
    with open_cache(str(shared_small_cache.path)) as cache:
        got = list(cache.iter_records(read_ahead=depth))
    for i, (record, want) in enumerate(zip(got, shared_small_cache.records, strict=True)):
        assert_record_equal(record, want, f"record {i}")
    assert not _readahead_threads()


@pytest.mark.parametrize(("start", "stop"), [(0, 1), (3, 17), (11, 12), (29, 30), (5, 5)])
def test_partial_scans_with_read_ahead_match_partial_scans_without(shared_small_cache, start, stop):
    with open_cache(str(shared_small_cache.path)) as cache:
        want = list(cache.iter_records(start, stop, read_ahead=0))
        got = list(cache.iter_records(start, stop, read_ahead=3))
    _same_records(got, want)


def test_read_ahead_decodes_each_chunk_of_the_scan_once_on_its_threads(
    shared_small_cache, monkeypatch
):
    decoded = []
    original = LogitCache._decoded

    def spy_decoded(self, shard, chunk, rows_on_demand=False):
        decoded.append((shard, chunk, threading.current_thread().name))
        return original(self, shard, chunk, rows_on_demand)

    monkeypatch.setattr(LogitCache, "_decoded", spy_decoded)
    with open_cache(str(shared_small_cache.path)) as cache:
        list(cache.iter_records(read_ahead=2))
    chunks = [
        (s, c)
        for s, entry in enumerate(shared_small_cache.manifest.shards)
        for c in range(len(entry.chunk_records))
    ]
    assert sorted((s, c) for s, c, _ in decoded) == chunks  # each once
    assert all(name.startswith("logitcache-readahead") for _, _, name in decoded)


@pytest.mark.parametrize(("cpus", "threads"), [(1, 0), (2, 2), (16, 2)])
def test_scans_read_ahead_by_default_with_a_core_to_spare(
    shared_small_cache, monkeypatch, cpus, threads
):
    monkeypatch.setattr(readahead, "usable_cpus", lambda: cpus)
    assert readahead.scan_read_ahead() == readahead.DEPTH_PER_THREAD * threads
    with open_cache(str(shared_small_cache.path)) as cache:
        scan = cache.iter_records()
        first = next(scan)
        assert len(_readahead_threads()) == threads
        got = [first, *scan]
    assert not _readahead_threads()
    for i, (record, want) in enumerate(zip(got, shared_small_cache.records, strict=True)):
        assert_record_equal(record, want, f"record {i}")


def test_threads_follow_the_depth_and_the_cores(monkeypatch):
    monkeypatch.setattr(readahead, "usable_cpus", lambda: 8)
    assert [readahead.threads_for(d) for d in (0, 1, 2, 4, 9)] == [0, 1, 2, 2, 2]
    monkeypatch.setattr(readahead, "usable_cpus", lambda: 1)
    assert [readahead.threads_for(d) for d in (0, 1, 4)] == [0, 1, 1]


def test_a_scan_stopped_early_stops_its_read_ahead(shared_small_cache):
    with open_cache(str(shared_small_cache.path)) as cache:
        scan = cache.iter_records(read_ahead=4)
        next(scan)
        assert _readahead_threads()
        scan.close()
        assert not _readahead_threads()


def test_a_corrupt_block_met_ahead_fails_at_its_own_chunk_by_name(small_cache):
    entry = small_cache.manifest.shards[1]
    with open_cache(str(small_cache.path)) as cache:
        offset, length, _, _ = cache.shard_file(1).chunks.block(1, "topk_logprobs")
        first_bad = int(cache.shard_starts[1]) + entry.chunk_records[0]
    path = small_cache.shard_path(1)
    data = bytearray(path.read_bytes())
    data[offset + length // 2] ^= 0x10
    path.write_bytes(bytes(data))
    for depth in (0, 4):
        got = []
        with open_cache(str(small_cache.path)) as cache, pytest.raises(CorruptCacheError) as error:
            for record in cache.iter_records(read_ahead=depth):
                got.append(record)
        assert len(got) == first_bad, depth
        message = str(error.value)
        assert f"shard {entry.path} chunk 1 column topk_logprobs: checksum mismatch" in message
    assert not _readahead_threads()


def test_closing_the_cache_stops_read_ahead_and_the_scan_goes_on(shared_small_cache):
    """close() joins the read-ahead thread before it unmaps shards; a scan still running
    then decodes by itself, reopening shards, and yields the same records."""
    cache = open_cache(str(shared_small_cache.path))
    scan = cache.iter_records(read_ahead=4)
    got = [next(scan) for _ in range(3)]
    assert _readahead_threads()
    cache.close()
    assert not _readahead_threads()
    got += list(scan)
    cache.close()
    for i, (record, want) in enumerate(zip(got, shared_small_cache.records, strict=True)):
        assert_record_equal(record, want, f"record {i}")


# -- the streaming dataset ---------------------------------------------------------------
@pytest.mark.parametrize("window", [1, 7, 1000])
def test_dataset_with_read_ahead_streams_the_same_records(shared_small_cache, window):
    url = str(shared_small_cache.path)
    want = list(LogitCacheDataset(url, seed=5, shuffle_window=window, read_ahead=0))
    got = list(LogitCacheDataset(url, seed=5, shuffle_window=window, read_ahead=3))
    _same_records(got, want)
    assert not _readahead_threads()


def test_dataset_read_ahead_decodes_what_it_reads(shared_small_cache, monkeypatch):
    worked, read = [], []
    original_decoded, original_read = LogitCache.decoded_chunk, LogitCache.read_chunk

    def decoded_chunk(self, shard, chunk):
        worked.append((shard, chunk))
        return original_decoded(self, shard, chunk)

    def read_chunk(self, shard, chunk, decoded=None):
        assert decoded is not None  # made by a read-ahead thread
        read.append((shard, chunk))
        return original_read(self, shard, chunk, decoded)

    monkeypatch.setattr(LogitCache, "decoded_chunk", decoded_chunk)
    monkeypatch.setattr(LogitCache, "read_chunk", read_chunk)
    ds = LogitCacheDataset(str(shared_small_cache.path), seed=1, shuffle_window=5, read_ahead=2)
    assert len(list(ds)) == len(shared_small_cache.records)
    assert sorted(worked) == sorted(read)
    # Windows of 5 records cut chunks: some chunks are decoded in two windows.
    assert len(read) > sum(len(s.chunk_records) for s in shared_small_cache.manifest.shards)


def test_dataset_resumes_to_the_same_records_with_read_ahead(shared_small_cache):
    url = str(shared_small_cache.path)
    full = list(LogitCacheDataset(url, seed=2, shuffle_window=4, read_ahead=0))
    ds = LogitCacheDataset(url, seed=2, shuffle_window=4, read_ahead=3)
    it = iter(ds)
    head = [next(it) for _ in range(11)]
    state = ds.state_dict()
    it.close()
    resumed = LogitCacheDataset(url, seed=2, shuffle_window=4, read_ahead=3)
    resumed.load_state_dict(state)
    _same_records(head + list(resumed), full)


def test_closing_a_datasets_cache_mid_epoch_stops_read_ahead_and_the_epoch_goes_on(
    shared_small_cache,
):
    url = str(shared_small_cache.path)
    want = list(LogitCacheDataset(url, seed=4, shuffle_window=6, read_ahead=0))
    ds = LogitCacheDataset(url, seed=4, shuffle_window=6, read_ahead=3)
    it = iter(ds)
    got = [next(it) for _ in range(5)]
    assert _readahead_threads()
    ds.cache.close()  # the cache this process's iteration reads
    assert not _readahead_threads()
    got += list(it)
    _same_records(got, want)


def test_a_closed_dataset_stops_read_ahead_and_reopens_its_cache_when_read(
    shared_small_cache,
):
    url = str(shared_small_cache.path)
    want = list(LogitCacheDataset(url, seed=4, shuffle_window=6, read_ahead=0))
    with LogitCacheDataset(url, seed=4, shuffle_window=6, read_ahead=3) as ds:
        it = iter(ds)
        got = [next(it) for _ in range(5)]
        first = ds.cache
        ds.close()
        assert not _readahead_threads()
        got += list(it)
        _same_records(got, want)
        again = list(ds)
        assert ds.cache is not first  # a new epoch opened the cache again
    assert not _readahead_threads()  # the with block closed that one too
    _same_records(again, want)


def test_negative_read_ahead_is_refused(shared_small_cache):
    with pytest.raises(ValueError, match="read_ahead must be >= 0 chunks, got -1"):
        LogitCacheDataset(str(shared_small_cache.path), read_ahead=-1)


def test_remote_dataset_releasing_shards_while_reading_ahead(tmp_path):
    """A memory:// cache whose local copies are evicted as the stream moves on: shards of
    chunks still being read ahead are not unmapped under the read-ahead thread."""
    url = f"memory://logitcache-readahead-{uuid.uuid4().hex}/cache"
    records = make_records(40, seed=8)
    manifest = write_cache(
        url, records, k=SMALL_K, vocab_size=SMALL_VOCAB, chunk_bytes=1500, shard_bytes=4000
    )
    assert len(manifest.shards) >= 4
    options = {"cache_dir": str(tmp_path / "local"), "cache_limit_bytes": 9000}
    want = list(LogitCacheDataset(url, seed=3, shuffle_window=6, read_ahead=0, **options))
    got = list(LogitCacheDataset(url, seed=3, shuffle_window=6, read_ahead=4, **options))
    _same_records(got, want)
    assert sorted(r.sample_id for r in got) == sorted(r["sample_id"] for r in records)
