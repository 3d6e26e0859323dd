"""Whole caches on S3 (moto on loopback): write, read back bit-exact, stream with workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from logitcache import CacheWriter, open_cache
from logitcache.loader import LogitCacheDataset, LogitCacheLoader
from logitcache.synthetic import synthetic_records

from .fault_proxy import shard_get

N = 120
WRITE = {"k": 8, "vocab_size": 512, "chunk_bytes": 2048, "shard_bytes": 10_000}


def _records():
    return list(synthetic_records(N, k=8, vocab_size=512, mean_length=24, seed=4))


def _write(url, options=None):
    with CacheWriter(url, storage_options=options, **WRITE) as w:
        for kw in _records():
            w.add(**kw)


def _same_record(a, b) -> bool:
    return (
        a.sample_id == b.sample_id
        and np.array_equal(a.input_ids, b.input_ids)
        and np.array_equal(a.loss_mask, b.loss_mask)
        and np.array_equal(a.topk_ids, b.topk_ids)
        and np.array_equal(a.topk_logprobs.view(np.uint16), b.topk_logprobs.view(np.uint16))
    )


@pytest.fixture
def s3_cache(s3_bucket, tmp_path):
    bucket, options = s3_bucket
    url = f"s3://{bucket}/runs/cache"
    _write(url, options)
    local = str(tmp_path / "local")
    _write(local)
    return url, options, local


def test_write_to_s3_and_read_back_bit_exact(s3_cache, tmp_path):
    url, options, local = s3_cache
    with open_cache(url, storage_options=options, cache_dir=str(tmp_path / "c")) as remote:
        names = remote.store.list("shards")
        assert len(names) == len(remote.manifest.shards) > 3
        assert remote.store.exists("manifest.json")
        assert remote.verify() == []
        with open_cache(local) as ref:
            assert [s.records for s in remote.manifest.shards] == [
                s.records for s in ref.manifest.shards
            ]
            for a, b in zip(remote.iter_records(), ref.iter_records(), strict=True):
                assert _same_record(a, b)


def test_streaming_keeps_the_local_cache_under_its_limit(s3_cache, tmp_path):
    url, options, local = s3_cache
    with open_cache(local) as ref:
        biggest = max(s.bytes for s in ref.manifest.shards)
    limit = 3 * biggest
    ds = LogitCacheDataset(
        url,
        storage_options=options,
        cache_dir=str(tmp_path / "c"),
        cache_limit_bytes=limit,
        shuffle_window=8,
        prefetch_shards=1,
    )
    seen = [r.sample_id for r in ds]
    assert sorted(seen) == sorted(kw["sample_id"] for kw in _records())
    cached = ds.cache.store.cached_files()
    assert sum(size for _, size, _ in cached) <= limit
    assert len(cached) < len(ds.cache.manifest.shards), "older shards were evicted"


def test_loader_with_workers_matches_local_and_survives_faults(faulty_s3_bucket, tmp_path):
    bucket, options, plan = faulty_s3_bucket
    url = f"s3://{bucket}/cache"
    _write(url, options)
    local = str(tmp_path / "local")
    _write(local)

    def batches(u, opts):
        ds = LogitCacheDataset(u, storage_options=opts, cache_dir=str(tmp_path / "c"), seed=3)
        loader = LogitCacheLoader(ds, 8, num_workers=2)
        if opts is not None:
            assert loader.multiprocessing_context.get_start_method() in ("forkserver", "spawn")
        return list(loader)

    expected = batches(local, None)
    plan.add("drop", shard_get, times=2)
    plan.add("500", shard_get, times=2)
    got = batches(url, options)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert plan.pending() == 0


def test_missing_cache_names_the_url(s3_bucket):
    bucket, options = s3_bucket
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/nothing"):
        open_cache(f"s3://{bucket}/nothing", storage_options=options)
