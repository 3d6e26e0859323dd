"""LogitCacheDataset over a real local cache: partitioning, determinism and exact resume."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from logitcache import CacheWriter, open_cache
from logitcache.loader import LogitCacheDataset, LogitCacheLoader, LogitCacheMapDataset
from logitcache.synthetic import synthetic_records

N_RECORDS = 203


@pytest.fixture(scope="module")
def cache_url(tmp_path_factory) -> str:
    """203 records in 7 shards of uneven chunk counts (small chunks and shards on purpose)."""
    url = str(tmp_path_factory.mktemp("loader") / "cache")
    with CacheWriter(url, k=8, vocab_size=512, chunk_bytes=2048, shard_bytes=12000) as w:
        for kw in synthetic_records(N_RECORDS, k=8, vocab_size=512, mean_length=24, seed=1):
            w.add(**kw)
    return url


@pytest.fixture(scope="module")
def sample_ids(cache_url) -> list[str]:
    with open_cache(cache_url) as cache:
        ids = [r.sample_id for r in cache.iter_records()]
    assert len(set(ids)) == N_RECORDS
    return ids


def _ids(records) -> list[str]:
    return [r.sample_id for r in records]


def _epoch_ids(cache_url, *, world, workers, uneven, epoch=0) -> list[list[str]]:
    parts = []
    for rank in range(world):
        ds = LogitCacheDataset(
            cache_url, rank=rank, world_size=world, uneven=uneven, seed=5, shuffle_window=16
        )
        ds.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=_ids)
        got = [sid for batch in loader for sid in batch]
        assert len(got) == len(ds)
        parts.append(got)
    return parts


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_each_record_once_per_epoch_across_ranks_and_workers(cache_url, sample_ids, world, workers):
    parts = _epoch_ids(cache_url, world=world, workers=workers, uneven="none")
    assert sorted(s for p in parts for s in p) == sorted(sample_ids)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("workers", [0, 2])
def test_pad_and_drop_give_equal_rank_sizes(cache_url, sample_ids, world, workers):
    pad = _epoch_ids(cache_url, world=world, workers=workers, uneven="pad")
    per_rank = -(-N_RECORDS // world)
    assert all(len(p) == per_rank for p in pad)
    counts = Counter(s for p in pad for s in p)
    assert set(counts) == set(sample_ids)
    assert sum(c - 1 for c in counts.values()) == per_rank * world - N_RECORDS

    drop = _epoch_ids(cache_url, world=world, workers=workers, uneven="drop")
    assert all(len(p) == N_RECORDS // world for p in drop)
    flat = [s for p in drop for s in p]
    assert len(flat) == len(set(flat)) and set(flat) <= set(sample_ids)


def test_order_depends_on_seed_and_epoch_only(cache_url, sample_ids):
    def order(epoch, seed=5, shuffle=True):
        ds = LogitCacheDataset(cache_url, seed=seed, shuffle=shuffle, shuffle_window=16)
        ds.set_epoch(epoch)
        return [r.sample_id for r in ds]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert order(0, seed=6) != order(0)
    assert sorted(order(1)) == sorted(sample_ids)
    assert order(3, shuffle=False) == sample_ids


def _run(cache_url, workers, *, stop_after=None, state=None, batch_size=5, drop_last=False):
    """Batches (as lists of tensors) of one pass, optionally resumed or stopped early."""
    ds = LogitCacheDataset(cache_url, seed=11, shuffle_window=16, world_size=2, rank=1)
    loader = LogitCacheLoader(ds, batch_size, num_workers=workers, drop_last=drop_last)
    if state is not None:
        loader.load_state_dict(state)
    if stop_after is None:
        return list(loader), loader
    it = iter(loader)
    return [next(it) for _ in range(stop_after)], loader


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("drop_last", [False, True])
def test_resume_yields_exactly_the_remaining_batches(cache_url, workers, drop_last):
    full, _ = _run(cache_url, workers, drop_last=drop_last)
    assert len(full) > 10
    for n in (0, 1, 7, len(full) - 1):
        head, loader = _run(cache_url, workers, stop_after=n, drop_last=drop_last)
        state = json.loads(json.dumps(loader.state_dict()))  # a handful of plain integers
        assert _same(head, full[:n])
        tail, _ = _run(cache_url, workers, state=state, drop_last=drop_last)
        assert _same(tail, full[n:]), f"resume after {n} batches with {workers} workers"


def test_resume_of_a_resumed_run_and_the_next_epoch(cache_url):
    full, _ = _run(cache_url, 2)
    _, first = _run(cache_url, 2, stop_after=3)
    ds = LogitCacheDataset(cache_url, seed=11, shuffle_window=16, world_size=2, rank=1)
    loader = LogitCacheLoader(ds, 5, num_workers=2)
    loader.load_state_dict(first.state_dict())
    it = iter(loader)
    middle = [next(it) for _ in range(4)]
    assert _same(middle, full[3:7])
    tail, second = _run(cache_url, 2, state=loader.state_dict())
    assert _same(tail, full[7:])
    assert ds.epoch == 0 and second.dataset.epoch == 1, "a complete pass advances the epoch"
    next_epoch = list(second)
    ds1 = LogitCacheDataset(cache_url, seed=11, shuffle_window=16, world_size=2, rank=1)
    ds1.set_epoch(1)
    assert _same(next_epoch, list(LogitCacheLoader(ds1, 5, num_workers=2)))


def test_resume_does_not_reread_consumed_records(cache_url):
    full = list(LogitCacheDataset(cache_url, seed=2, shuffle_window=16))
    ds = LogitCacheDataset(cache_url, seed=2, shuffle_window=16)
    it = iter(ds)
    head = [next(it) for _ in range(150)]
    state = ds.state_dict()
    assert state["samples_consumed"] == [150]

    resumed = LogitCacheDataset(cache_url, seed=2, shuffle_window=16)
    resumed.load_state_dict(state)
    reread = []
    read_chunk = resumed.cache.read_chunk
    resumed.cache.read_chunk = lambda s, c, decoded=None: (
        reread.extend(read_chunk(s, c, decoded)) or read_chunk(s, c)
    )
    tail = list(resumed)
    assert [r.sample_id for r in head + tail] == [r.sample_id for r in full]
    max_chunk = max(max(s.chunk_records) for s in resumed.cache.manifest.shards)
    assert len(reread) <= len(tail) + 16 + 2 * max_chunk < N_RECORDS


def test_mismatched_state_is_refused_with_the_field(cache_url):
    _, loader = _run(cache_url, 0, stop_after=2)
    state = loader.state_dict()
    other = LogitCacheDataset(cache_url, seed=12, shuffle_window=16, world_size=2, rank=1)
    with pytest.raises(ValueError, match="'seed' is 11 but this dataset has 12"):
        other.load_state_dict(state)
    ds = LogitCacheDataset(cache_url, seed=11, shuffle_window=16, world_size=2, rank=1)
    with pytest.raises(ValueError, match="'batch_size' is 5 but this loader has 6"):
        LogitCacheLoader(ds, 6).load_state_dict(state)
    loader2 = LogitCacheLoader(ds, 5, num_workers=2)
    loader2.load_state_dict(state)
    with pytest.raises(ValueError, match="num_workers=0"):
        next(iter(loader2))


def test_map_dataset_random_access(cache_url, sample_ids):
    ds = LogitCacheMapDataset(cache_url)
    assert len(ds) == N_RECORDS
    assert ds[17].sample_id == sample_ids[17] and ds[-1].sample_id == sample_ids[-1]
    loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=2, collate_fn=_ids)
    assert sorted(s for b in loader for s in b) == sorted(sample_ids)


def test_loader_batches_are_collated_kd_batches(cache_url):
    ds = LogitCacheDataset(cache_url, shuffle=False)
    batch = next(iter(LogitCacheLoader(ds, 4, pad_to_multiple_of=8)))
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["kd_ids"].shape[1] == 8
    assert int((batch["labels"] != -100).sum()) == batch["kd_index"].numel()


def test_default_shuffle_window_holds_a_bounded_amount_of_decoded_data(cache_url):
    with open_cache(cache_url) as cache:
        m = cache.manifest
        per_record = (m.tokens * 5 + m.targets * m.k * 6) / m.records
    small = LogitCacheDataset(cache_url, shuffle_window_bytes=40 * 1024)
    assert small.shuffle_window == int(40 * 1024 // per_record)
    assert 1 <= small.shuffle_window < N_RECORDS
    # The window only changes how far records mix: every record still comes once per epoch.
    assert sorted(_ids(small)) == sorted(_ids(LogitCacheDataset(cache_url, shuffle_window=7)))
    big = LogitCacheDataset(cache_url)
    assert big.shuffle_window > N_RECORDS  # 256 MiB holds this whole toy cache
    assert LogitCacheDataset(cache_url, shuffle_window=5).shuffle_window == 5
    with pytest.raises(ValueError, match="shuffle_window_bytes"):
        LogitCacheDataset(cache_url, shuffle_window_bytes=0)
