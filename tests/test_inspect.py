"""Teacher-distribution statistics, chunk sampling and the per-record view of `inspect`."""

from __future__ import annotations

import numpy as np
import pytest

from logitcache import CacheWriter, open_cache
from logitcache.inspect import (
    cache_summary,
    collect_teacher_sample,
    format_record_view,
    format_report,
    inspect_report,
    quantile_summary,
    record_view,
    row_statistics,
    sample_chunks,
)
from logitcache.synthetic import synthetic_records


def test_row_statistics_match_hand_computed_values():
    probs = np.array([[0.5, 0.25, 0.125], [1.0, 0.0, 0.0]])
    with np.errstate(divide="ignore"):
        lp = np.log(probs)
    lp[1, 1:] = -30.0  # "probability zero" as a teacher would store it
    stats = row_statistics(lp.astype(np.float16))
    np.testing.assert_allclose(stats["top1_prob"], [0.5, 1.0], rtol=1e-3)
    np.testing.assert_allclose(stats["tail_mass"], [0.125, 0.0], atol=1e-3)
    q = np.array([4, 2, 1]) / 7
    np.testing.assert_allclose(stats["entropy_topk_nats"], [-(q * np.log(q)).sum(), 0.0], atol=1e-3)


def test_row_statistics_of_empty_rows():
    stats = row_statistics(np.zeros((0, 4), np.float16))
    assert all(v.size == 0 for v in stats.values())
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        row_statistics(np.zeros(4))


def test_quantile_summary():
    q = quantile_summary(np.arange(101, dtype=np.float64))
    assert q["count"] == 101 and q["min"] == 0 and q["max"] == 100
    assert q["p50"] == 50 and q["p01"] == 1 and q["p99"] == 99 and q["mean"] == 50
    assert quantile_summary(np.zeros(0))["p50"] is None


def test_sample_chunks_spreads_whole_chunks_evenly():
    chunks = [(s, c, 10) for s in range(5) for c in range(4)]  # 200 records
    assert sample_chunks(chunks, 500) == [(s, c) for s, c, _ in chunks]
    picked = sample_chunks(chunks, 40)
    assert len(picked) == 4
    assert picked[0] == (0, 0) and picked[-1] == (4, 3)  # first and last chunk, evenly between
    assert len({s for s, _ in picked}) >= 3


@pytest.fixture(scope="module")
def cache_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("inspect") / "cache")
    with CacheWriter(url, k=8, vocab_size=300, chunk_bytes=4 << 10, shard_bytes=16 << 10) as w:
        for record in synthetic_records(40, k=8, vocab_size=300, seed=3, mean_length=30):
            w.add(**record)
    return url


def test_report_counts_every_target_when_not_sampling(cache_url):
    with open_cache(cache_url) as cache:
        report, sample = inspect_report(cache, sample_records=10_000, progress=False)
        assert not sample.is_sample and sample.records == len(cache)
        assert sample.targets == cache.manifest.targets == report["targets"]
        sub = collect_teacher_sample(cache, sample_records=5, progress=False)
        assert sub.is_sample and sub.records == 5
        summary = cache_summary(cache)
    assert summary["bytes_per_target"] == pytest.approx(summary["bytes"] / summary["targets"])
    assert sum(s["records"] for s in summary["shards"]) == 40
    text = format_report(report)
    assert "all 40 records" in text and "tail mass" in text


def test_record_view_rank_and_candidates(cache_url):
    with open_cache(cache_url) as cache:
        record = cache[-1]
        view = record_view(cache, -1, top=2)
        assert view["index"] == len(cache) - 1
        with pytest.raises(ValueError, match="valid: 0..39"):
            record_view(cache, 40)
    positions = np.flatnonzero(record.loss_mask)
    for j, row in enumerate(view["rows"]):
        assert row["position"] == positions[j]
        hit = np.flatnonzero(record.topk_ids[j] == record.input_ids[positions[j]])
        assert row["rank"] == (int(hit[0]) + 1 if hit.size else None)
        assert len(row["candidates"]) == 2
    assert f"record {len(view['rows']) and view['index']}" in format_record_view(view)


def test_a_negative_tail_mass_is_explained(tmp_path):
    url = str(tmp_path / "c")
    with CacheWriter(url, k=4, vocab_size=50) as w:
        # Four entries of probability 0.26 each: 1.04 in total, within the writer's slack.
        w.add(
            input_ids=np.array([1, 2], np.int32),
            loss_mask=np.array([False, True]),
            topk_ids=np.array([[2, 3, 4, 5]], np.int32),
            topk_logprobs=np.full((1, 4), np.log(0.26), np.float32),
        )
    with open_cache(url) as cache:
        report, _ = inspect_report(cache, progress=False)
    text = format_report({**report, "url": url})
    assert "negative tail mass" in text and "fp16 rounding" in text
