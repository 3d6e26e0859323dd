"""CacheWriter: validates teacher records, groups them into chunks and shards, commits last.

Chunks are encoded on a thread pool (the numba kernels and zstd release the GIL) and written
in order; the manifest is written only by a clean close, so a failed run commits nothing.
"""

from __future__ import annotations

import collections
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from . import __version__
from .codecs import CodecError, Pipeline, default_pipeline_configs, kernels
from .format import (
    COL_INPUT_IDS,
    COL_LOSS_MASK,
    COL_RECORD_LENGTHS,
    COL_SAMPLE_ID_BYTES,
    COL_SAMPLE_ID_LENGTHS,
    COL_TOPK_IDS,
    COL_TOPK_LOGPROBS,
    COLUMN_DTYPES,
    MANIFEST_NAME,
    MAX_K,
    MAX_MANIFEST_BYTES,
    MAX_ROW_MASS,
    MAX_SAMPLE_ID_BYTES,
    MAX_VOCAB_SIZE,
    PARTIAL_DIR,
    POSITIONS_ALL,
    POSITIONS_MODES,
    SHARD_DIR,
    CacheError,
)
from .layout import WriterSlot, new_generation
from .lossy import LossyRows
from .manifest import Manifest, ShardEntry, now_iso
from .progress import Progress, as_json, identity_mismatch, read_progress
from .shard import COLUMN_ORDER, EncodedChunk, ShardBuilder, encode_chunk
from .storage import open_store, store_checksum

_FP16_MIN = float(np.finfo(np.float16).min)
_EXP_TABLE: np.ndarray | None = None

# Messages for the status codes of _kernels.check_and_canonicalize_rows (1..5).
_ROW_ERRORS = {
    1: ("topk_ids", "id {value} is outside [0, vocab_size={vocab})"),
    2: ("topk_logprobs", "value {value} is not finite"),
    3: ("topk_logprobs", "value {value} > 0 is not a log-probability"),
    4: ("topk_ids", "id {value} appears twice in the row"),
    5: (
        "topk_logprobs",
        "the row's probabilities sum to {value:.4g} > 1; pass log_softmax outputs, not logits",
    ),
}


def _exp_table() -> np.ndarray:
    """exp() of every fp16 bit pattern, so the kernel sums probability mass by lookup."""
    global _EXP_TABLE
    if _EXP_TABLE is None:
        values = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            table = np.exp(values)
        table[~np.isfinite(table)] = 0.0
        _EXP_TABLE = table
    return _EXP_TABLE


# Decoded bytes after which a chunk is closed. A random read unzips and checksums its whole
# chunk (then decodes its record's rows), so small chunks make single reads cheap: at 256 KiB
# a chunk holds one record of ~1,000 tokens (K=100) or a few short ones. Each chunk also costs
# a scan a fixed amount (seven zstd frames and their checksums, the Python around the one
# call that decodes them, and the read-ahead threads' turns at the GIL). Against 2 MiB chunks,
# on bench_loader's records: random reads 2.6x as fast, scans 0.88x as fast on one thread and
# 0.81x with read-ahead, files 0.5% larger (benchmarks/bench_chunking.py, which also measures
# 64 KiB to 512 KiB).
DEFAULT_CHUNK_BYTES = 256 << 10
DEFAULT_SHARD_BYTES = 256 << 20


class CacheWriter:
    """Write a logit cache at `url` (a directory or any fsspec URL).

    Use as a context manager; `add()` one record at a time or `add_batch()` for teacher
    output. Rows may come in any order; they are stored in canonical order (logprob
    descending, ties by id ascending). float32/float64 logprobs are rounded to fp16, and
    values below the fp16 range (probability 0 at any precision) are stored as -65504.

    Shards are named with a fresh generation token, so `overwrite=True` writes the new cache
    beside the old one, commits its manifest, and only then removes the old shards: a crash at
    any moment leaves one of the two readable. Files the writer did not create are never removed.

    Distributed writers pass `rank` and `world_size`: each rank commits a partial manifest
    and `logitcache merge` (or `merge_partials`) commits the cache once all ranks finished.

    `lossy_kl=BUDGET` (nats) stores every row within BUDGET of its lossless version (KL in
    each direction, renormalised over the stored ids, with and without the outside bucket, plus
    the cost of leaving out the tail entries; see logitcache.lossy): logprobs on a grid and
    rows cut short where their tail is light (unless `lossy_truncate=False`), padded to K with
    entries of logprob -65504.

    Long runs call `checkpoint(progress)` now and then; a run killed later is continued by a
    writer created with `resume=True` and the same identity (k, vocab_size, positions, teacher,
    tokenizer, metadata, codecs, rank, world_size), which keeps the checkpointed shards and
    returns the caller's `progress` as `resumed_progress` (None when starting fresh).
    """

    def __init__(
        self,
        url: str,
        *,
        k: int,
        vocab_size: int,
        positions: str = "supervised",
        storage_options: dict | None = None,
        teacher: dict | None = None,
        tokenizer: dict | None = None,
        metadata: dict | None = None,
        codecs: dict[str, list[dict[str, Any]]] | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        rank: int | None = None,
        world_size: int | None = None,
        overwrite: bool = False,
        resume: bool = False,
        threads: int | None = None,
        generation: str | None = None,
        lossy_kl: float | None = None,
        lossy_truncate: bool = True,
    ):
        if not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise ValueError(f"k={k!r}: must be an integer in [1, {MAX_K}]")
        if not isinstance(vocab_size, int) or not k <= vocab_size <= MAX_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size={vocab_size!r}: must be an integer in [k, {MAX_VOCAB_SIZE}]"
            )
        if positions not in POSITIONS_MODES:
            raise ValueError(f"positions={positions!r}: must be one of {POSITIONS_MODES}")
        _check_rank(rank, world_size)
        for name, value in (("chunk_bytes", chunk_bytes), ("shard_bytes", shard_bytes)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a positive integer number of bytes")
        self.k, self.vocab_size, self.positions = k, vocab_size, positions
        self.rank, self.world_size = rank, world_size
        self.chunk_bytes, self.shard_bytes = int(chunk_bytes), int(shard_bytes)
        configs = default_pipeline_configs(k)
        # Lossy mode (spec section 12): rows within a per-row KL budget, entropy-coded.
        self._lossy = (
            None if lossy_kl is None else LossyRows(lossy_kl, k, truncation=lossy_truncate)
        )
        if self._lossy is not None:
            configs.update(self._lossy.pipelines())
        for name, config in (codecs or {}).items():
            if name not in configs:
                raise ValueError(f"codecs: unknown column {name!r}; columns are {list(configs)}")
            configs[name] = config
        self.pipelines = {}
        for name, config in configs.items():
            try:
                self.pipelines[name] = Pipeline.from_config(config)
            except CodecError as exc:
                raise ValueError(f"codecs[{name!r}]: {exc}") from None
        self._column_configs = {
            name: {"dtype": COLUMN_DTYPES[name].str, "codecs": configs[name]} for name in configs
        }
        self.teacher, self.tokenizer = teacher, tokenizer
        self.metadata = dict(metadata or {})
        self._identity = as_json(
            {
                "k": k,
                "vocab_size": vocab_size,
                "positions": positions,
                "teacher": teacher,
                "tokenizer": tokenizer,
                "metadata": self.metadata,
                "codecs": {name: configs[name] for name in sorted(configs)},
                "rank": rank,
                "world_size": world_size,
                **({} if self._lossy is None else {"lossy": self._lossy.config()}),
            },
            what="teacher, tokenizer and metadata",
        )
        self.slot = WriterSlot(rank)
        if generation is not None and not re.fullmatch(r"[0-9a-f]{12}", str(generation)):
            raise ValueError(f"generation={generation!r}: must be 12 lowercase hex digits")
        self.generation = generation or new_generation()
        self.store = open_store(url, storage_options)
        self._kept: list[ShardEntry] = []  # shards of a resumed checkpoint
        self._checkpointed = 0  # shards of this run covered by the progress file
        self._replaced: set[str] = set()  # shards of the commit this writer replaces
        self.resumed_progress: Any = None
        self._prepare_destination(overwrite, resume)

        self._stamp = np.zeros(vocab_size, dtype=np.int64)
        self._stamp_base = 0
        self._pending: dict[str, list] = collections.defaultdict(list)
        self._pending_counts = [0, 0, 0]  # records, tokens, targets
        self._pending_bytes = 0
        self._records_added = 0
        workers = threads or min(4, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lgc-encode")
        self._in_flight: collections.deque[Future] = collections.deque()
        self._max_in_flight = 2 * workers
        self._builder: ShardBuilder | None = None
        self._builder_rel = ""
        self._shards: list[ShardEntry] = []
        self._closed = False

    # -- destination ---------------------------------------------------------------------
    def _shard_name(self, index: int) -> str:
        return self.slot.shard_name(self.generation, index)

    def _commit_name(self) -> str:
        return self.slot.commit_name

    def _prepare_destination(self, overwrite: bool, resume: bool) -> None:
        """Decide what this run replaces or resumes, and clear leftovers of its own slot.

        Nothing that a committed manifest, this slot's partial or a kept checkpoint lists is
        touched here; files of other names (other ranks, other programs) never are.
        """
        store, slot = self.store, self.slot
        store.check_writable(slot.commit_name)
        store.check_writable(slot.progress_name)
        where = f"{store.url}/{slot.commit_name}"
        committed = _listed(store, slot.commit_name)
        merged = (_listed(store, MANIFEST_NAME) if slot.rank is not None else None) or set()
        has_merged = slot.rank is not None and store.exists(MANIFEST_NAME)
        progress = read_progress(store, slot.progress_name)
        progress_where = f"{store.url}/{slot.progress_name}"
        finished = (
            committed is not None
            and progress is not None
            and {s.path for s in progress.shards} <= committed
        )
        if finished:
            # Killed after its commit, before removing its progress file: the run is complete.
            store.remove(slot.progress_name)
            progress = None
        if resume and progress is None and (committed is not None or has_merged):
            raise CacheError(
                f"{where}: the cache is complete (committed), there is nothing to resume; "
                "check for a committed cache before resuming, or pass overwrite=True without "
                "resume to replace it"
            )
        if (committed is not None or has_merged) and not overwrite:
            if resume:
                raise CacheError(
                    f"{progress_where}: the interrupted run was replacing the committed cache "
                    f"at {store.url}; pass overwrite=True with resume=True to continue it"
                )
            raise CacheError(
                f"{where}: a committed cache is already there; pass overwrite=True "
                "(--overwrite on the command line) to replace it, or write to a new URL"
            )
        if progress is not None and not resume:
            if not overwrite:
                raise CacheError(
                    f"{progress_where}: an interrupted run left a checkpoint of "
                    f"{sum(s.records for s in progress.shards):,} records; pass resume=True "
                    "to continue it, or overwrite=True to discard it"
                )
            store.remove(slot.progress_name)  # discarded: its shards are cleared below
            progress = None
        if progress is not None:
            identity_mismatch(progress.identity, self._identity, progress_where)
            self._check_kept(progress)
            self._kept = list(progress.shards)
            self.resumed_progress = progress.progress
        self._replaced = (committed or set()) - merged
        protected = (committed or set()) | merged | {s.path for s in self._kept}
        for rel in store.list(SHARD_DIR):
            if slot.owns(rel) and rel not in protected:
                store.remove(rel)  # of this slot, listed nowhere: a run that did not commit
        for rel in store.list("") + store.list(PARTIAL_DIR):
            if slot.owns_temporary(rel):
                store.remove(rel)

    def _check_kept(self, progress: Progress) -> None:
        """Every shard of the checkpoint is there, whole: size always, checksum locally."""
        for entry in progress.shards:
            try:
                size = self.store.size(entry.path)
            except FileNotFoundError:
                size = None
            problem = None
            if size != entry.bytes:
                problem = "is missing" if size is None else f"has {size} bytes, not {entry.bytes}"
            elif self.store.is_local and store_checksum(self.store, entry.path) != entry.checksum:
                problem = "does not match its recorded checksum"
            if problem:
                raise CacheError(
                    f"{self.store.url}/{self.slot.progress_name}: cannot resume: checkpointed "
                    f"shard {entry.path} {problem}; restore it, or start over with "
                    "overwrite=True"
                )

    # -- input ---------------------------------------------------------------------------
    def add(
        self,
        *,
        input_ids,
        loss_mask,
        topk_ids,
        topk_logprobs,
        sample_id: str | None = None,
    ) -> None:
        """Validate one record and queue it; ValueError names the field and the record."""
        if self._closed:
            raise CacheError("this CacheWriter is closed")
        index = self._records_added
        ids = _int_array(input_ids, "input_ids", index, ndim=1)
        t = ids.shape[0]
        if t < 1:
            raise ValueError(f"record {index}: input_ids is empty; a record needs T >= 1 tokens")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
            raise ValueError(
                f"record {index}: input_ids holds {bad}, outside [0, vocab_size={self.vocab_size})"
            )
        mask = _mask_array(loss_mask, index, t)
        n = t - 1 if self.positions == POSITIONS_ALL else int(mask.sum())
        rows_ids = _int_array(topk_ids, "topk_ids", index, ndim=2)
        rows_lp = _logprob_array(topk_logprobs, index)
        for name, rows in (("topk_ids", rows_ids), ("topk_logprobs", rows_lp)):
            if rows.shape != (n, self.k):
                what = (
                    "T-1 positions (positions='all')"
                    if self.positions == POSITIONS_ALL
                    else "the positions where loss_mask is true"
                )
                raise ValueError(
                    f"record {index}: {name} has shape {rows.shape}, expected ({n}, {self.k}): "
                    f"one row of k={self.k} per target, for {what}"
                )
        rows_ids = np.array(rows_ids, dtype=np.int32, order="C")  # own copies: sorted in place
        rows_lp = np.array(rows_lp, dtype=np.float16, order="C")
        self._check_rows(index, rows_ids, rows_lp)
        if self._lossy is not None:
            rows_ids, rows_lp = self._lossy.apply(rows_ids, rows_lp)
        sid = _sample_id_bytes(sample_id, index)

        self._pending[COL_RECORD_LENGTHS].append(t)
        self._pending[COL_INPUT_IDS].append(ids.astype(np.int32, copy=False))
        self._pending[COL_LOSS_MASK].append(mask.view(np.uint8))
        self._pending[COL_TOPK_IDS].append(rows_ids)
        self._pending[COL_TOPK_LOGPROBS].append(rows_lp)
        self._pending["sample_id"].append(sid)
        self._pending_counts[0] += 1
        self._pending_counts[1] += t
        self._pending_counts[2] += n
        self._pending_bytes += 5 * t + 6 * n * self.k
        self._records_added += 1
        if self._pending_bytes >= self.chunk_bytes:
            self._flush_chunk()

    def add_batch(
        self,
        *,
        input_ids,
        loss_mask,
        topk_ids,
        topk_logprobs,
        sample_ids=None,
    ) -> None:
        """Add several records: each argument is a sequence with one entry per record."""
        count = len(input_ids)
        for name, seq in (
            ("loss_mask", loss_mask),
            ("topk_ids", topk_ids),
            ("topk_logprobs", topk_logprobs),
            ("sample_ids", sample_ids),
        ):
            if seq is not None and len(seq) != count:
                raise ValueError(f"add_batch: {name} has {len(seq)} entries, input_ids has {count}")
        for i in range(count):
            self.add(
                input_ids=input_ids[i],
                loss_mask=loss_mask[i],
                topk_ids=topk_ids[i],
                topk_logprobs=topk_logprobs[i],
                sample_id=None if sample_ids is None else sample_ids[i],
            )

    def add_padded(
        self,
        *,
        input_ids,
        loss_mask,
        lengths,
        topk_ids,
        topk_logprobs,
        sample_ids=None,
    ) -> None:
        """Add a padded batch in the layout a teacher forward pass produces.

        input_ids, loss_mask: [B, L]; lengths: [B] real lengths; topk_ids, topk_logprobs:
        [B, L, K] where row [b, p] is the distribution of token p, that is the teacher's
        output at position p - 1 already shifted by one (row [b, 0] is ignored). Only the rows
        of stored positions are kept: those with loss_mask true, or every p >= 1 in "all" mode.
        """
        ids, mask = np.asarray(input_ids), np.asarray(loss_mask)
        lengths = np.asarray(lengths)
        if ids.ndim != 2 or mask.shape != ids.shape or lengths.shape != (ids.shape[0],):
            raise ValueError(
                f"add_padded: input_ids {ids.shape} and loss_mask {mask.shape} must be [B, L] "
                f"and lengths {lengths.shape} must be [B]"
            )
        rows_ids, rows_lp = np.asarray(topk_ids), np.asarray(topk_logprobs)
        want = (*ids.shape, self.k)
        for name, rows in (("topk_ids", rows_ids), ("topk_logprobs", rows_lp)):
            if rows.shape != want:
                raise ValueError(f"add_padded: {name} has shape {rows.shape}, expected {want}")
        if lengths.size and (lengths.min() < 1 or lengths.max() > ids.shape[1]):
            raise ValueError(f"add_padded: lengths must be in [1, L={ids.shape[1]}]")
        for b, t in enumerate(lengths.tolist()):
            m = mask[b, :t]
            keep = np.arange(1, t) if self.positions == POSITIONS_ALL else np.flatnonzero(m)
            self.add(
                input_ids=ids[b, :t],
                loss_mask=m,
                topk_ids=rows_ids[b, keep],
                topk_logprobs=rows_lp[b, keep],
                sample_id=None if sample_ids is None else sample_ids[b],
            )

    def _check_rows(self, index: int, ids: np.ndarray, logprobs: np.ndarray) -> None:
        if ids.shape[0] == 0:
            return
        result = np.zeros(3, dtype=np.int64)
        bits = logprobs.view(np.uint16)
        kern = kernels()
        kern.check_and_canonicalize_rows(
            ids,
            bits,
            self.vocab_size,
            self._stamp,
            self._stamp_base,
            _exp_table(),
            MAX_ROW_MASS,
            result,
        )
        self._stamp_base += ids.shape[0]
        status, row, col = (int(v) for v in result)
        if status != kern.ROW_OK:
            field, template = _ROW_ERRORS[status]
            if status == kern.ROW_MASS_TOO_LARGE:
                value = float(np.exp(logprobs[row].astype(np.float64)).sum())
            elif field == "topk_ids":
                value = int(ids[row, col])
            else:
                value = float(logprobs[row, col])
            raise ValueError(
                f"record {index}: {field} row {row} column {col}: "
                + template.format(value=value, vocab=self.vocab_size)
            )

    # -- chunks and shards ---------------------------------------------------------------
    def _flush_chunk(self) -> None:
        if not self._pending_counts[0]:
            return
        p = self._pending
        columns = {
            COL_RECORD_LENGTHS: np.asarray(p[COL_RECORD_LENGTHS], dtype=np.int32),
            COL_INPUT_IDS: np.concatenate(p[COL_INPUT_IDS]),
            COL_LOSS_MASK: np.concatenate(p[COL_LOSS_MASK]),
            COL_TOPK_IDS: np.concatenate(p[COL_TOPK_IDS]).reshape(-1, self.k),
            COL_TOPK_LOGPROBS: np.concatenate(p[COL_TOPK_LOGPROBS]).reshape(-1, self.k),
        }
        sids = p["sample_id"]
        if any(s is not None for s in sids):
            columns[COL_SAMPLE_ID_LENGTHS] = np.array(
                [-1 if s is None else len(s) for s in sids], dtype=np.int32
            )
            columns[COL_SAMPLE_ID_BYTES] = np.frombuffer(
                b"".join(s for s in sids if s is not None), dtype=np.uint8
            )
        records, tokens, targets = self._pending_counts
        future = self._pool.submit(
            encode_chunk, columns, self.pipelines, records=records, tokens=tokens, targets=targets
        )
        self._in_flight.append(future)
        self._pending = collections.defaultdict(list)
        self._pending_counts = [0, 0, 0]
        self._pending_bytes = 0
        while len(self._in_flight) > self._max_in_flight:
            self._write_chunk(self._in_flight.popleft().result())

    def _write_chunk(self, chunk: EncodedChunk) -> None:
        if self._builder is None:
            self._builder_rel = self._shard_name(len(self._kept) + len(self._shards))
            self._builder = ShardBuilder(
                self.store.new_local_file(self._builder_rel),
                k=self.k,
                vocab_size=self.vocab_size,
                positions=self.positions,
                pipelines=self.pipelines,
                shard_path=self._builder_rel,
            )
        self._builder.add_chunk(chunk)
        if self._builder.bytes_written >= self.shard_bytes:
            self._finish_shard()

    def _finish_shard(self) -> None:
        builder, rel = self._builder, self._builder_rel
        self._builder = None
        size, checksum, footer_checksum = builder.finish()
        self.store.put_file(builder.path, rel)
        self._shards.append(
            ShardEntry(
                path=rel,
                records=builder.records,
                tokens=builder.tokens,
                targets=builder.targets,
                bytes=size,
                checksum=checksum,
                chunk_records=builder.chunk_records,
                footer_checksum=footer_checksum,
            )
        )

    def _drain(self) -> None:
        """Encode and write everything added so far, and publish the shard being built."""
        self._flush_chunk()
        while self._in_flight:
            self._write_chunk(self._in_flight.popleft().result())
        if self._builder is not None:
            self._finish_shard()

    # -- checkpoints ---------------------------------------------------------------------
    def checkpoint(self, progress: dict) -> None:
        """Make every record added so far durable, with the caller's `progress` beside it.

        Publishes the shard being built (pending records are flushed into it first), then
        atomically replaces this writer's progress file with the shards published so far, the
        writer's identity and `progress` (any JSON-serialisable dict: the caller's position in
        its input). A run killed later resumes from here with `resume=True`; records added after
        the last checkpoint were never committed and must be added again.
        """
        if self._closed:
            raise CacheError("this CacheWriter is closed")
        state = as_json(progress, what="checkpoint progress")
        if not isinstance(state, dict):
            raise ValueError(f"checkpoint progress must be a dict, got {type(progress).__name__}")
        try:
            self._drain()
            record = Progress(
                identity=self._identity,
                shards=self._kept + self._shards,
                progress=state,
                generation=self.generation,
            )
            self.store.write_bytes(self.slot.progress_name, record.dumps())
        except BaseException:
            self.abort()
            raise
        self._checkpointed = len(self._shards)

    # -- commit --------------------------------------------------------------------------
    @property
    def manifest(self) -> Manifest:
        return Manifest(
            k=self.k,
            vocab_size=self.vocab_size,
            positions=self.positions,
            shards=self._kept + self._shards,
            columns=self._column_configs,
            teacher=self.teacher,
            tokenizer=self.tokenizer,
            metadata=self.metadata,
            created_by=f"logitcache {__version__}",
            created_at=now_iso(),
            rank=self.rank,
            world_size=self.world_size,
            lossy=None
            if self._lossy is None
            else {**self._lossy.config(), "measured": self._lossy.stats.to_json()},
        )

    @property
    def lossy_stats(self):
        """What lossy mode did so far (rows, exact rows, mean and max row KL); None if lossless."""
        return None if self._lossy is None else self._lossy.stats

    def close(self) -> Manifest:
        """Write what is pending, then the manifest (the commit). Returns the manifest.

        After the commit, the progress file and the shards of the cache (or partial) this one
        replaced are removed; a crash before the commit leaves the old one intact.
        """
        if self._closed:
            raise CacheError("this CacheWriter is already closed")
        try:
            self._drain()
            manifest = self.manifest
            self._check_published(manifest.shards)
            self.store.write_bytes(self._commit_name(), manifest.dumps())
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._pool.shutdown()
        self.store.remove(self.slot.progress_name)
        for rel in sorted(self._replaced - {s.path for s in manifest.shards}):
            self.store.remove(rel)
        return manifest

    def _check_published(self, shards: list[ShardEntry]) -> None:
        """Every shard about to be committed is there with its size: a second writer started
        on the same root by mistake clears this one's files, and must not yield a manifest
        that lists missing shards."""
        for entry in shards:
            try:
                size = self.store.size(entry.path)
            except FileNotFoundError:
                size = None
            if size != entry.bytes:
                raise CacheError(
                    f"{self.store.url}: shard {entry.path} this writer published is "
                    f"{'gone' if size is None else f'{size} bytes, not {entry.bytes}'}; was "
                    "another writer started on the same URL? Nothing was committed: run one "
                    "writer per URL (and rank), then write again"
                )

    def abort(self) -> None:
        """Drop what was written since the last checkpoint; nothing is committed.

        Checkpointed shards stay, with their progress file, for a later `resume=True`.
        """
        self._closed = True
        for future in self._in_flight:
            future.cancel()
        self._in_flight.clear()
        self._pool.shutdown(wait=True)
        if self._builder is not None:
            self._builder.abort()
            self._builder = None
        for entry in self._shards[self._checkpointed :]:
            self.store.remove(entry.path)
        del self._shards[self._checkpointed :]

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _check_rank(rank, world_size) -> None:
    for name, value in (("rank", rank), ("world_size", world_size)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"{name}={value!r}: must be an integer or None")
    if rank is None:
        if world_size is not None:
            raise ValueError(f"world_size={world_size}: needs rank= (this writer's rank)")
        return
    if world_size is None:
        raise ValueError(
            f"rank={rank} needs world_size= (the number of ranks), so that merge can tell "
            "when a rank is missing"
        )
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")


def _listed(store, name: str) -> set[str] | None:
    """Shard paths listed by the committed manifest `name`; None when there is none. A damaged
    manifest counts as committed but lists nothing (its shards are then left alone)."""
    if not store.exists(name):
        return None
    try:
        data = store.read_bytes(name, max_bytes=MAX_MANIFEST_BYTES)
        return {s.path for s in Manifest.loads(data, source=name).shards}
    except CacheError:
        return set()


def _int_array(value, name: str, index: int, *, ndim: int) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"record {index}: {name} has dtype {array.dtype}; pass integer token ids")
    if array.ndim != ndim:
        raise ValueError(f"record {index}: {name} has {array.ndim} dimensions, expected {ndim}")
    if array.size and (
        array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max
    ):
        raise ValueError(f"record {index}: {name} holds values that do not fit int32")
    return array


def _mask_array(value, index: int, t: int) -> np.ndarray:
    mask = np.asarray(value)
    if mask.ndim != 1 or mask.shape[0] != t:
        raise ValueError(
            f"record {index}: loss_mask has shape {mask.shape}, expected ({t},) like input_ids"
        )
    if mask.dtype != np.bool_:
        if not np.issubdtype(mask.dtype, np.integer) or (
            mask.size and (mask.min() < 0 or mask.max() > 1)
        ):
            raise ValueError(
                f"record {index}: loss_mask has dtype {mask.dtype}; pass booleans (or 0/1 integers)"
            )
        mask = mask.astype(np.bool_)
    if mask[0]:
        raise ValueError(
            f"record {index}: loss_mask[0] is true, but the first token has no context to be "
            "predicted from; set it to false"
        )
    return np.ascontiguousarray(mask)


def _logprob_array(value, index: int) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != 2:
        raise ValueError(f"record {index}: topk_logprobs has {array.ndim} dimensions, expected 2")
    if array.dtype == np.float16:
        return array
    if array.dtype not in (np.float32, np.float64):
        raise ValueError(
            f"record {index}: topk_logprobs has dtype {array.dtype}; pass float16, float32 or "
            "float64 log-probabilities"
        )
    if array.size and not np.isfinite(array).all():
        row, col = np.argwhere(~np.isfinite(array))[0]
        raise ValueError(
            f"record {index}: topk_logprobs row {row} column {col}: value "
            f"{array[row, col]} is not finite"
        )
    return np.maximum(array, _FP16_MIN).astype(np.float16)


def _sample_id_bytes(sample_id, index: int) -> bytes | None:
    if sample_id is None:
        return None
    if not isinstance(sample_id, str):
        raise ValueError(f"record {index}: sample_id must be a str or None, got {type(sample_id)}")
    data = sample_id.encode("utf-8")
    if len(data) > MAX_SAMPLE_ID_BYTES:
        raise ValueError(
            f"record {index}: sample_id is {len(data)} bytes, the limit is {MAX_SAMPLE_ID_BYTES}"
        )
    return data


__all__ = ["CacheWriter", "COLUMN_ORDER"]
