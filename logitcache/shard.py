"""One shard file: a header, chunks of column blocks, a JSON footer and a fixed trailer.

ShardBuilder writes one; ShardFile memory-maps one, validates its footer against the manifest
before decoding anything, and decodes a chunk at a time (spec/FORMAT.md, "Shard files").
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import xxhash

from . import _numpy_kernels, native
from ._numpy_kernels import (
    RECORD_STARTS_BAD_LENGTHS,
    RECORD_STARTS_BAD_MASK,
    RECORD_STARTS_MASKED_FIRST,
    RECORD_STARTS_OK,
)
from .codecs import (
    CodecError,
    Pipeline,
    StagedBlock,
    aligned_view,
    read_kernels,
    ready_kernels,
)
from .directory import COLUMN_INDEX, COLUMN_ORDER, ChunkDirectory
from .format import (
    BLOCK_ALIGN,
    COL_INPUT_IDS,
    COL_LOSS_MASK,
    COL_RECORD_LENGTHS,
    COL_SAMPLE_ID_BYTES,
    COL_SAMPLE_ID_LENGTHS,
    COL_TOPK_IDS,
    COL_TOPK_LOGPROBS,
    COLUMN_DTYPES,
    FORMAT_MAJOR,
    FORMAT_MINOR,
    FORMAT_VERSION,
    HEADER_SIZE,
    MAX_BLOCK_RAW_BYTES,
    MAX_FOOTER_BYTES,
    MAX_SAMPLE_ID_BYTES,
    POSITIONS_ALL,
    REQUIRED_COLUMNS,
    SHARD_MAGIC,
    TRAILER_SIZE,
    CorruptCacheError,
    IncompatibleVersionError,
)
from .sealed_json import strict_loads

_HEADER = struct.Struct("<8sHHI")
_TRAILER = struct.Struct("<QQ8s")
_FIX = "the file is corrupt: re-download it, or re-write the cache"
_RECORD_STARTS_PROBLEMS = {
    RECORD_STARTS_BAD_LENGTHS: "record lengths do not add up to the chunk's tokens",
    RECORD_STARTS_BAD_MASK: "loss_mask holds values other than 0 and 1",
    RECORD_STARTS_MASKED_FIRST: "loss_mask is true at the first token of a record",
}
_HEX16 = re.compile(r"[0-9a-f]{16}")

# A scan maps the pages of the chunks ahead this many bytes at a time, in one call, where
# touching them one by one takes a page fault per few pages: on Linux 6.18 a first pass over
# a mapped 257 MiB shard (page cache warm) took 24 ms, against 8 ms for the call and 8 ms
# for the pass after it. bench_loader's full scan includes the difference.
PREFAULT_BYTES = 16 << 20
# MADV_POPULATE_READ (Linux 5.14+); None where there is no such call.
_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else None)


def footer_members(footer) -> int:
    """The members of a footer's objects where footers have them: the top level, `columns`,
    each column's spec and codec configs, each chunk entry and its blocks (for
    strict_loads' quick duplicate check; a footer with objects elsewhere is undercounted,
    and so parsed with the slow check)."""
    if type(footer) is not dict:
        return 0
    count = len(footer)
    columns = footer.get("columns")
    if type(columns) is dict:
        count += len(columns) + _entry_members(columns.values(), "codecs")
    chunks = footer.get("chunks")
    if type(chunks) is list:
        count += _entry_members(chunks, "blocks")
    return count


def _entry_members(entries, inner: str) -> int:
    """Members of each object among `entries`, of the object or list under its `inner` key,
    and of the objects that one holds."""
    count = 0
    for entry in entries:
        if type(entry) is not dict:
            continue
        count += len(entry)
        held = entry.get(inner)
        if type(held) is dict:
            count += len(held)
            held = held.values()
        elif type(held) is not list:
            continue
        for item in held:
            if type(item) is dict:
                count += len(item)
    return count


def checksum_hex(data) -> str:
    return xxhash.xxh3_64_hexdigest(data)


@dataclass(frozen=True)
class EncodedBlock:
    data: bytes
    raw_length: int
    checksum: str


@dataclass(frozen=True)
class EncodedChunk:
    records: int
    tokens: int
    targets: int
    blocks: dict[str, EncodedBlock]


def encode_chunk(
    columns: dict[str, np.ndarray],
    pipelines: dict[str, Pipeline],
    *,
    records: int,
    tokens: int,
    targets: int,
) -> EncodedChunk:
    """Encode each column of a chunk with its pipeline (runs on writer threads)."""
    blocks = {}
    for name in COLUMN_ORDER:
        if name not in columns:
            continue
        array = np.ascontiguousarray(columns[name], dtype=COLUMN_DTYPES[name])
        data = pipelines[name].encode(array)
        blocks[name] = EncodedBlock(data, array.nbytes, checksum_hex(data))
    return EncodedChunk(records, tokens, targets, blocks)


class ShardBuilder:
    """Writes one shard file sequentially; the whole-file checksum is computed on the way."""

    def __init__(
        self,
        path: str,
        *,
        k: int,
        vocab_size: int,
        positions: str,
        pipelines,
        shard_path: str,
    ):
        self.path = path
        self.shard_path = shard_path  # its path inside the cache, recorded in the footer
        self.k, self.vocab_size, self.positions = k, vocab_size, positions
        self.pipelines = pipelines
        self._file = open(path, "wb")  # noqa: SIM115 - closed in finish()/abort()
        self._hash = xxhash.xxh3_64()
        self._offset = 0
        self._chunks: list[dict] = []
        self.records = self.tokens = self.targets = 0
        self._write(_HEADER.pack(SHARD_MAGIC, FORMAT_MAJOR, FORMAT_MINOR, 0))

    @property
    def bytes_written(self) -> int:
        return self._offset

    @property
    def chunk_records(self) -> list[int]:
        return [c["records"] for c in self._chunks]

    def _write(self, data) -> None:
        try:
            self._file.write(data)
        except OSError as exc:
            # write() alone says "No space left on device"; say where.
            raise type(exc)(exc.errno, exc.strerror or str(exc), self.path) from None
        self._hash.update(data)
        self._offset += len(data)

    def add_chunk(self, chunk: EncodedChunk) -> None:
        blocks = {}
        for name, block in chunk.blocks.items():
            pad = -self._offset % BLOCK_ALIGN
            if pad:
                self._write(b"\0" * pad)
            blocks[name] = {
                "offset": self._offset,
                "length": len(block.data),
                "raw_length": block.raw_length,
                "checksum": block.checksum,
            }
            self._write(block.data)
        self._chunks.append(
            {
                "records": chunk.records,
                "tokens": chunk.tokens,
                "targets": chunk.targets,
                "blocks": blocks,
            }
        )
        self.records += chunk.records
        self.tokens += chunk.tokens
        self.targets += chunk.targets

    def finish(self) -> tuple[int, str, str]:
        """Write footer and trailer, flush to disk; returns (file size, whole-file checksum,
        footer checksum as 16 hex digits)."""
        used = {name for c in self._chunks for name in c["blocks"]}
        footer = {
            "format_version": FORMAT_VERSION,
            "path": self.shard_path,
            "k": self.k,
            "vocab_size": self.vocab_size,
            "positions": self.positions,
            "columns": {
                name: {
                    "dtype": COLUMN_DTYPES[name].str,
                    "codecs": self.pipelines[name].get_config(),
                }
                for name in COLUMN_ORDER
                if name in used or name in REQUIRED_COLUMNS
            },
            "records": self.records,
            "tokens": self.tokens,
            "targets": self.targets,
            "chunks": self._chunks,
        }
        pad = -self._offset % BLOCK_ALIGN
        if pad:
            self._write(b"\0" * pad)
        data = json.dumps(footer, separators=(",", ":")).encode()
        self._write(data)
        footer_digest = xxhash.xxh3_64_intdigest(data)
        self._write(_TRAILER.pack(len(data), footer_digest, SHARD_MAGIC))
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise type(exc)(exc.errno, exc.strerror or str(exc), self.path) from None
        self._file.close()
        return self._offset, f"xxh3_64:{self._hash.hexdigest()}", f"{footer_digest:016x}"

    def abort(self) -> None:
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


@dataclass
class DecodedChunk:
    """The columns of one chunk plus the offsets that cut them into records.

    The teacher columns are decoded whole, or, for a chunk decoded for one record, left
    staged (zstd undone) and decoded a record's rows at a time by `rows`.
    """

    token_starts: np.ndarray  # int64 [R + 1]
    target_starts: np.ndarray  # int64 [R + 1]
    input_ids: np.ndarray
    loss_mask: np.ndarray
    topk_ids: np.ndarray | StagedBlock  # [n, K] int32 when decoded
    topk_logprobs: np.ndarray | StagedBlock  # [n, K] float16 when decoded
    sample_ids: list[str | None] | None
    rows: Callable[[int, int], tuple[np.ndarray, np.ndarray]]  # (topk_ids, logprobs) of rows


class ShardFile:
    """A memory-mapped shard whose footer has been checked against its manifest entry."""

    def __init__(
        self, path: str, *, name: str, entry=None, k: int, vocab_size: int, positions: str
    ):
        self.name = name  # the shard's path inside the cache, used in messages
        self.k, self.vocab_size, self.positions = k, vocab_size, positions
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise CorruptCacheError(
                f"shard {name}: the manifest lists it but the file is missing ({path}): "
                "restore the file, or re-write the cache"
            ) from None
        if entry is not None and size != entry.bytes:
            raise CorruptCacheError(
                f"shard {name}: file has {size} bytes, the manifest says {entry.bytes}: {_FIX}"
            )
        if size < HEADER_SIZE + TRAILER_SIZE:
            raise CorruptCacheError(f"shard {name}: {size} bytes is too short: {_FIX}")
        with open(path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.buf = np.frombuffer(self._mmap, dtype=np.uint8)
        self.size = size
        self._entry = entry
        self._read_header()
        self.footer_start, footer = self._read_footer()
        self._chunk_bytes: list[tuple[int, int]] | None = None  # where each chunk lies
        self._prefaulted = HEADER_SIZE  # bytes below this are mapped (prefault)
        self._parse_footer(footer, entry)

    def prefault(self, index: int) -> None:
        """Before a scan decodes chunk `index`: map the pages from it to PREFAULT_BYTES
        past it, if not done yet, in one call. Only for scans (a random read would map
        pages it never reads); a no-op where the kernel cannot."""
        global _POPULATE_READ
        if _POPULATE_READ is None:
            return
        if self._chunk_bytes is None:
            offsets, lengths = self.chunks.blocks[:, :, 0], self.chunks.blocks[:, :, 1]
            first = np.where(offsets >= 0, offsets, self.footer_start).min(axis=1).tolist()
            last = (offsets + lengths).max(axis=1).tolist()
            self._chunk_bytes = list(zip(first, last, strict=True))
        begin, end = self._chunk_bytes[index]
        if end <= self._prefaulted:
            return
        # From the chunk on, not the start of the file, for a scan that starts mid-shard.
        start = max(begin, self._prefaulted) // mmap.PAGESIZE * mmap.PAGESIZE
        stop = min(end + PREFAULT_BYTES, self.footer_start)
        try:
            self._mmap.madvise(_POPULATE_READ, start, stop - start)
        except OSError:
            _POPULATE_READ = None  # an older kernel: let pages fault in as read
            return
        except ValueError:
            return  # the map was closed under the scan (LogitCache.close): it reopens it
        self._prefaulted = stop

    def close(self) -> None:
        self.buf = None
        # Records may still hold views of the map; then it closes when they are gone.
        with contextlib.suppress(BufferError):
            self._mmap.close()

    def _fail(self, message: str, chunk: int | None = None):
        where = f"shard {self.name}" + (f" chunk {chunk}" if chunk is not None else "")
        raise CorruptCacheError(f"{where}: {message}: {_FIX}")

    def _read_header(self) -> None:
        magic, major, minor, _ = _HEADER.unpack_from(self._mmap, 0)
        if magic != SHARD_MAGIC:
            self._fail(f"bad magic {magic!r} at offset 0 (not a logitcache shard)")
        if major != FORMAT_MAJOR:
            raise IncompatibleVersionError(
                f"shard {self.name}: format major version {major}, this reader reads "
                f"{FORMAT_MAJOR}; use a logitcache release that supports it"
            )
        self.header_minor = minor  # must equal the footer's (spec section 4)

    def _read_footer(self) -> tuple[int, dict]:
        length, digest, magic = _TRAILER.unpack_from(self._mmap, self.size - TRAILER_SIZE)
        if magic != SHARD_MAGIC:
            self._fail("bad trailer magic (the file is truncated or not a shard)")
        if length > MAX_FOOTER_BYTES or length > self.size - HEADER_SIZE - TRAILER_SIZE:
            self._fail(f"footer length {length} does not fit the file")
        start = self.size - TRAILER_SIZE - length
        data = self._mmap[start : start + length]
        if xxhash.xxh3_64_intdigest(data) != digest:
            self._fail("footer checksum mismatch")
        recorded = getattr(self._entry, "footer_checksum", None)
        if recorded is not None and recorded != f"{digest:016x}":
            self._fail(
                f"footer checksum {digest:016x} differs from {recorded} in the manifest: this "
                "is not the file the manifest lists (renamed, swapped or copied from another "
                "cache)"
            )
        try:
            footer = strict_loads(
                bytes(data), source=f"shard {self.name} footer", what="it", members=footer_members
            )
        except CorruptCacheError as exc:
            self._fail(str(exc).split(": ", 1)[1].split(";")[0])
        if not isinstance(footer, dict):
            self._fail("footer is not a JSON object")
        return start, footer

    def _parse_footer(self, footer: dict, entry) -> None:
        version = footer.get("format_version")
        match = re.fullmatch(r"(\d+)\.(\d+)", version) if isinstance(version, str) else None
        if match is None:
            self._fail(f"footer format_version {version!r} is not MAJOR.MINOR")
        if int(match.group(1)) != FORMAT_MAJOR:
            raise IncompatibleVersionError(
                f"shard {self.name}: footer format version {version}, this reader reads "
                f"{FORMAT_MAJOR}.x; use a logitcache release that supports it"
            )
        minor = int(match.group(2))
        if minor != self.header_minor:
            self._fail(f"header minor version {self.header_minor} != footer's {version}")
        if minor >= 1:
            # Bound to its place: a shard moved, swapped or copied in from elsewhere is caught.
            path = footer.get("path")
            if not isinstance(path, str):
                self._fail("footer 'path' is missing (format 1.1 footers name their shard)")
            if entry is not None and path != entry.path:
                self._fail(
                    f"footer says this file is {path!r}, the manifest lists it as "
                    f"{entry.path!r}: shard files were renamed, swapped or copied from another "
                    "cache"
                )
        for key, want in (
            ("k", self.k),
            ("vocab_size", self.vocab_size),
            ("positions", self.positions),
        ):
            if footer.get(key) != want:
                self._fail(f"footer {key} {footer.get(key)!r} != manifest {want!r}")
        columns = footer.get("columns")
        if not isinstance(columns, dict):
            self._fail("footer 'columns' is missing")
        self.pipelines: dict[str, Pipeline] = {}
        for name, spec in columns.items():
            if name not in COLUMN_DTYPES:
                continue  # a column of a newer minor version: ignored
            if not isinstance(spec, dict) or spec.get("dtype") != COLUMN_DTYPES[name].str:
                self._fail(f"column {name}: dtype must be {COLUMN_DTYPES[name].str!r}")
            try:
                self.pipelines[name] = Pipeline.from_config(spec.get("codecs"))
            except CodecError as exc:
                self._fail(f"column {name}: {exc}")
        chunks = footer.get("chunks")
        if not isinstance(chunks, list):
            self._fail("footer 'chunks' must be a list")
        directory = ChunkDirectory.from_entries(
            chunks,
            k=self.k,
            positions=self.positions,
            footer_start=self.footer_start,
            expansion={name: p.max_expansion() for name, p in self.pipelines.items()},
        )
        if directory is None:  # some entry is malformed: find it and say what is wrong
            directory = ChunkDirectory.from_parsed(
                [self._parse_chunk(i, c) for i, c in enumerate(chunks)]
            )
        totals = dict(
            zip(
                ("records", "tokens", "targets"), directory.counts.sum(axis=0).tolist(), strict=True
            )
        )
        for key, total in totals.items():
            if footer.get(key) != total:
                self._fail(f"footer {key} {footer.get(key)!r} != sum over chunks {total}")
            if entry is not None and getattr(entry, key) != total:
                self._fail(f"{key} {total} != manifest {getattr(entry, key)}")
        if entry is not None and directory.counts[:, 0].tolist() != entry.chunk_records:
            self._fail("chunk record counts differ from the manifest's chunk_records")
        self.records = totals["records"]
        self.chunks = directory
        # Chunks whose every block is verified (directory.verified, a flag a chunk).
        self._chunk_verified = bytearray(directory.verified.all(axis=1).tobytes())
        # Default pipelines decode a chunk in one call (native.py) where it can.
        configs = {name: pipeline.get_config() for name, pipeline in self.pipelines.items()}
        self._in_one_call = native.fits(configs, self.k)
        self.chunk_starts = np.concatenate([[0], np.cumsum(self.chunks.counts[:, 0])])

    def _parse_chunk(self, index: int, chunk) -> dict:
        if not isinstance(chunk, dict):
            self._fail("chunk entry is not an object", index)
        counts = {}
        for key in ("records", "tokens", "targets"):
            value = chunk.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                self._fail(f"'{key}' = {value!r} is not a count", index)
            counts[key] = value
        r, t, n, k = counts["records"], counts["tokens"], counts["targets"], self.k
        if r < 1 or t < r or n > t:
            self._fail(f"inconsistent counts records={r} tokens={t} targets={n}", index)
        if self.positions == POSITIONS_ALL and n != t - r:
            self._fail(f"positions 'all' needs targets = tokens - records, got {n}", index)
        expected = {
            COL_RECORD_LENGTHS: r * 4,
            COL_INPUT_IDS: t * 4,
            COL_LOSS_MASK: t,
            COL_TOPK_IDS: n * k * 4,
            COL_TOPK_LOGPROBS: n * k * 2,
            COL_SAMPLE_ID_LENGTHS: r * 4,
            COL_SAMPLE_ID_BYTES: None,
        }
        blocks = chunk.get("blocks")
        if not isinstance(blocks, dict):
            self._fail("'blocks' is missing", index)
        parsed = {}
        for name in COLUMN_ORDER:
            block = blocks.get(name)
            if block is None:
                if name in REQUIRED_COLUMNS:
                    self._fail(f"column {name} is missing", index)
                continue
            if name not in self.pipelines:
                self._fail(f"column {name} has no codec pipeline in the footer", index)
            fields = {}
            for key in ("offset", "length", "raw_length"):
                value = block.get(key) if isinstance(block, dict) else None
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    self._fail(f"column {name}: '{key}' = {value!r} is not a size", index)
                fields[key] = value
            checksum = block.get("checksum")
            if not isinstance(checksum, str) or not _HEX16.fullmatch(checksum):
                self._fail(f"column {name}: bad checksum field {checksum!r}", index)
            offset, length, raw = fields["offset"], fields["length"], fields["raw_length"]
            if offset < HEADER_SIZE or offset + length > self.footer_start:
                self._fail(
                    f"column {name}: block [{offset}, {offset + length}) is outside the chunk area",
                    index,
                )
            want = expected[name]
            if name == COL_SAMPLE_ID_BYTES:
                if raw > r * MAX_SAMPLE_ID_BYTES:
                    self._fail(f"column {name}: raw_length {raw} is too large", index)
            elif raw != want:
                self._fail(
                    f"column {name}: raw_length {raw} != {want} implied by the counts", index
                )
            if raw > MAX_BLOCK_RAW_BYTES:
                self._fail(f"column {name}: raw_length {raw} exceeds the format limit", index)
            if raw > length * self.pipelines[name].max_expansion() + 64:
                self._fail(
                    f"column {name}: {length} stored bytes cannot decode to raw_length "
                    f"{raw} with this pipeline",
                    index,
                )
            parsed[name] = (offset, length, raw, checksum)
        if (COL_SAMPLE_ID_LENGTHS in parsed) != (COL_SAMPLE_ID_BYTES in parsed):
            self._fail("sample_id needs both its lengths and bytes columns", index)
        return {**counts, "blocks": parsed}

    def block_problem(self, index: int, name: str) -> str | None:
        offset, length, _, checksum = self.chunks.block(index, name)
        got = xxhash.xxh3_64_intdigest(self.buf[offset : offset + length])
        if got != checksum:
            return (
                f"shard {self.name} chunk {index} column {name}: checksum mismatch "
                f"(expected {checksum:016x}, got {got:016x}): {_FIX}"
            )
        self.chunks.verified[index, COLUMN_INDEX[name]] = True
        return None

    def _verified_blocks(self, index: int) -> list[list[int]]:
        """[offset, length, raw_length] of chunk `index`'s block of each column (in
        COLUMN_INDEX order, offset -1 where the column is absent), every present block's
        checksum verified: once per process, since bytes verified once stay verified."""
        blocks = self.chunks.blocks[index].tolist()
        if not self._chunk_verified[index]:
            self._verify_chunk(index, blocks)
        return blocks

    def _verify_chunk(self, index: int, blocks: list[list[int]]) -> None:
        """Hash every block of the chunk not yet verified, in one pass over plain lists (a
        random read verifies the chunk it decodes: this is on its path)."""
        verified = self.chunks.verified[index].tolist()
        checksums = self.chunks.checksums[index].tolist()
        buf = self.buf
        for column, (offset, length, _) in enumerate(blocks):
            if verified[column]:
                continue  # absent, or verified before
            if xxhash.xxh3_64_intdigest(buf[offset : offset + length]) != checksums[column]:
                raise CorruptCacheError(self.block_problem(index, COLUMN_ORDER[column]))
        self.chunks.verified[index] = True
        self._chunk_verified[index] = 1

    def _column(self, index: int, name: str, blocks: list | None = None) -> np.ndarray:
        """A column of the chunk decoded whole (`blocks`: its _verified_blocks)."""
        if blocks is None:
            blocks = self._verified_blocks(index)
        offset, length, raw = blocks[COLUMN_INDEX[name]]
        try:
            buf = self.pipelines[name].decode_bytes(self.buf[offset : offset + length], raw)
        except CodecError as exc:
            self._fail(f"column {name}: {exc}", index)
        return aligned_view(buf, COLUMN_DTYPES[name])

    def _teacher_column(self, index: int, name: str, n: int, blocks: list, staged: bool):
        """A teacher column as [n, K] (ids checked against the vocabulary), or with
        `staged` and a pipeline that decodes by rows, a StagedBlock of it."""
        dtype = COLUMN_DTYPES[name]
        if staged:
            offset, length, raw = blocks[COLUMN_INDEX[name]]
            try:
                block = self.pipelines[name].stage(
                    self.buf[offset : offset + length], raw, self.k * dtype.itemsize
                )
            except CodecError as exc:
                self._fail(f"column {name}: {exc}", index)
            if block is not None:
                return block
        values = self._column(index, name, blocks).reshape(n, self.k)
        if name == COL_TOPK_IDS:
            self._check_ids(index, name, values)
        return values

    def _check_ids(self, index: int, name: str, ids: np.ndarray) -> None:
        # An id outside the vocabulary would index out of bounds in any consumer. As
        # uint32 a negative id is above any vocabulary: one pass checks both ends.
        if ids.size and ids.view(np.uint32).max() >= self.vocab_size:
            self._fail(f"{name} holds ids outside [0, vocab_size={self.vocab_size})", index)

    def _rows(self, index: int, name: str, source, lo: int, hi: int) -> np.ndarray:
        """Rows lo..hi-1 of a teacher column from _teacher_column, read-only."""
        if isinstance(source, np.ndarray):
            return source[lo:hi]
        width = self.k * COLUMN_DTYPES[name].itemsize
        try:
            buf = source.decode_range(lo * width, hi * width)
        except CodecError as exc:
            self._fail(f"column {name}: {exc}", index)
        values = aligned_view(buf, COLUMN_DTYPES[name]).reshape(hi - lo, self.k)
        if name == COL_TOPK_IDS:
            self._check_ids(index, name, values)
        values.flags.writeable = False
        return values

    def decode_chunk(self, index: int, rows_on_demand: bool = False) -> DecodedChunk:
        """Decode and check one chunk; every offset is validated before it is used.

        With `rows_on_demand` the teacher columns are decoded a record's rows at a time by
        the result's `rows` (a random read decodes one record's rows, not all of them).
        """
        r, t, n = self.chunks.counts[index].tolist()
        if self._in_one_call:
            whole = native.decode_default_chunk(
                ready_kernels(),
                self.buf,
                self.chunks.blocks[index],
                self.chunks.checksums[index],
                self.chunks.verified[index],
                (r, t, n),
                self.k,
                self.positions == POSITIONS_ALL,
                # A chunk of one record: its rows are all the record's, decode them here.
                teacher_rows=not rows_on_demand or r == 1,
            )
            if isinstance(whole, native.DefaultChunk):
                return self._decoded_in_one_call(index, whole, n)
            if whole == native.WIDE_IDS:
                self._in_one_call = False  # its other chunks would be decoded twice too
        blocks = self._verified_blocks(index)
        lengths = self._column(index, COL_RECORD_LENGTHS, blocks)
        mask_u8 = self._column(index, COL_LOSS_MASK, blocks)
        # Their sizes are r and t: raw_length was checked against the counts (spec 4.2).
        token_starts = np.empty(r + 1, dtype=np.int64)
        target_starts = np.empty(r + 1, dtype=np.int64)
        kernels = read_kernels(0) or _numpy_kernels
        status = kernels.record_starts(
            lengths, mask_u8, self.positions == POSITIONS_ALL, token_starts, target_starts
        )
        if status != RECORD_STARTS_OK:
            self._fail(_RECORD_STARTS_PROBLEMS[status], index)
        if target_starts[-1] != n:
            self._fail(f"loss_mask selects {target_starts[-1]} targets, footer says {n}", index)
        loss_mask = mask_u8.view(np.bool_)
        input_ids = self._column(index, COL_INPUT_IDS, blocks)
        self._check_ids(index, COL_INPUT_IDS, input_ids)
        topk_logprobs = self._teacher_column(index, COL_TOPK_LOGPROBS, n, blocks, rows_on_demand)
        topk_ids = self._teacher_column(index, COL_TOPK_IDS, n, blocks, rows_on_demand)
        sample_ids = None
        if self.chunks.has(index, COL_SAMPLE_ID_LENGTHS):
            sample_ids = self._sample_ids(
                index,
                self._column(index, COL_SAMPLE_ID_LENGTHS, blocks),
                self._column(index, COL_SAMPLE_ID_BYTES, blocks),
            )
        columns = (input_ids, loss_mask, topk_ids, topk_logprobs)
        return self._assemble(index, token_starts, target_starts, *columns, sample_ids)

    def _assemble(
        self,
        index: int,
        token_starts: np.ndarray,
        target_starts: np.ndarray,
        input_ids: np.ndarray,
        loss_mask: np.ndarray,
        topk_ids,
        topk_logprobs,
        sample_ids: list[str | None] | None,
    ) -> DecodedChunk:
        """The DecodedChunk of checked columns, read-only; teacher columns decoded whole or
        staged (their rows decoded on demand)."""
        for array in (input_ids, loss_mask, topk_ids, topk_logprobs):
            if isinstance(array, np.ndarray):
                array.flags.writeable = False

        def rows(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
            return (
                self._rows(index, COL_TOPK_IDS, topk_ids, lo, hi),
                self._rows(index, COL_TOPK_LOGPROBS, topk_logprobs, lo, hi),
            )

        return DecodedChunk(
            token_starts,
            target_starts,
            input_ids,
            loss_mask,
            topk_ids,
            topk_logprobs,
            sample_ids,
            rows,
        )

    def _decoded_in_one_call(self, index: int, whole: native.DefaultChunk, n: int):
        """The DecodedChunk of what native.decode_default_chunk decoded, with the checks its
        kernels leave to Python (the same as the codec-by-codec path's). Teacher columns left
        as planes are staged, to be decoded a record's rows at a time."""
        self.chunks.verified[index] = True
        self._chunk_verified[index] = 1
        if whole.target_starts[-1] != n:
            self._fail(
                f"loss_mask selects {whole.target_starts[-1]} targets, footer says {n}", index
            )
        self._check_ids(index, COL_INPUT_IDS, whole.input_ids)
        sample_ids = None
        if whole.sample_id_lengths is not None:
            sample_ids = self._sample_ids(index, whole.sample_id_lengths, whole.sample_id_bytes)
        if whole.topk_ids is not None:
            topk_ids = whole.topk_ids.reshape(n, self.k)
            topk_logprobs = whole.topk_logprobs.reshape(n, self.k)
            self._check_ids(index, COL_TOPK_IDS, whole.topk_ids)
        else:
            topk_ids = self._stage_planes(index, COL_TOPK_IDS, whole.topk_planes, n)
            topk_logprobs = self._stage_planes(index, COL_TOPK_LOGPROBS, whole.logprob_planes, n)
        columns = (whole.input_ids, whole.loss_mask.view(np.bool_), topk_ids, topk_logprobs)
        return self._assemble(index, whole.token_starts, whole.target_starts, *columns, sample_ids)

    def _stage_planes(self, index: int, name: str, planes: np.ndarray, n: int) -> StagedBlock:
        """A teacher column's planes (its zstd frame decoded) staged for rows. The default
        pipelines, the only ones decoded in one call (native.fits), stage by rows of any K."""
        row = self.k * COLUMN_DTYPES[name].itemsize
        try:
            staged = self.pipelines[name].stage_unzipped(planes, n * row, row)
        except CodecError as exc:
            self._fail(f"column {name}: {exc}", index)
        if staged is None:
            raise RuntimeError(f"column {name}: pipeline {self.pipelines[name]} cannot stage rows")
        return staged

    def _sample_ids(self, index: int, lengths: np.ndarray, data: np.ndarray) -> list[str | None]:
        # Checked as Python ints: a chunk holds a few records, where each numpy call would
        # cost more than the whole list.
        sid_lengths = lengths.tolist()
        sid_bytes = data.tobytes()
        if min(sid_lengths) < -1 or max(sid_lengths) > MAX_SAMPLE_ID_BYTES:
            self._fail("sample_id length out of range", index)
        if sum(length for length in sid_lengths if length > 0) != len(sid_bytes):
            self._fail("sample_id lengths do not add up to its bytes", index)
        out: list[str | None] = []
        pos = 0
        for length in sid_lengths:
            if length < 0:
                out.append(None)
                continue
            try:
                out.append(sid_bytes[pos : pos + length].decode("utf-8"))
            except UnicodeDecodeError:
                self._fail("sample_id is not valid UTF-8", index)
            pos += length
        return out
