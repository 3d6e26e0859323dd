"""open_cache() and LogitCache: random access and streaming over a committed cache.

A record is found from the manifest alone (shard, then chunk by record counts); decoding it
decodes its chunk once, and a small LRU keeps recently decoded chunks.
"""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import xxhash

from .codecs import DECODED_BYTES_PER_PAIR, expect_decoding
from .format import MANIFEST_NAME, CacheError, CorruptCacheError, Record
from .manifest import Manifest, read_manifest
from .readahead import ReadAhead, scan_read_ahead
from .shard import DecodedChunk, ShardFile
from .storage import open_store


def open_cache(
    url: str,
    storage_options: dict | None = None,
    cache_dir: str | None = None,
    cache_limit_bytes: int | None = None,
    k: int | None = None,
    chunk_cache_size: int = 8,
) -> LogitCache:
    """Open the committed cache at `url`. `k` < the cache's K truncates rows to their top k."""
    store = open_store(
        url, storage_options, cache_dir=cache_dir, cache_limit_bytes=cache_limit_bytes
    )
    try:
        manifest = read_manifest(store)
    except BaseException:
        store.close()
        raise
    return LogitCache(store, manifest, k=k, chunk_cache_size=chunk_cache_size)


class LogitCache:
    """A committed cache: `len`, `cache[i] -> Record`, `iter_records()`, `verify()`."""

    def __init__(
        self, store, manifest: Manifest, *, k: int | None = None, chunk_cache_size: int = 8
    ):
        if k is not None and not (isinstance(k, int) and 1 <= k <= manifest.k):
            raise ValueError(f"k={k!r}: must be an integer in [1, {manifest.k}] for this cache")
        self.store = store
        self.manifest = manifest
        self.k = k or manifest.k
        self.url = store.url
        self.shard_starts = np.concatenate(
            [[0], np.cumsum([s.records for s in manifest.shards], dtype=np.int64)]
        ).astype(np.int64)
        self._chunk_starts = [
            np.concatenate([[0], np.cumsum(s.chunk_records, dtype=np.int64)])
            for s in manifest.shards
        ]
        self._shards: dict[int, ShardFile] = {}
        self._chunks: collections.OrderedDict[tuple[int, int], DecodedChunk] = (
            collections.OrderedDict()
        )
        self._chunk_cache_size = max(1, chunk_cache_size)
        self._lock = threading.RLock()
        self._read_aheads: weakref.WeakSet[ReadAhead] = weakref.WeakSet()

    # -- lookup --------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.shard_starts[-1])

    def locate(self, index: int) -> tuple[int, int, int]:
        """(shard index, chunk index, index within the chunk) of global record `index`."""
        n = len(self)
        if not isinstance(index, (int, np.integer)) or isinstance(index, (bool, np.bool_)):
            raise TypeError(f"record index must be an integer, got {type(index).__name__}")
        if not -n <= index < n:
            raise IndexError(
                f"record {index} is out of range for a cache of {n} records "
                f"(valid: 0..{n - 1}, or -{n}..-1 from the end)"
            )
        if index < 0:
            index += n
        shard = int(np.searchsorted(self.shard_starts, index, side="right") - 1)
        local = index - int(self.shard_starts[shard])
        starts = self._chunk_starts[shard]
        chunk = int(np.searchsorted(starts, local, side="right") - 1)
        return shard, chunk, local - int(starts[chunk])

    def __getitem__(self, index: int) -> Record:
        shard, chunk, offset = self.locate(index)
        return self._record(self._decoded(shard, chunk, rows_on_demand=True), offset)

    def read_chunk(
        self, shard: int, chunk: int, decoded: DecodedChunk | None = None
    ) -> list[Record]:
        """The records of one chunk (`decoded`: its decoded_chunk() from a read-ahead)."""
        if decoded is None:
            decoded = self._decoded(shard, chunk)
        return [self._record(decoded, i) for i in range(len(decoded.token_starts) - 1)]

    def iter_records(
        self, start: int = 0, stop: int | None = None, *, read_ahead: int | None = None
    ) -> Iterator[Record]:
        """Records start..stop-1 in order, decoding each chunk once and prefetching shards.

        `read_ahead` chunks ahead are decoded on background threads while this one hands out
        records (readahead.py). By default a scan reads 4 ahead on 2 threads where the
        process may use 2 cores or more, and none on one core; 0 turns it off.
        """
        stop = len(self) if stop is None else min(stop, len(self))
        depth = scan_read_ahead() if read_ahead is None else read_ahead
        if stop - start <= 1:
            depth = 0  # one chunk at most: nothing to overlap
        with self.start_read_ahead(
            lambda key: self._decoded(*key),
            ((shard, chunk) for shard, chunk, _, _ in self._chunk_spans(start, stop)),
            depth,
        ) as ahead:
            self.expect_reading(stop - start)
            for shard, chunk, first, end in self._chunk_spans(start, stop):
                if chunk == 0:
                    self._prefetch_after(shard)
                decoded = ahead.take((shard, chunk))
                if decoded is None:
                    # Decoding here: map the pages from this chunk on in windows first.
                    # Read-ahead threads fault them in instead: madvise holds the GIL.
                    self.shard_file(shard).prefault(chunk)
                    decoded = self._decoded(shard, chunk)
                for i in range(first, end):
                    yield self._record(decoded, i)

    def _chunk_spans(self, start: int, stop: int) -> Iterator[tuple[int, int, int, int]]:
        """(shard, chunk, first, end) of each chunk that iter_records(start, stop) decodes,
        in order: it yields that chunk's records first..end-1. Walks the chunks in order
        rather than locating each one."""
        if start >= stop:
            return
        shard, from_chunk, first = self.locate(start)
        index = start
        while index < stop:
            starts = self._chunk_starts[shard].tolist()
            for chunk in range(from_chunk, len(starts) - 1):
                end = min(starts[chunk + 1] - starts[chunk], first + stop - index)
                yield shard, chunk, first, end
                index += end - first
                first = 0
                if index >= stop:
                    return
            shard, from_chunk = shard + 1, 0

    def start_read_ahead(self, unpack: Callable, keys: Iterable, depth: int) -> ReadAhead:
        """A ReadAhead over this cache's chunks (readahead.py) that close() stops before it
        unmaps the shards its thread reads."""
        ahead = ReadAhead(unpack, keys, depth)
        if depth:
            with self._lock:
                self._read_aheads.add(ahead)
        return ahead

    def decoded_chunk(self, shard: int, chunk: int) -> DecodedChunk:
        """One chunk decoded whole (from the LRU when it holds it), for a read-ahead thread
        to hand to read_chunk."""
        return self._decoded(shard, chunk)

    def __iter__(self) -> Iterator[Record]:
        return self.iter_records()

    def expect_reading(self, records: int) -> None:
        """Tell the decoders that about `records` records (of average size) are to be read,
        so that a long read loads the fast kernels at its start (codecs.expect_decoding)."""
        m = self.manifest
        if records > 0 and m.records:
            expect_decoding(m.targets * records // m.records * m.k * DECODED_BYTES_PER_PAIR)

    # -- decoding ------------------------------------------------------------------------
    def shard_file(self, shard: int) -> ShardFile:
        with self._lock:
            opened = self._shards.get(shard)
            if opened is None:
                entry = self.manifest.shards[shard]
                with self.store.shard_to_map(
                    entry.path, size=entry.bytes, checksum=entry.checksum
                ) as path:
                    opened = self._shards[shard] = ShardFile(
                        path,
                        name=entry.path,
                        entry=entry,
                        k=self.manifest.k,
                        vocab_size=self.manifest.vocab_size,
                        positions=self.manifest.positions,
                    )
            return opened

    def _decoded(self, shard: int, chunk: int, rows_on_demand: bool = False) -> DecodedChunk:
        """The chunk from the LRU, or decoded (with `rows_on_demand`, its teacher rows are
        decoded a record at a time: a random read pays for its record, not its chunk)."""
        key = (shard, chunk)
        with self._lock:
            decoded = self._chunks.get(key)
            if decoded is not None:
                self._chunks.move_to_end(key)
                return decoded
        decoded = self.shard_file(shard).decode_chunk(chunk, rows_on_demand=rows_on_demand)
        with self._lock:
            self._chunks[key] = decoded
            while len(self._chunks) > self._chunk_cache_size:
                self._chunks.popitem(last=False)
        return decoded

    def _record(self, chunk: DecodedChunk, i: int) -> Record:
        t0, t1 = chunk.token_starts[i], chunk.token_starts[i + 1]
        n0, n1 = chunk.target_starts[i], chunk.target_starts[i + 1]
        topk_ids, topk_logprobs = chunk.rows(n0, n1)
        if self.k != self.manifest.k:
            # Rows are in canonical order, so the top k' are the first k' columns.
            topk_ids = np.ascontiguousarray(topk_ids[:, : self.k])
            topk_logprobs = np.ascontiguousarray(topk_logprobs[:, : self.k])
        return Record(
            input_ids=chunk.input_ids[t0:t1],
            loss_mask=chunk.loss_mask[t0:t1],
            topk_ids=topk_ids,
            topk_logprobs=topk_logprobs,
            sample_id=None if chunk.sample_ids is None else chunk.sample_ids[i],
        )

    def _prefetch_after(self, shard: int, ahead: int = 2) -> None:
        upcoming = self.manifest.shards[shard + 1 : shard + 1 + ahead]
        if upcoming:
            self.store.prefetch([(s.path, s.bytes, s.checksum) for s in upcoming])

    # -- checking ------------------------------------------------------------------------
    def verify(self, raise_errors: bool = True, progress: bool = False) -> list[str]:
        """Check every shard file, footer, block checksum and record invariant.

        Returns every problem found (an empty list when the cache is sound); with
        `raise_errors`, raises CorruptCacheError listing them instead of returning.
        """
        problems: list[str] = []
        self.expect_reading(len(self))
        shards = range(len(self.manifest.shards))
        if progress:
            from tqdm import tqdm

            shards = tqdm(shards, desc="verify", unit="shard")
        for s in shards:
            entry = self.manifest.shards[s]
            try:
                shard = self.shard_file(s)
            except (CacheError, OSError) as exc:
                problems.append(str(exc))
                continue
            got = f"xxh3_64:{xxhash.xxh3_64_hexdigest(shard.buf)}"
            if got != entry.checksum:
                problems.append(
                    f"shard {entry.path}: file checksum mismatch (expected {entry.checksum}, "
                    f"got {got}): the file is corrupt: re-download it, or re-write the cache"
                )
            for c in range(len(shard.chunks)):
                bad = [
                    p for name in shard.chunks[c]["blocks"] if (p := shard.block_problem(c, name))
                ]
                problems.extend(bad)
                if bad:
                    continue
                try:
                    decoded = shard.decode_chunk(c)
                except CacheError as exc:
                    problems.append(str(exc))
                    continue
                problems.extend(self._check_values(entry.path, c, decoded))
        if problems and raise_errors:
            raise CorruptCacheError(
                f"{self.url}: {len(problems)} problem(s) found:\n" + "\n".join(problems)
            )
        return problems

    def _check_values(self, path: str, c: int, chunk: DecodedChunk) -> list[str]:
        where = f"shard {path} chunk {c}"
        vocab = self.manifest.vocab_size
        out = []
        if chunk.input_ids.size and (chunk.input_ids.min() < 0 or chunk.input_ids.max() >= vocab):
            out.append(f"{where}: input_ids outside [0, vocab_size={vocab})")
        if chunk.topk_ids.size and (chunk.topk_ids.min() < 0 or chunk.topk_ids.max() >= vocab):
            out.append(f"{where}: topk_ids outside [0, vocab_size={vocab})")
        lp = chunk.topk_logprobs
        if lp.size and (not np.isfinite(lp).all() or (lp > 0).any()):
            out.append(f"{where}: topk_logprobs has non-finite or positive values")
        return out

    # -- lifetime ------------------------------------------------------------------------
    def release_shard(self, shard: int) -> None:
        """Unmap one shard and drop its decoded chunks, so a remote store may evict its file.

        Streaming readers call this for shards they have moved past; reading the shard again
        later simply re-opens it (and re-fetches it if it was evicted).
        """
        with self._lock:
            opened = self._shards.pop(shard, None)
            for key in [key for key in self._chunks if key[0] == shard]:
                del self._chunks[key]
        if opened is not None:
            opened.close()

    def close(self) -> None:
        # Read-ahead threads first, and outside the lock: one may be waiting for it to open
        # a shard. A scan still running goes on without read-ahead, reopening shards.
        with self._lock:
            aheads = list(self._read_aheads)
        for ahead in aheads:
            ahead.close()
        with self._lock:
            self._chunks.clear()
            for shard in self._shards.values():
                shard.close()
            self._shards.clear()
        self.store.close()

    def __enter__(self) -> LogitCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"LogitCache({self.url!r}, records={len(self)}, k={self.k}, "
            f"vocab_size={m.vocab_size}, positions={m.positions!r})"
        )


__all__ = ["open_cache", "LogitCache", "MANIFEST_NAME"]
