"""LogitCacheDataset decodes a window's chunks as they are needed and lets them go after
their last record: the first record waits for one chunk, memory holds the chunks in progress,
and the order (hence every resume point) is the planned one."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from logitcache import CacheWriter, open_cache
from logitcache.loader import LogitCacheDataset
from logitcache.reader import LogitCache
from logitcache.synthetic import synthetic_records


def _write(url: str, chunk_bytes: int) -> str:
    with CacheWriter(url, k=8, vocab_size=512, chunk_bytes=chunk_bytes, shard_bytes=20000) as w:
        for kw in synthetic_records(120, k=8, vocab_size=512, mean_length=24, seed=4):
            w.add(**kw)
    return url


@pytest.fixture(scope="module")
def grouped(tmp_path_factory) -> str:
    """Chunks of several records each."""
    return _write(str(tmp_path_factory.mktemp("grouped") / "cache"), 2048)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> str:
    """One record per chunk."""
    return _write(str(tmp_path_factory.mktemp("single") / "cache"), 1)


class _Chunk(list):
    """A decoded chunk (list of records) whose lifetime the test can watch."""

    __hash__ = object.__hash__


@pytest.fixture
def watched(monkeypatch):
    """Counts chunk decodes and tracks which decoded chunks are still alive."""
    state = {"decodes": 0, "alive": weakref.WeakSet()}
    original = LogitCache.read_chunk

    def read_chunk(self, shard, chunk, decoded=None):
        state["decodes"] += 1
        out = _Chunk(original(self, shard, chunk, decoded))
        state["alive"].add(out)
        return out

    monkeypatch.setattr(LogitCache, "read_chunk", read_chunk)
    return state


def test_the_first_record_decodes_only_its_own_chunk(grouped, watched):
    ds = LogitCacheDataset(grouped, seed=3, shuffle_window=10_000)  # the whole cache
    first = next(iter(ds))
    assert watched["decodes"] == 1
    assert first.sample_id is not None


@pytest.mark.parametrize("window", [1, 7, 10_000])
def test_order_is_the_planned_order(grouped, window):
    ds = LogitCacheDataset(grouped, seed=9, shuffle_window=window)
    with open_cache(grouped) as cache:
        planned = [cache[int(i)].sample_id for i in ds.worker_indices(0, 0, 0)]
    assert [r.sample_id for r in ds] == planned
    assert sorted(planned) == sorted(r.sample_id for r in open_cache(grouped).iter_records())


def test_each_chunk_is_decoded_once_per_window(grouped, watched):
    ds = LogitCacheDataset(grouped, seed=2, shuffle_window=10_000)
    with open_cache(grouped) as cache:
        chunks = sum(len(s.chunk_records) for s in cache.manifest.shards)
    assert len(list(ds)) == 120
    assert watched["decodes"] == chunks


def test_single_record_chunks_are_let_go_as_soon_as_their_record_is_out(single, watched):
    ds = LogitCacheDataset(single, seed=1, shuffle_window=10_000)
    most = 0
    for record in ds:
        del record  # records hold no cycles: reference counting frees them at once
        most = max(most, len(watched["alive"]))
    assert watched["decodes"] == 120
    assert most <= 1  # the generator holds at most the chunk of the record it just gave out
    gc.collect()
    assert len(watched["alive"]) == 0


def test_chunks_in_progress_never_exceed_the_window(grouped, watched):
    window = 12
    ds = LogitCacheDataset(grouped, seed=5, shuffle_window=window)
    most = 0
    for record in ds:
        del record  # records hold no cycles: reference counting frees them at once
        most = max(most, len(watched["alive"]))
    assert 1 <= most <= window
    gc.collect()
    assert len(watched["alive"]) == 0


def test_default_window_is_32_mib_of_decoded_records(grouped):
    ds = LogitCacheDataset(grouped)
    m = ds.cache.manifest
    per_record = (m.tokens * 5 + m.targets * m.k * 6) / m.records
    assert ds.shuffle_window == min(1 << 16, int((32 << 20) // per_record))


def test_resume_mid_window_yields_the_rest_of_the_planned_order(grouped):
    full = [r.sample_id for r in LogitCacheDataset(grouped, seed=6, shuffle_window=9)]
    ds = LogitCacheDataset(grouped, seed=6, shuffle_window=9)
    it = iter(ds)
    head = [next(it).sample_id for _ in range(40)]  # 4 windows and 4 records of the fifth
    state = ds.state_dict()
    resumed = LogitCacheDataset(grouped, seed=6, shuffle_window=9)
    resumed.load_state_dict(state)
    assert head + [r.sample_id for r in resumed] == full
    assert np.array_equal(np.sort(full), np.sort(np.unique(full)))
