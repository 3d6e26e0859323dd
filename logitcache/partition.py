"""Splitting an epoch across ranks and DataLoader workers, and where each one resumes.

Ranks take contiguous slices of the epoch order and workers contiguous slices of their rank's,
so each process reads few shards. Uneven counts are padded, dropped or left uneven.
"""

from __future__ import annotations

from collections.abc import Sequence

UNEVEN_MODES = ("pad", "drop", "none")


def rank_span(records: int, rank: int, world_size: int, uneven: str = "pad") -> tuple[int, int]:
    """Positions [start, stop) of the epoch order that `rank` reads.

    - "pad": every rank reads ceil(records / world_size); positions past the end wrap to the
      start of the epoch order, so the first (size * world_size - records) records are seen
      twice (what torch's DistributedSampler does).
    - "drop": every rank reads floor(records / world_size); the last records of the epoch order
      (a different set each epoch when shuffling) are not seen this epoch.
    - "none": each record exactly once; ranks differ by at most one record. Collective
      operations then need care (the last step may be missing on some ranks).
    """
    if uneven not in UNEVEN_MODES:
        raise ValueError(f"uneven={uneven!r}: choose one of {UNEVEN_MODES}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if uneven == "pad":
        size = -(-records // world_size)
        return rank * size, (rank + 1) * size
    if uneven == "drop":
        size = records // world_size
        return rank * size, (rank + 1) * size
    return _even_split(records, rank, world_size)


def worker_span(start: int, stop: int, worker: int, num_workers: int) -> tuple[int, int]:
    """Positions of [start, stop) that DataLoader worker `worker` of `num_workers` reads."""
    if num_workers < 1 or not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} is not in [0, num_workers={num_workers})")
    lo, hi = _even_split(stop - start, worker, num_workers)
    return start + lo, start + hi


def _even_split(n: int, part: int, parts: int) -> tuple[int, int]:
    base, extra = divmod(n, parts)
    lo = part * base + min(part, extra)
    return lo, lo + base + (1 if part < extra else 0)


def batches_of(samples: int, batch_size: int, drop_last: bool) -> int:
    return samples // batch_size if drop_last else -(-samples // batch_size)


def consumed_per_worker(
    samples: Sequence[int], batch_size: int, drop_last: bool, batches: int
) -> list[int]:
    """Samples each worker had handed out when the consumer had received `batches` batches.

    A DataLoader over an IterableDataset (in order, the default) takes one batch from each
    worker in turn, skipping workers that are exhausted: batch number t of worker w arrives in
    round t, after the round-t batches of workers < w. Each worker batches only its own samples.
    """
    return round_robin_state(samples, batch_size, drop_last, batches)[0]


def round_robin_state(
    samples: Sequence[int], batch_size: int, drop_last: bool, batches: int
) -> tuple[list[int], int]:
    """(samples consumed per worker, the worker that delivers the next batch) after `batches`.

    A resumed DataLoader starts its round-robin at worker 0 again, so a resume must rotate
    workers to make the one that was next come first; the second value says by how much.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    counts = [batches_of(n, batch_size, drop_last) for n in samples]
    if batches < 0 or batches > sum(counts):
        raise ValueError(f"{batches} batches consumed, but the epoch has only {sum(counts)}")
    taken = [0] * len(counts)
    left = batches
    while left:
        active = [w for w, c in enumerate(counts) if taken[w] < c]
        # Whole rounds at once: every active worker gives one batch per round.
        rounds = min(left // len(active), min(counts[w] - taken[w] for w in active))
        if rounds:
            for w in active:
                taken[w] += rounds
            left -= rounds * len(active)
            continue
        for w in active[:left]:
            taken[w] += 1
        left = 0
    active = [w for w, c in enumerate(counts) if taken[w] < c]
    # Within a round, workers deliver in index order: the next is the lowest one still behind.
    upcoming = min(active, key=lambda w: (taken[w], w)) if active else 0
    consumed = [min(t * batch_size, n) for t, n in zip(taken, samples, strict=True)]
    return consumed, upcoming
