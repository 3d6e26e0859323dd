"""Several caches as one stream of micro-batches: sampled by proportion, resumable exactly.

Which source the next record comes from is decided by a jittered stride schedule: source i's
n-th record sits at the virtual time (n + u) / p_i, with p_i its share and u in [0, 1) hashed
from (seed, stream, i, n), and records are taken in order of that time. Up to any time t source
i has supplied floor(p_i t) or floor(p_i t) + 1 records, so in every window of W consecutive
records its count is within 2 + 2 * S * p_i of p_i * W (S sources): the proportions hold over a
few hundred records, not only on average, and the order is still random. The schedule needs no
state beyond how many records each source has supplied.

Each source is a `LogitCacheDataset`, partitioned across ranks and DataLoader workers exactly as
a single cache is; every worker runs its own schedule over its own slices, and a source that
runs out starts its next epoch (a new order) while the others go on. A worker hands out groups
of records (sorted by length and cut into micro-batches, as `kd.batching` does for one cache)
with its draw counts after the group, so the trainer's position is those counts per worker plus
the worker due next: a handful of integers per source, and resuming reads nothing consumed.
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from logitcache.format import POSITIONS_ALL, Record
from logitcache.loader import LogitCacheDataset

from .packing import collate_micro_batch

STATE_VERSION = 1
# Fields of a mixture's state that a resumed stream must share with the one that saved it.
IDENTITY = ("sources", "weights", "seed", "num_workers", "group_records", "world_size", "rank")
_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit integers that scatters every input bit."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def unit_hash(*values: int) -> float:
    """A number in [0, 1) determined by `values` alone (53 random bits)."""
    x = 0
    for v in values:
        x = _mix(x ^ (int(v) & _MASK))
    return (x >> 11) * (1.0 / (1 << 53))


class ProportionalSchedule:
    """The source of each next record, in proportion to `weights` (see the module docstring).

    `draws` (records each source has supplied so far) is the whole state: a schedule built
    with the draws of another continues exactly where that one stands.
    """

    def __init__(
        self,
        weights: Sequence[float],
        *,
        seed: int,
        stream: int = 0,
        draws: Sequence[int] | None = None,
    ):
        if not weights or any(not (math.isfinite(w) and w > 0) for w in weights):
            raise ValueError(f"weights must be finite numbers > 0, got {list(weights)}")
        total = float(sum(weights))
        self.shares = [w / total for w in weights]
        self.seed, self.stream = int(seed), int(stream)
        self.draws = [int(n) for n in (draws or [0] * len(weights))]
        if len(self.draws) != len(weights) or min(self.draws) < 0:
            raise ValueError(f"draws {self.draws} do not fit {len(weights)} sources")
        self._times = [self._time(i) for i in range(len(weights))]

    def _time(self, source: int) -> float:
        n = self.draws[source]
        return (n + unit_hash(self.seed, self.stream, source, n)) / self.shares[source]

    def __next__(self) -> int:
        source = min(range(len(self._times)), key=lambda i: (self._times[i], i))
        self.draws[source] += 1
        self._times[source] = self._time(source)
        return source

    def __iter__(self):
        return self


# --------------------------------------------------------------------------------------------
# Micro-batches of records from several sources (built in the DataLoader workers)


def collate_mixture(
    records: Sequence[Record],
    sources: Sequence[int],
    *,
    positions: Sequence[str],
    teacher: Sequence[bool],
    packing: bool = False,
    pack_length: int = 0,
    pad_token_id: int = 0,
) -> dict[str, Any]:
    """One micro-batch whose records come from several caches.

    The token tensors are `kd.packing.collate_micro_batch`'s (padded or packed). The teacher
    rows are kept per source, since caches may differ in K and positions mode:
    ``teacher_rows[s]`` = {kd_ids [M_s, K_s] int32, kd_logprobs [M_s, K_s] fp16, kd_index [M_s]
    (flat index into the token tensors)}, empty for a source without records here or without
    a KD term (`teacher[s]` false). ``record_source`` [B] and ``token_source`` [R, W] (-1 on
    padding) say which source each record and token belongs to.
    """
    batch = collate_micro_batch(
        records,
        positions=positions[0],
        teacher=False,
        packing=packing,
        pack_length=pack_length,
        pad_token_id=pad_token_id,
    )
    width = batch["input_ids"].shape[1]
    token_source = torch.full(batch["input_ids"].shape, -1, dtype=torch.int16)
    segments = batch["segments"].tolist()
    for (row, start, length), s in zip(segments, sources, strict=True):
        token_source[row, start : start + length] = s
    teacher_rows = []
    for s in range(len(positions)):
        mine = [b for b, src in enumerate(sources) if src == s]
        if not (teacher[s] and mine):
            teacher_rows.append(_no_rows())
            continue
        ids, logprobs, index = [], [], []
        for b in mine:
            r = records[b]
            at = r.target_positions(positions[s])
            if len(at) != r.num_targets:
                raise ValueError(
                    f"record {r.sample_id!r} of source {s}: {r.num_targets} teacher rows, but "
                    f"positions mode {positions[s]!r} describes {len(at)}"
                )
            rows_ids, rows_lp = r.topk_ids, r.topk_logprobs
            if positions[s] == POSITIONS_ALL:  # rows at every position: keep the targets'
                keep = r.loss_mask[at]
                at, rows_ids, rows_lp = at[keep], rows_ids[keep], rows_lp[keep]
            row, start, _ = segments[b]
            ids.append(rows_ids)
            logprobs.append(rows_lp)
            index.append(row * width + start + at)
        teacher_rows.append(
            {
                "kd_ids": torch.from_numpy(np.concatenate(ids).astype(np.int32, copy=False)),
                "kd_logprobs": torch.from_numpy(
                    np.concatenate(logprobs).astype(np.float16, copy=False)
                ),
                "kd_index": torch.from_numpy(np.concatenate(index).astype(np.int64)),
            }
        )
    batch["teacher_rows"] = teacher_rows
    batch["record_source"] = torch.tensor(list(sources), dtype=torch.long)
    batch["token_source"] = token_source
    return batch


def _no_rows() -> dict[str, torch.Tensor]:
    return {
        "kd_ids": torch.zeros((0, 1), dtype=torch.int32),
        "kd_logprobs": torch.zeros((0, 1), dtype=torch.float16),
        "kd_index": torch.zeros(0, dtype=torch.long),
    }


class MixtureCollator:
    """Records of one group -> micro-batches of similar length (runs in the workers)."""

    def __init__(
        self,
        batch_size: int,
        *,
        positions: Sequence[str],
        teacher: Sequence[bool],
        group_by_length: bool,
        packing: bool,
        pack_length: int,
        pad_token_id: int,
    ):
        self.batch_size = batch_size
        self.group_by_length = group_by_length
        self.options = dict(
            positions=list(positions),
            teacher=list(teacher),
            packing=packing,
            pack_length=pack_length,
            pad_token_id=pad_token_id,
        )

    def __call__(self, records: Sequence[Record], sources: Sequence[int]) -> list[dict]:
        order = list(range(len(records)))
        if self.group_by_length:
            order.sort(key=lambda i: (-records[i].num_tokens, i))
        micro = []
        for start in range(0, len(order), self.batch_size):
            chosen = order[start : start + self.batch_size]
            batch = collate_mixture(
                [records[i] for i in chosen], [sources[i] for i in chosen], **self.options
            )
            batch["num_tokens"] = sum(records[i].num_tokens for i in chosen)
            batch["sample_ids"] = [records[i].sample_id for i in chosen]
            micro.append(batch)
        return micro


# --------------------------------------------------------------------------------------------
# The dataset: one schedule per worker over its slices of every source


class _SourceReader:
    """One worker's records of one source, epoch after epoch, from a draw count."""

    def __init__(
        self,
        dataset: LogitCacheDataset,
        name: str,
        num_workers: int,
        worker: int,
        rotation: int,
        draws: int,
    ):
        self.dataset, self.num_workers = dataset, num_workers
        self.worker, self.rotation = worker, rotation
        lo, hi = dataset.worker_spans(num_workers)[worker]
        if hi <= lo:
            raise ValueError(
                f"source {name!r} ({dataset.url}): its {len(dataset.cache)} records leave no "
                f"record to DataLoader worker {worker} of rank {dataset.rank} (of "
                f"{dataset.world_size} ranks x {max(1, num_workers)} workers); use fewer "
                "num_workers or a larger cache"
            )
        self.epoch, consumed = divmod(draws, hi - lo)
        self._start(consumed)

    def _start(self, consumed: int) -> None:
        # A loader state naming this worker's place: LogitCacheDataset then reads the slice of
        # the epoch that the single-cache loader gives this worker, from that place on.
        state = self.dataset.state_dict()
        workers = max(1, self.num_workers)
        state.update(
            epoch=self.epoch,
            num_workers=self.num_workers,
            samples_consumed=[consumed if w == self.worker else 0 for w in range(workers)],
            worker_rotation=self.rotation,
        )
        self.dataset.load_state_dict(state)
        self._records = iter(self.dataset)

    def __next__(self) -> Record:
        try:
            return next(self._records)
        except StopIteration:
            self.epoch += 1
            self._start(0)
            return next(self._records)


class MixtureDataset(IterableDataset):
    """Endless groups of `group_records` records drawn from `sources` in proportion to `weights`.

    Yields {"worker": w, "draws": [records drawn from each source by worker w so far],
    "micro_batches": collate(records, source indices)} (micro-batch order shuffled from the
    seed, the worker and the group). `resume_from(draws, next_worker)` makes the workers
    continue from those counts. Use with `MixtureStream`, which keeps that state.
    """

    def __init__(
        self,
        sources: Sequence[LogitCacheDataset],
        weights: Sequence[float],
        names: Sequence[str],
        *,
        seed: int,
        group_records: int,
        collate: MixtureCollator,
        shuffle_groups: bool = True,
    ):
        if not (len(sources) == len(weights) == len(names)) or not sources:
            raise ValueError("give one weight and one name per source")
        ranks = {(s.rank, s.world_size) for s in sources}
        if len(ranks) != 1:
            raise ValueError(f"the sources are split across different ranks: {sorted(ranks)}")
        self.sources, self.names = list(sources), list(names)
        self.weights = [float(w) for w in weights]
        self.seed, self.group_records = int(seed), int(group_records)
        self.collate, self.shuffle_groups = collate, shuffle_groups
        self.rank, self.world_size = sources[0].rank, sources[0].world_size
        self._draws: list[list[int]] | None = None
        self._rotation = 0

    def resume_from(self, draws: list[list[int]] | None, next_worker: int = 0) -> None:
        self._draws, self._rotation = draws, int(next_worker)

    @property
    def records_per_epoch(self) -> int:
        """This rank's records of all sources together: an epoch of the mixture."""
        return sum(len(s) for s in self.sources)

    @property
    def is_remote(self) -> bool:
        return any(s.is_remote for s in self.sources)

    def __iter__(self):
        info = get_worker_info()
        slot, num_workers = (0, 0) if info is None else (info.id, info.num_workers)
        workers = max(1, num_workers)
        worker = (slot + self._rotation) % workers
        draws = self._draws[worker] if self._draws else [0] * len(self.sources)
        readers = [
            _SourceReader(ds, name, num_workers, worker, self._rotation, n)
            for ds, name, n in zip(self.sources, self.names, draws, strict=True)
        ]
        stream = self.rank * workers + worker
        schedule = ProportionalSchedule(self.weights, seed=self.seed, stream=stream, draws=draws)
        while True:
            group = sum(schedule.draws) // self.group_records
            picked = [next(schedule) for _ in range(self.group_records)]
            micro = self.collate([next(readers[s]) for s in picked], picked)
            if self.shuffle_groups:
                rng = np.random.default_rng([self.seed, stream, group])
                micro = [micro[i] for i in rng.permutation(len(micro))]
            yield {"worker": worker, "draws": list(schedule.draws), "micro_batches": micro}


def _as_is(item):
    return item


class MixtureStream:
    """Endless micro-batches of a MixtureDataset, with an exact, JSON-able resume point.

    The interface of `kd.batching.MicroBatchStream`: next(), state_dict(), load_state_dict(),
    epoch. The state holds each worker's draw counts before the group being handed out, the
    worker that group came from, and how many of its micro-batches were taken.
    """

    def __init__(
        self,
        dataset: MixtureDataset,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ):
        self.dataset = dataset
        self.num_workers = int(num_workers)
        self._options: dict[str, Any] = {"pin_memory": pin_memory}
        if num_workers:
            self._options["prefetch_factor"] = prefetch_factor or 2
            if dataset.is_remote:  # fsspec / s3fs clients are not fork-safe
                methods = multiprocessing.get_all_start_methods()
                self._options["multiprocessing_context"] = (
                    "forkserver" if "forkserver" in methods else "spawn"
                )
        workers = max(1, self.num_workers)
        self._draws = [[0] * len(dataset.sources) for _ in range(workers)]
        self._next_worker = 0
        self._iter = None
        self._pending: list[dict] = []
        self._taken = 0
        self._before: tuple[int, list[int]] | None = None  # (worker, draws) before this group
        self._skip = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while self._taken >= len(self._pending):
            self._next_group()
        batch = self._pending[self._taken]
        self._taken += 1
        return batch

    def _next_group(self) -> None:
        if self._iter is None:
            self.dataset.resume_from(self._draws, self._next_worker)
            loader = DataLoader(
                self.dataset,
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_as_is,
                **self._options,
            )
            self._iter = iter(loader)
        item = next(self._iter)
        worker = int(item["worker"])
        if worker != self._next_worker:  # the DataLoader serves its workers in turn
            raise RuntimeError(f"group from worker {worker}, expected {self._next_worker}")
        self._before = (worker, self._draws[worker])
        self._draws[worker] = [int(n) for n in item["draws"]]
        self._next_worker = (worker + 1) % len(self._draws)
        self._pending, self._taken, self._skip = item["micro_batches"], self._skip, 0

    # -- where the stream stands ---------------------------------------------------------
    def _position(self) -> tuple[list[list[int]], int, int]:
        """(draws per worker, worker due next, micro-batches of its group already taken)."""
        draws = [list(d) for d in self._draws]
        if self._before is not None and self._taken < len(self._pending):
            worker, before = self._before  # inside a group: resume reads it again
            draws[worker] = list(before)
            return draws, worker, self._taken
        return draws, self._next_worker, self._skip

    def state_dict(self) -> dict[str, Any]:
        draws, next_worker, taken = self._position()
        return {
            "version": STATE_VERSION,
            "sources": list(self.dataset.names),
            "weights": list(self.dataset.weights),
            "seed": self.dataset.seed,
            "num_workers": self.num_workers,
            "group_records": self.dataset.group_records,
            "world_size": self.dataset.world_size,
            "rank": self.dataset.rank,
            "draws": draws,
            "next_worker": next_worker,
            "taken": taken,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"mixture state version {state.get('version')!r} is not 1")
        mine = self.state_dict()
        for key in IDENTITY:
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"mixture state field {key!r} is {state.get(key)!r} but this mixture has "
                    f"{mine[key]!r}; resume with the same sources, weights, seed and layout"
                )
        self.close()
        self._draws = [[int(n) for n in d] for d in state["draws"]]
        self._next_worker = int(state["next_worker"])
        self._pending, self._taken, self._before = [], 0, None
        self._skip = int(state["taken"])

    def close(self) -> None:
        """Stop the DataLoader workers (they are started again by the next next())."""
        self._iter = None

    # -- progress ------------------------------------------------------------------------
    def source_draws(self) -> list[int]:
        """Records taken from each source so far, over this rank's workers: the draws before
        the group being handed out plus the records of its micro-batches already taken."""
        draws, _, _ = self._position()
        taken = [sum(d[i] for d in draws) for i in range(len(self.dataset.sources))]
        if self._before is not None and self._taken < len(self._pending):
            for batch in self._pending[: self._taken]:
                for source in batch["record_source"].tolist():
                    taken[source] += 1
        return taken

    @property
    def epoch(self) -> int:
        """Passes over the mixture: records taken / the sources' records together."""
        return sum(self.source_draws()) // max(1, self.dataset.records_per_epoch)

    def passes(self) -> list[float]:
        """Passes over each source so far (records taken / its records on this rank)."""
        sizes = [len(ds) for ds in self.dataset.sources]
        return [n / max(1, size) for n, size in zip(self.source_draws(), sizes, strict=True)]
