"""The stream of micro-batches a training run consumes: length-grouped, resumable exactly.

The loader hands out groups of `group_batches * batch_size` records (built in its workers);
each group is sorted by length and cut into micro-batches, so a micro-batch holds records of
similar length and little padding, and the order of a group's micro-batches is then shuffled
from (seed, epoch, group) so lengths do not cycle through the loss curve. A checkpoint stores
the loader's state before the current group plus how many of its micro-batches were taken;
resuming reads that group again and skips them, which reproduces the uninterrupted stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from logitcache.format import Record
from logitcache.loader import LogitCacheDataset, LogitCacheLoader

from .packing import collate_micro_batch


class GroupCollator:
    """Records of one loader batch -> micro-batches sorted by length (runs in the workers)."""

    def __init__(
        self,
        batch_size: int,
        *,
        positions: str,
        group_by_length: bool,
        teacher: bool,
        packing: bool,
        pack_length: int,
        pad_token_id: int,
    ):
        self.batch_size = batch_size
        self.options = dict(
            positions=positions,
            teacher=teacher,
            packing=packing,
            pack_length=pack_length,
            pad_token_id=pad_token_id,
        )
        self.group_by_length = group_by_length

    def __call__(self, records: Sequence[Record]) -> list[dict]:
        order = list(range(len(records)))
        if self.group_by_length:
            order.sort(key=lambda i: (-records[i].num_tokens, i))
        micro = []
        for start in range(0, len(order), self.batch_size):
            chosen = [records[i] for i in order[start : start + self.batch_size]]
            batch = collate_micro_batch(chosen, **self.options)
            batch["num_tokens"] = sum(r.num_tokens for r in chosen)
            batch["sample_ids"] = [r.sample_id for r in chosen]
            micro.append(batch)
        return micro


def micro_batches_per_epoch(
    dataset: LogitCacheDataset, num_workers: int, batch_size: int, group_records: int
) -> int:
    """Micro-batches this rank takes in one epoch (each worker groups its own records)."""
    total = 0
    for lo, hi in dataset.worker_spans(num_workers):
        full, rest = divmod(hi - lo, group_records)
        total += full * math.ceil(group_records / batch_size) + math.ceil(rest / batch_size)
    return total


class MicroBatchStream:
    """Endless micro-batches over epochs of a LogitCacheLoader whose batches are groups."""

    def __init__(self, loader: LogitCacheLoader, *, seed: int, shuffle_groups: bool):
        self.loader = loader
        self.seed = seed
        self.shuffle_groups = shuffle_groups
        self._iter = None
        self._pending: list[dict] = []
        self._taken = 0  # micro-batches handed out from the current group
        self._before: dict[str, Any] | None = None  # loader state before the current group
        self._group = 0  # index of the current group within its epoch
        self._skip = 0  # micro-batches to skip in the next group (after a resume)
        self._resumed: dict[str, Any] | None = None  # loader state to resume from, until used
        self.epoch = loader.dataset.epoch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        empty_passes = 0
        while self._taken >= len(self._pending):
            if not self._next_group():
                empty_passes += 1
                if empty_passes > 1:
                    raise ValueError(
                        f"{self.loader.dataset.url}: a whole epoch gave this rank no records"
                    )
        batch = self._pending[self._taken]
        self._taken += 1
        return batch

    def _next_group(self) -> bool:
        """Fetch the next group; False when the epoch ended instead."""
        if self._iter is None:
            self._iter = iter(self.loader)
            if self._before is None or self._before["epoch"] != self.loader.dataset.epoch:
                self._group = -1
        # Before its first batch a resumed loader reports the start of the epoch, not the
        # resume point: the state loaded is the one to record.
        before = self._resumed if self._resumed is not None else self.loader.state_dict()
        try:
            group = next(self._iter)
        except StopIteration:
            self._iter, self._resumed = None, None
            self._pending, self._taken = [], 0
            return False
        self._before, self._resumed = before, None
        self.epoch = int(before["epoch"])
        self._group += 1
        if self.shuffle_groups:
            rng = np.random.default_rng([self.seed, self.epoch, self._group])
            group = [group[i] for i in rng.permutation(len(group))]
        self._pending, self._taken = group, self._skip
        self._skip = 0
        return True

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: JSON-able integers and the loader's state."""
        if self._resumed is not None:  # resumed, nothing taken since
            return {"loader": self._resumed, "group": self._group + 1, "taken": self._skip}
        if self._before is None or self._taken >= len(self._pending):
            # Between groups: the loader's own state is the whole story.
            return {"loader": self.loader.state_dict(), "group": self._group + 1, "taken": 0}
        return {"loader": self._before, "group": self._group, "taken": self._taken}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self._iter, self._pending = None, []
        self._taken = 0
        self._before = self._resumed = state["loader"]
        self._group = int(state["group"]) - 1
        self._skip = int(state["taken"])
        self.epoch = int(state["loader"]["epoch"])
