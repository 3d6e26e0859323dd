"""The order of one epoch, computed from the manifest alone: shard and chunk shuffle, windows.

Shards are permuted, then the chunks inside each shard, so a reader still moves through one
shard at a time; a bounded window permutation then mixes records across neighbouring chunks.

How far a record moves (W: records per window, c: records in its chunk):
- its shard takes any place in the shard order, so the record may land anywhere in the epoch;
- its chunk takes any place among the chunks of its shard: the record lands anywhere in its
  shard's stretch of the epoch, uniformly over chunk positions;
- within the window holding its chunk's slot it takes any place: it moves up to W - 1
  positions from that slot, and records of one chunk come out within W - 1 positions of each
  other (2W - 1 when the chunk straddles two windows), in random order.
What is not mixed: records of one shard stay in one stretch of the epoch (as with any
shard-by-shard reader), and the c records of a chunk stay within a window of each other. With
small chunks (c of 1 to a few, the writer's default of 256 KiB) the order within a shard is
close to a uniform permutation. Ranks and workers take contiguous slices of this order
(logitcache.partition), so each sees a random subset of the shards' stretches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Salts keep the random streams of different decisions independent of each other.
_SALT_SHARDS = 0x5A4D
_SALT_CHUNKS = 0xC4C5
_SALT_WINDOW = 0x3B1D


def epoch_rng(seed: int, epoch: int, *salt: int) -> np.random.Generator:
    """A generator determined by (seed, epoch, salt...) and nothing else."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch), *map(int, salt)])


@dataclass(frozen=True)
class ChunkTable:
    """Every chunk of a cache in storage order: its shard, index in the shard, first record."""

    shard: np.ndarray  # int64 [C]
    chunk: np.ndarray  # int64 [C]
    start: np.ndarray  # int64 [C], global index of the chunk's first record
    count: np.ndarray  # int64 [C], records in the chunk

    @classmethod
    def from_chunk_records(cls, chunk_records: list[list[int]]) -> ChunkTable:
        """From each shard's list of per-chunk record counts (ShardEntry.chunk_records)."""
        counts = [np.asarray(c, dtype=np.int64) for c in chunk_records]
        shard = np.concatenate([np.full(len(c), s, np.int64) for s, c in enumerate(counts)] or [[]])
        chunk = np.concatenate([np.arange(len(c), dtype=np.int64) for c in counts] or [[]])
        count = np.concatenate(counts or [[]]).astype(np.int64)
        start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
        if (count <= 0).any():
            raise ValueError("every chunk must hold at least one record")
        return cls(shard.astype(np.int64), chunk.astype(np.int64), start[: len(count)], count)

    @classmethod
    def from_manifest(cls, manifest) -> ChunkTable:
        return cls.from_chunk_records([list(s.chunk_records) for s in manifest.shards])

    @property
    def records(self) -> int:
        return int(self.count.sum())

    def __len__(self) -> int:
        return len(self.count)


def chunk_order(table: ChunkTable, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Chunk ids (rows of `table`) in this epoch's order: shards permuted, then their chunks."""
    if not shuffle or len(table) == 0:
        return np.arange(len(table), dtype=np.int64)
    n_shards = int(table.shard.max()) + 1
    shard_perm = epoch_rng(seed, epoch, _SALT_SHARDS).permutation(n_shards)
    rng = epoch_rng(seed, epoch, _SALT_CHUNKS)
    bounds = np.searchsorted(table.shard, np.arange(n_shards + 1))
    parts = []
    for s in shard_perm:
        lo, hi = bounds[s], bounds[s + 1]
        parts.append(lo + rng.permutation(hi - lo))
    return np.concatenate(parts).astype(np.int64)


class EpochSequence:
    """Positions 0.. of an epoch mapped to (chunk id, offset in chunk) and global record index.

    Positions past the number of records wrap around to the start; that is how padding to an
    even split across ranks repeats records.
    """

    def __init__(self, table: ChunkTable, order: np.ndarray):
        self.table = table
        self.order = order
        self.cum = np.concatenate([[0], np.cumsum(table.count[order])]).astype(np.int64)
        self.records = int(self.cum[-1])

    def locate(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(chunk ids, offsets within the chunk) of positions lo..hi-1."""
        if self.records == 0:
            raise ValueError("the cache holds no records")
        pos = np.arange(lo, hi, dtype=np.int64) % self.records
        k = np.searchsorted(self.cum, pos, side="right") - 1
        return self.order[k], pos - self.cum[k]

    def record_indices(self, lo: int, hi: int) -> np.ndarray:
        chunk_ids, offsets = self.locate(lo, hi)
        return self.table.start[chunk_ids] + offsets

    def shards_between(self, lo: int, hi: int) -> list[int]:
        """Shards that positions lo..hi-1 touch, in first-touch order."""
        if hi <= lo or self.records == 0:
            return []
        out: list[int] = []
        seen: set[int] = set()
        # Walk chunk by chunk rather than record by record.
        pos = lo
        while pos < hi:
            p = pos % self.records
            k = int(np.searchsorted(self.cum, p, side="right") - 1)
            shard = int(self.table.shard[self.order[k]])
            if shard not in seen:
                seen.add(shard)
                out.append(shard)
            pos += int(self.cum[k + 1] - p)
        return out


def window_permutation(
    seed: int, epoch: int, stream: int, window: int, size: int, *, shuffle: bool
) -> np.ndarray:
    """The order in which the `size` records of window `window` of a stream are yielded.

    A window permutation is the bounded shuffle buffer of this loader: memory is one window of
    records, and it is a pure function of its arguments, so resuming mid-window needs no data.
    """
    if not shuffle:
        return np.arange(size, dtype=np.int64)
    return epoch_rng(seed, epoch, _SALT_WINDOW, stream, window).permutation(size).astype(np.int64)
