"""The teacher pass's batches: token-budget batches of examples, sorted by length within a
bounded window (training batches from a cache are kd.batching's).

A teacher pass pays for padding, so examples of similar length share a batch; sorting only
within a window of `sort_window` examples keeps memory bounded on any amount of data. The
order is a pure function of the input order and the options, which is what lets a resumed run
skip exactly the batches an interrupted one committed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from .data import Example

POSITIONS = ("supervised", "all")
# A batch stops growing before padding would exceed this share of its B x L tokens: a window
# of few examples, or the tail of a length distribution, then makes several tighter batches.
MAX_PADDING = 0.2


@dataclass
class Batch:
    """Examples padded on the right into one [B, L] array, with the rows the teacher scores.

    `rows[j]` is the flat index `b * L + p - 1` into [B, L] of the hidden state that predicts
    stored token p of example b: the stored tokens of example 0 first, each in position order,
    then those of example 1, and so on; `row_counts[b]` is how many belong to example b.
    """

    index: int  # position in the run's order of batches
    examples: list[Example]
    input_ids: np.ndarray  # int64 [B, L]
    lengths: np.ndarray  # int64 [B]
    rows: np.ndarray  # int64 [N]
    row_counts: list[int]

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.size)

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def targets(self) -> int:
        return int(self.rows.size)


def stored_positions(example: Example, positions: str) -> np.ndarray:
    """Positions p whose distribution (predicted from tokens < p) is stored for `example`."""
    if positions == "all":
        return np.arange(1, len(example.input_ids), dtype=np.int64)
    return np.flatnonzero(example.loss_mask).astype(np.int64)


def token_budget_batches(
    examples: Iterable[Example],
    *,
    batch_tokens: int,
    positions: str = "supervised",
    max_batch_size: int | None = None,
    sort_window: int = 2048,
    pad_id: int = 0,
) -> Iterator[Batch]:
    """Batches whose padded size B x L stays within `batch_tokens`.

    Examples are read `sort_window` at a time, sorted longest first (ties keep their input
    order) and cut greedily: a batch ends before it would exceed the budget, `max_batch_size`
    examples, or MAX_PADDING of padding. An example longer than the budget gets a batch of its
    own. Within a window the longest batch comes first, so running out of memory shows at once.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions {positions!r}: choose one of {POSITIONS}")
    if batch_tokens < 1 or sort_window < 1 or (max_batch_size is not None and max_batch_size < 1):
        raise ValueError("batch_tokens, sort_window and max_batch_size must be at least 1")
    index = 0
    window: list[Example] = []
    for example in examples:
        window.append(example)
        if len(window) >= sort_window:
            for batch_examples in _cut(window, batch_tokens, max_batch_size):
                yield _pad(index, batch_examples, positions, pad_id)
                index += 1
            window = []
    for batch_examples in _cut(window, batch_tokens, max_batch_size):
        yield _pad(index, batch_examples, positions, pad_id)
        index += 1


def _cut(
    window: list[Example], batch_tokens: int, max_batch_size: int | None
) -> Iterator[list[Example]]:
    order = sorted(range(len(window)), key=lambda i: (-len(window[i].input_ids), i))
    group: list[Example] = []
    longest = real = 0
    for i in order:
        example = window[i]
        length = len(example.input_ids)
        if group:
            padded = (len(group) + 1) * longest
            full = max_batch_size is not None and len(group) >= max_batch_size
            if full or padded > batch_tokens or padded - real - length > MAX_PADDING * padded:
                yield group
                group = []
        if not group:
            longest, real = length, 0  # sorted longest first: the first example sets L
        group.append(example)
        real += length
    if group:
        yield group


def _pad(index: int, examples: list[Example], positions: str, pad_id: int) -> Batch:
    lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
    width = int(lengths.max())
    input_ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    rows, counts = [], []
    for b, example in enumerate(examples):
        input_ids[b, : lengths[b]] = example.input_ids
        stored = stored_positions(example, positions)
        rows.append(b * width + stored - 1)
        counts.append(int(stored.size))
    return Batch(
        index=index,
        examples=examples,
        input_ids=input_ids,
        lengths=lengths,
        rows=np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64),
        row_counts=counts,
    )
