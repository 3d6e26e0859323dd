"""Epoch order and partitioning as pure functions of the manifest: spans, shuffles, resume maths."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.partition import (
    batches_of,
    consumed_per_worker,
    rank_span,
    round_robin_state,
    worker_span,
)
from logitcache.shuffle import ChunkTable, EpochSequence, chunk_order, window_permutation

UNEVEN_SHARDS = [[3, 5, 1], [7], [2, 2, 2, 2], [4, 1]]  # 29 records, uneven shards and chunks


def _positions(records: int, world: int, workers: int, uneven: str) -> list[list[int]]:
    out = []
    for rank in range(world):
        start, stop = rank_span(records, rank, world, uneven)
        for w in range(max(1, workers)):
            lo, hi = worker_span(start, stop, w, max(1, workers))
            out.append(list(range(lo, hi)))
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
@pytest.mark.parametrize("records", [1, 7, 29, 100])
def test_spans_cover_each_position_once(world, workers, records):
    none = _positions(records, world, workers, "none")
    assert sorted(p for part in none for p in part) == list(range(records))

    pad = _positions(records, world, workers, "pad")
    flat = [p % records for part in pad for p in part]
    per_rank = -(-records // world)
    assert len(flat) == per_rank * world
    counts = np.bincount(flat, minlength=records)
    assert (counts >= 1).all(), "padding never loses a record"
    expected = np.bincount(np.arange(per_rank * world) % records, minlength=records)
    assert (counts == expected).all(), "the pad repeats the first records of the epoch order"

    drop = _positions(records, world, workers, "drop")
    flat = [p for part in drop for p in part]
    assert len(flat) == len(set(flat)) == (records // world) * world
    assert max(flat, default=-1) < records


def test_spans_reject_bad_arguments():
    with pytest.raises(ValueError, match="uneven='spread'"):
        rank_span(10, 0, 2, "spread")
    with pytest.raises(ValueError, match="rank 2"):
        rank_span(10, 2, 2)
    with pytest.raises(ValueError, match="worker 3"):
        worker_span(0, 10, 3, 3)


def _simulate_dataloader(samples: list[int], batch_size: int, drop_last: bool) -> list[int]:
    """Which worker each delivered batch comes from, the way torch's DataLoader dispatches:
    indices go round-robin to active workers, an exhausted worker answers StopIteration once
    and is skipped from then on."""
    left = [batches_of(n, batch_size, drop_last) for n in samples]
    active = [True] * len(samples)
    out, w = [], 0
    while any(active):
        if active[w]:
            if left[w]:
                left[w] -= 1
                out.append(w)
            else:
                active[w] = False
        w = (w + 1) % len(samples)
    return out


@settings(max_examples=200, deadline=None)
@given(
    samples=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    batch_size=st.integers(1, 7),
    drop_last=st.booleans(),
    data=st.data(),
)
def test_consumed_per_worker_matches_dataloader_dispatch(samples, batch_size, drop_last, data):
    order = _simulate_dataloader(samples, batch_size, drop_last)
    n = data.draw(st.integers(0, len(order)))
    expected = [min(order[:n].count(w) * batch_size, s) for w, s in enumerate(samples)]
    assert consumed_per_worker(samples, batch_size, drop_last, n) == expected
    if n < len(order):
        assert round_robin_state(samples, batch_size, drop_last, n)[1] == order[n]


def test_consumed_per_worker_rejects_too_many_batches():
    with pytest.raises(ValueError, match="only 5"):
        consumed_per_worker([5, 3], 2, False, 6)


def test_chunk_order_is_a_deterministic_shard_grouped_permutation():
    table = ChunkTable.from_chunk_records(UNEVEN_SHARDS)
    assert table.records == 29 and len(table) == 10
    a = chunk_order(table, seed=3, epoch=0, shuffle=True)
    assert sorted(a.tolist()) == list(range(10))
    assert (a == chunk_order(table, seed=3, epoch=0, shuffle=True)).all()
    assert not (a == chunk_order(table, seed=3, epoch=1, shuffle=True)).all()
    assert not (a == chunk_order(table, seed=4, epoch=0, shuffle=True)).all()
    shards = table.shard[a].tolist()
    runs = [s for i, s in enumerate(shards) if i == 0 or shards[i - 1] != s]
    assert sorted(runs) == [0, 1, 2, 3], "each shard's chunks stay together"
    assert chunk_order(table, seed=3, epoch=0, shuffle=False).tolist() == list(range(10))


def test_epoch_sequence_maps_positions_to_every_record_once():
    table = ChunkTable.from_chunk_records(UNEVEN_SHARDS)
    seq = EpochSequence(table, chunk_order(table, seed=1, epoch=2, shuffle=True))
    idx = seq.record_indices(0, 29)
    assert sorted(idx.tolist()) == list(range(29))
    assert seq.record_indices(29, 32).tolist() == idx[:3].tolist(), "positions wrap to the start"
    chunk_ids, offsets = seq.locate(0, 29)
    assert (offsets < table.count[chunk_ids]).all()
    assert seq.shards_between(0, 29) == list(dict.fromkeys(table.shard[chunk_ids].tolist()))


def test_window_permutation_is_reproducible():
    a = window_permutation(0, 1, 2, 3, 50, shuffle=True)
    assert sorted(a.tolist()) == list(range(50))
    assert (a == window_permutation(0, 1, 2, 3, 50, shuffle=True)).all()
    assert not (a == window_permutation(0, 1, 2, 4, 50, shuffle=True)).all()
    assert window_permutation(0, 1, 2, 3, 5, shuffle=False).tolist() == [0, 1, 2, 3, 4]
