"""`kd train`: a student learns from a logit cache (top-K KD + SFT cross-entropy).

`train(config)` reads top to bottom: set up the processes, check the student against the cache,
build the stream of micro-batches, wrap the model (DDP / FSDP2 under torchrun), then loop over
optimizer steps with periodic eval and checkpoints. The pieces live in their own modules:
config (keys), student (loading, checks, the wrapped forward), batching / packing (micro-batch
stream and layouts), distributed, checkpoint, evaluate and metrics.

Loss normalisation: every optimizer step averages over all target tokens of the step, across
its micro-batches and ranks (not a mean of per-batch means), so gradient accumulation and the
number of ranks change nothing but speed. The counts are all-reduced before the backward.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from logitcache.format import CacheError
from logitcache.loader import (
    DEFAULT_SHUFFLE_WINDOW_BYTES,
    LogitCacheDataset,
    LogitCacheLoader,
)

from . import checkpoint as ckpt
from .batching import GroupCollator, MicroBatchStream, micro_batches_per_epoch
from .config import TrainConfig, to_dict, write_config
from .distributed import (
    Ranks,
    all_reduce_sum,
    barrier,
    clip_grad_norm,
    gradient_sync,
    init_ranks,
    shutdown,
    wrap_model,
)
from .evaluate import EvalSet, evaluate, load_eval_set
from .losses import gather_target_rows, kd_sft_loss
from .metrics import (
    METRICS_FILE,
    PLOT_FILE,
    SUMMARY_FILE,
    MetricsLog,
    format_summary,
    plot_losses,
    write_summary,
)
from .mixture import MixtureCollator, MixtureDataset, MixtureStream
from .packing import check_packing_support
from .source_loss import SourcesLoss, SourceSums, StepCounts, step_counts
from .stages import Source, Stage, comparable, plan_stages
from .student import Student, StudentWithHead, check_against_cache, load_student

RUN_CONFIG = "run.toml"
MODEL_DIR = "model"
STAGES_DIR = "stages"  # the model at the end of each stage, by stage name
# Keys that may change when a run is resumed: they do not touch the model, data order or math.
RESUMABLE_CHANGES = frozenset(
    {
        "output_dir",
        "cache",
        "storage_options",
        "cache_dir",
        "eval_data",
        "eval_every",
        "eval_at_start",
        "eval_max_records",
        "eval_batch_size",
        "eval_max_length",
        "eval_chat_template",
        "log_every",
        "save_every",
        "keep_checkpoints",
        "plot",
        "threads",
        "overwrite",
        "prefetch_factor",
        "device",
        "loss_chunk_rows",
    }
)


@dataclass
class TrainResult:
    output_dir: str
    model_dir: str  # the final student (a transformers directory)
    checkpoint: str  # the final checkpoint
    steps: int
    summary: dict[str, Any]


def train(config: TrainConfig, *, resume: str | None = None, progress: bool = True) -> TrainResult:
    """Run `config`; `resume` ("latest", a step or a checkpoint path) continues a run exactly.

    Under torchrun every process calls this; rank 0 writes the files. Raises ValueError (or
    CacheError / OSError) with the key or file and the fix, before any step, when the student,
    cache, eval data or output directory do not fit together.
    """
    ranks = init_ranks(config.device)
    threads = torch.get_num_threads()
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        return _train(config, ranks, resume, progress)
    finally:
        torch.set_num_threads(threads)
        shutdown(ranks)


def warn_if_truncated_lossy(manifest, config: TrainConfig, *, where: str = "") -> None:
    """Rows a lossy cache cut short give a loss over the stored ids no signal on the ids they
    left out; only `tail` puts the student's mass on those into the outside bucket it trains.
    benchmarks/bench_lossy.py measured the difference (results/bench_lossy*.json)."""
    lossy = manifest.lossy or {}
    where = where or f"cache {config.cache}"
    if config.kd_weight > 0 and lossy.get("truncation") and config.mode != "tail":
        warnings.warn(
            f"{where} is lossy with rows cut short (budget {lossy.get('kl_budget')} "
            f"nats): in mode {config.mode!r} the student learns nothing about the ids a row "
            "left out, which raised held-out KL in benchmarks/bench_lossy.py; train with "
            "mode='tail', or write the cache with --lossy-no-truncation",
            stacklevel=2,
        )


def _train(config: TrainConfig, ranks: Ranks, resume: str | None, progress: bool) -> TrainResult:
    out = config.output_dir
    resumed = prepare_output_dir(config, resume, ranks)
    seed_everything(config.seed)
    stages = plan_stages(config)  # one stage unless the config lists stages

    # -- 1. The caches, the student and the held-out data, checked against each other -----------
    datasets = [
        [open_source_dataset(stage, source) for source in stage.sources] for stage in stages
    ]
    student = load_student(
        resumed.path if resumed else config.student,
        init="pretrained" if resumed else config.student_init,
        tokenizer="" if resumed else config.tokenizer,
        seed=config.seed,
    )
    vocab_size = max(
        check_against_cache(
            dataset.cache.manifest,
            student,
            vocab_size=config.vocab_size,
            ignore_tokenizer_mismatch=config.ignore_tokenizer_mismatch,
            ignore_vocab_mismatch=config.ignore_vocab_mismatch,
            where=source_label(stage, source),
        )
        for stage, stage_datasets in zip(stages, datasets, strict=True)
        for source, dataset in zip(stage.sources, stage_datasets, strict=True)
    )
    for stage, stage_datasets in zip(stages, datasets, strict=True):
        for source, dataset in zip(stage.sources, stage_datasets, strict=True):
            warn_if_truncated_lossy(
                dataset.cache.manifest, source.config, where=source_label(stage, source)
            )
    eval_set = open_eval_set(config, student) if config.eval_data else None
    if config.packing:
        check_packing_support(student.model, vocab_rows=vocab_size)

    # -- 2. How many optimizer steps each stage takes ---------------------------------------------
    ends = list(
        itertools.accumulate(stage_steps(s, d) for s, d in zip(stages, datasets, strict=True))
    )
    starts, max_steps = [0, *ends[:-1]], ends[-1]

    # -- 3. The model on its device, wrapped; optimizer -------------------------------------------
    device = ranks.device
    autocast_dtype = autocast_dtype_for(config, device)
    student.model.to(device)
    if config.gradient_checkpointing:
        enable_activation_checkpointing(student.model)
    wrapped = wrap_model(
        StudentWithHead(student.model),
        student.model,
        config.distributed,
        ranks,
        bf16=autocast_dtype is not None,
    )
    if config.distributed == "fsdp" and ranks.distributed:
        autocast_dtype = None  # FSDP2's mixed-precision policy casts instead
    optimizer = build_optimizer(wrapped, config)

    step, totals = 0, {"tokens": 0, "records": 0, "elapsed_s": 0.0}
    stream = None  # the current stage's micro-batches
    if resumed:
        for group in optimizer.param_groups:  # saved groups carry the scheduler's key
            group.setdefault("initial_lr", group["lr"])
        ckpt.restore_optimizer(wrapped, optimizer, resumed.optimizer)
        ckpt.restore_rank_rng(resumed, ranks.rank)
        step = resumed.step
        totals = {k: resumed.state["totals"][k] for k in totals}
    else:
        seed_everything(config.seed + 1_000_003 * ranks.rank)  # per-rank dropout streams

    if ranks.is_main:
        write_config(config, os.path.join(out, RUN_CONFIG))
    metrics = MetricsLog(out, enabled=ranks.is_main, resume_step=step if resumed else None)
    staged = bool(config.stages)  # stage names go into the metrics and checkpoints

    def stage_at(at_step: int) -> Stage:
        return stages[min(bisect.bisect_left(ends, at_step), len(stages) - 1)]

    def run_eval(at_step: int) -> dict[str, Any]:
        result = evaluate(
            wrapped,
            eval_set,
            batch_size=config.eval_batch_size or config.batch_size,
            vocab_size=vocab_size,
            device=device,
            rank=ranks.rank,
            world_size=ranks.world_size,
            autocast_dtype=autocast_dtype,
            all_reduce=lambda values: all_reduce_sum(values, ranks),
        )
        record = {
            "kind": "eval",
            "step": at_step,
            **({"stage": stage_at(at_step).name} if staged else {}),
            "eval_ce": result.ce,
            "eval_kd": result.kl,
            "eval_accuracy": result.accuracy,
            "eval_targets": result.targets,
        }
        metrics.write(record)
        return record

    def save(at_step: int) -> ckpt.SavedCheckpoint:
        stage = stage_at(at_step)
        return ckpt.save_checkpoint(
            out,
            at_step,
            wrapped=wrapped,
            student=student,
            optimizer=optimizer,
            scheduler=scheduler,
            rank_state={
                "stream": stream.state_dict() if stream else resumed.rank(ranks.rank)["stream"]
            },
            trainer_state={
                "totals": totals,
                "world_size": ranks.world_size,
                "config": to_dict(config),
                "stage": {
                    "index": stage.index,
                    "name": stage.name,
                    "step": at_step - starts[stage.index],
                },
            },
            ranks=ranks,
            keep=config.keep_checkpoints,
        )

    # -- 4. The loop: stage by stage, optimizer step by optimizer step ----------------------------
    from tqdm.auto import tqdm

    bar = tqdm(
        total=max_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=not (progress and ranks.is_main),
        dynamic_ncols=True,
    )
    last_eval = None
    if eval_set is not None and config.eval_at_start and step == 0:
        last_eval = run_eval(0)
    saved = None
    scheduler = None
    if resumed and step >= max_steps:  # nothing left to run: the end re-saves the state read
        scheduler = stage_scheduler(optimizer, stages[-1].config, max_steps - starts[-1])
        scheduler.load_state_dict(resumed.scheduler)
    for stage, end in zip(stages, ends, strict=True):
        if step >= end:
            continue  # finished before the checkpoint this run resumed from
        first, sources = starts[stage.index], stage.sources
        stream = build_stream(stage, datasets[stage.index], ranks, student)
        scheduler = stage_scheduler(optimizer, stage.config, end - first)
        if resumed and step > first:  # the checkpoint lies inside this stage
            scheduler.load_state_dict(resumed.scheduler)
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
                group["lr"] = lr
            stream.load_state_dict(resumed.rank(ranks.rank)["stream"])
        if staged:
            bar.set_description(f"train {stage.name}")
        window = StepWindow()
        per_source = SourceSums([s.name for s in sources]) if stage.mixture else None
        tick = time.perf_counter()
        while step < end:
            micro_batches = [next(stream) for _ in range(config.grad_accum)]
            counts = StepCounts.from_list(
                all_reduce_sum(step_counts(micro_batches, len(sources)), ranks), len(sources)
            )
            targets = counts.total_targets
            # Each source's rows are scored with its own settings, all normalised by the
            # step's target tokens (kd.source_loss); one source is the plain StepLoss.
            loss_head = SourcesLoss(
                [
                    StepLoss(s.config, vocab_size, targets, targets, ranks.world_size)
                    for s in sources
                ]
            )

            optimizer.zero_grad(set_to_none=True)
            kd_sums, ce_sums = [0.0] * len(sources), [0.0] * len(sources)
            for i, batch in enumerate(micro_batches):
                batch = to_device(batch, device)
                with gradient_sync(wrapped, enabled=i == len(micro_batches) - 1):
                    with autocast(device, autocast_dtype):
                        loss = wrapped(batch, loss_head)
                    loss.total.backward()
                for s in range(len(sources)):
                    kd_sums[s] += loss.kd[s]
                    ce_sums[s] += loss.ce[s]
            grad_norm = clip_grad_norm(wrapped.parameters(), config.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step += 1

            sums = all_reduce_sum(kd_sums + ce_sums, ranks)
            kd_sums, ce_sums = sums[: len(sources)], sums[len(sources) :]
            rows = sum(counts.rows)
            kd = sum(kd_sums) / rows if rows else None
            ce = sum(ce_sums) / targets if targets else 0.0
            step_loss = sum(
                s.config.kd_weight * (kd_sums[i] / targets)
                + s.config.sft_weight * (ce_sums[i] / targets)
                for i, s in enumerate(sources)
                if targets
            )
            now = time.perf_counter()
            totals["elapsed_s"] += now - tick
            totals["tokens"] += counts.tokens
            totals["records"] += sum(counts.records)
            window.add(
                loss=step_loss,
                kd=kd,
                ce=ce,
                tokens=counts.tokens,
                slots=counts.slots,
                seconds=now - tick,
            )
            if per_source is not None:
                per_source.add(kd_sums, ce_sums, counts)
            tick = now
            if step % config.log_every == 0 or step == end:
                record = {
                    "kind": "train",
                    "step": step,
                    **({"stage": stage.name} if staged else {}),
                    "epoch": stream.epoch,
                    **window.means(),
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_seen": totals["tokens"],
                }
                if per_source is not None:
                    record["sources"] = per_source.means(stream.passes())
                    per_source = SourceSums([s.name for s in sources])
                metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                window = StepWindow()
            bar.update(1)
            if eval_set is not None and config.eval_every and step % config.eval_every == 0:
                last_eval = run_eval(step)
            if config.save_every and step % config.save_every == 0:
                saved = save(step)
            tick = time.perf_counter()  # eval and checkpoints are not training time

        if staged:  # the end of a stage: its eval, checkpoint and model
            if eval_set is not None and (last_eval is None or last_eval["step"] != step):
                last_eval = run_eval(step)
            if saved is None or saved.step != step:
                saved = save(step)
            if ranks.is_main:
                ckpt.export_model(saved.path, os.path.join(out, STAGES_DIR, stage.name))
        if step < max_steps:
            stream.close()
    bar.close()

    # -- 5. The end: final eval and checkpoint, the model directory, plot and summary -----------
    if eval_set is not None and (last_eval is None or last_eval["step"] != step):
        last_eval = run_eval(step)
    if saved is None or saved.step != step:
        saved = save(step)
    metrics.close()
    model_dir = os.path.join(out, MODEL_DIR)
    summary = {}
    if ranks.is_main:
        ckpt.export_model(saved.path, model_dir)
        final = last_train_record(out)
        summary = {
            "steps": step,
            "records": totals["records"],
            "tokens": totals["tokens"],
            "elapsed_s": totals["elapsed_s"],
            "tokens_per_s": totals["tokens"] / max(totals["elapsed_s"], 1e-9),
            "loss": final.get("loss"),
            "kd": final.get("kd"),
            "ce": final.get("ce"),
            "eval": last_eval,
            "model_dir": model_dir,
            "checkpoint": saved.path,
            "world_size": ranks.world_size,
        }
        if staged:
            summary["stages"] = {
                s.name: {"steps": ends[s.index], "model_dir": os.path.join(out, STAGES_DIR, s.name)}
                for s in stages
            }
        write_summary(out, summary)
        if config.plot:
            plot_losses(out)
        if progress:
            print(format_summary(summary), flush=True)
    barrier(ranks)
    return TrainResult(out, model_dir, saved.path, step, summary)


# --------------------------------------------------------------------------------------------
# The loss of one micro-batch


class StepLoss:
    """Head function: KD + SFT loss of a micro-batch, normalised by the whole step's counts.

    Sums over this micro-batch divided by the step's target and teacher-row counts over all
    ranks, times the number of ranks (DDP and FSDP average gradients over ranks), so the
    gradients of a step are those of the mean over every target token in it.
    """

    def __init__(self, config: TrainConfig, vocab_size: int, targets: int, rows: int, world: int):
        self.config = config
        self.vocab_size = vocab_size
        self.kd_weight = config.kd_weight * world / rows if rows and config.kd_weight else 0.0
        self.sft_weight = config.sft_weight * world / targets if targets else 0.0

    def __call__(self, hidden, weight, bias, batch):
        c = self.config
        if weight.dtype != hidden.dtype:  # autocast: the lm_head joins the activations' dtype
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
        rows = gather_target_rows(hidden, batch["labels"], batch["kd_index"])
        return kd_sft_loss(
            rows.hidden,
            weight,
            rows.targets,
            batch["kd_ids"],
            batch["kd_logprobs"],
            bias=bias,
            kd_rows=rows.kd_rows,
            mode=c.mode,
            kd_weight=self.kd_weight,
            sft_weight=self.sft_weight,
            temperature=c.temperature,
            scale_by_t2=c.scale_by_t2,
            beta=c.beta,
            vocab_size=self.vocab_size,
            reduction="sum",
            chunk_size=c.loss_chunk_rows or None,
        )


class StepWindow:
    """Per-step numbers between two log lines, averaged when written."""

    def __init__(self):
        self.steps: list[dict[str, Any]] = []

    def add(self, **values) -> None:
        self.steps.append(values)

    def means(self) -> dict[str, Any]:
        n = len(self.steps)
        kd = [s["kd"] for s in self.steps if s["kd"] is not None]
        seconds = sum(s["seconds"] for s in self.steps)
        tokens = sum(s["tokens"] for s in self.steps)
        return {
            "loss": sum(s["loss"] for s in self.steps) / n,
            "kd": sum(kd) / len(kd) if kd else None,
            "ce": sum(s["ce"] for s in self.steps) / n,
            "tokens_per_s": tokens / max(seconds, 1e-9),
            "pad_fraction": 1 - tokens / max(1, sum(s["slots"] for s in self.steps)),
            "step_s": seconds / n,
        }


# --------------------------------------------------------------------------------------------
# Set-up helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def autocast_dtype_for(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; fp32 on the CPU unless bf16 is asked for."""
    if config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant checkpoints)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(kwargs)


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def pad_token_id(student: Student) -> int:
    tok = student.tokenizer
    for value in (tok.pad_token_id, tok.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=True)
        if isinstance(value, dict):  # a mixture's per-source teacher rows
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        return value

    return {k: move(v) for k, v in batch.items()}


def open_dataset(
    config: TrainConfig,
    where: str | None = None,
    shuffle_window_bytes: int = DEFAULT_SHUFFLE_WINDOW_BYTES,
) -> LogitCacheDataset:
    """A training cache, opened now so a missing or damaged cache fails before anything;
    errors name it as `where` (by default `cache URL`)."""
    where = where or f"cache {config.cache}"
    dataset = LogitCacheDataset(
        config.cache,
        storage_options=config.storage_options or None,
        cache_dir=config.cache_dir or None,
        k=config.k or None,
        shuffle=config.shuffle,
        seed=config.seed,
        shuffle_window_bytes=shuffle_window_bytes,
    )
    try:
        cache = dataset.cache
    except CacheError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if len(cache) == 0:
        raise ValueError(f"{where}: holds no records")
    if config.k and config.k > cache.manifest.k:
        raise ValueError(
            f"{where}: k = {config.k}, but the cache holds the top {cache.manifest.k} only"
        )
    return dataset


def open_source_dataset(stage: Stage, source: Source) -> LogitCacheDataset:
    """The cache of one source of a stage, opened now so a missing cache fails before anything.

    Sources of a mixture share the single-cache shuffle window's memory between them."""
    window = DEFAULT_SHUFFLE_WINDOW_BYTES // (len(stage.sources) if stage.mixture else 1)
    return open_dataset(source.config, source_label(stage, source), window)


def source_label(stage: Stage, source: Source) -> str:
    """How errors name a cache: as `cache URL` in a plain run, with its stage and source else."""
    if not stage.mixture and not stage.name:
        return f"cache {source.cache}"
    named = (
        f"source {source.name!r} (cache {source.cache})"
        if stage.mixture
        else (f"cache {source.cache}")
    )
    return f"{stage.label} {named}" if stage.name else named


def stage_steps(stage: Stage, datasets: list[LogitCacheDataset]) -> int:
    """Optimizer steps of a stage: its max_steps, or its epochs over its data."""
    config = stage.config
    if config.max_steps:
        return config.max_steps
    if stage.mixture:
        records = sum(len(d) for d in datasets)
        per_epoch = math.ceil(records / config.batch_size)
    else:
        group_records = config.batch_size * (config.group_batches if config.group_by_length else 1)
        per_epoch = micro_batches_per_epoch(
            datasets[0], config.num_workers, config.batch_size, group_records
        )
    return max(1, math.ceil(config.epochs * per_epoch / config.grad_accum))


def build_stream(
    stage: Stage, datasets: list[LogitCacheDataset], ranks: Ranks, student: Student
) -> MicroBatchStream | MixtureStream:
    """The stage's micro-batches: length-grouped groups from the loader's workers.

    One cache: LogitCacheLoader + MicroBatchStream. A mixture: MixtureStream, whose workers
    draw each group's records from the sources in proportion (kd.mixture)."""
    config = stage.config
    group_records = config.batch_size * (config.group_batches if config.group_by_length else 1)
    layout = dict(
        group_by_length=config.group_by_length,
        packing=config.packing,
        pack_length=config.pack_length,
        pad_token_id=pad_token_id(student),
    )
    pin_memory = ranks.device.type == "cuda"
    if stage.mixture:
        collate = MixtureCollator(
            config.batch_size,
            positions=[d.positions for d in datasets],
            teacher=[s.config.kd_weight > 0 for s in stage.sources],
            **layout,
        )
        mixture = MixtureDataset(
            datasets,
            [s.weight for s in stage.sources],
            [s.name for s in stage.sources],
            seed=config.seed,
            group_records=group_records,
            collate=collate,
            shuffle_groups=config.group_by_length,
        )
        return MixtureStream(
            mixture,
            num_workers=config.num_workers,
            pin_memory=pin_memory,
            prefetch_factor=config.prefetch_factor,
        )
    dataset = datasets[0]
    loader = LogitCacheLoader(
        dataset,
        group_records,
        num_workers=config.num_workers,
        pin_memory=pin_memory,
        collate_fn=GroupCollator(
            config.batch_size,
            positions=dataset.cache.manifest.positions,
            teacher=stage.sources[0].config.kd_weight > 0,  # plain SFT never reads the teacher
            **layout,
        ),
        **({"prefetch_factor": config.prefetch_factor} if config.num_workers else {}),
    )
    return MicroBatchStream(loader, seed=config.seed, shuffle_groups=config.group_by_length)


def stage_scheduler(optimizer, config: TrainConfig, steps: int):
    """The learning-rate schedule of one stage: warmup and decay over its own steps, from its
    own lr (the optimizer's moments carry over from the stage before)."""
    for group in optimizer.param_groups:
        group["initial_lr"] = config.lr
    return build_scheduler(optimizer, config, steps)


def open_eval_set(config: TrainConfig, student: Student) -> EvalSet:
    try:
        return load_eval_set(
            config.eval_data,
            student.tokenizer,
            max_records=config.eval_max_records,
            max_length=config.eval_max_length,
            storage_options=config.storage_options or None,
            check_tokenizer=not config.ignore_tokenizer_mismatch,
            chat_template=config.eval_chat_template,
        )
    except CacheError as exc:
        raise ValueError(f"eval_data {config.eval_data}: {exc}") from None


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases and normalisation weights)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps
    )


def build_scheduler(optimizer, config: TrainConfig, max_steps: int):
    """Linear warmup to lr over warmup_steps, then cosine / linear decay to min_lr_ratio * lr."""
    warmup, floor = config.warmup_steps, config.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        if config.lr_schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def prepare_output_dir(
    config: TrainConfig, resume: str | None, ranks: Ranks
) -> ckpt.LoadedCheckpoint | None:
    """Check output_dir against the run: a new run needs it free (or overwrite=true), a resumed
    one a checkpoint whose configuration matches. Returns the checkpoint to resume from."""
    out = config.output_dir
    if resume:
        path = ckpt.find_checkpoint(out, resume)
        loaded = ckpt.load_checkpoint(path)
        check_resume_config(config, loaded.state.get("config", {}), path)
        if loaded.state.get("world_size") != ranks.world_size:
            raise ValueError(
                f"{path}: written by {loaded.state.get('world_size')} processes, resumed with "
                f"{ranks.world_size}; resume with the same number of processes"
            )
        if ranks.is_main:
            ckpt.clean_staging(out)
        barrier(ranks)
        return loaded
    ours = [
        RUN_CONFIG,
        METRICS_FILE,
        ckpt.CHECKPOINTS,
        MODEL_DIR,
        STAGES_DIR,
        PLOT_FILE,
        SUMMARY_FILE,
    ]
    present = [name for name in ours if os.path.exists(os.path.join(out, name))]
    if present and not config.overwrite:
        raise ValueError(
            f"output_dir {out} already holds a run ({', '.join(present)}); pass --resume to "
            "continue it, overwrite=true to replace it, or choose another output_dir"
        )
    barrier(ranks)
    if ranks.is_main:
        for name in present:
            path = os.path.join(out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        os.makedirs(out, exist_ok=True)
    barrier(ranks)
    return None


def check_resume_config(config: TrainConfig, saved: dict[str, Any], path: str) -> None:
    """A resumed run must compute what the interrupted one would have: same keys that matter."""
    current = to_dict(config)

    def same(key: str) -> bool:
        if key in ("sources", "stages"):  # cache URLs may move, as the flat `cache` key may
            return comparable(saved[key]) == comparable(current[key])
        return saved[key] == current[key]

    changed = [
        f"{key} ({saved[key]!r} -> {current[key]!r})"
        for key in current
        if key in saved and key not in RESUMABLE_CHANGES and not same(key)
    ]
    if changed:
        raise ValueError(
            f"{path}: resuming continues that run exactly, but these keys differ from its "
            f"configuration: {', '.join(changed)}; resume with its run.toml, or start a new "
            f"run with student={path}"
        )


def last_train_record(output_dir: str) -> dict[str, Any]:
    from .metrics import read_metrics

    train_records = [r for r in read_metrics(output_dir) if r.get("kind") == "train"]
    return train_records[-1] if train_records else {}
