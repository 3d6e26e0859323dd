"""Lossy caches with a per-row KL budget: logprobs on a grid, short rows where the tail is light.

`CacheWriter(..., lossy_kl=BUDGET)` stores each teacher row so that it differs from the row a
lossless cache would hold (the fp16 row) by at most BUDGET nats in every one of these measures
(spec/FORMAT.md section 12), checked exactly for every row as it is written:

- renorm: KL between the lossless and the stored row, both renormalised over the stored ids, in
  both directions (what `renorm`, `teacher_renorm` and `reverse` losses see);
- tail: the same over the stored ids plus one bucket for the mass outside them, both directions
  (what the `tail` loss sees);
- truncation: the reverse KL of the stored row (renormalised) against the whole lossless row
  (renormalised over all K ids), which adds the cost of the entries left out.

How: half the budget goes to truncation (unless `lossy_truncate=False`, which keeps every entry
and gives the whole budget to the grid) (the row keeps its fewest leading entries whose
left-out mass costs at most BUDGET/2, and entries whose probability underflows the grid), half
to quantisation: a grid of step 2 sqrt(BUDGET/2) * 0.9, which by Hoeffding's lemma keeps the KL
of nearest rounding below BUDGET/2. The first entry of a row stays exact, so a near-certain
row keeps its outside mass; rounding feeds the mass error back so the outside bucket survives.
A row that still exceeds the budget (rare) is stored exactly, truncated. Short rows are padded
to K with entries of logprob -65504 (no mass) whose ids are the smallest ids not in the row;
readers return them as they are, and losses leave them out (`kd.losses`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .codecs import GRID_UNIT, grid_tables, kernels

PAD_BITS = 0xFBFF  # binary16 -65504: an entry that carries no probability
PAD_LOGPROB = -65504.0
# Share of the budget that truncation may use; quantisation gets the rest.
TRUNCATION_SHARE = 0.5
# Margin under the Hoeffding bound for fp16 rounding of grid points and mass feedback.
GRID_MARGIN = 0.9

_TABLES: tuple[np.ndarray, np.ndarray] | None = None


def _value_tables() -> tuple[np.ndarray, np.ndarray]:
    """(value, exp(value)) of every binary16 bit pattern, float64; non-finite -> 0 mass."""
    global _TABLES
    if _TABLES is None:
        values = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            exp = np.exp(values)
        exp[~np.isfinite(exp)] = 0.0
        _TABLES = (values, exp)
    return _TABLES


def row_entries(topk_logprobs: np.ndarray) -> np.ndarray:
    """Entries per row that are part of the row (K' of spec section 12): those above -65504.
    Rows of lossless caches give K, unless the teacher's probability underflowed fp16."""
    values = np.asarray(topk_logprobs)
    return (values > PAD_LOGPROB).sum(axis=-1)


def grid_step_units(budget: float, truncation: bool = True) -> int:
    """The grid step, in 1/1024 nat, for a per-row budget in nats (all of it for the grid
    when rows are not truncated)."""
    share = 1.0 - TRUNCATION_SHARE if truncation else 1.0
    step = 2.0 * math.sqrt(budget * share) * GRID_MARGIN
    return int(min(2048, max(1, math.floor(step * GRID_UNIT))))


def check_budget(budget) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"lossy_kl={budget!r}: must be a number of nats (e.g. 0.01)")
    budget = float(budget)
    if not (0.0 < budget <= 1.0) or not math.isfinite(budget):
        raise ValueError(
            f"lossy_kl={budget!r}: the per-row KL budget must be in (0, 1] nats; 0.01 keeps "
            "rows within 1% of a nat of the lossless ones"
        )
    return budget


@dataclass
class LossyStats:
    """What a lossy writer did, for the manifest and for benchmarks."""

    rows: int = 0
    exact_rows: int = 0  # rows stored exactly (truncated only): the grid could not meet the budget
    entries: int = 0  # entries kept (not padding)
    error_sum: float = 0.0
    error_max: float = 0.0
    errors: list[np.ndarray] = field(default_factory=list, repr=False)
    keep_errors: bool = False

    def to_json(self) -> dict:
        return {
            "rows": self.rows,
            "exact_rows": self.exact_rows,
            "mean_entries": self.entries / self.rows if self.rows else 0.0,
            "mean_row_kl": self.error_sum / self.rows if self.rows else 0.0,
            "max_row_kl": self.error_max,
        }


def _xlogy_ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a * log(a / b) with 0 where a == 0 and inf where b == 0 < a."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = a * (np.log(a) - np.log(b))
    out[a == 0] = 0.0
    out[(b == 0) & (a > 0)] = np.inf
    return out


def row_errors(lossless_bits: np.ndarray, stored_bits: np.ndarray) -> dict[str, np.ndarray]:
    """Per-row error measures of stored rows against the lossless rows they came from.

    Both are uint16 [n, K] with entries aligned (entry c of a stored row is the quantised entry
    c of the lossless row, or PAD_BITS when left out). Returns renorm_fwd, renorm_rev, tail_fwd,
    tail_rev, truncation and the row error (their maximum, truncation added to renorm_rev).
    """
    _, exp = _value_tables()
    p_all = exp[lossless_bits]
    stored = stored_bits != PAD_BITS
    p = np.where(stored, p_all, 0.0)
    q = np.where(stored, exp[stored_bits], 0.0)
    mp, mq, mk = p.sum(1), q.sum(1), p_all.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        pn, qn = p / mp[:, None], q / mq[:, None]
        fwd = _xlogy_ratio(pn, qn).sum(1)
        rev = _xlogy_ratio(qn, pn).sum(1)
        trunc = np.log(mk / mp)
        pt, qt = np.maximum(0.0, 1.0 - mp), np.maximum(0.0, 1.0 - mq)
        zp, zq = mp + pt, mq + qt
        tp, tq = p / zp[:, None], q / zq[:, None]
        tail_fwd = _xlogy_ratio(tp, tq).sum(1) + _xlogy_ratio(pt / zp, qt / zq)
        tail_rev = _xlogy_ratio(tq, tp).sum(1) + _xlogy_ratio(qt / zq, pt / zp)
    empty = mp <= 0  # a row without mass (every entry -65504): nothing to lose
    for arr in (fwd, rev, trunc, tail_fwd, tail_rev):
        arr[empty] = 0.0
    error = np.maximum.reduce([fwd, rev + trunc, tail_fwd, tail_rev])
    return {
        "renorm_fwd": fwd,
        "renorm_rev": rev,
        "tail_fwd": tail_fwd,
        "tail_rev": tail_rev,
        "truncation": trunc,
        "error": error,
    }


class LossyRows:
    """Turns canonical fp16 rows into lossy rows within a KL budget (see the module docs)."""

    def __init__(self, budget: float, k: int, *, truncation: bool = True):
        self.budget = check_budget(budget)
        self.k = k
        self.truncation = bool(truncation)
        self.step_units = grid_step_units(self.budget, self.truncation)
        self.step = self.step_units / GRID_UNIT
        self.grid_bits, _ = grid_tables(self.step_units)
        self.zero_index = len(self.grid_bits) - 1
        self.stats = LossyStats()

    def config(self) -> dict:
        """The manifest's `lossy` object (spec section 12)."""
        return {
            "mode": "kl",
            "kl_budget": self.budget,
            "grid_step": self.step,
            "truncation": self.truncation,
        }

    def pipelines(self) -> dict[str, list[dict]]:
        return {
            "topk_ids": [{"id": "ans_ids", "row_length": self.k}],
            "topk_logprobs": [
                {"id": "fp16_grid", "row_length": self.k, "step": self.step_units},
                {"id": "ans_uint", "elementsize": 4, "row_length": self.k},
            ],
        }

    def keep_counts(self, bits: np.ndarray) -> np.ndarray:
        """Leading entries each row keeps: the fewest whose left-out mass costs at most the
        truncation share of the budget (log of whole mass over kept mass)."""
        _, exp = _value_tables()
        out = np.empty(bits.shape[0], dtype=np.int64)
        if not self.truncation:
            out.fill(self.k)
            return out
        kernels().keep_counts(bits, self.budget * TRUNCATION_SHARE, exp, out)
        return out

    def errors(self, lossless_bits: np.ndarray, stored_bits: np.ndarray) -> np.ndarray:
        """The row error of `row_errors`, computed by a kernel (no log per entry)."""
        values, exp = _value_tables()
        out = np.empty(lossless_bits.shape[0], dtype=np.float64)
        kernels().lossy_row_errors(lossless_bits, stored_bits, PAD_BITS, values, exp, out)
        return out

    def apply(self, ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lossy versions of canonical rows (ids int32 [n, K], logprobs fp16 [n, K]): aligned
        quantised entries, then re-sorted canonically with left-out entries as padding."""
        n = ids.shape[0]
        if n == 0:
            return ids, logprobs
        bits = logprobs.view(np.uint16)
        values, exp = _value_tables()
        keep = self.keep_counts(bits)
        out = np.empty_like(bits)
        kern = kernels()
        kern.quantize_rows(bits, keep, self.step, self.zero_index, self.grid_bits, values, exp, out)
        errors = self.errors(bits, out)
        over = errors > self.budget
        if over.any():  # store those rows exactly, truncated
            cols = np.arange(self.k)[None, :]
            exact = np.where(cols < keep[over, None], bits[over], PAD_BITS).astype(np.uint16)
            out[over] = exact
            errors[over] = self.errors(np.ascontiguousarray(bits[over]), exact)
        stats = self.stats
        stats.rows += n
        stats.exact_rows += int(over.sum())
        stats.entries += int((out != PAD_BITS).sum())
        stats.error_sum += float(errors.sum())
        stats.error_max = max(stats.error_max, float(errors.max()))
        if stats.keep_errors:
            stats.errors.append(errors)
        new_ids = np.ascontiguousarray(ids, dtype=np.int32).copy()
        kern.sort_and_pad_rows(new_ids, out, PAD_BITS, np.full(self.k, -1, dtype=np.int64))
        return new_ids, out.view(np.float16)
