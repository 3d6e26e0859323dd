"""Tests of the synthetic teacher: the shape of its rows and the realism of their statistics."""

from __future__ import annotations

import numpy as np
import pytest

from logitcache.synthetic import (
    SyntheticTeacher,
    canonical_order,
    row_statistics,
    synthetic_records,
)

# fp16 rounding of logprobs near 0 can lift a row's mass a hair above 1.
MASS_SLACK = 2e-3


@pytest.fixture(scope="module")
def rows_100() -> tuple[np.ndarray, np.ndarray]:
    return SyntheticTeacher(128256, 100, seed=0).rows(4000)


def test_rows_shapes_dtypes_and_ranges(rows_100):
    ids, logprobs = rows_100
    assert ids.shape == (4000, 100) and ids.dtype == np.int32
    assert logprobs.shape == (4000, 100) and logprobs.dtype == np.float16
    assert ids.min() >= 0 and ids.max() < 128256
    assert np.isfinite(logprobs).all()
    assert (logprobs <= 0).all()


def test_rows_have_distinct_ids(rows_100):
    ids, _ = rows_100
    s = np.sort(ids, axis=1)
    assert not (s[:, 1:] == s[:, :-1]).any()


def test_rows_are_canonical(rows_100):
    ids, logprobs = rows_100
    lp = logprobs.astype(np.float32)
    assert (lp[:, 1:] <= lp[:, :-1]).all()
    ties = lp[:, 1:] == lp[:, :-1]
    assert ties.any()  # fp16 rounding makes ties; they must be ordered by id
    assert (ids[:, 1:][ties] > ids[:, :-1][ties]).all()


def test_row_mass_at_most_one(rows_100):
    _, logprobs = rows_100
    mass = np.exp(logprobs.astype(np.float64)).sum(axis=1)
    assert (mass <= 1 + MASS_SLACK).all()


def test_determinism_by_seed():
    a = SyntheticTeacher(32000, 64, seed=7).rows(300)
    b = SyntheticTeacher(32000, 64, seed=7).rows(300)
    c = SyntheticTeacher(32000, 64, seed=8).rows(300)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1].view(np.uint16), b[1].view(np.uint16))
    assert not np.array_equal(a[0], c[0])


def test_stream_continues_across_calls():
    teacher = SyntheticTeacher(32000, 64, seed=3)
    first, _ = teacher.rows(50)
    second, _ = teacher.rows(50)
    # The context pool carries over, so the first new row shares ids with the last old one.
    assert len(np.intersect1d(first[-1], second[0])) > 0
    assert not np.array_equal(first[:50], second[:50])


def test_statistics_match_the_real_teacher_rows():
    """Calibrated to SmolLM2-135M-Instruct over standard-library source (K=100, V=49152):
    each quantile within a tolerance of the real rows' (logitcache.synthetic docstring)."""
    ids, logprobs = SyntheticTeacher(49152, 100, seed=0).rows(8000)
    stats = row_statistics(ids, logprobs)
    real_top1 = [0.16, 0.29, 0.53, 0.86, 0.98]
    real_entropy = [0.13, 0.63, 1.66, 2.69, 3.40]
    real_tail = [0.0003, 0.0024, 0.024, 0.089, 0.185]
    assert np.abs(np.subtract(stats["top1_prob"], real_top1)).max() < 0.1
    assert np.abs(np.subtract(stats["topk_entropy_nats"], real_entropy)).max() < 0.25
    # Tail mass within a factor of 2.5 at every quantile (it spans three decades).
    ratio = np.maximum(stats["tail_mass"], 1e-9) / np.array(real_tail)
    assert (ratio > 0.4).all() and (ratio < 2.5).all()
    assert 0.12 < stats["context_overlap"] < 0.3


def test_ids_follow_a_zipf_like_prior(rows_100):
    ids, _ = rows_100
    # Skewed: low ids (frequent tokens) are far more common than in a uniform draw...
    assert (ids < 1000).mean() > 0.1
    # ...but the top-K still reaches deep into the vocabulary.
    assert (ids > 128256 // 2).mean() > 0.05
    # Ids follow frequency rank only roughly: the permutation is not the identity.
    teacher = SyntheticTeacher(128256, 100)
    assert not np.array_equal(teacher.rank_to_id[:1000], np.arange(1000))
    assert np.sort(teacher.rank_to_id).tolist() == list(range(128256))


def test_small_vocabulary_edge_cases():
    ids, logprobs = SyntheticTeacher(8, 8, seed=1).rows(20)
    assert (np.sort(ids, axis=1) == np.arange(8)).all()
    assert (np.exp(logprobs.astype(np.float64)).sum(axis=1) <= 1 + MASS_SLACK).all()
    ids, logprobs = SyntheticTeacher(1000, 1).rows(5)
    assert ids.shape == (5, 1) and logprobs.shape == (5, 1)
    empty_ids, empty_lp = SyntheticTeacher(1000, 4).rows(0)
    assert empty_ids.shape == (0, 4) and empty_lp.shape == (0, 4)


@pytest.mark.parametrize(
    ("vocab_size", "k", "kwargs"),
    [(1, 1, {}), (100, 0, {}), (100, 101, {}), (100, 10, {"confident_fraction": 1.5})],
)
def test_bad_parameters_are_rejected(vocab_size, k, kwargs):
    with pytest.raises(ValueError, match="vocab_size|k=|confident_fraction"):
        SyntheticTeacher(vocab_size, k, **kwargs)


def test_canonical_order_sorts_ties_by_id():
    ids = np.array([[5, 3, 9, 1]], dtype=np.int32)
    lp = np.array([[-1.0, -0.5, -1.0, -0.0]], dtype=np.float16)
    out_ids, out_lp = canonical_order(ids, lp)
    assert out_ids.tolist() == [[1, 3, 5, 9]]
    assert out_lp.astype(np.float32).tolist() == [[-0.0, -0.5, -1.0, -1.0]]
    # Positive and negative zero and positive values keep their bits.
    ids = np.array([[0, 1, 2]], dtype=np.int32)
    lp = np.array([[0.0, 0.5, -2.0]], dtype=np.float16)
    out_ids, out_lp = canonical_order(ids, lp)
    assert out_ids.tolist() == [[1, 0, 2]]
    expected = np.array([[0.5, 0.0, -2.0]], np.float16)
    assert out_lp.view(np.uint16).tolist() == expected.view(np.uint16).tolist()


@pytest.mark.parametrize("positions", ["supervised", "all"])
def test_synthetic_records_layout(positions):
    records = list(
        synthetic_records(12, k=16, vocab_size=5000, seed=2, mean_length=40, positions=positions)
    )
    assert len(records) == 12
    for i, rec in enumerate(records):
        ids, mask = rec["input_ids"], rec["loss_mask"]
        assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
        assert len(ids) >= 2 and not mask[0] and mask[-1]
        # Prompt first (False), then the response (True), one contiguous block each.
        assert (np.diff(mask.astype(np.int8)) >= 0).all()
        n_rows = int(mask.sum()) if positions == "supervised" else len(ids) - 1
        assert rec["topk_ids"].shape == (n_rows, 16)
        assert rec["topk_logprobs"].shape == (n_rows, 16)
        assert rec["sample_id"] == f"synthetic-2-{i:08d}"
        assert ids.min() >= 0 and ids.max() < 5000
        # Each token with a row was sampled from that row.
        first = 1 if positions == "all" else int(np.argmax(mask))
        rows = rec["topk_ids"]
        assert all(ids[first + j] in rows[j] for j in range(n_rows))


def test_synthetic_records_determinism_and_options():
    a = list(synthetic_records(3, k=8, vocab_size=1000, seed=5, with_sample_id=False))
    b = list(synthetic_records(3, k=8, vocab_size=1000, seed=5, with_sample_id=False))
    assert "sample_id" not in a[0]
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x["input_ids"], y["input_ids"])
        assert np.array_equal(x["topk_ids"], y["topk_ids"])
    lengths = [len(r["input_ids"]) for r in synthetic_records(200, k=4, vocab_size=1000)]
    assert 150 < np.mean(lengths) < 360
    with pytest.raises(ValueError, match="positions"):
        next(synthetic_records(1, k=4, vocab_size=100, positions="every"))
