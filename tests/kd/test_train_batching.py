"""The micro-batch stream of kd train: length-grouped, and resumable exactly at any point,
including from a state saved by a run that was itself resumed, and across epochs."""

from __future__ import annotations

import pytest

from kd.batching import GroupCollator, MicroBatchStream, micro_batches_per_epoch
from logitcache.loader import LogitCacheDataset, LogitCacheLoader


def make_stream(cache, workers: int, batch_size: int = 3, group_batches: int = 4):
    dataset = LogitCacheDataset(str(cache), seed=11)
    loader = LogitCacheLoader(
        dataset,
        batch_size * group_batches,
        num_workers=workers,
        collate_fn=GroupCollator(
            batch_size,
            positions=dataset.positions,
            group_by_length=True,
            teacher=True,
            packing=False,
            pack_length=0,
            pad_token_id=0,
        ),
    )
    per_epoch = micro_batches_per_epoch(dataset, workers, batch_size, batch_size * group_batches)
    return MicroBatchStream(loader, seed=11, shuffle_groups=True), per_epoch


def ids(batch) -> tuple[str, ...]:
    return tuple(batch["sample_ids"])


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_at_any_point_reproduces_the_stream(kd_inputs, workers):
    stream, per_epoch = make_stream(kd_inputs.cache, workers)
    total = per_epoch + 5  # into the second epoch
    reference = [ids(next(stream)) for _ in range(total)]
    # An epoch is every record once, in micro-batches of similar length.
    first_epoch = [i for batch in reference[:per_epoch] for i in batch]
    assert sorted(first_epoch) == sorted(set(first_epoch)) and len(first_epoch) == 96
    assert reference[per_epoch:] != reference[: total - per_epoch]  # a new order each epoch

    for cut in (1, 2, 5, per_epoch - 1, per_epoch, per_epoch + 2):
        stream, _ = make_stream(kd_inputs.cache, workers)
        got = [ids(next(stream)) for _ in range(cut)]
        state = stream.state_dict()
        # Resume, take one micro-batch, save again and resume from that (a resumed run's
        # checkpoint), then take the rest.
        resumed, _ = make_stream(kd_inputs.cache, workers)
        resumed.load_state_dict(state)
        assert resumed.state_dict() == state
        got.append(ids(next(resumed)))
        again, _ = make_stream(kd_inputs.cache, workers)
        again.load_state_dict(resumed.state_dict())
        got += [ids(next(again)) for _ in range(total - cut - 1)]
        assert got == reference, cut


def test_groups_hold_records_of_similar_length(kd_inputs):
    stream, per_epoch = make_stream(kd_inputs.cache, 0, batch_size=4, group_batches=6)
    batches = [next(stream) for _ in range(per_epoch)]
    padded = sum(int(b["input_ids"].numel()) for b in batches)
    tokens = sum(int(b["num_tokens"]) for b in batches)
    plain, _ = make_stream(kd_inputs.cache, 0, batch_size=4, group_batches=1)
    ungrouped = [next(plain) for _ in range(per_epoch)]
    plain_padded = sum(int(b["input_ids"].numel()) for b in ungrouped)
    assert padded < plain_padded and tokens / padded > 0.9
