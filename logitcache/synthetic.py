"""A synthetic teacher: realistic top-K next-token distributions without a model or a GPU.

Benchmarks, tests and the demo use it to produce data with the skew of real teacher logits.

The model
---------
Vocabulary prior. Token frequency follows a discretised Zipf-Mandelbrot law over frequency
ranks r = 0..V-1: the prior of rank r is F(r+1) - F(r), F the CDF of the continuous density
(x + b)^-a on [0, V) with a = 1.05, b = 2.7 (corpus token frequencies of BPE vocabularies have
roughly this shape: a flattened head, then a power law). Token ids follow rank only roughly, as
in BPE vocabularies where merges are numbered in the order they were learnt: id order is the
order of log(1 + r) + N(0, 0.7^2), so frequent tokens sit mostly at low ids but neighbouring
ids mix ranks across about a factor of two. The permutation depends on the vocabulary size
only, so teachers with different seeds share one "tokenizer".

Candidates. Per position, the teacher considers ~2K + K/4 candidate tokens: 2K draws from the
prior flattened to exponent 0.6 (a teacher's top-K lists plausible continuations, much less
skewed than corpus frequency), plus a context pool of K/4 tokens carried along the stream:
each pool slot is replaced with probability 0.23 per position, so consecutive positions share
part of their candidate sets, as real contexts do. Duplicate draws are removed.

Logits. Candidate c at position t gets
    z_c = s_t * (3.9 + 0.35 * log prior(c) + 1.2 * eps_c + 2 * [c in pool]) + m_t * [c is the best],
eps ~ N(0, 1), with a per-position sharpness s_t ~ LogNormal(log 1.49, 0.25) and a winner margin
m_t that is large (1.1 + Exp(2.8)) at 31% of positions (near-certain tokens) and small
(Exp(1.07)) elsewhere. Every token outside the candidates follows the same model without the
relevance bonus 3.9, its noise integrated out: the normaliser adds, in closed form, the
expected mass exp(s^2 * 1.2^2 / 2) * (sum over the vocabulary of prior^(0.35 s) minus the
candidates' share), from a table of sum(prior^e) over a grid of exponents e. So the stored
rows are log-softmax values over the full vocabulary, the tail mass 1 - sum(exp(row)) is
positive and realistic, and no [positions, V] array is ever built. Logprobs are computed in
float32, rounded to float16, and rows are sorted canonically (logprob descending, ties by id
ascending). K heavily penalised reserve candidates guarantee K distinct ids per row even in
tiny vocabularies; with realistic vocabularies they never reach the top-K.

Calibration. The constants were fitted (a random search, then a local one, on the sum of the
quantile differences) to the real teacher rows of `tools/real_rows.py`: SmolLM2-135M-Instruct
over Python standard-library source, every position a target, K=100, V=49152. Quantiles
10/25/50/75/90% (`python -m logitcache.synthetic --vocab-size 49152 --k 100 --positions 20000`
against the real rows, `benchmarks/bench_codec.py` prints both):

                        synthetic                        real
    top-1 probability   0.16 / 0.32 / 0.60 / 0.88 / 0.98     0.16 / 0.29 / 0.53 / 0.86 / 0.98
    entropy in top-K    0.12 / 0.63 / 1.71 / 2.69 / 3.32     0.13 / 0.63 / 1.66 / 2.69 / 3.40
    tail mass           .0003 / .0037 / .030 / .138 / .341   .0003 / .0024 / .024 / .089 / .185
    id reuse, next row  18%                                  22%

The synthetic tail is heavier above its median and neighbouring rows share fewer ids; the
real rows' ids are also more skewed (an order-0 entropy coder stores them in fewer bytes).
Versions before this calibration drew most positions near-certain (top-1 median 0.97).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

ZIPF_EXPONENT = 1.05
ZIPF_OFFSET = 2.7
ID_JITTER = 0.7
CANDIDATE_FLATTENING = 0.6
CONTEXT_REFRESH = 0.23
PRIOR_WEIGHT = 0.35
NOISE_SCALE = 1.2
CONTEXT_BONUS = 2.0
RELEVANCE = 3.9
RESERVE_PENALTY = 30.0
SHARPNESS_MEDIAN = 1.49
SHARPNESS_SPREAD = 0.25
CONFIDENT_FRACTION = 0.31
# Winner margin: CONFIDENT_MARGIN + Exp(CONFIDENT_MARGIN_SCALE) at confident positions,
# Exp(OPEN_MARGIN_SCALE) elsewhere.
CONFIDENT_MARGIN = 1.1
CONFIDENT_MARGIN_SCALE = 2.8
OPEN_MARGIN_SCALE = 1.07
# Grid of exponents e for the table of log sum_v prior_v^e (the closed-form tail mass).
_EXPONENT_GRID = np.geomspace(0.01, 20.0, 160)


def _zipf_cdf_scale(exponent: float, offset: float, size: int) -> tuple[float, float, float]:
    """Constants of G(x) = (x + b)^c with c = 1 - exponent, so that CDF(x) = (G(x) - G0) / span."""
    c = 1.0 - exponent
    if abs(c) < 1e-9:  # the law becomes logarithmic; nudge it off the singular point
        c = 1e-9
    g0 = offset**c
    span = (size + offset) ** c - g0
    return c, g0, span


def _zipf_log_prior(size: int, exponent: float, offset: float) -> np.ndarray:
    """log P(rank r) for r < size under the discretised continuous Zipf-Mandelbrot law."""
    c, g0, span = _zipf_cdf_scale(exponent, offset, size)
    edges = (np.arange(size + 1, dtype=np.float64) + offset) ** c
    mass = (edges[1:] - edges[:-1]) / span
    return np.log(mass)


def _sample_zipf_ranks(
    rng: np.random.Generator, shape: tuple[int, ...], size: int, exponent: float, offset: float
) -> np.ndarray:
    """Ranks drawn from the discretised Zipf-Mandelbrot law by its closed-form inverse CDF."""
    c, g0, span = _zipf_cdf_scale(exponent, offset, size)
    u = rng.random(shape)
    x = (g0 + u * span) ** (1.0 / c) - offset
    return np.clip(x.astype(np.int64), 0, size - 1).astype(np.int32)


def _rank_to_id(vocab_size: int) -> np.ndarray:
    """The fixed, BPE-like permutation from frequency rank to token id for a vocabulary size."""
    rng = np.random.default_rng([vocab_size, 0x70CE4])
    key = np.log1p(np.arange(vocab_size, dtype=np.float64)) + ID_JITTER * rng.standard_normal(
        vocab_size
    )
    order = np.argsort(key, kind="stable")  # order[i] = the rank that gets id i
    rank_to_id = np.empty(vocab_size, dtype=np.int32)
    rank_to_id[order] = np.arange(vocab_size, dtype=np.int32)
    return rank_to_id


def canonical_order(
    topk_ids: np.ndarray, topk_logprobs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by float16 logprob descending, ties by id ascending."""
    bits = np.ascontiguousarray(topk_logprobs, dtype=np.float16).view(np.uint16).astype(np.int64)
    # Order-preserving integer key of an fp16 value: flip all bits of negatives, the sign of others.
    key = np.where(bits & 0x8000, bits ^ 0xFFFF, bits | 0x8000)
    combined = ((0xFFFF - key) << 32) | topk_ids.astype(np.int64)
    combined.sort(axis=1)
    ids = (combined & 0xFFFFFFFF).astype(np.int32)
    order_key = 0xFFFF - (combined >> 32)
    out_bits = np.where(order_key & 0x8000, order_key & 0x7FFF, order_key ^ 0xFFFF)
    return ids, out_bits.astype(np.uint16).view(np.float16)


class SyntheticTeacher:
    """A stream of synthetic teacher rows over a vocabulary (see the module docstring).

    Consecutive calls to `rows` continue one stream (the context carries over); the stream is
    a deterministic function of the seed and the sequence of calls.
    """

    def __init__(
        self,
        vocab_size: int,
        k: int,
        *,
        seed: int = 0,
        confident_fraction: float = CONFIDENT_FRACTION,
    ):
        if vocab_size < 2:
            raise ValueError(f"vocab_size={vocab_size}: need at least 2 tokens")
        if not 1 <= k <= vocab_size:
            raise ValueError(f"k={k}: must be in 1..vocab_size ({vocab_size})")
        if not 0.0 <= confident_fraction <= 1.0:
            raise ValueError(f"confident_fraction={confident_fraction}: must be in [0, 1]")
        self.vocab_size = int(vocab_size)
        self.k = int(k)
        self.seed = int(seed)
        self.confident_fraction = float(confident_fraction)
        self._rng = np.random.default_rng([self.seed, vocab_size, k])
        self.rank_to_id = _rank_to_id(self.vocab_size)
        self.log_prior = _zipf_log_prior(self.vocab_size, ZIPF_EXPONENT, ZIPF_OFFSET)
        self._log_prior32 = self.log_prior.astype(np.float32)
        # Never ask for more distinct candidates than the vocabulary holds.
        self.n_draws = min(2 * self.k + 8, self.vocab_size)
        self.n_context = max(1, min(self.k // 4, self.vocab_size))
        self._log_power_sums = np.array(
            [_logsumexp(e * self.log_prior) for e in _EXPONENT_GRID], dtype=np.float64
        )
        self._context = self._draw_candidate_ranks((1, self.n_context))[0]

    def _draw_candidate_ranks(self, shape: tuple[int, ...]) -> np.ndarray:
        return _sample_zipf_ranks(
            self._rng, shape, self.vocab_size, ZIPF_EXPONENT * CANDIDATE_FLATTENING, ZIPF_OFFSET
        )

    def sample_prior_ids(self, n: int) -> np.ndarray:
        """`n` token ids drawn from the unigram prior (for prompts)."""
        ranks = _sample_zipf_ranks(self._rng, (n,), self.vocab_size, ZIPF_EXPONENT, ZIPF_OFFSET)
        return self.rank_to_id[ranks]

    def _context_ranks(self, n: int) -> np.ndarray:
        """[n, P] context pool ranks: each slot is refreshed with probability CONTEXT_REFRESH."""
        p = self.n_context
        fresh = self._draw_candidate_ranks((n, p))
        refresh = self._rng.random((n, p)) < CONTEXT_REFRESH
        # Row t of each slot holds the draw made at its last refresh at or before t; row -1
        # (before the stream started) stands for the pool carried over from the last call.
        last = np.where(refresh, np.arange(n)[:, None], -1)
        np.maximum.accumulate(last, axis=0, out=last)
        pool = np.take_along_axis(fresh, np.maximum(last, 0), axis=0)
        pool = np.where(last >= 0, pool, self._context[None, :])
        self._context = pool[-1].copy()
        return pool

    def _log_power_sum(self, exponents: np.ndarray) -> np.ndarray:
        """log sum_v prior_v^e, interpolated in log e from the precomputed grid."""
        e = np.clip(exponents, _EXPONENT_GRID[0], _EXPONENT_GRID[-1])
        return np.interp(np.log(e), np.log(_EXPONENT_GRID), self._log_power_sums)

    def rows(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next `n` positions: (topk_ids int32 [n, K], topk_logprobs float16 [n, K])."""
        n = int(n)
        k = self.k
        if n <= 0:
            return np.zeros((0, k), np.int32), np.zeros((0, k), np.float16)
        rng = self._rng
        # K consecutive ranks from a random start are K distinct tokens: a reserve that
        # guarantees a full row when the draws collide (tiny vocabularies). Its heavy penalty
        # keeps it out of the top-K whenever enough drawn candidates exist.
        reserve = (rng.integers(0, self.vocab_size, (n, 1)) + np.arange(k)) % self.vocab_size
        ranks = np.concatenate(
            [
                self._draw_candidate_ranks((n, self.n_draws)),
                self._context_ranks(n),
                reserve.astype(np.int32),
            ],
            axis=1,
        )
        n_cand = ranks.shape[1]
        log_prior = self._log_prior32[ranks]
        noise = rng.standard_normal(ranks.shape, dtype=np.float32)
        base = PRIOR_WEIGHT * log_prior + NOISE_SCALE * noise + RELEVANCE
        base[:, self.n_draws : self.n_draws + self.n_context] += CONTEXT_BONUS
        base[:, self.n_draws + self.n_context :] -= RESERVE_PENALTY
        # Remove duplicate candidates: sort (rank, column) keys and drop every repeat of a rank
        # but its first column, so a drawn candidate wins over its reserve copy.
        keys = (ranks.astype(np.int64) << 16) | np.arange(n_cand, dtype=np.int64)
        keys.sort(axis=1)
        dup = np.zeros(ranks.shape, dtype=bool)
        dup[:, 1:] = (keys[:, 1:] >> 16) == (keys[:, :-1] >> 16)
        dup_cols = (keys & 0xFFFF)[dup]
        dup_rows = np.nonzero(dup)[0]
        base[dup_rows, dup_cols] = -np.inf

        sharp = np.exp(np.log(SHARPNESS_MEDIAN) + SHARPNESS_SPREAD * rng.standard_normal(n)).astype(
            np.float32
        )
        confident = rng.random(n) < self.confident_fraction
        margin = np.where(
            confident,
            CONFIDENT_MARGIN + rng.exponential(CONFIDENT_MARGIN_SCALE, n),
            rng.exponential(OPEN_MARGIN_SCALE, n),
        ).astype(np.float32)
        z = base * sharp[:, None]
        top = np.argpartition(z, n_cand - k, axis=1)[:, n_cand - k :]
        z_top = np.take_along_axis(z, top, axis=1)
        best = np.argmax(z_top, axis=1)
        rows_idx = np.arange(n)
        z_top[rows_idx, best] += margin
        z[rows_idx, top[rows_idx, best]] += margin

        # Normaliser: every candidate plus the expected mass of all non-candidate tokens.
        e = PRIOR_WEIGHT * sharp.astype(np.float64)
        cand_power = np.exp(e.astype(np.float32)[:, None] * log_prior)
        cand_power[np.isneginf(base)] = 0.0
        cand_power = cand_power.sum(axis=1, dtype=np.float64)
        log_total = self._log_power_sum(e)
        outside = np.maximum(np.exp(log_total) - cand_power, 0.0)
        # Guard against exp overflow/underflow: combine in the log domain.
        log_outside = (
            np.log(np.maximum(outside, 1e-300))
            + 0.5 * (sharp.astype(np.float64) * NOISE_SCALE) ** 2
        )
        z_max = z.max(axis=1).astype(np.float64)
        cand_sum = np.exp(z - z_max.astype(np.float32)[:, None]).sum(axis=1, dtype=np.float64)
        log_norm = z_max + np.log(cand_sum + np.exp(np.minimum(log_outside - z_max, 700.0)))
        logprobs = (z_top.astype(np.float64) - log_norm[:, None]).astype(np.float32)
        ids = self.rank_to_id[np.take_along_axis(ranks, top, axis=1)]
        return canonical_order(ids, logprobs.astype(np.float16))


def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    return m + float(np.log(np.sum(np.exp(x - m))))


def row_statistics(topk_ids: np.ndarray, topk_logprobs: np.ndarray) -> dict[str, Any]:
    """Quantiles (10/25/50/75/90%) of the properties that make teacher rows realistic or not.

    top1_prob: probability of the best token; topk_entropy_nats: entropy of the row renormalised
    over its K ids; tail_mass: 1 - sum(p) over the row (fp16 rounding can make it a hair below
    zero); context_overlap: mean fraction of ids a row shares with the next row.
    """
    q = [0.1, 0.25, 0.5, 0.75, 0.9]
    p = np.exp(topk_logprobs.astype(np.float64))
    mass = p.sum(axis=1)
    renorm = p / mass[:, None]
    entropy = -(renorm * np.log(np.maximum(renorm, 1e-300))).sum(axis=1)
    n, k = topk_ids.shape
    overlap = 0.0
    if n > 1:
        m = min(n - 1, 2000)
        both = np.concatenate([topk_ids[:m], topk_ids[1 : m + 1]], axis=1)
        both.sort(axis=1)
        overlap = float(((both[:, 1:] == both[:, :-1]).sum(axis=1) / k).mean())
    return {
        "quantiles": q,
        "top1_prob": np.quantile(p[:, 0], q).round(4).tolist(),
        "topk_entropy_nats": np.quantile(entropy, q).round(3).tolist(),
        "tail_mass": np.quantile(1.0 - mass, q).round(5).tolist(),
        "context_overlap": round(overlap, 4),
    }


def synthetic_records(
    n_records: int,
    *,
    k: int,
    vocab_size: int,
    seed: int = 0,
    mean_length: int = 256,
    positions: str = "supervised",
    with_sample_id: bool = True,
) -> Iterator[dict[str, Any]]:
    """Yield `n_records` keyword dicts for `CacheWriter.add`: prompt, then response tokens.

    Lengths are LogNormal around `mean_length` (at least 2 tokens); the prompt takes 10-60% of
    a record and has loss_mask False, the response has loss_mask True. Prompt tokens come from
    the unigram prior; every token that has a teacher row is sampled from that row, so the
    stored distributions describe the tokens that follow, as a teacher's would.
    """
    if positions not in ("supervised", "all"):
        raise ValueError(f"positions={positions!r}: must be 'supervised' or 'all'")
    if mean_length < 2:
        raise ValueError(f"mean_length={mean_length}: must be at least 2")
    teacher = SyntheticTeacher(vocab_size, k, seed=seed)
    rng = np.random.default_rng([seed, 0x5EC0])
    sigma = 0.6
    for index in range(int(n_records)):
        length = int(
            max(2, round(mean_length * np.exp(sigma * rng.standard_normal() - sigma**2 / 2)))
        )
        prompt = int(np.clip(round(length * rng.uniform(0.1, 0.6)), 1, length - 1))
        loss_mask = np.zeros(length, dtype=bool)
        loss_mask[prompt:] = True
        input_ids = teacher.sample_prior_ids(length).astype(np.int32)
        first_row = 1 if positions == "all" else prompt
        topk_ids, topk_logprobs = teacher.rows(length - first_row)
        # Gumbel-max sampling from each row (renormalised over its K ids).
        gumbel = rng.gumbel(size=topk_ids.shape)
        choice = np.argmax(topk_logprobs.astype(np.float64) + gumbel, axis=1)
        input_ids[first_row:] = topk_ids[np.arange(topk_ids.shape[0]), choice]
        record: dict[str, Any] = {
            "input_ids": input_ids,
            "loss_mask": loss_mask,
            "topk_ids": topk_ids,
            "topk_logprobs": topk_logprobs,
        }
        if with_sample_id:
            record["sample_id"] = f"synthetic-{seed}-{index:08d}"
        yield record


def _main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Print statistics of the synthetic teacher.")
    parser.add_argument("--vocab-size", type=int, default=128256)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--positions", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ids, logprobs = SyntheticTeacher(args.vocab_size, args.k, seed=args.seed).rows(args.positions)
    for name, value in row_statistics(ids, logprobs).items():
        print(f"{name}: {json.dumps(value)}")


if __name__ == "__main__":
    _main()
