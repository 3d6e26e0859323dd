"""PyTorch side of logitcache: streaming and map-style datasets, a resumable loader, collate_kd.

The only logitcache module that imports torch. Datasets pickle only their URL and options;
every process (each DataLoader worker included) opens its own cache and storage client.
"""

from __future__ import annotations

import functools
import multiprocessing
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from .format import POSITIONS_ALL, POSITIONS_MODES, POSITIONS_SUPERVISED, Record
from .partition import rank_span, round_robin_state, worker_span
from .reader import LogitCache, open_cache
from .shuffle import ChunkTable, EpochSequence, chunk_order, window_permutation

STATE_VERSION = 1
IGNORE_INDEX = -100


def _dist_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError("pass both rank and world_size, or neither")
        return int(rank), int(world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _CacheHandle:
    """Opens the cache lazily, once per process; never pickled."""

    def __init__(self, url: str, options: dict[str, Any]):
        self.url = url
        self.options = options
        self._cache: LogitCache | None = None
        self._pid: int | None = None

    @property
    def cache(self) -> LogitCache:
        import os

        if self._cache is None or self._pid != os.getpid():
            # After a fork the parent's maps and clients are not ours to use or close.
            self._cache = open_cache(self.url, **self.options)
            self._pid = os.getpid()
        return self._cache

    def close(self) -> None:
        import os

        if self._cache is not None and self._pid == os.getpid():
            self._cache.close()
        self._cache = None

    def __getstate__(self) -> dict:
        return {"url": self.url, "options": self.options}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["url"], state["options"])


class _CacheBacked:
    """A dataset over one cache, opened lazily in each process (see _CacheHandle)."""

    def __init__(
        self,
        url: str,
        storage_options: dict | None,
        cache_dir: str | None,
        cache_limit_bytes: int | None,
        k: int | None,
    ):
        self.url = url
        self._handle = _CacheHandle(
            url,
            {
                "storage_options": storage_options,
                "cache_dir": cache_dir,
                "cache_limit_bytes": cache_limit_bytes,
                "k": k,
            },
        )

    @property
    def cache(self) -> LogitCache:
        return self._handle.cache

    @property
    def positions(self) -> str:
        return self.cache.manifest.positions

    def close(self) -> None:
        """Close this process's cache: its read-ahead threads stop and its shards are
        unmapped (records still held keep their map until they are gone). The dataset
        stays usable: the next read opens the cache again."""
        self._handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# More records than this per window only lengthens the permutations, not the mixing.
MAX_SHUFFLE_WINDOW = 1 << 16
# Decoded bytes of the records of one shuffle window: its worst-case memory (every chunk of
# the window partly handed out at once). The chunk shuffle already spreads records over their
# shard; the window mixes the records of each chunk with those of its neighbours.
DEFAULT_SHUFFLE_WINDOW_BYTES = 32 << 20


class LogitCacheDataset(_CacheBacked, IterableDataset):
    """Streams the records of a cache in a deterministic order from (seed, epoch).

    Order: shards permuted, chunks permuted within each shard, then records permuted within
    windows of `shuffle_window` records (the bounded shuffle buffer). By default a window is
    as many records as `shuffle_window_bytes` of decoded data (the manifest's average record
    size decides how many): long records get fewer per window instead of more memory.

    How far a record moves: its shard lands anywhere in the epoch (rank and worker slices
    included), its chunk anywhere within its shard's stretch, and the record anywhere within
    its window of the chunk order; records stored in one chunk come out within one window
    (plus one window if the chunk straddles two) of each other, in random order. With the
    writer's default chunks (256 KiB decoded, one to a few records), that is close to a
    uniform shuffle within each shard. See logitcache.shuffle.

    Memory: a chunk is decoded when the window first needs one of its records and dropped
    after its last one was handed out, so a process holds the chunks that are partly handed
    out (at most one window's worth, `shuffle_window_bytes`; about one or two chunks with
    single-record chunks) plus the reader's small LRU of decoded chunks. The first batch
    waits only for its own chunks, not for a whole window. Ranks (torch.distributed
    if initialised, else `rank`/`world_size`) take contiguous slices of the epoch order, and
    DataLoader workers contiguous slices of their rank's; `uneven` says how a record count that
    does not divide evenly across ranks is handled: "pad" (default; repeats the first few
    records of the epoch order), "drop", or "none" (each record exactly once, ranks differ by
    at most one record). See logitcache.partition.rank_span.

    Resuming: `state_dict()` after iterating in this process, or LogitCacheLoader.state_dict()
    with DataLoader workers, holds the epoch and how many samples each worker had handed out;
    `load_state_dict()` continues exactly there without reading what was consumed.

    Read-ahead: with `read_ahead` > 0, each process decodes that many of the chunks it will
    need next on background threads (logitcache.readahead; off by default: DataLoader
    workers already use a core each, but worth it without workers and with cores to spare).
    Order, records and resume points are the same either way.
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict | None = None,
        cache_dir: str | None = None,
        cache_limit_bytes: int | None = None,
        k: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_window: int | None = None,
        shuffle_window_bytes: int = DEFAULT_SHUFFLE_WINDOW_BYTES,
        uneven: str = "pad",
        rank: int | None = None,
        world_size: int | None = None,
        prefetch_shards: int = 2,
        read_ahead: int = 0,
    ):
        if shuffle_window is not None and shuffle_window < 1:
            raise ValueError(f"shuffle_window must be >= 1, got {shuffle_window}")
        if shuffle_window_bytes < 1:
            raise ValueError(f"shuffle_window_bytes must be >= 1, got {shuffle_window_bytes}")
        super().__init__(url, storage_options, cache_dir, cache_limit_bytes, k)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self._shuffle_window = None if shuffle_window is None else int(shuffle_window)
        self.shuffle_window_bytes = int(shuffle_window_bytes)
        self.uneven = uneven
        self.rank, self.world_size = _dist_rank_world(rank, world_size)
        rank_span(0, self.rank, self.world_size, uneven)  # validates early
        self.prefetch_shards = int(prefetch_shards)
        if read_ahead < 0:
            raise ValueError(f"read_ahead must be >= 0 chunks, got {read_ahead}")
        self.read_ahead = int(read_ahead)
        self.epoch = 0
        self._resume: dict[str, Any] | None = None
        self._yielded = 0  # samples handed out in this process during this epoch (no workers)

    # -- what the cache looks like -----------------------------------------------------
    @property
    def shuffle_window(self) -> int:
        """Records per shuffle window: as given, or what fits `shuffle_window_bytes` decoded."""
        if self._shuffle_window is None:
            m = self.cache.manifest
            decoded = m.tokens * 5 + m.targets * self.cache.k * 6  # int32 + bool, int32 + fp16
            per_record = max(1.0, decoded / max(1, m.records))
            self._shuffle_window = int(
                min(MAX_SHUFFLE_WINDOW, max(1, self.shuffle_window_bytes // per_record))
            )
        return self._shuffle_window

    @property
    def is_remote(self) -> bool:
        return not self.cache.store.is_local

    def __len__(self) -> int:
        """Samples this rank yields in one epoch (over all of its workers)."""
        start, stop = rank_span(len(self.cache), self.rank, self.world_size, self.uneven)
        return stop - start

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration yields (drops a pending resume)."""
        if epoch != self.epoch:
            self._resume = None
        self.epoch = int(epoch)
        self._yielded = 0

    # -- the plan ----------------------------------------------------------------------
    def _sequence(self, epoch: int) -> EpochSequence:
        table = ChunkTable.from_manifest(self.cache.manifest)
        return EpochSequence(
            table, chunk_order(table, seed=self.seed, epoch=epoch, shuffle=self.shuffle)
        )

    def worker_spans(self, num_workers: int) -> list[tuple[int, int]]:
        """Epoch positions [start, stop) of each worker of this rank (0 workers: one span)."""
        start, stop = rank_span(len(self.cache), self.rank, self.world_size, self.uneven)
        n = max(1, num_workers)
        return [worker_span(start, stop, w, n) for w in range(n)]

    def worker_indices(
        self, epoch: int, num_workers: int, worker: int, skip: int = 0
    ) -> np.ndarray:
        """Global record indices that `worker` yields in `epoch`, after the first `skip`."""
        seq = self._sequence(epoch)
        return np.concatenate(
            [idx for idx, _ in self._windows(seq, epoch, num_workers, worker, skip)]
            or [np.zeros(0, np.int64)]
        )

    def _windows(self, seq: EpochSequence, epoch: int, num_workers: int, worker: int, skip: int):
        """(record indices, (chunk ids, offsets)) per window, in yield order, after `skip`."""
        start, stop = self.worker_spans(num_workers)[worker]
        n, size = stop - start, self.shuffle_window
        stream = self.rank * max(1, num_workers) + worker
        for window in range(skip // size, -(-n // size)):
            lo = start + window * size
            hi = min(stop, lo + size)
            perm = window_permutation(
                self.seed, epoch, stream, window, hi - lo, shuffle=self.shuffle
            )
            if window == skip // size:
                perm = perm[skip % size :]
            chunk_ids, offsets = seq.locate(lo, hi)
            chunk_ids, offsets = chunk_ids[perm], offsets[perm]
            yield seq.table.start[chunk_ids] + offsets, (chunk_ids, offsets, lo, hi, stop)

    def _decode_order(self, windows) -> Iterator[int]:
        """The chunk ids that __iter__ decodes, in order: each window's chunks by first need
        (a chunk that straddles two windows is decoded in each)."""
        for _, (chunk_ids, *_) in windows:
            _, first = np.unique(chunk_ids, return_index=True)
            yield from chunk_ids[np.sort(first)].tolist()

    # -- iteration ---------------------------------------------------------------------
    def __iter__(self) -> Iterator[Record]:
        info = get_worker_info()
        worker, num_workers = (0, 0) if info is None else (info.id, info.num_workers)
        epoch = self.epoch
        worker, skip = self._resume_point(epoch, num_workers, worker)
        if info is None:
            self._yielded = skip
        cache = self.cache
        seq = self._sequence(epoch)
        table = seq.table
        ahead = cache.start_read_ahead(
            lambda c: cache.decoded_chunk(int(table.shard[c]), int(table.chunk[c])),
            self._decode_order(self._windows(seq, epoch, num_workers, worker, skip)),
            self.read_ahead,
        )
        held: set[int] = set()
        with ahead:
            for _, (chunk_ids, offsets, _lo, hi, stop) in self._windows(
                seq, epoch, num_workers, worker, skip
            ):
                self._prefetch(seq, hi, stop)
                chunks, left = np.unique(chunk_ids, return_counts=True)
                now = set(table.shard[chunks].tolist())
                # Shards of chunks being read ahead stay mapped until those are decoded.
                self._release(held - now - set(table.shard[ahead.pending()].tolist()))
                held = now
                # Each chunk is decoded once, when the window first needs one of its records,
                # and let go after its last one: memory holds the chunks in progress, not the
                # window.
                remaining = dict(zip(chunks.tolist(), left.tolist(), strict=True))
                decoded: dict[int, list[Record]] = {}
                for c, o in zip(chunk_ids.tolist(), offsets.tolist(), strict=True):
                    records = decoded.get(c)
                    if records is None:
                        records = cache.read_chunk(
                            int(table.shard[c]), int(table.chunk[c]), decoded=ahead.take(c)
                        )
                        decoded[c] = records
                    remaining[c] -= 1
                    if not remaining[c]:
                        del decoded[c]
                    if info is None:
                        self._yielded += 1
                    yield records[o]
                    del records
        self._release(held)
        if info is None:
            # A finished epoch: the next iteration starts the next one from the beginning.
            self._resume = None

    def _prefetch(self, seq: EpochSequence, hi: int, stop: int) -> None:
        """Ask the store for the next shards this worker will read (remote stores only)."""
        cache = self.cache
        if cache.store.is_local or self.prefetch_shards < 1:
            return
        ahead = seq.shards_between(hi, min(stop, hi + 4 * self.shuffle_window))
        shards = cache.manifest.shards
        cache.store.prefetch(
            [
                (shards[s].path, shards[s].bytes, shards[s].checksum)
                for s in ahead[: self.prefetch_shards]
            ]
        )

    def _release(self, shards: set[int]) -> None:
        """Unmap shards this worker has moved past, so a remote cache can evict them."""
        cache = self.cache
        if cache.store.is_local or not shards:
            return
        for s in shards:
            cache.release_shard(s)

    # -- resuming ----------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {
            "records": len(self.cache),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_window": self.shuffle_window,
            "uneven": self.uneven,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def _resume_point(self, epoch: int, num_workers: int, slot: int) -> tuple[int, int]:
        """(the worker whose stream DataLoader worker `slot` serves, samples to skip in it)."""
        state = self._resume
        if state is None or state["epoch"] != epoch:
            return slot, 0
        if state["num_workers"] != num_workers:
            raise ValueError(
                f"resume state was saved with num_workers={state['num_workers']}, but this "
                f"DataLoader has num_workers={num_workers}; resume with the same number of workers"
            )
        # The DataLoader's round-robin restarts at worker 0: rotate so the stream that was
        # due next comes first.
        worker = (slot + int(state["worker_rotation"])) % max(1, num_workers)
        return worker, int(state["samples_consumed"][worker])

    def state_dict(self) -> dict[str, Any]:
        """Where iteration in this process stands (use LogitCacheLoader.state_dict with workers)."""
        return self._state(0, [self._yielded], 0)

    def _state(self, num_workers: int, samples_consumed: list[int], rotation: int) -> dict:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "num_workers": num_workers,
            "samples_consumed": [int(s) for s in samples_consumed],
            "worker_rotation": int(rotation),
            **self._identity(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: the next iteration yields exactly what had not been consumed."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"loader state version {state.get('version')!r} is not {STATE_VERSION}"
            )
        mine = self._identity()
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(
                    f"loader state field {key!r} is {state.get(key)!r} but this dataset has "
                    f"{value!r}; resume with the same cache, seed, shuffle and world layout"
                )
        spans = self.worker_spans(state["num_workers"])
        consumed = state["samples_consumed"]
        if len(consumed) != len(spans) or any(
            not 0 <= c <= hi - lo for c, (lo, hi) in zip(consumed, spans, strict=True)
        ):
            raise ValueError(f"loader state samples_consumed={consumed!r} does not fit this epoch")
        self.epoch = int(state["epoch"])
        self._resume = dict(state)
        self._yielded = int(consumed[0]) if state["num_workers"] == 0 else 0

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_yielded"] = 0
        return state


class LogitCacheMapDataset(_CacheBacked, Dataset):
    """Random access to the records of a cache: `len(ds)`, `ds[i] -> Record`.

    For samplers of your own (e.g. torch's DistributedSampler); streaming large remote caches
    is what LogitCacheDataset is for, since random access fetches whole shards.
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict | None = None,
        cache_dir: str | None = None,
        cache_limit_bytes: int | None = None,
        k: int | None = None,
    ):
        super().__init__(url, storage_options, cache_dir, cache_limit_bytes, k)

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> Record:
        return self.cache[int(index)]


# -- collation ---------------------------------------------------------------------------


def _infer_positions(record: Record, b: int) -> str:
    n, t = record.num_targets, record.num_tokens
    supervised = int(np.count_nonzero(record.loss_mask))
    if n == supervised:
        return POSITIONS_SUPERVISED  # also right for "all" when every position is a target
    if n == t - 1:
        return POSITIONS_ALL
    raise ValueError(
        f"record {b} ({record.sample_id!r}): {n} teacher rows fit neither positions mode "
        f"({supervised} supervised targets, {t - 1} positions); pass positions= explicitly"
    )


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype).share_memory_()


def collate_kd(
    records: Sequence[Record],
    *,
    positions: str | None = None,
    pad_to_multiple_of: int | None = None,
    pin_memory: bool = False,
    pad_token_id: int = 0,
) -> dict[str, torch.Tensor]:
    """Batch records for KD training: padded token tensors plus packed teacher rows.

    Returns input_ids [B, L] (long), attention_mask [B, L] (long), labels [B, L] (long:
    input_ids where loss_mask is true, else -100), kd_ids [M, K] (int32: half the bytes of
    long through worker queues and host-to-device copies; the losses widen it on the device),
    kd_logprobs [M, K] (float16) and kd_index [M] (long): the flat index b * L + p into [B, L]
    of the target token each teacher row describes. The student logits that predict it are at
    flat index kd_index - 1 (same row, since p >= 1). In positions mode "all" only rows whose
    position is a training target (loss_mask true) are kept, so M always equals the number of
    labels != -100. `positions` is inferred from the row counts when not given.
    """
    if not records:
        raise ValueError("collate_kd needs at least one record")
    if positions is not None and positions not in POSITIONS_MODES:
        raise ValueError(f"positions={positions!r}: choose one of {POSITIONS_MODES}")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    lengths = [r.num_tokens for r in records]
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    k = records[0].topk_ids.shape[1]
    batch = len(records)
    rows_of: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for b, r in enumerate(records):
        if r.topk_ids.shape[1] != k:
            raise ValueError(
                f"record {b} ({r.sample_id!r}): K={r.topk_ids.shape[1]}, batch has {k}"
            )
        mode = positions or _infer_positions(r, b)
        rows_at = r.target_positions(mode)
        if len(rows_at) != r.num_targets:
            raise ValueError(
                f"record {b} ({r.sample_id!r}): {r.num_targets} teacher rows, but positions "
                f"mode {mode!r} describes {len(rows_at)}"
            )
        ids, lps = r.topk_ids, r.topk_logprobs
        if mode == POSITIONS_ALL:
            keep = r.loss_mask[rows_at]
            rows_at, ids, lps = rows_at[keep], ids[keep], lps[keep]
        rows_of.append((rows_at, ids, lps))
    m = sum(len(rows_at) for rows_at, _, _ in rows_of)
    # Inside a DataLoader worker the batch is built in shared memory directly, as torch's own
    # collate does: otherwise every tensor is copied into shared memory again when it is sent.
    new = _shared_empty if get_worker_info() is not None else _empty
    out = {
        "input_ids": new((batch, width), torch.long),
        "attention_mask": new((batch, width), torch.long),
        "labels": new((batch, width), torch.long),
        "kd_ids": new((m, k), torch.int32),
        "kd_logprobs": new((m, k), torch.float16),
        "kd_index": new((m,), torch.long),
    }
    input_ids, attention_mask, labels = (
        out[name].numpy() for name in ("input_ids", "attention_mask", "labels")
    )
    input_ids.fill(pad_token_id)
    attention_mask.fill(0)
    labels.fill(IGNORE_INDEX)
    kd_ids, kd_logprobs, kd_index = (
        out[name].numpy() for name in ("kd_ids", "kd_logprobs", "kd_index")
    )
    row = 0
    for b, (r, (rows_at, ids, lps)) in enumerate(zip(records, rows_of, strict=True)):
        t = r.num_tokens
        input_ids[b, :t] = r.input_ids
        attention_mask[b, :t] = 1
        labels[b, :t] = np.where(r.loss_mask, r.input_ids, IGNORE_INDEX)
        n = len(rows_at)
        kd_ids[row : row + n] = ids
        kd_logprobs[row : row + n] = lps
        kd_index[row : row + n] = b * width + rows_at
        row += n
    if pin_memory:
        if torch.cuda.is_available():
            out = {name: t.pin_memory() for name, t in out.items()}
        else:
            warnings.warn(
                "collate_kd(pin_memory=True): no CUDA device, tensors left unpinned", stacklevel=2
            )
    return out


# -- the resumable loader ----------------------------------------------------------------


class LogitCacheLoader(DataLoader):
    """A DataLoader over a LogitCacheDataset that counts what it delivered, to resume there.

    Batches are collate_kd dicts. `state_dict()` holds the epoch and, per worker, the samples
    handed out when the consumer had received its last batch; `load_state_dict()` makes the
    next iteration yield exactly the batches an uninterrupted run would have yielded next
    (same batch_size, num_workers and drop_last). A complete pass advances the dataset's epoch.
    Workers start with forkserver (spawn where there is none) for remote caches, since
    fsspec/s3fs clients are not fork-safe.
    """

    def __init__(
        self,
        dataset: LogitCacheDataset,
        batch_size: int,
        *,
        num_workers: int = 0,
        drop_last: bool = False,
        pad_to_multiple_of: int | None = None,
        pad_token_id: int = 0,
        pin_memory: bool = False,
        multiprocessing_context=None,
        **kwargs,
    ):
        if not isinstance(dataset, LogitCacheDataset):
            raise TypeError("LogitCacheLoader needs a LogitCacheDataset")
        if kwargs.get("in_order") is False:
            raise ValueError("in_order=False is not supported: resuming relies on the order")
        if kwargs.get("persistent_workers"):
            raise ValueError(
                "persistent_workers is not supported: the epoch and resume point reach the "
                "workers when each epoch starts"
            )
        if num_workers > 0 and multiprocessing_context is None and dataset.is_remote:
            methods = multiprocessing.get_all_start_methods()
            multiprocessing_context = "forkserver" if "forkserver" in methods else "spawn"
        collate = functools.partial(
            collate_kd,
            positions=dataset.positions,
            pad_to_multiple_of=pad_to_multiple_of,
            pad_token_id=pad_token_id,
        )
        super().__init__(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            drop_last=drop_last,
            collate_fn=kwargs.pop("collate_fn", collate),
            pin_memory=pin_memory,
            multiprocessing_context=multiprocessing_context,
            **kwargs,
        )
        self._batches = 0  # delivered in the current epoch since the consumed point below
        self._base: list[int] | None = None  # samples consumed per worker before this pass

    def __iter__(self):
        dataset: LogitCacheDataset = self.dataset
        epoch = dataset.epoch
        spans = dataset.worker_spans(self.num_workers)
        resume = dataset._resume
        if resume is not None and resume["epoch"] == epoch:
            base, rotation = list(resume["samples_consumed"]), int(resume["worker_rotation"])
        else:
            base, rotation = [0] * len(spans), 0
        self._base, self._rotation, self._batches, self._epoch = base, rotation, 0, epoch
        for batch in super().__iter__():
            self._batches += 1
            yield batch
        if dataset.epoch == epoch:
            dataset.set_epoch(epoch + 1)
        self._base, self._batches = None, 0

    def state_dict(self) -> dict[str, Any]:
        dataset: LogitCacheDataset = self.dataset
        spans = dataset.worker_spans(self.num_workers)
        n = len(spans)
        if self._base is None:
            return dataset._state(self.num_workers, [0] * n, 0)
        # DataLoader slot i has been serving worker (i + rotation) % n since this pass began.
        workers = [(i + self._rotation) % n for i in range(n)]
        remaining = [spans[w][1] - spans[w][0] - self._base[w] for w in workers]
        now, upcoming = round_robin_state(remaining, self.batch_size, self.drop_last, self._batches)
        consumed = list(self._base)
        for slot, w in enumerate(workers):
            consumed[w] += now[slot]
        state = dataset._state(self.num_workers, consumed, workers[upcoming])
        state["epoch"] = self._epoch
        state["batch_size"] = self.batch_size
        state["drop_last"] = self.drop_last
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in (("batch_size", self.batch_size), ("drop_last", self.drop_last)):
            if key in state and state[key] != value:
                raise ValueError(
                    f"loader state field {key!r} is {state[key]!r} but this loader has {value!r}"
                )
        self.dataset.load_state_dict(state)


__all__ = [
    "IGNORE_INDEX",
    "LogitCacheDataset",
    "LogitCacheLoader",
    "LogitCacheMapDataset",
    "collate_kd",
]
