"""A shard's chunk directory: every chunk's counts and column blocks, held in numpy arrays.

A shard's footer lists each chunk as a JSON object. Checking those objects one by one took
about 10 µs a chunk, 20 ms per shard of 256 KiB chunks: the largest cost of opening a
shard, paid by every reader that touches it. `ChunkDirectory.from_entries` runs the same
checks over whole arrays and returns None when any entry fails one, so that the shard's
own per-chunk parser can name the chunk, the column and the field.
"""

from __future__ import annotations

import re

import numpy as np

from .format import (
    COL_INPUT_IDS,
    COL_LOSS_MASK,
    COL_RECORD_LENGTHS,
    COL_SAMPLE_ID_BYTES,
    COL_SAMPLE_ID_LENGTHS,
    COL_TOPK_IDS,
    COL_TOPK_LOGPROBS,
    HEADER_SIZE,
    MAX_BLOCK_RAW_BYTES,
    MAX_SAMPLE_ID_BYTES,
    OPTIONAL_COLUMNS,
    POSITIONS_ALL,
    REQUIRED_COLUMNS,
)

COLUMN_ORDER = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
COLUMN_INDEX = {name: i for i, name in enumerate(COLUMN_ORDER)}
_HEX = re.compile(r"[0-9a-f]*")
# Counts and sizes above this are left to the per-chunk parser, so that no product below
# overflows int64 (sizes times K <= 4096 times 4 bytes, or times a pipeline's expansion).
_FAST_LIMIT = 1 << 40


class ChunkDirectory:
    """A shard's chunk entries in numpy arrays: a few hundred bytes a chunk, where the parsed
    JSON took kilobytes (a process reading a large cache keeps every open shard's directory).

    `directory[i]` gives chunk i as the footer describes it: {"records", "tokens", "targets",
    "blocks": {column: (offset, length, raw_length, checksum hex)}}.
    """

    def __init__(self, counts: np.ndarray, blocks: np.ndarray, checksums: np.ndarray):
        self.counts = counts  # int64 [chunks, 3]: records, tokens, targets
        self.blocks = blocks  # int64 [chunks, columns, 3]: offset, length, raw; -1 if absent
        self.checksums = checksums  # uint64 [chunks, columns]
        # Blocks whose checksum matched (absent ones count as verified), so a chunk decoded
        # again (evicted from a reader's LRU, or read by random access) is hashed once per
        # process. The map is read-only and writers never modify a published shard in place
        # (they write new files), so bytes verified once stay verified.
        self.verified = blocks[:, :, 0] < 0

    @classmethod
    def from_parsed(cls, chunks: list[dict]) -> ChunkDirectory:
        """From entries already checked one by one: {"records", "tokens", "targets",
        "blocks": {column: (offset, length, raw_length, checksum hex)}}."""
        n, width = len(chunks), len(COLUMN_ORDER)
        counts = np.zeros((n, 3), dtype=np.int64)
        blocks = np.full((n, width, 3), -1, dtype=np.int64)
        checksums = np.zeros((n, width), dtype=np.uint64)
        for i, chunk in enumerate(chunks):
            counts[i] = (chunk["records"], chunk["tokens"], chunk["targets"])
            for name, (offset, length, raw, checksum) in chunk["blocks"].items():
                column = COLUMN_INDEX[name]
                blocks[i, column] = (offset, length, raw)
                checksums[i, column] = int(checksum, 16)
        return cls(counts, blocks, checksums)

    @classmethod
    def from_entries(
        cls,
        chunks: list,
        *,
        k: int,
        positions: str,
        footer_start: int,
        expansion: dict[str, int],
    ) -> ChunkDirectory | None:
        """The directory of a footer's chunk entries with every check of
        ShardFile._parse_chunk made on whole arrays, or None when an entry is malformed or
        fails a check (then the per-chunk parser finds which). `expansion` maps each column
        with a codec pipeline to its pipeline's max_expansion()."""
        try:
            flat = [v for c in chunks for v in (c["records"], c["tokens"], c["targets"])]
            tables = [c["blocks"] for c in chunks]
            if not all(type(t) is dict for t in tables):
                return None
            present = {}
            for name in COLUMN_ORDER:
                entries = [t.get(name) for t in tables]
                have = [e is not None for e in entries]
                if not any(have):
                    continue
                if not all(have) or name not in expansion:
                    return None  # a column in some chunks only, or without a pipeline
                present[name] = entries
                flat += [e[f] for e in entries for f in ("offset", "length", "raw_length")]
            checksums = [e["checksum"] for entries in present.values() for e in entries]
        except (KeyError, TypeError):
            return None
        if not all(type(v) is int for v in flat) or not all(type(s) is str for s in checksums):
            return None
        if (COL_SAMPLE_ID_LENGTHS in present) != (COL_SAMPLE_ID_BYTES in present):
            return None
        if any(name not in present for name in REQUIRED_COLUMNS):
            return None
        if flat and (min(flat) < 0 or max(flat) >= _FAST_LIMIT):
            return None
        hex_digits = "".join(checksums)
        if len(hex_digits) != 16 * len(checksums) or not _HEX.fullmatch(hex_digits):
            return None

        n = len(chunks)
        values = np.array(flat, dtype=np.int64)
        counts = values[: 3 * n].reshape(n, 3)
        r, t, m = counts.T
        bad = (r < 1) | (t < r) | (m > t)
        if positions == POSITIONS_ALL:
            bad |= m != t - r
        if bad.any():
            return None
        expected = {
            COL_RECORD_LENGTHS: r * 4,
            COL_INPUT_IDS: t * 4,
            COL_LOSS_MASK: t,
            COL_TOPK_IDS: m * k * 4,
            COL_TOPK_LOGPROBS: m * k * 2,
            COL_SAMPLE_ID_LENGTHS: r * 4,
        }
        blocks = np.full((n, len(COLUMN_ORDER), 3), -1, dtype=np.int64)
        stored = values[3 * n :].reshape(len(present), n, 3)
        for j, name in enumerate(present):
            offset, length, raw = stored[j].T
            bad = (offset < HEADER_SIZE) | (offset + length > footer_start)
            if name == COL_SAMPLE_ID_BYTES:
                bad |= raw > r * MAX_SAMPLE_ID_BYTES
            else:
                bad |= raw != expected[name]
            bad |= raw > MAX_BLOCK_RAW_BYTES
            bad |= raw > length * expansion[name] + 64
            if bad.any():
                return None
            blocks[:, COLUMN_INDEX[name]] = stored[j]
        digests = np.frombuffer(bytes.fromhex(hex_digits), dtype=">u8").astype(np.uint64)
        sums = np.zeros((n, len(COLUMN_ORDER)), dtype=np.uint64)
        for j, name in enumerate(present):
            sums[:, COLUMN_INDEX[name]] = digests[j * n : (j + 1) * n]
        return cls(counts.copy(), blocks, sums)

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"chunk {index} out of range ({len(self)} chunks)")
        records, tokens, targets = self.counts[index].tolist()
        blocks = {}
        for name, column in COLUMN_INDEX.items():
            offset, length, raw = self.blocks[index, column].tolist()
            if offset >= 0:
                blocks[name] = (offset, length, raw, f"{int(self.checksums[index, column]):016x}")
        return {"records": records, "tokens": tokens, "targets": targets, "blocks": blocks}

    def block(self, index: int, name: str) -> tuple[int, int, int, int]:
        """(offset, length, raw_length, checksum as an integer) of a column's block."""
        column = COLUMN_INDEX[name]
        offset, length, raw = self.blocks[index, column].tolist()
        return offset, length, raw, int(self.checksums[index, column])

    def has(self, index: int, name: str) -> bool:
        return bool(self.blocks[index, COLUMN_INDEX[name], 0] >= 0)
