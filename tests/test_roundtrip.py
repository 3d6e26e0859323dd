"""Property tests: whatever valid records go in come back bit-exact, in canonical row order.

Covers T=1, N=0, K=1..256, vocabularies up to 262144, ties, fp16 extremes (-65504, zeros of
both signs, subnormals), both positions modes, optional sample_ids, many chunks and shards.
"""

from __future__ import annotations

import math
import tempfile
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from logitcache import CacheWriter, open_cache
from logitcache.format import MAX_ROW_MASS
from tests.conftest import assert_record_equal

FP16_MIN = -65504.0
NEG_MIN_SUBNORMAL = -(2.0**-24)
NEG_MAX_SUBNORMAL = -(2.0**-14 - 2.0**-24)
NEG_MIN_NORMAL = -(2.0**-14)


def fp16_keys(values: np.ndarray) -> np.ndarray:
    """The order-preserving integer key of each fp16 value (-0.0 sorts below +0.0)."""
    bits = values.astype(np.float16).view(np.uint16).astype(np.int64)
    return np.where(bits & 0x8000, bits ^ 0xFFFF, bits | 0x8000)


def canonical(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference canonical order: logprob descending, ties by id ascending."""
    lp16 = np.asarray(logprobs, dtype=np.float16)
    order = np.lexsort((ids, -fp16_keys(lp16)), axis=-1)
    return (
        np.take_along_axis(ids, order, axis=1).astype(np.int32),
        np.take_along_axis(lp16, order, axis=1),
    )


# -- strategies --------------------------------------------------------------------------

HEAD_KINDS = ["zero", "neg_zero", "neg_min_subnormal", "neg_max_subnormal", "neg_min_normal",
              "uniform", "two_halves", "none"]  # fmt: skip
TAIL_KINDS = ["spread", "all_fp16_min", "all_equal", "few_values"]


def make_row_values(rng: np.random.Generator, k: int, head: str, tail: str) -> np.ndarray:
    """A valid row of k fp16 logprobs (<= 0, mass <= 1.05), in random column order.

    The head holds at most the mass of one near-certain token; every tail value is below
    log(0.02 / k), so the row sums to well under MAX_ROW_MASS even after fp16 rounding.
    """
    ceiling = math.log(0.02 / k)
    if tail == "spread":
        values = rng.uniform(FP16_MIN, ceiling, k)
        values[rng.random(k) < 0.2] = FP16_MIN
    elif tail == "all_fp16_min":
        values = np.full(k, FP16_MIN)
    elif tail == "all_equal":
        values = np.full(k, rng.uniform(-40.0, ceiling))
    else:
        values = rng.choice([FP16_MIN, -1000.0, ceiling - 1.0], size=k)
    heads = {
        "zero": [0.0],
        "neg_zero": [-0.0],
        "neg_min_subnormal": [NEG_MIN_SUBNORMAL],
        "neg_max_subnormal": [NEG_MAX_SUBNORMAL],
        "neg_min_normal": [NEG_MIN_NORMAL],
        "uniform": [rng.uniform(-8.0, 0.0)],
        "two_halves": [math.log(0.5), math.log(0.5)],  # a tie at the top
        "none": [],
    }[head][:k]
    values[: len(heads)] = heads
    row = values.astype(np.float16)
    rng.shuffle(row)
    assert np.exp(row.astype(np.float64)).sum() <= MAX_ROW_MASS
    return row


def make_rows(rng: np.random.Generator, n: int, k: int, vocab: int) -> tuple[np.ndarray, ...]:
    ids = np.empty((n, k), dtype=np.int64)
    logprobs = np.empty((n, k), dtype=np.float16)
    for r in range(n):
        if k >= 2 and rng.random() < 0.3:  # a row holding the extreme ids 0 and vocab - 1
            inner = rng.choice(vocab - 2, size=k - 2, replace=False) + 1
            ids[r] = np.concatenate([[0, vocab - 1], inner])
        else:
            ids[r] = rng.choice(vocab, size=k, replace=False)
        logprobs[r] = make_row_values(
            rng, k, str(rng.choice(HEAD_KINDS)), str(rng.choice(TAIL_KINDS))
        )
    return ids, logprobs


@st.composite
def caches(draw) -> dict[str, Any]:
    """A writer configuration and the records to write with it."""
    k = draw(st.sampled_from([1, 2, 3, 7, 16, 100, 128, 256]))
    vocab = draw(st.sampled_from([k, k + 1, 1000, 32000, 151936, 262144]))
    positions = draw(st.sampled_from(["supervised", "all"]))
    sample_ids = draw(st.sampled_from(["none", "all", "some"]))
    n_records = draw(st.integers(0, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    records = []
    for index in range(n_records):
        t = draw(st.integers(1, 24 if k <= 16 else 8))
        mask_kind = draw(st.sampled_from(["random", "none", "all_but_first"]))
        loss_mask = np.zeros(t, dtype=bool)
        if mask_kind == "random":
            loss_mask[1:] = rng.random(t - 1) < 0.6
        elif mask_kind == "all_but_first":
            loss_mask[1:] = True
        n = t - 1 if positions == "all" else int(loss_mask.sum())
        ids, logprobs = make_rows(rng, n, k, vocab)
        input_ids = rng.integers(0, vocab, t)
        input_ids[rng.random(t) < 0.1] = vocab - 1
        record = {
            "input_ids": input_ids.astype(draw(st.sampled_from([np.int32, np.int64]))),
            "loss_mask": loss_mask,
            "topk_ids": ids.astype(draw(st.sampled_from([np.int32, np.int64]))),
            # float32 input is rounded to fp16 by the writer; these values are exact in fp16.
            "topk_logprobs": logprobs.astype(draw(st.sampled_from([np.float16, np.float32]))),
        }
        if sample_ids == "all" or (sample_ids == "some" and rng.random() < 0.5):
            record["sample_id"] = draw(
                st.sampled_from(["", "ex-0", "é✓ unicode", "x" * 4096, f"rec-{index}"])
            )
        records.append(record)
    return {
        "k": k,
        "vocab_size": vocab,
        "positions": positions,
        "records": records,
        # From one record per chunk and one chunk per shard up to everything in one shard.
        "chunk_bytes": draw(st.sampled_from([1, 300, 4096, 2 << 20])),
        "shard_bytes": draw(st.sampled_from([1, 2000, 256 << 20])),
        "threads": draw(st.sampled_from([1, 3])),
    }


def expected(record: dict[str, Any]) -> dict[str, Any]:
    ids, logprobs = canonical(np.asarray(record["topk_ids"]), record["topk_logprobs"])
    return {**record, "topk_ids": ids, "topk_logprobs": logprobs}


# -- the property ----------------------------------------------------------------------------


def check_roundtrip(case: dict[str, Any]) -> None:
    records = case["records"]
    with tempfile.TemporaryDirectory() as tmp:
        with CacheWriter(
            tmp,
            k=case["k"],
            vocab_size=case["vocab_size"],
            positions=case["positions"],
            chunk_bytes=case["chunk_bytes"],
            shard_bytes=case["shard_bytes"],
            threads=case["threads"],
        ) as writer:
            for record in records:
                writer.add(**record)
        manifest = writer.manifest
        want = [expected(r) for r in records]
        assert manifest.records == len(records)
        assert manifest.tokens == sum(len(r["input_ids"]) for r in records)
        assert manifest.targets == sum(len(r["topk_ids"]) for r in records)
        with open_cache(tmp, chunk_cache_size=1) as cache:
            assert len(cache) == len(records)
            for i, record in enumerate(cache.iter_records()):
                assert_record_equal(record, want[i], where=f"record {i} (iter)")
            # Random access in a scrambled order, with a one-chunk cache: re-decodes chunks.
            order = np.random.default_rng(len(records)).permutation(len(records))
            for i in order.tolist():
                assert_record_equal(cache[i], want[i], where=f"record {i} (getitem)")
            assert cache.verify() == []


@given(caches())
@example(  # T=1 in both modes: a record with no targets at all
    {
        "k": 1,
        "vocab_size": 1,
        "positions": "all",
        "records": [
            {
                "input_ids": np.zeros(1, np.int32),
                "loss_mask": np.zeros(1, bool),
                "topk_ids": np.zeros((0, 1), np.int32),
                "topk_logprobs": np.zeros((0, 1), np.float16),
            }
        ],
        "chunk_bytes": 1,
        "shard_bytes": 1,
        "threads": 1,
    }
)
def test_roundtrip_is_bit_exact(case):
    check_roundtrip(case)


@pytest.mark.parametrize(
    "k, vocab, positions",
    [(1, 2, "supervised"), (256, 256, "all"), (256, 262144, "supervised"), (100, 128256, "all")],
)
def test_roundtrip_extremes(k, vocab, positions):
    """Fixed corner cases: K=1, K=vocab (every row a permutation), the largest vocabulary."""
    rng = np.random.default_rng(k * vocab)
    records = []
    for t in (1, 2, 9):
        loss_mask = np.arange(t) % 2 == 1
        n = t - 1 if positions == "all" else int(loss_mask.sum())
        ids, logprobs = make_rows(rng, n, k, vocab)
        input_ids = np.full(t, vocab - 1)
        records.append(
            {
                "input_ids": input_ids,
                "loss_mask": loss_mask,
                "topk_ids": ids,
                "topk_logprobs": logprobs,
            }
        )
    case = {
        "k": k,
        "vocab_size": vocab,
        "positions": positions,
        "records": records,
        "chunk_bytes": 1,
        "shard_bytes": 1,
        "threads": 2,
    }
    check_roundtrip(case)


def test_every_fp16_bit_pattern_of_a_valid_logprob_survives():
    """Every finite fp16 value <= 0 (-0.0, +0.0 and all subnormals included) round-trips."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    values = bits.view(np.float16)
    valid = values[np.isfinite(values) & (values <= 0)]
    # One near-certain value per row at most: put each value at the head of a row whose
    # other entries are -65504.
    k = 4
    rows = np.full((valid.size, k), FP16_MIN, dtype=np.float16)
    rows[:, 0] = valid
    ids = np.tile(np.arange(k, dtype=np.int32), (valid.size, 1))
    t = valid.size + 1
    record = {
        "input_ids": np.zeros(t, np.int32),
        "loss_mask": np.arange(t) > 0,
        "topk_ids": ids,
        "topk_logprobs": rows,
    }
    check_roundtrip(
        {
            "k": k,
            "vocab_size": 16,
            "positions": "supervised",
            "records": [record],
            "chunk_bytes": 2 << 20,
            "shard_bytes": 256 << 20,
            "threads": 1,
        }
    )


def test_float_input_below_the_fp16_range_is_stored_as_fp16_min(tmp_path):
    """float32/64 logprobs below -65504 (probability 0) are stored as -65504, not -inf."""
    values = np.array([[-0.01, -70000.0, -1e30, -3.4e38]], dtype=np.float64)
    ids = np.array([[5, 2, 1, 9]], dtype=np.int32)
    with CacheWriter(str(tmp_path), k=4, vocab_size=10) as writer:
        for dtype in (np.float32, np.float64):
            writer.add(
                input_ids=np.array([1, 2], np.int32),
                loss_mask=np.array([False, True]),
                topk_ids=ids,
                topk_logprobs=values.astype(dtype),
            )
    with open_cache(str(tmp_path)) as cache:
        for record in cache:
            np.testing.assert_array_equal(record.topk_ids, [[5, 1, 2, 9]])
            np.testing.assert_array_equal(
                record.topk_logprobs.view(np.uint16),
                np.array([[-0.01, FP16_MIN, FP16_MIN, FP16_MIN]], np.float16).view(np.uint16),
            )


@pytest.mark.parametrize("tokens", [300_000, 2_000_000])
def test_highly_compressible_chunks_pass_the_expansion_bound(tokens):
    """Constant columns compress by up to zstd's RLE ratio; the reader's bound on
    raw_length / stored length must still accept what a writer produces."""
    record = {
        "input_ids": np.zeros(tokens, np.int32),
        "loss_mask": np.zeros(tokens, bool),
        "topk_ids": np.zeros((0, 1), np.int32),
        "topk_logprobs": np.zeros((0, 1), np.float16),
    }
    check_roundtrip(
        {
            "k": 1,
            "vocab_size": 2,
            "positions": "supervised",
            "records": [record, record],
            "chunk_bytes": 64 << 20,
            "shard_bytes": 256 << 20,
            "threads": 1,
        }
    )
