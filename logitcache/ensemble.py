"""Ensemble caches: several teachers' caches over the same records, combined into one cache whose
rows are the top-K of the weighted mixture of the teachers' distributions.

Probabilities are mixed, not logprobs averaged: the ensemble's distribution is

    m(v) = sum_j w_j p_j(v),        weights w_j > 0 normalised to sum to 1,

a proper distribution over the vocabulary, whereas averaging logprobs (a product of experts)
is not normalised and drops to nothing wherever one teacher is sure. A cache only holds each
teacher's top K_j, so p_j(v) is known for the ids teacher j listed; for any other id it lies in

    0 <= p_j(v) <= b_j = min(t_j, p_j^min),   t_j = 1 - sum(listed p_j)  (the tail mass),

p_j^min being the smallest probability teacher j listed (an unlisted id is no likelier than
that). The candidates are the ids any teacher listed; how the unknown parts are filled is the
`tail` option, recorded in the manifest's metadata:

- ``lower`` (default): unknown parts count as 0. Every stored logprob is a lower bound of
  log m(v), exact where every teacher listed v, and at most sum over the teachers that did not
  list v of w_j b_j below it (`EnsembleResult.max_gap` is the largest such gap stored). A row's
  mass is at most 1 and its tail 1 - sum(exp(row)) covers whatever is unknown, so the `tail`
  loss mode (and every renormalising mode) reads the row as a distribution.
- ``uniform``: teacher j's tail mass is spread evenly over the V_j - K_j ids it did not list,
  p_j(v) ~ t_j / (V_j - K_j): an estimate within the bounds above (never a bound itself), the
  assumption under which top-K storage is usually analysed.

The stored K is the top K of the candidates by that value (default: the largest K of the
sources). An id no teacher listed is not a candidate, although its mixture probability may
reach sum_j w_j b_j; the true top-K of m may therefore hold ids none of the caches recorded.
All arithmetic is float64 from the fp16 cache values; the result is rounded to fp16 once, when
written (so a lower bound may exceed the true value by fp16 rounding, at most 2^-11 relative).

Records must be the same in every cache, in the same order: same input_ids and loss_mask,
checked record by record; the caches must record the same tokenizer fingerprint and
positions mode. The output is written through CacheWriter, so it is committed atomically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .format import CacheError, Record

TAIL_MODES = ("lower", "uniform")
_FP16_MIN = -65504.0


@dataclass
class MixedRows:
    """The top-K of a mixture for a block of target rows (float64 logprobs, canonical order)."""

    topk_ids: np.ndarray  # int32 [N, K]
    topk_logprobs: np.ndarray  # float64 [N, K]
    listed_by_all: np.ndarray  # bool [N, K]: every teacher listed the id, so the value is exact
    gap: np.ndarray  # float64 [N, K]: the most the true probability may exceed exp(logprob)


def mix_topk(
    ids: Sequence[np.ndarray],
    logprobs: Sequence[np.ndarray],
    weights: Sequence[float],
    *,
    k: int,
    vocab_sizes: Sequence[int],
    tail: str = "lower",
) -> MixedRows:
    """Mix the teachers' rows for the same N targets: `ids[j]` [N, K_j] and `logprobs[j]`
    [N, K_j] of teacher j (full-vocabulary log-probabilities), weights summing to 1.

    Returns the top `k` ids of each row of the mixture and their log-probabilities under the
    `tail` rule (see the module docstring). Vectorised over rows: each row's candidates are
    gathered by one np.unique over (row, id) keys.
    """
    if tail not in TAIL_MODES:
        raise ValueError(f"tail={tail!r}: choose one of {TAIL_MODES}")
    n = ids[0].shape[0]
    if n == 0:
        empty = np.zeros((0, k))
        return MixedRows(np.zeros((0, k), np.int32), empty, np.zeros((0, k), bool), empty)
    vocab = int(max(vocab_sizes))
    rows = np.arange(n, dtype=np.int64)
    keys, values, bound_parts, spread_parts = [], [], [], []
    bound_total = np.zeros(n)  # sum_j w_j b_j: an unlisted id's largest possible mass
    spread_total = np.zeros(n)  # sum_j w_j t_j / (V_j - K_j): its uniform-tail estimate
    for j, (tid, tlp, w) in enumerate(zip(ids, logprobs, weights, strict=True)):
        if tid.shape[0] != n:
            raise ValueError(f"teacher {j} has {tid.shape[0]} rows, teacher 0 has {n}")
        p = np.exp(np.asarray(tlp, dtype=np.float64))
        tail_mass = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
        bound = w * np.minimum(tail_mass, p.min(axis=1))
        unlisted = vocab_sizes[j] - tid.shape[1]
        spread = w * tail_mass / unlisted if unlisted > 0 else np.zeros(n)
        bound_total += bound
        spread_total += spread
        keys.append((rows[:, None] * vocab + tid.astype(np.int64)).ravel())
        values.append((w * p).ravel())
        bound_parts.append(np.repeat(bound, tid.shape[1]))
        spread_parts.append(np.repeat(spread, tid.shape[1]))
    unique, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    mass = np.bincount(inverse, weights=np.concatenate(values), minlength=len(unique))
    listed = np.bincount(inverse, minlength=len(unique))
    row_of = unique // vocab
    gap = bound_total[row_of] - np.bincount(
        inverse, weights=np.concatenate(bound_parts), minlength=len(unique)
    )
    gap = np.maximum(gap, 0.0)
    if tail == "uniform":
        unknown = spread_total[row_of] - np.bincount(
            inverse, weights=np.concatenate(spread_parts), minlength=len(unique)
        )
        mass = mass + np.maximum(unknown, 0.0)

    # Each row's candidates into a padded [N, C] table, then the top k by (mass desc, id asc).
    per_row = np.bincount(row_of, minlength=n)
    width = int(per_row.max())
    if width < k:
        raise ValueError(f"the teachers list only {width} distinct ids in a row, fewer than k={k}")
    starts = np.concatenate([[0], np.cumsum(per_row)[:-1]])
    col = np.arange(len(unique)) - starts[row_of]
    table_mass = np.full((n, width), -1.0)
    table_ids = np.full((n, width), np.iinfo(np.int64).max)
    table_at = np.zeros((n, width), dtype=np.int64)
    table_mass[row_of, col] = mass
    table_ids[row_of, col] = unique % vocab
    table_at[row_of, col] = np.arange(len(unique))
    order = np.lexsort((table_ids, -table_mass), axis=1)[:, :k]
    chosen = np.take_along_axis(table_at, order, axis=1)
    with np.errstate(divide="ignore"):
        out_lp = np.log(mass[chosen])
    return MixedRows(
        topk_ids=(unique[chosen] % vocab).astype(np.int32),
        topk_logprobs=np.maximum(out_lp, _FP16_MIN),
        listed_by_all=listed[chosen] == len(ids),
        gap=gap[chosen],
    )


@dataclass
class EnsembleResult:
    dst: str
    records: int
    targets: int
    k: int
    vocab_size: int
    weights: list[float]  # normalised
    tail: str
    exact_share: float  # stored entries every teacher listed (their value is exact)
    max_gap: float  # largest amount a stored probability may understate the mixture ("lower")
    mean_gap: float


def ensemble_caches(
    sources: Sequence[str],
    dst: str,
    *,
    weights: Sequence[float] | None = None,
    k: int | None = None,
    tail: str = "lower",
    teacher: str | None = None,
    check_tokenizers: bool = True,
    codecs: dict | None = None,
    chunk_bytes: int | None = None,
    shard_bytes: int | None = None,
    storage_options: dict | None = None,
    dst_storage_options: dict | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> EnsembleResult:
    """Write at `dst` the cache of the weighted mixture of the teachers cached at `sources`.

    `weights` (default: equal) are normalised; `k` defaults to the largest K of the sources;
    `tail` is "lower" or "uniform" (module docstring). Raises ValueError naming the cache and
    the record when the caches do not describe the same records with the same tokenizer.
    """
    from tqdm import tqdm

    from . import CacheWriter, open_cache

    sources = list(sources)
    if len(sources) < 2:
        raise ValueError("an ensemble needs at least two source caches")
    if tail not in TAIL_MODES:
        raise ValueError(f"tail {tail!r}: choose one of {', '.join(TAIL_MODES)}")
    weights = _normalised(weights, len(sources))
    caches = []
    try:
        for url in sources:
            caches.append(open_cache(url, storage_options=storage_options))
        manifests = [c.manifest for c in caches]
        _check_compatible(sources, manifests, check_tokenizers)
        out_k = k or max(m.k for m in manifests)
        if not 1 <= out_k <= max(m.k for m in manifests):
            raise ValueError(
                f"k {out_k}: must be between 1 and the largest K of the sources "
                f"({max(m.k for m in manifests)})"
            )
        vocab_sizes = [int(m.vocab_size) for m in manifests]
        first = manifests[0]
        identity = {
            "name": teacher
            or "ensemble of "
            + ", ".join(_teacher_name(m, u) for m, u in zip(manifests, sources, strict=True)),
            "members": [
                {
                    "cache": url,
                    "weight": w,
                    "teacher": m.teacher,
                    "k": m.k,
                    "vocab_size": m.vocab_size,
                }
                for url, w, m in zip(sources, weights, manifests, strict=True)
            ],
        }
        sizes = {}
        if chunk_bytes is not None:
            sizes["chunk_bytes"] = chunk_bytes
        if shard_bytes is not None:
            sizes["shard_bytes"] = shard_bytes
        gaps_max = gaps_sum = 0.0
        exact = entries = targets = count = 0
        with CacheWriter(
            dst,
            k=out_k,
            vocab_size=max(vocab_sizes),
            positions=first.positions,
            storage_options=dst_storage_options or storage_options,
            teacher=identity,
            tokenizer=first.tokenizer,
            metadata={
                "ensemble": {
                    "sources": sources,
                    "weights": weights,
                    "tail": tail,
                    "logprobs": "lower bounds of the mixture's log-probabilities, exact where "
                    "every teacher listed the id"
                    if tail == "lower"
                    else "the mixture's log-probabilities with each teacher's tail mass spread "
                    "evenly over the ids it did not list (an estimate)",
                }
            },
            codecs=codecs,
            overwrite=overwrite,
            **sizes,
        ) as writer:
            streams = [c.iter_records() for c in caches]
            bar = tqdm(
                zip(*streams, strict=False),
                total=first.records,
                desc="ensemble",
                unit="rec",
                disable=None if progress is None else not progress,
            )
            for records in bar:
                _check_same_record(records, count, sources)
                mixed = mix_topk(
                    [r.topk_ids for r in records],
                    [r.topk_logprobs for r in records],
                    weights,
                    k=out_k,
                    vocab_sizes=vocab_sizes,
                    tail=tail,
                )
                writer.add(
                    input_ids=records[0].input_ids,
                    loss_mask=records[0].loss_mask,
                    topk_ids=mixed.topk_ids,
                    topk_logprobs=mixed.topk_logprobs,
                    sample_id=records[0].sample_id,
                )
                count += 1
                targets += mixed.topk_ids.shape[0]
                entries += mixed.topk_ids.size
                exact += int(mixed.listed_by_all.sum())
                if mixed.gap.size:
                    gaps_max = max(gaps_max, float(mixed.gap.max()))
                    gaps_sum += float(mixed.gap.sum())
            if count != first.records:
                raise CacheError(
                    f"{sources[0]}: the manifest lists {first.records} records but "
                    f"{count} were read"
                )
    finally:
        for cache in caches:
            cache.close()
    return EnsembleResult(
        dst=dst,
        records=count,
        targets=targets,
        k=out_k,
        vocab_size=max(vocab_sizes),
        weights=weights,
        tail=tail,
        exact_share=exact / entries if entries else 1.0,
        max_gap=gaps_max,
        mean_gap=gaps_sum / entries if entries else 0.0,
    )


def _normalised(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} source caches; give one per cache")
    if any(not (math.isfinite(w) and w > 0) for w in weights):
        raise ValueError(f"weights {weights}: each must be a finite number > 0")
    total = sum(weights)
    return [w / total for w in weights]


def _teacher_name(manifest, url: str) -> str:
    return str((manifest.teacher or {}).get("name") or url)


def _check_compatible(sources: list[str], manifests: list, check_tokenizers: bool) -> None:
    """Same records count, positions mode and tokenizer in every cache, else ValueError."""
    first, url0 = manifests[0], sources[0]
    for url, m in zip(sources[1:], manifests[1:], strict=True):
        if m.records != first.records:
            raise ValueError(
                f"{url} holds {m.records} records, {url0} holds {first.records}: an ensemble "
                "combines caches of the same records; cache the same data with each teacher"
            )
        if m.positions != first.positions:
            raise ValueError(
                f"{url} stores positions {m.positions!r}, {url0} stores {first.positions!r}: "
                "rows would describe different tokens; cache both with the same positions mode"
            )
    if not check_tokenizers:
        return
    for url, m in zip(sources, manifests, strict=True):
        if not (m.tokenizer or {}).get("vocab_fingerprint"):
            raise ValueError(
                f"{url} records no tokenizer fingerprint, so its ids cannot be checked against "
                "the other teachers'; pass --skip-tokenizer-check if the teachers are known to "
                "share a tokenizer"
            )
    for url, m in zip(sources[1:], manifests[1:], strict=True):
        ours, theirs = first.tokenizer["vocab_fingerprint"], m.tokenizer["vocab_fingerprint"]
        if ours != theirs:
            raise ValueError(
                f"{url} was written with another tokenizer than {url0} ({m.tokenizer.get('name')} "
                f"vs {first.tokenizer.get('name')}; fingerprint {theirs} vs {ours}): the same id "
                "means different tokens, so the teachers' probabilities cannot be mixed"
            )


def _check_same_record(records: Sequence[Record], index: int, sources: list[str]) -> None:
    first = records[0]
    for url, r in zip(sources[1:], records[1:], strict=True):
        problem = _difference(first, r)
        if problem:
            raise ValueError(
                f"record {index} ({first.sample_id!r} in {sources[0]}, {r.sample_id!r} in "
                f"{url}): {problem}; an ensemble needs the same records in the same order in "
                "every cache (cache the same data with the same settings for each teacher)"
            )


def _difference(a: Record, b: Record) -> str | None:
    if a.num_tokens != b.num_tokens:
        return f"{a.num_tokens} tokens vs {b.num_tokens}"
    for name in ("input_ids", "loss_mask"):
        x, y = getattr(a, name), getattr(b, name)
        if not np.array_equal(x, y):
            p = int(np.flatnonzero(x != y)[0])
            return f"{name} differs at position {p} ({x[p]} vs {y[p]})"
    return None
