"""Held-out evaluation of a student: response-token cross-entropy, token accuracy and, on a
logit cache, the KL to the teacher's top-K.

The held-out set is a logit cache or SFT rows (jsonl / Parquet through `kd.data`); either way
only target tokens (loss_mask) are scored. Logits are formed in chunks of rows from the hidden
states and the lm_head, as in training, so evaluating a large vocabulary needs little memory;
one pass yields the cross-entropy, the argmax and the teacher columns together.

    KL = sum_k p_k (log p_k - log q_k), p = softmax over the K cached teacher logprobs,
    q = the student's distribution renormalised over the same K ids (the ``renorm`` loss).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch

from logitcache import open_cache
from logitcache.format import MANIFEST_NAME, POSITIONS_ALL

from .losses import IGNORE_INDEX, gather_target_rows

# Rows of [rows, vocab] logits formed at once (fp32): 64 MiB at a vocabulary of 49152.
EVAL_CHUNK_BYTES = 64 << 20


@dataclass
class HeldOutRecord:
    input_ids: np.ndarray  # int [T]
    loss_mask: np.ndarray  # bool [T]
    topk_ids: np.ndarray | None = None  # int32 [N, K], a cache's teacher rows at the targets
    topk_logprobs: np.ndarray | None = None  # [N, K]


@dataclass
class EvalSet:
    """Held-out records kept in memory, to be scored repeatedly (every few training steps)."""

    source: str
    records: list[HeldOutRecord]
    has_teacher: bool
    tokenizer_identity: dict | None = None  # a cache's manifest `tokenizer`
    vocab_size: int | None = None  # a cache's teacher vocabulary

    @property
    def targets(self) -> int:
        return int(sum(int(r.loss_mask.sum()) for r in self.records))


@dataclass
class EvalResult:
    ce: float  # mean cross-entropy per target token, nats
    accuracy: float  # share of target tokens whose argmax is the target
    kl: float | None  # mean KL to the teacher's top-K per teacher row (caches only)
    targets: int
    records: int

    def as_dict(self) -> dict:
        return asdict(self)


def is_cache(url: str, storage_options: dict | None = None) -> bool:
    """True when `url` holds a committed logit cache (its manifest.json)."""
    if "://" not in url or url.startswith("file://"):
        return os.path.isfile(os.path.join(url.removeprefix("file://"), MANIFEST_NAME))
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs.exists(f"{path.rstrip('/')}/{MANIFEST_NAME}")


def load_eval_set(
    data: str,
    tokenizer,
    *,
    max_records: int = 0,
    max_length: int = 2048,
    storage_options: dict | None = None,
    cache_dir: str | None = None,
    check_tokenizer: bool = True,
    chat_template: bool = False,
) -> EvalSet:
    """Read a held-out logit cache or SFT rows into memory (the first `max_records`, 0: all).

    A cache's tokenizer fingerprint is checked against `tokenizer`; SFT rows are tokenized
    with it (truncated to `max_length` tokens; prompt/response pairs rendered with the chat
    template when `chat_template`, as `kd cache` can do for training rows).
    """
    if is_cache(data, storage_options):
        with open_cache(data, storage_options=storage_options, cache_dir=cache_dir) as cache:
            if check_tokenizer:
                from logitcache.identity import check_tokenizer as check

                check(cache.manifest.tokenizer, tokenizer, what=f"held-out cache {data}")
            stop = len(cache) if not max_records else min(max_records, len(cache))
            records = []
            for r in cache.iter_records(0, stop):
                ids, lps = r.topk_ids, r.topk_logprobs
                if cache.manifest.positions == POSITIONS_ALL:
                    # Rows for positions 1..T-1: keep those of the targets, as training does.
                    keep = r.loss_mask[1:]
                    ids, lps = ids[keep], lps[keep]
                records.append(
                    HeldOutRecord(
                        np.array(r.input_ids), np.array(r.loss_mask), np.array(ids), np.array(lps)
                    )
                )
            return EvalSet(
                data, records, True, cache.manifest.tokenizer, int(cache.manifest.vocab_size)
            )
    from .data import DataStats, ExampleBuilder, iter_examples

    builder = ExampleBuilder(
        tokenizer, max_length=max_length, overflow="truncate", chat_template=chat_template
    )
    stats = DataStats()
    examples = iter_examples(
        data, builder, storage_options=storage_options, stats=stats, limit=max_records or None
    )
    records = [HeldOutRecord(e.input_ids, e.loss_mask) for e in examples]
    if not records:
        raise ValueError(f"{data}: no held-out examples with a target token ({stats.summary()})")
    return EvalSet(data, records, False)


# --------------------------------------------------------------------------------------------
# Batches


def eval_batches(eval_set: EvalSet, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Padded batches of similar length (longest first), with teacher rows where there are."""
    order = sorted(range(len(eval_set.records)), key=lambda i: -len(eval_set.records[i].input_ids))
    return [
        _collate([eval_set.records[i] for i in order[s : s + batch_size]], eval_set.has_teacher)
        for s in range(0, len(order), batch_size)
    ]


def _collate(records: list[HeldOutRecord], teacher: bool) -> dict[str, torch.Tensor]:
    width = max(len(r.input_ids) for r in records)
    n = len(records)
    input_ids = np.zeros((n, width), dtype=np.int64)
    attention_mask = np.zeros((n, width), dtype=np.int64)
    labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    kd_index, kd_ids, kd_logprobs = [], [], []
    for b, r in enumerate(records):
        t = len(r.input_ids)
        input_ids[b, :t] = r.input_ids
        attention_mask[b, :t] = 1
        labels[b, :t] = np.where(r.loss_mask, r.input_ids, IGNORE_INDEX)
        if teacher:
            kd_index.append(b * width + np.flatnonzero(r.loss_mask))
            kd_ids.append(r.topk_ids)
            kd_logprobs.append(r.topk_logprobs)
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "labels": torch.from_numpy(labels),
    }
    if teacher:
        batch["kd_index"] = torch.from_numpy(np.concatenate(kd_index).astype(np.int64))
        batch["kd_ids"] = torch.from_numpy(np.concatenate(kd_ids).astype(np.int64))
        batch["kd_logprobs"] = torch.from_numpy(np.concatenate(kd_logprobs).astype(np.float32))
    else:
        batch["kd_index"] = torch.zeros(0, dtype=torch.long)
    return batch


# --------------------------------------------------------------------------------------------
# Scoring


class EvalHead:
    """Head function: sums of CE, correct argmaxes, targets, KL and teacher rows of a batch."""

    def __init__(self, vocab_size: int | None = None):
        self.vocab_size = vocab_size

    def __call__(self, hidden, weight, bias, batch) -> torch.Tensor:
        rows = gather_target_rows(hidden, batch["labels"], batch["kd_index"])
        vocab = self.vocab_size or weight.shape[0]
        weight = weight[:vocab].float()
        bias = None if bias is None else bias[:vocab].float()
        h = rows.hidden.float()
        targets = rows.targets
        has_kd = "kd_ids" in batch and batch["kd_ids"].numel() > 0
        kd_of_row = torch.full((h.shape[0],), -1, dtype=torch.long, device=h.device)
        if has_kd:
            kd_ids = batch["kd_ids"].to(h.device)
            log_p = torch.log_softmax(batch["kd_logprobs"].to(h.device, torch.float32), dim=1)
            kd_of_row[rows.kd_rows] = torch.arange(kd_ids.shape[0], device=h.device)
            if bool((kd_ids >= vocab).any()):
                raise ValueError(
                    f"a teacher row names token id {int(kd_ids.max())}, outside the model's "
                    f"{vocab} columns; the held-out cache belongs to another vocabulary"
                )
        sums = torch.zeros(5, dtype=torch.float64, device=h.device)
        chunk = max(1, EVAL_CHUNK_BYTES // (4 * vocab))
        for start in range(0, h.shape[0], chunk):
            part = slice(start, start + chunk)
            z = h[part] @ weight.t()
            if bias is not None:
                z += bias
            y = targets[part]
            scored = y != IGNORE_INDEX
            lse = torch.logsumexp(z, dim=1)
            y_safe = torch.where(scored, y, 0)
            ce = lse - z.gather(1, y_safe[:, None]).squeeze(1)
            correct = z.argmax(dim=1) == y_safe
            sums[0] += ce[scored].double().sum()
            sums[1] += (correct & scored).sum()
            sums[2] += scored.sum()
            if has_kd:
                j = kd_of_row[part]
                with_kd = j >= 0
                if bool(with_kd.any()):
                    jj = j[with_kd]
                    log_q = torch.log_softmax(z[with_kd].gather(1, kd_ids[jj]), dim=1)
                    lp = log_p[jj]
                    sums[3] += (lp.exp() * (lp - log_q)).sum().double()
                    sums[4] += with_kd.sum()
        return sums


def _result(sums: list[float], records: int) -> EvalResult:
    ce_sum, correct, targets, kl_sum, kd_rows = sums
    return EvalResult(
        ce=ce_sum / targets if targets else math.nan,
        accuracy=correct / targets if targets else math.nan,
        kl=kl_sum / kd_rows if kd_rows else None,
        targets=int(targets),
        records=records,
    )


@torch.no_grad()
def evaluate(
    module,
    eval_set: EvalSet,
    *,
    batch_size: int = 8,
    vocab_size: int | None = None,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    autocast_dtype: torch.dtype | None = None,
    all_reduce=None,
) -> EvalResult:
    """Score `eval_set` with a student module.

    `module` is a transformers causal LM, or (during training) the StudentWithHead the loop
    wraps with DDP / FSDP. Under several ranks each takes every world_size-th batch and every
    rank runs the same number of forwards (FSDP gathers weights collectively); `all_reduce`
    sums the five totals over ranks.
    """
    from .student import StudentWithHead

    if not isinstance(module, torch.nn.Module) or not hasattr(module, "forward"):
        raise TypeError("evaluate needs a torch module")
    wrapped = module if _takes_head(module) else StudentWithHead(module)
    head = EvalHead(vocab_size)
    batches = eval_batches(eval_set, batch_size)
    rounds = math.ceil(len(batches) / world_size)
    device = torch.device(device)
    was_training = wrapped.training
    wrapped.eval()
    sums = torch.zeros(5, dtype=torch.float64)
    try:
        for i in range(rounds):
            index = i * world_size + rank
            # A rank without a batch in the last round runs one anyway and discards it.
            batch = batches[index] if index < len(batches) else batches[0]
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(
                device.type,
                dtype=autocast_dtype or torch.bfloat16,
                enabled=autocast_dtype is not None,
            ):
                part = wrapped(batch, head)
            if index < len(batches):
                sums += part.cpu()
    finally:
        wrapped.train(was_training)
    totals = sums.tolist() if all_reduce is None else all_reduce(sums.tolist())
    return _result(totals, len(eval_set.records))


def _takes_head(module) -> bool:
    from .student import StudentWithHead

    inner = getattr(module, "module", module)  # DDP keeps the wrapped module here
    return isinstance(inner, StudentWithHead)


def evaluate_model(
    model_dir: str,
    data: str | EvalSet,
    *,
    batch_size: int = 8,
    max_records: int = 0,
    max_length: int = 2048,
    device: str = "cpu",
    tokenizer: str | None = None,
    storage_options: dict | None = None,
    vocab_size: int | None = None,
    chat_template: bool = False,
) -> EvalResult:
    """Load a model directory (safetensors) and score held-out data (a cache, jsonl/Parquet
    rows, or an EvalSet already loaded, to score several models on one set).

    The softmax covers the model's output columns, or the first `vocab_size` of them (default
    for a cache: its teacher vocabulary, which keeps a padded student's extra columns out).
    """
    from .models import embedding_rows, load_model

    loaded = load_model(model_dir, device=device, dtype="float32", tokenizer=tokenizer)
    if isinstance(data, EvalSet):
        eval_set = data
    else:
        eval_set = load_eval_set(
            data,
            loaded.tokenizer,
            max_records=max_records,
            max_length=max_length,
            storage_options=storage_options,
            chat_template=chat_template,
        )
    rows = embedding_rows(loaded.model)
    vocab = vocab_size or (min(rows, eval_set.vocab_size) if eval_set.vocab_size else rows)
    return evaluate(loaded.model, eval_set, batch_size=batch_size, vocab_size=vocab, device=device)
