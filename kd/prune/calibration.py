"""Calibration sequences for importance scores: SFT rows (the formats `kd.data` reads) or a logit
cache, whose records carry their token ids, batched by length so little compute goes to padding.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..data import DataStats, Example, ExampleBuilder, iter_examples

DEFAULT_SAMPLES = 1024
DEFAULT_MAX_LENGTH = 1024
DEFAULT_BATCH_TOKENS = 4096


@dataclass
class Calibration:
    """The sequences importance is measured on, and where they came from."""

    examples: list[Example]
    source: str
    kind: str  # "data" or "cache"
    stats: DataStats | None = None

    @property
    def tokens(self) -> int:
        return int(sum(len(e.input_ids) for e in self.examples))

    def describe(self) -> dict:
        return {
            "source": self.source,
            "kind": self.kind,
            "samples": len(self.examples),
            "tokens": self.tokens,
            "rows": self.stats.summary() if self.stats is not None else None,
        }


def is_cache(url: str, storage_options: dict | None = None) -> bool:
    """True when `url` is a committed logit cache (it holds a manifest.json)."""
    if any(ch in url for ch in "*?["):
        return False  # a glob names data files
    if "://" not in url or url.startswith("file://"):
        return os.path.isfile(os.path.join(url.removeprefix("file://"), "manifest.json"))
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs.isfile(path.rstrip("/") + "/manifest.json")


def load_calibration(
    source: str,
    tokenizer,
    *,
    samples: int | None = None,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    chat_template: bool = False,
    vocab_rows: int | None = None,
    storage_options: dict | None = None,
) -> Calibration:
    """The first `samples` sequences (default 1024, or all when fewer) of `source`.

    `source` is SFT data (JSON lines / Parquet rows, as `kd cache` reads them) or a logit cache
    directory/URL; a cache's tokenizer fingerprint must match `tokenizer`. Sequences longer
    than `max_length` are cut to their beginning. `vocab_rows` bounds token ids (the model's
    embedding rows).
    """
    samples = DEFAULT_SAMPLES if samples is None else samples
    if samples < 1:
        raise ValueError(f"--calib-samples {samples}: must be at least 1")
    if max_length is not None and max_length < 2:
        raise ValueError(f"--max-length {max_length}: must be at least 2")
    if is_cache(source, storage_options):
        examples = _from_cache(source, tokenizer, samples, max_length, vocab_rows, storage_options)
        calibration = Calibration(examples, source, "cache")
    else:
        builder = ExampleBuilder(
            tokenizer,
            max_length=max_length,
            overflow="truncate",
            chat_template=chat_template,
            vocab_size=vocab_rows,
        )
        stats = DataStats()
        examples = list(
            iter_examples(
                source, builder, storage_options=storage_options, stats=stats, limit=samples
            )
        )
        calibration = Calibration(examples, source, "data", stats=stats)
    if not calibration.examples:
        raise ValueError(f"{source}: no calibration sequences (every row was skipped)")
    return calibration


def _from_cache(source, tokenizer, samples, max_length, vocab_rows, storage_options):
    from logitcache import open_cache
    from logitcache.identity import check_tokenizer

    examples = []
    with open_cache(source, storage_options=storage_options) as cache:
        check_tokenizer(cache.manifest.tokenizer, tokenizer, what=f"cache {source}")
        for index, record in enumerate(cache.iter_records(0, min(samples, len(cache)))):
            ids = np.asarray(record.input_ids, dtype=np.int32)[:max_length]
            mask = np.asarray(record.loss_mask, dtype=bool)[:max_length]
            if vocab_rows is not None and ids.size and int(ids.max()) >= vocab_rows:
                raise ValueError(
                    f"{source}: record {index} holds token id {int(ids.max())}, but the model "
                    f"has {vocab_rows} embedding rows; the cache belongs to another model"
                )
            if ids.size < 2:
                continue
            sample_id = record.sample_id if record.sample_id is not None else str(index)
            examples.append(Example(sample_id=sample_id, input_ids=ids, loss_mask=mask))
    return examples


@dataclass
class Batch:
    input_ids: np.ndarray  # int64 [B, S], right-padded
    attention_mask: np.ndarray  # int64 [B, S], 1 on real tokens
    loss_mask: np.ndarray  # bool [B, S], True on target tokens


def batches(
    examples: Sequence[Example], *, batch_tokens: int = DEFAULT_BATCH_TOKENS, pad_id: int = 0
) -> list[Batch]:
    """Examples sorted by length (longest first) and packed into right-padded batches of at
    most `batch_tokens` padded tokens (one sequence per batch where a sequence is longer)."""
    if batch_tokens < 1:
        raise ValueError(f"--batch-tokens {batch_tokens}: must be at least 1")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    out, group = [], []
    for i in order:
        longest = len(examples[group[0]].input_ids) if group else len(examples[i].input_ids)
        if group and (len(group) + 1) * longest > batch_tokens:
            out.append(_pad([examples[j] for j in group], pad_id))
            group = []
        group.append(i)
    if group:
        out.append(_pad([examples[j] for j in group], pad_id))
    return out


def _pad(examples: list[Example], pad_id: int) -> Batch:
    length = max(len(e.input_ids) for e in examples)
    ids = np.full((len(examples), length), pad_id, dtype=np.int64)
    attention = np.zeros((len(examples), length), dtype=np.int64)
    loss = np.zeros((len(examples), length), dtype=bool)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = e.input_ids
        attention[row, :n] = 1
        loss[row, :n] = e.loss_mask
    return Batch(ids, attention, loss)


def iter_torch(batch_list: Sequence[Batch], device) -> Iterator[tuple]:
    """(input_ids, attention_mask, loss_mask) tensors of each batch on `device`."""
    import torch

    for b in batch_list:
        yield (
            torch.from_numpy(b.input_ids).to(device),
            torch.from_numpy(b.attention_mask).to(device),
            torch.from_numpy(b.loss_mask).to(device),
        )
