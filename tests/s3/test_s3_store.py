"""The remote store against a real S3 server on loopback: bytes, listing, shard cache, faults."""

from __future__ import annotations

import mmap
import os
import pickle

import numpy as np
import pytest

from logitcache.format import CorruptCacheError
from logitcache.retry import RemoteAccessError, RemoteNotFoundError, RetryPolicy
from logitcache.storage import RemoteStore, open_store

from .fault_proxy import shard_get

FAST_RETRY = RetryPolicy(attempts=6, base_delay_s=0.01, max_delay_s=0.05, budget_s=30.0)


def _shards(store: RemoteStore, sizes: list[int], seed: int = 0) -> list[tuple[str, int, str]]:
    """Upload random shard files of these sizes; returns their (rel, size, checksum)."""
    import xxhash

    rng = np.random.default_rng(seed)
    out = []
    for i, size in enumerate(sizes):
        rel = f"shards/{i:05d}.lgc"
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        local = store.new_local_file(rel)
        with open(local, "wb") as f:
            f.write(data)
        store.put_file(local, rel)
        assert not os.path.exists(local)
        out.append((rel, size, f"xxh3_64:{xxhash.xxh3_64_hexdigest(data)}"))
    return out


def _remote_bytes(store: RemoteStore, rel: str) -> bytes:
    return store.read_bytes(rel)


def _leftovers(cache_dir) -> list[str]:
    return [os.path.join(d, n) for d, _, names in os.walk(cache_dir) for n in names if ".tmp-" in n]


def _store(bucket, options, tmp_path, **kw) -> RemoteStore:
    store = open_store(
        f"s3://{bucket}/cache", options, cache_dir=str(tmp_path / "shard-cache"), **kw
    )
    assert isinstance(store, RemoteStore)
    store.retry = FAST_RETRY
    return store


def test_write_list_read_bit_exact(s3_bucket, tmp_path):
    bucket, options = s3_bucket
    store = _store(bucket, options, tmp_path)
    assert not store.exists("manifest.json")
    assert store.list("shards") == []
    shards = _shards(store, [1000, 70_000, 5])
    store.write_bytes("manifest.json", b'{"hello": 1}')
    assert store.exists("manifest.json")
    assert store.read_bytes("manifest.json") == b'{"hello": 1}'
    assert store.size("shards/00001.lgc") == 70_000
    assert store.list("shards") == [rel for rel, _, _ in shards]
    for rel, size, checksum in shards:
        path = store.local_shard_path(rel, size=size, checksum=checksum)
        with open(path, "rb") as f:
            assert f.read() == _remote_bytes(store, rel)
    store.remove("shards/00002.lgc")
    assert store.list("shards") == ["shards/00000.lgc", "shards/00001.lgc"]
    store.close()


def test_lru_eviction_and_refetch(faulty_s3_bucket, tmp_path):
    bucket, options, plan = faulty_s3_bucket
    store = _store(bucket, options, tmp_path, cache_limit_bytes=25_000)
    shards = _shards(store, [10_000] * 4)
    paths = [store.local_shard_path(*s[:1], size=s[1], checksum=s[2]) for s in shards]
    cached = {p for p, _, _ in store.cached_files()}
    assert cached == set(paths[2:]), "the two least recently used shards are evicted"
    assert sum(size for _, size, _ in store.cached_files()) <= 25_000

    n_gets = sum(1 for m, p, _ in plan.log if shard_get(m, p))
    again = store.local_shard_path(shards[3][0], size=10_000, checksum=shards[3][2])
    assert again == paths[3]
    assert sum(1 for m, p, _ in plan.log if shard_get(m, p)) == n_gets, "a hit is not fetched"
    refetched = store.local_shard_path(shards[0][0], size=10_000, checksum=shards[0][2])
    assert sum(1 for m, p, _ in plan.log if shard_get(m, p)) == n_gets + 1
    with open(refetched, "rb") as f:
        assert f.read() == _remote_bytes(store, shards[0][0])
    assert not _leftovers(tmp_path)
    store.close()


def test_eviction_spares_memory_mapped_shards(s3_bucket, tmp_path):
    bucket, options = s3_bucket
    store = _store(bucket, options, tmp_path, cache_limit_bytes=15_000)
    shards = _shards(store, [10_000] * 3)
    first = store.local_shard_path(shards[0][0], size=10_000, checksum=shards[0][2])
    with open(first, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        for rel, size, checksum in shards[1:]:
            store.local_shard_path(rel, size=size, checksum=checksum)
        assert os.path.exists(first), "a memory-mapped shard must not be evicted"
        assert bytes(mapped[:100]) == _remote_bytes(store, shards[0][0])[:100]
    finally:
        mapped.close()
    store.close()


def test_prefetch_runs_ahead(faulty_s3_bucket, tmp_path):
    bucket, options, plan = faulty_s3_bucket
    store = _store(bucket, options, tmp_path)
    shards = _shards(store, [20_000, 30_000, 40_000])
    store.prefetch(shards)
    for fut in list(store._get_prefetcher()._in_flight.values()):
        fut.result(timeout=30)
    n_gets = sum(1 for m, p, _ in plan.log if shard_get(m, p))
    assert n_gets == 3
    for rel, size, checksum in shards:
        path = store.local_shard_path(rel, size=size, checksum=checksum)
        with open(path, "rb") as f:
            assert f.read() == _remote_bytes(store, rel)
    reads = sum(1 for m, p, _ in plan.log if shard_get(m, p))
    assert reads == n_gets + 3, "only the test's own read_bytes calls fetched again"
    store.close()


@pytest.mark.parametrize("fault", ["500", "503", "drop", "truncate"])
def test_transient_faults_are_retried(faulty_s3_bucket, tmp_path, fault):
    bucket, options, plan = faulty_s3_bucket
    store = _store(bucket, options, tmp_path)
    store.part_bytes = 16_384  # several ranged GETs per shard, each one can fail
    shards = _shards(store, [50_000, 40_000])
    plan.add(fault, shard_get, times=3)
    for rel, size, checksum in shards:
        path = store.local_shard_path(rel, size=size, checksum=checksum)
        with open(path, "rb") as f:
            got = f.read()
        assert got == _remote_bytes(store, rel)
    assert plan.pending() == 0, "every injected fault was hit"
    assert not _leftovers(tmp_path), "no half-written file is left in the cache directory"
    store.close()


def test_corrupt_download_is_detected_and_refetched(faulty_s3_bucket, tmp_path):
    bucket, options, plan = faulty_s3_bucket
    store = _store(bucket, options, tmp_path)
    ((rel, size, checksum),) = _shards(store, [30_000])
    plan.add("corrupt", shard_get, times=1)
    path = store.local_shard_path(rel, size=size, checksum=checksum)
    assert [k for m, p, k in plan.log if shard_get(m, p)] == ["corrupt", None]
    with open(path, "rb") as f:
        assert f.read() == _remote_bytes(store, rel)
    assert not _leftovers(tmp_path)
    store.close()


def test_persistent_corruption_fails_with_url_and_leaves_nothing(faulty_s3_bucket, tmp_path):
    bucket, options, plan = faulty_s3_bucket
    store = _store(bucket, options, tmp_path)
    store.retry = RetryPolicy(attempts=3, base_delay_s=0.01, max_delay_s=0.02, budget_s=10)
    ((rel, size, checksum),) = _shards(store, [30_000])
    plan.add("corrupt", shard_get, times=100)
    with pytest.raises(CorruptCacheError, match=rf"s3://{bucket}/cache/{rel}.*checksum"):
        store.local_shard_path(rel, size=size, checksum=checksum)
    assert [p for p, _, _ in store.cached_files()] == []
    assert not _leftovers(tmp_path)
    store.close()


def test_not_found_and_denied_fail_fast_naming_the_url(faulty_s3_bucket, tmp_path):
    bucket, options, plan = faulty_s3_bucket
    store = _store(bucket, options, tmp_path)
    with pytest.raises(RemoteNotFoundError, match=rf"s3://{bucket}/cache/shards/nope.lgc"):
        store.local_shard_path("shards/nope.lgc", size=10, checksum="xxh3_64:" + "0" * 16)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        store.read_bytes("manifest.json")

    ((rel, size, checksum),) = _shards(store, [1000])
    plan.log.clear()
    plan.add("403", shard_get, times=100)
    with pytest.raises(RemoteAccessError, match=rf"s3://{bucket}/cache/{rel}.*access denied"):
        store.local_shard_path(rel, size=size, checksum=checksum)
    assert sum(1 for m, p, _ in plan.log if shard_get(m, p)) == 1, "a 403 is not retried"
    store.close()


def test_pickled_store_carries_no_client(s3_bucket, tmp_path):
    bucket, options = s3_bucket
    store = _store(bucket, options, tmp_path)
    ((rel, size, checksum),) = _shards(store, [5000])
    store.local_shard_path(rel, size=size, checksum=checksum)
    clone = pickle.loads(pickle.dumps(store))
    assert clone._fs is None and clone._prefetcher is None
    assert clone.cache_root == store.cache_root
    path = clone.local_shard_path(rel, size=size, checksum=checksum)
    assert os.path.getsize(path) == size
    store.close()
    clone.close()
