"""`kd cache`: run a teacher once over SFT data and store its top-K in a logit cache.

Three stages run at once, joined by bounded queues: a loader thread turns rows into examples
and token-budget batches (kd.teacher_batching); the calling thread runs the teacher
(kd.scoring); a writer thread hands each batch's records to the CacheWriter, which encodes
chunks on threads of its own, so the device never waits on compression. The writer
checkpoints every few minutes, and a killed run resumes after the last checkpointed batch: the
batch order is a function of the data and the options, which the checkpoint's identity pins.
Under torchrun, or with several devices, every rank does this for its share of the rows
(kd.ranks).
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from logitcache import CacheError, CacheWriter
from logitcache.identity import tokenizer_identity
from logitcache.writer import DEFAULT_CHUNK_BYTES, DEFAULT_SHARD_BYTES

from .data import (
    OVERFLOW_POLICIES,
    ROW_FORMATS,
    DataStats,
    ExampleBuilder,
    count_rows,
    iter_examples,
    source_fingerprint,
)
from .models import LoadedModel, embedding_rows, load_model
from .ranks import Group, Ranks, from_env, run_per_device
from .teacher_batching import POSITIONS, Batch, token_budget_batches

# Padded tokens per batch when --batch-tokens is not given.
DEFAULT_BATCH_TOKENS = {"cuda": 16384, "cpu": 4096}
# Batches in flight between the stages: enough to hide a slow moment, few enough to bound memory.
QUEUE_DEPTH = 4


@dataclass
class CacheOptions:
    """How a teacher pass runs: the keyword arguments of `cache_teacher`, `kd cache`'s options.

    Those that change which records are written, or their order, are recorded in the
    manifest's metadata (`kd_cache.options`), and a resumed run must repeat them.
    """

    k: int = 100  # top-K entries stored per target position
    positions: str = "supervised"  # "supervised": targets only; "all": every position p >= 1
    max_length: int | None = None  # tokens per example; default: the teacher's context length
    overflow: str = "truncate"  # longer examples: "truncate" (keep the start) or "skip"
    row_format: str = "auto"  # force one row shape: messages, prompt_response, text, tokens
    chat_template: bool = False  # prompt/response rows through the tokenizer's chat template
    add_eos: bool = True  # append EOS to prompt/response examples (a target)
    skip_bad_rows: bool = False  # count and skip malformed rows instead of stopping
    limit: int | None = None  # read only the first LIMIT rows of the data
    tokenizer: str | None = None  # where the tokenizer comes from (default: the teacher's)
    device: str | None = None  # default: cuda (cuda:LOCAL_RANK under torchrun) if present, cpu
    devices: list[str] | None = None  # several: one process per device on this machine
    dtype: str | None = None  # default: bfloat16 on CUDA, float32 on CPU
    threads: int | None = None  # torch CPU threads (default: torch's, one per core)
    batch_tokens: int | None = None  # padded tokens per batch (default 16384 CUDA, 4096 CPU)
    max_batch_size: int | None = None  # examples per batch at most
    sort_window: int = 2048  # examples sorted by length together
    row_chunk: int | None = None  # lm_head rows per chunk (default: 1 GiB CUDA, 256 MiB CPU)
    resume: bool = False  # continue an interrupted run at `out` (starts fresh if there is none)
    overwrite: bool = False  # replace a committed cache at `out` (with resume: continue doing so)
    checkpoint_seconds: float = 600.0  # make the records so far durable this often
    checkpoint_batches: int | None = None  # ... or every N batches, whichever comes first
    storage_options: dict | None = None  # fsspec options for `out`
    data_storage_options: dict | None = None  # fsspec options for `data`
    trust_remote_code: bool = False  # run code shipped with the model (off: never by default)
    progress: bool = True  # a tqdm bar on rank 0
    lossy_kl: float | None = None  # lossy cache: every row within this KL (nats); logitcache.lossy
    lossy_truncate: bool = True  # lossy rows may be cut short where their tail is light
    # The cache's layout (default: the writer's). Smaller chunks make random reads faster,
    # larger ones scans and training loaders: benchmarks/bench_chunking.py measures both.
    chunk_bytes: int | None = None  # raw bytes a chunk holds before it is closed
    shard_bytes: int | None = None  # bytes a shard file holds before the next one starts


@dataclass
class CacheSummary:
    """What a teacher pass wrote (totals of the committed cache) and how fast."""

    url: str
    records: int
    tokens: int
    targets: int
    bytes: int
    shards: int
    ranks: int
    seconds: float  # wall time of this call, loading the teacher included
    scored_targets: int  # targets the teacher scored in this call (not the resumed ones)
    scoring_seconds: float = 0.0  # from the first batch to the commit (slowest rank)
    resumed_batches: int = 0  # batches a resumed run found committed (all ranks)
    already_complete: bool = False  # --resume found the finished cache: nothing to do
    data: dict = field(default_factory=dict)  # DataStats over all ranks
    teacher: dict = field(default_factory=dict)

    @property
    def target_tokens_per_s(self) -> float:
        """Targets scored per second of scoring and writing (teacher loading not counted)."""
        return self.scored_targets / self.scoring_seconds if self.scoring_seconds > 0 else 0.0

    def describe(self) -> list[str]:
        if self.already_complete:
            return [f"{self.url}: already complete ({self.records:,} records); nothing to do"]
        lines = [
            f"wrote {self.records:,} records ({self.tokens:,} tokens, {self.targets:,} targets, "
            f"{self.bytes / 2**20:,.1f} MiB in {self.shards} shards) to {self.url}",
            f"{self.scored_targets:,} targets scored in {self.scoring_seconds:,.1f} s "
            f"({self.target_tokens_per_s:,.0f} target tokens/s"
            + (f" over {self.ranks} ranks" if self.ranks > 1 else "")
            + f"); {self.seconds:,.1f} s in all",
        ]
        if self.resumed_batches:
            lines.append(f"resumed after {self.resumed_batches:,} committed batches")
        stats = DataStats(**{k: v for k, v in self.data.items() if k != "first_bad"})
        stats.first_bad = list(self.data.get("first_bad", []))
        lines.append("data: " + stats.summary())
        return lines


def cache_teacher(teacher: str | LoadedModel, data: str, out: str, **options: Any) -> CacheSummary:
    """Run `teacher` over the SFT rows at `data` and write its top-K logprobs to `out`.

    `teacher` is a transformers directory (safetensors), a .gguf file, or a LoadedModel
    already in memory. `data` and `out` are paths or fsspec URLs. `options` are the fields of
    CacheOptions. Under torchrun each rank writes its share and rank 0 commits the cache;
    `devices=[...]` with several entries starts one process per device instead.
    Returns the summary of the committed cache (on every rank).
    """
    names = {f.name for f in fields(CacheOptions)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"cache_teacher: unknown options {unknown}; see kd.teacher.CacheOptions")
    opts = CacheOptions(**options)
    _check_options(opts)
    if opts.devices and len(opts.devices) > 1:
        if not isinstance(teacher, str):
            raise ValueError("devices=[...] starts new processes: pass the teacher as a path")
        if from_env().distributed:
            raise ValueError(
                "devices=[...] starts its own ranks; under torchrun pass device= (or nothing)"
            )
        started = time.perf_counter()
        child = asdict(replace(opts, devices=None, device=None))
        summary = run_per_device(_cache_on_device, list(opts.devices), teacher, data, out, child)
        summary.seconds = time.perf_counter() - started
        return summary
    if opts.devices:
        opts = replace(opts, device=opts.devices[0], devices=None)
    return _TeacherPass(teacher, data, out, opts).run()


def _cache_on_device(teacher: str, data: str, out: str, options: dict, *, device: str):
    return _TeacherPass(teacher, data, out, CacheOptions(**{**options, "device": device})).run()


def _check_options(opts: CacheOptions) -> None:
    if not isinstance(opts.k, int) or opts.k < 1:
        raise ValueError(f"k={opts.k!r}: must be a positive integer")
    if opts.positions not in POSITIONS:
        raise ValueError(f"positions={opts.positions!r}: choose one of {POSITIONS}")
    if opts.overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow={opts.overflow!r}: choose one of {OVERFLOW_POLICIES}")
    if opts.row_format not in ROW_FORMATS:
        raise ValueError(f"row_format={opts.row_format!r}: choose one of {ROW_FORMATS}")
    for name in (
        "limit",
        "batch_tokens",
        "max_batch_size",
        "row_chunk",
        "checkpoint_batches",
        "chunk_bytes",
        "shard_bytes",
    ):
        value = getattr(opts, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r}: must be a positive integer")
    if opts.max_length is not None and opts.max_length < 2:
        raise ValueError(f"max_length={opts.max_length}: must be at least 2")
    if opts.sort_window < 1:
        raise ValueError(f"sort_window={opts.sort_window}: must be at least 1")
    if not opts.checkpoint_seconds > 0:
        raise ValueError(f"checkpoint_seconds={opts.checkpoint_seconds}: must be positive")
    if opts.lossy_kl is not None and not opts.lossy_kl > 0:
        raise ValueError(f"lossy_kl={opts.lossy_kl!r}: must be a positive budget in nats")


# --------------------------------------------------------------------------------------------
# One rank's pass


class _TeacherPass:
    def __init__(self, teacher: str | LoadedModel, data: str, out: str, opts: CacheOptions):
        self.teacher, self.data, self.out, self.opts = teacher, data, out, opts
        self.ranks: Ranks = from_env()
        self.stats = DataStats()

    def run(self) -> CacheSummary:
        import torch

        threads = torch.get_num_threads()
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)  # --threads is for this pass, not the process

    def _run(self) -> CacheSummary:
        started = time.perf_counter()
        with Group(self.ranks) as group:
            self._load()
            self._describe()
            finished = self._finished() if self.opts.resume else None
            resumed = scored = 0
            seconds = 0.0
            if finished is None:
                resumed, scored, seconds = self._score_and_write()
            elif finished == "rank":  # committed before: count its rows and batches only
                resumed = sum(1 for _ in self._batches())
            stats = group.all_gather(asdict(self.stats))
            resumed = sum(group.all_gather(resumed))
            scored = sum(group.all_gather(scored))
            seconds = max(group.all_gather(seconds))
            group.barrier()  # every rank has committed its partial manifest
            if self.ranks.distributed and self.ranks.rank == 0 and finished != "cache":
                from logitcache.merge import merge_partials

                merge_partials(self.out, self.opts.storage_options)
            group.barrier()  # the merged manifest is there for everyone to read
        summary = self._summary(resumed, scored, complete=finished == "cache")
        summary.data = _sum_stats(stats)
        summary.scoring_seconds = seconds
        summary.seconds = time.perf_counter() - started
        return summary

    # -- set-up --------------------------------------------------------------------------
    def _load(self) -> None:
        import torch

        opts = self.opts
        if opts.threads:
            torch.set_num_threads(opts.threads)
        if isinstance(self.teacher, LoadedModel):
            self.loaded = self.teacher
            weight = next(self.loaded.model.parameters())
            self.device = weight.device
            asked = torch.device(opts.device) if opts.device else None
            if asked is not None and (
                asked.type != self.device.type or asked.index not in (None, self.device.index)
            ):
                raise ValueError(
                    f"device={opts.device!r}, but the loaded teacher is on {self.device}; move "
                    "it first, or leave device out"
                )
            if opts.dtype is not None and getattr(torch, opts.dtype, None) != weight.dtype:
                raise ValueError(
                    f"dtype={opts.dtype!r}, but the loaded teacher is in {weight.dtype}; convert "
                    "it first, or leave dtype out"
                )
        else:
            self.device = torch.device(_default_device(opts.device, self.ranks))
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            self.loaded = load_model(
                self.teacher,
                device=str(self.device),
                dtype=opts.dtype,
                tokenizer=opts.tokenizer,
                trust_remote_code=opts.trust_remote_code,
            )
        from .scoring import HostCopies, TopKScorer

        model = self.loaded.model
        self.vocab_rows = embedding_rows(model)
        self.scorer = TopKScorer(model, k=opts.k, row_chunk=opts.row_chunk)
        self.copies = HostCopies(self.device)
        context = getattr(model.config, "max_position_embeddings", None)
        self.max_length = opts.max_length or context
        if context and self.max_length > context:
            raise ValueError(
                f"max_length={self.max_length} exceeds the teacher's context length {context}; "
                f"pass --max-length {context} or less"
            )
        tok = self.loaded.tokenizer
        self.builder = ExampleBuilder(
            tok,
            max_length=self.max_length,
            overflow=opts.overflow,
            chat_template=opts.chat_template,
            row_format=opts.row_format,
            add_eos=opts.add_eos,
        )
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        kind = "cuda" if self.device.type == "cuda" else "cpu"
        self.batch_tokens = opts.batch_tokens or DEFAULT_BATCH_TOKENS[kind]

    def _describe(self) -> None:
        """The identity the manifest records and a resumed run must match."""
        opts = self.opts
        self.teacher_identity = dict(self.loaded.identity)
        source = opts.tokenizer or self.loaded.source
        self.tokenizer_identity = tokenizer_identity(
            self.loaded.tokenizer, name=os.path.basename(os.path.normpath(source))
        )
        self.metadata = {
            "kd_cache": {
                "data": {
                    "url": self.data if "://" in self.data else os.path.abspath(self.data),
                    "fingerprint": source_fingerprint(self.data, opts.data_storage_options),
                },
                "options": {
                    "max_length": self.max_length,
                    "overflow": opts.overflow,
                    "row_format": opts.row_format,
                    "chat_template": opts.chat_template,
                    "add_eos": opts.add_eos,
                    "skip_bad_rows": opts.skip_bad_rows,
                    "limit": opts.limit,
                    "batch_tokens": self.batch_tokens,
                    "max_batch_size": opts.max_batch_size,
                    "sort_window": opts.sort_window,
                },
            }
        }

    # -- the pass ------------------------------------------------------------------------
    def _score_and_write(self) -> tuple[int, int, float]:
        """Score this rank's share into its writer; (batches resumed, targets scored, seconds)."""
        opts, ranks = self.opts, self.ranks
        started = time.perf_counter()
        if opts.resume:
            self._check_checkpoint()
        writer = CacheWriter(
            self.out,
            k=opts.k,
            vocab_size=self.vocab_rows,
            positions=opts.positions,
            storage_options=opts.storage_options,
            teacher=self.teacher_identity,
            tokenizer=self.tokenizer_identity,
            metadata=self.metadata,
            rank=ranks.rank if ranks.distributed else None,
            world_size=ranks.world_size if ranks.distributed else None,
            overwrite=opts.overwrite,
            resume=opts.resume,
            lossy_kl=opts.lossy_kl,
            lossy_truncate=opts.lossy_truncate,
            chunk_bytes=opts.chunk_bytes or DEFAULT_CHUNK_BYTES,
            shard_bytes=opts.shard_bytes or DEFAULT_SHARD_BYTES,
        )
        resumed = writer.resumed_progress or {}
        skip = int(resumed.get("batches", 0))
        bar = self._progress_bar(int(resumed.get("examples", 0)))
        sink = _RecordSink(writer, opts, bar, resumed)
        loader = _Background(self._batches(), QUEUE_DEPTH, name="kd-cache-loader")
        writing = _Consumer(sink.write, QUEUE_DEPTH, name="kd-cache-writer")
        skipped = {"examples": 0, "targets": 0}
        checked = False
        scored = 0
        try:
            for batch in loader:
                if not checked:  # once, on real input, before any result is relied upon
                    self.scorer.check_against_forward(batch.examples[0].input_ids)
                    checked = True
                if batch.index < skip:
                    skipped["examples"] += len(batch.examples)
                    skipped["targets"] += batch.targets
                    continue
                if skip and batch.index == skip:
                    _check_skipped(skipped, resumed, self.out)
                input_ids = self.copies.to_device(batch.input_ids)
                rows = self.copies.to_device(batch.rows)
                ids, logprobs = self.scorer.score(input_ids, rows)
                writing.put((batch, self.copies.start([ids, logprobs])))
                scored += batch.targets
            if skip:
                _check_skipped(skipped, resumed, self.out, final=True)
            if not ranks.distributed and self.stats.examples == 0:
                raise ValueError(f"{self.data}: nothing to score: {self.stats.summary()}")
            writing.finish()
            bar.update(self.stats.rows - self.stats.examples)  # rows that made no example
            writer.close()
        except BaseException:
            loader.close()
            writing.abandon()
            writer.abort()  # what was checkpointed stays, for --resume
            raise
        finally:
            bar.close()
        return skip, scored, time.perf_counter() - started

    def _batches(self) -> Iterator[Batch]:
        opts, ranks = self.opts, self.ranks
        examples = iter_examples(
            self.data,
            self.builder,
            storage_options=opts.data_storage_options,
            skip_bad_rows=opts.skip_bad_rows,
            stats=self.stats,
            max_rows=opts.limit,
            part=(ranks.rank, ranks.world_size) if ranks.distributed else None,
        )
        return token_budget_batches(
            examples,
            batch_tokens=self.batch_tokens,
            positions=opts.positions,
            max_batch_size=opts.max_batch_size,
            sort_window=opts.sort_window,
            pad_id=self.pad_id,
        )

    def _progress_bar(self, initial: int):
        """A bar of examples on rank 0. Its total (the rows of this rank's share) is counted on
        a thread, so a run over a large remote data set starts at once and gains its ETA when
        the count arrives."""
        from tqdm.auto import tqdm

        enabled = self.opts.progress and self.ranks.rank == 0
        desc = "kd cache" + (f" rank 0/{self.ranks.world_size}" if self.ranks.distributed else "")
        bar = tqdm(initial=initial, unit="ex", desc=desc, disable=not enabled, dynamic_ncols=True)
        if enabled:

            def count() -> None:
                try:
                    rows = count_rows(self.data, self.opts.data_storage_options)
                except (OSError, ValueError):
                    return  # the loader reports a data problem itself
                if self.opts.limit is not None:
                    rows = min(rows, self.opts.limit)
                bar.total = len(range(self.ranks.rank, rows, self.ranks.world_size))
                bar.refresh()

            threading.Thread(target=count, name="kd-cache-count", daemon=True).start()
        return bar

    # -- endings -------------------------------------------------------------------------
    def _finished(self) -> str | None:
        """With resume: "cache" when `out` holds the finished cache of this same job, "rank"
        when this rank committed its share of it and only the merge is missing, else None.

        A finished cache of another job is an error unless overwrite is given (then the writer
        resumes, or starts, the replacement)."""
        from logitcache.format import MANIFEST_NAME
        from logitcache.layout import WriterSlot
        from logitcache.manifest import read_manifest
        from logitcache.storage import open_store

        store = open_store(self.out, self.opts.storage_options)
        if store.exists(MANIFEST_NAME):
            if self._same_job(read_manifest(store), store.url, fail=not self.opts.overwrite):
                return "cache"
            return None
        if self.ranks.distributed:
            name = WriterSlot(self.ranks.rank).commit_name
            if store.exists(name):
                partial = read_manifest(store, name=name)
                if partial.world_size == self.ranks.world_size and self._same_job(
                    partial, store.url, fail=False
                ):
                    return "rank"
        return None

    def _identity(self) -> dict:
        """What a resumed run must share with the interrupted one (and a finished cache with
        this job), in the shape the writer records it."""
        return {
            "k": self.opts.k,
            "positions": self.opts.positions,
            "teacher": self.teacher_identity,
            "tokenizer": self.tokenizer_identity,
            "metadata": {"kd_cache": self.metadata["kd_cache"]},
        }

    def _same_job(self, manifest, where: str, *, fail: bool) -> bool:
        recorded = {
            "k": manifest.k,
            "positions": manifest.positions,
            "teacher": manifest.teacher,
            "tokenizer": manifest.tokenizer,
            "metadata": {"kd_cache": manifest.metadata.get("kd_cache")},
        }
        difference = _first_difference(recorded, self._identity())
        if difference is not None and fail:
            raise CacheError(
                f"{where}: cannot resume: the committed cache there was written with "
                f"{difference}; write to a new --out, or pass --overwrite to replace it"
            )
        return difference is None

    def _check_checkpoint(self) -> None:
        """Name the exact field when a checkpoint of another job is in the way of --resume
        (the writer refuses it too, but names only the top-level field)."""
        from logitcache.layout import WriterSlot
        from logitcache.progress import read_progress
        from logitcache.storage import open_store

        store = open_store(self.out, self.opts.storage_options)
        slot = WriterSlot(self.ranks.rank if self.ranks.distributed else None)
        progress = read_progress(store, slot.progress_name)
        if progress is None:
            return
        recorded = {key: progress.identity.get(key) for key in self._identity()}
        recorded["metadata"] = {"kd_cache": (recorded["metadata"] or {}).get("kd_cache")}
        difference = _first_difference(recorded, self._identity())
        if difference is not None:
            raise CacheError(
                f"{store.url}: cannot resume: the interrupted run was started with "
                f"{difference}; resume it with the same data, teacher and options, or pass "
                "--overwrite (without --resume) to start over"
            )

    def _summary(self, resumed: int, scored: int, *, complete: bool) -> CacheSummary:
        from logitcache.manifest import read_manifest
        from logitcache.storage import open_store

        manifest = read_manifest(open_store(self.out, self.opts.storage_options))
        return CacheSummary(
            url=self.out,
            records=manifest.records,
            tokens=manifest.tokens,
            targets=manifest.targets,
            bytes=manifest.bytes,
            shards=len(manifest.shards),
            ranks=self.ranks.world_size,
            seconds=0.0,
            scored_targets=scored,
            resumed_batches=resumed,
            already_complete=complete,
            teacher=dict(self.teacher_identity),
        )


def _first_difference(recorded: Any, now: Any, path: str = "") -> str | None:
    """'FIELD = X, not Y now' for the first leaf where two JSON-like values differ."""
    if isinstance(recorded, dict) and isinstance(now, dict):
        for key in sorted(set(recorded) | set(now)):
            found = _first_difference(recorded.get(key), now.get(key), f"{path}.{key}")
            if found:
                return found
        return None
    if recorded == now:
        return None
    return f"{path.lstrip('.')} = {_short(recorded)}, not {_short(now)} as now"


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _default_device(device: str | None, ranks: Ranks) -> str:
    import torch

    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        return device
    if torch.cuda.is_available():
        return f"cuda:{ranks.local_rank % torch.cuda.device_count()}"
    return "cpu"


def _check_skipped(skipped: dict, resumed: dict, out: str, *, final: bool = False) -> None:
    """The batches a resumed run skips must hold exactly what the checkpoint says it wrote."""
    want = {key: int(resumed.get(key, -1)) for key in skipped}
    if skipped != want:
        raise CacheError(
            f"{out}: cannot resume: the checkpoint covers {want['examples']:,} examples "
            f"({want['targets']:,} targets) but the same batches now hold "
            f"{skipped['examples']:,} ({skipped['targets']:,}); the data or the batching "
            "changed without changing the recorded identity: start over with --overwrite"
            + (" (the data ended before the checkpoint's last batch)" if final else "")
        )


def _sum_stats(per_rank: list[dict]) -> dict:
    total: dict[str, Any] = {}
    for stats in per_rank:
        for key, value in stats.items():
            if key == "first_bad":
                total[key] = (total.get(key, []) + list(value))[:5]
            else:
                total[key] = total.get(key, 0) + value
    return total


class _RecordSink:
    """The writer thread's job: records of each scored batch into the cache, and checkpoints."""

    def __init__(self, writer: CacheWriter, opts: CacheOptions, bar, resumed: dict):
        self.writer, self.opts, self.bar = writer, opts, bar
        self.batches = int(resumed.get("batches", 0))
        self.examples = int(resumed.get("examples", 0))
        self.targets = int(resumed.get("targets", 0))
        self.new_targets = 0
        self.started = time.perf_counter()
        self.last_checkpoint = (self.started, self.batches)

    def write(self, item: tuple[Batch, Any]) -> None:
        batch, pending = item
        ids, logprobs = pending.result()
        start = 0
        for example, n in zip(batch.examples, batch.row_counts, strict=True):
            try:
                self.writer.add(
                    input_ids=example.input_ids,
                    loss_mask=example.loss_mask,
                    topk_ids=ids[start : start + n],
                    topk_logprobs=logprobs[start : start + n],
                    sample_id=example.sample_id,
                )
            except ValueError as exc:
                raise ValueError(
                    f"example {example.sample_id!r}: the cache refused the teacher's output "
                    f"({exc}); a teacher that overflows in float16 needs --dtype bfloat16 or "
                    "float32"
                ) from None
            start += n
        self.batches = batch.index + 1
        self.examples += len(batch.examples)
        self.targets += batch.targets
        self.new_targets += batch.targets
        elapsed = time.perf_counter() - self.started
        self.bar.set_postfix_str(f"{self.new_targets / max(elapsed, 1e-9):,.0f} tgt/s", False)
        self.bar.update(len(batch.examples))
        when, done = self.last_checkpoint
        now = time.perf_counter()
        every = self.opts.checkpoint_batches
        if now - when >= self.opts.checkpoint_seconds or (every and self.batches - done >= every):
            self.writer.checkpoint(
                {"batches": self.batches, "examples": self.examples, "targets": self.targets}
            )
            self.last_checkpoint = (time.perf_counter(), self.batches)


# --------------------------------------------------------------------------------------------
# Stages on threads


class _Background:
    """Iterate `items` on a thread, `depth` ahead of the consumer; errors reach the consumer."""

    _END = object()

    def __init__(self, items: Iterable, depth: int, *, name: str):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), name=name, daemon=True)
        self._thread.start()

    def _run(self, items: Iterable) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(_Failure(exc))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator:
        while True:
            item = self._queue.get()
            if item is self._END:
                self._thread.join()
                return
            if isinstance(item, _Failure):
                self._thread.join()
                raise item.exc
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class _Consumer:
    """Call `fn(item)` on a thread for each item put, in order; `depth` items may wait.

    A failure in `fn` stops the consumer and is raised by the next `put` or by `finish`.
    """

    _END = object()

    def __init__(self, fn, depth: int, *, name: str):
        self._fn = fn
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is self._END:
                return
            try:
                self._fn(item)
            except BaseException as exc:
                self._error = exc
                return

    def put(self, item) -> None:
        while True:
            self._raise_error()
            if not self._thread.is_alive():
                raise RuntimeError("the writer thread stopped")
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Wait until every item put has been handled; raise the consumer's error if any."""
        self.put(self._END)
        self._thread.join()
        self._raise_error()

    def abandon(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


@dataclass
class _Failure:
    exc: BaseException
