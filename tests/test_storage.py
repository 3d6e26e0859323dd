"""The store layer without a network: memory:// stores, retry rules, the prefetcher, eviction."""

from __future__ import annotations

import errno
import os
import threading
import time
import uuid

import pytest
import xxhash

from logitcache.format import CacheError, CorruptCacheError
from logitcache.prefetch import Prefetcher
from logitcache.retry import (
    RemoteNotFoundError,
    RetryPolicy,
    TransientDownloadError,
    call_with_retry,
    is_transient,
)
from logitcache.storage import LocalStore, RemoteStore, file_checksum, open_store

FAST = RetryPolicy(attempts=4, base_delay_s=0.001, max_delay_s=0.002, budget_s=5)


class _ClientError(Exception):
    """Shaped like botocore's ClientError: a `response` dict with the HTTP status."""

    def __init__(self, status: int, code: str):
        super().__init__(code)
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


def _wrapped(cause: BaseException) -> OSError:
    exc = OSError(errno.EIO, "wrapped")
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    "exc, transient",
    [
        (TimeoutError("read timed out"), True),
        (ConnectionResetError("reset by peer"), True),
        (_wrapped(_ClientError(500, "InternalError")), True),
        (_wrapped(_ClientError(503, "SlowDown")), True),
        (_wrapped(_ClientError(429, "TooManyRequests")), True),
        (TransientDownloadError("short read"), True),
        (OSError(errno.ECONNRESET, "reset"), True),
        (type("ServerDisconnectedError", (Exception,), {})("gone"), True),
        (FileNotFoundError("404"), False),
        (PermissionError("403"), False),
        (_wrapped(_ClientError(400, "InvalidRange")), False),
        (ValueError("bad argument"), False),
        (CacheError("bad manifest"), False),
    ],
)
def test_transient_classification(exc, transient):
    assert is_transient(exc) is transient


def test_retry_recovers_from_transient_errors():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset")
        return "ok"

    assert call_with_retry(flaky, url="memory://x/a", what="read it", policy=FAST) == "ok"
    assert len(calls) == 3


def test_retry_budget_is_bounded_and_names_the_url():
    calls = []

    def always():
        calls.append(1)
        raise TimeoutError("slow")

    with pytest.raises(CacheError, match=r"memory://x/a: could not read it after 4 attempts"):
        call_with_retry(always, url="memory://x/a", what="read it", policy=FAST)
    assert len(calls) == 4


@pytest.mark.parametrize("exc", [FileNotFoundError("nope"), PermissionError("denied")])
def test_permanent_errors_fail_on_first_attempt(exc):
    calls = []

    def fail():
        calls.append(1)
        raise exc

    with pytest.raises(type(exc), match="memory://x/a"):
        call_with_retry(fail, url="memory://x/a", what="read it", policy=FAST)
    assert len(calls) == 1


def test_prefetcher_fetches_each_key_once_while_in_flight():
    started = threading.Event()
    release = threading.Event()
    calls = []

    def fetch(key):
        calls.append(key)
        started.set()
        release.wait(5)
        return key * 2

    p = Prefetcher(fetch, threads=2)
    p.submit(21)
    p.submit(21)
    assert started.wait(5)
    result = []
    waiter = threading.Thread(target=lambda: result.append(p.get(21)))
    waiter.start()
    time.sleep(0.05)
    release.set()
    waiter.join(5)
    assert result == [42] and calls == [21]
    assert p.get(21) == 42 and calls == [21, 21], "a finished fetch is not remembered"
    p.close()


def test_prefetcher_delivers_errors_to_the_waiter():
    def fetch(key):
        raise RuntimeError(f"cannot fetch {key}")

    p = Prefetcher(fetch, threads=1)
    fut = p.submit("a")
    with pytest.raises(RuntimeError, match="cannot fetch a"):
        fut.result(5)
    with pytest.raises(RuntimeError, match="cannot fetch a"):
        p.get("a")
    p.close()


@pytest.fixture
def memory_store(tmp_path):
    url = f"memory://logitcache-test-{uuid.uuid4().hex}/cache"
    store = open_store(url, cache_dir=str(tmp_path / "local"), cache_limit_bytes=2500)
    assert isinstance(store, RemoteStore) and not store.is_local
    store.retry = FAST
    yield store
    store.close()
    if store.fs.exists(url):
        store.fs.rm(url, recursive=True)


def _upload(store, rel: str, data: bytes) -> tuple[str, int, str]:
    local = store.new_local_file(rel)
    with open(local, "wb") as f:
        f.write(data)
    store.put_file(local, rel)
    return rel, len(data), f"xxh3_64:{xxhash.xxh3_64_hexdigest(data)}"


def test_memory_store_round_trip_and_lru(memory_store):
    store = memory_store
    shards = [_upload(store, f"shards/{i}.lgc", bytes([i]) * 1000) for i in range(4)]
    assert store.list("shards") == [s[0] for s in shards]
    paths = []
    for rel, size, checksum in shards:
        path = store.local_shard_path(rel, size=size, checksum=checksum)
        assert file_checksum(path) == checksum
        paths.append(path)
    assert sorted(p for p, _, _ in store.cached_files()) == sorted(paths[2:])
    # Touching a shard makes it the most recent: the other one goes first.
    store.local_shard_path(*shards[2][:1], size=1000, checksum=shards[2][2])
    store.local_shard_path(*shards[0][:1], size=1000, checksum=shards[0][2])
    assert sorted(p for p, _, _ in store.cached_files()) == sorted([paths[0], paths[2]])


def test_a_shard_handed_out_for_mapping_is_not_evicted_before_it_is_mapped(memory_store):
    """Between download and mmap a shard is not yet in /proc/self/maps; downloads that evict
    (on another thread, in a reader) must still leave it until the `with` ends."""
    store = memory_store  # room for two 1000-byte shards
    shards = [_upload(store, f"shards/{i}.lgc", bytes([i]) * 1000) for i in range(4)]
    rel, size, checksum = shards[0]
    with store.shard_to_map(rel, size=size, checksum=checksum) as path:
        for other, other_size, other_checksum in shards[1:]:
            store.local_shard_path(other, size=other_size, checksum=other_checksum)
        assert os.path.exists(path), "evicted before it was mapped"
    # Once handed over, it is an ordinary unmapped file: the next download may evict it.
    store.local_shard_path(shards[1][0], size=1000, checksum=shards[1][2])
    store.local_shard_path(shards[2][0], size=1000, checksum=shards[2][2])
    assert not os.path.exists(path)


def test_checksum_mismatch_is_corruption_and_leaves_nothing(memory_store):
    store = memory_store
    rel, size, _ = _upload(store, "shards/a.lgc", b"x" * 1000)
    with pytest.raises(CorruptCacheError, match=r"memory://.*/cache/shards/a.lgc.*checksum"):
        store.local_shard_path(rel, size=size, checksum="xxh3_64:" + "0" * 16)
    assert store.cached_files() == []
    assert not any(".tmp-" in n for _, _, ns in os.walk(store.cache_root) for n in ns)


def test_size_mismatch_is_detected(memory_store):
    store = memory_store
    data = b"y" * 1000
    rel, _, checksum = _upload(store, "shards/b.lgc", data)
    with pytest.raises(CorruptCacheError, match="truncated|bytes"):
        store.local_shard_path(rel, size=2000, checksum=checksum)


def test_missing_object_fails_fast(memory_store):
    with pytest.raises(RemoteNotFoundError, match=r"memory://.*/cache/shards/none.lgc"):
        memory_store.local_shard_path("shards/none.lgc", size=1, checksum="xxh3_64:" + "1" * 16)


def test_malformed_manifest_checksum_is_rejected(memory_store):
    with pytest.raises(CacheError, match="shards/a.lgc: checksum 'md5:abc'"):
        memory_store.local_shard_path("shards/a.lgc", size=1, checksum="md5:abc")


def test_stale_temp_files_are_swept(memory_store):
    store = memory_store
    os.makedirs(store.cache_root, exist_ok=True)
    stale = os.path.join(store.cache_root, "x.lgc.tmp-dead")
    fresh = os.path.join(store.cache_root, "y.lgc.tmp-live")
    for p in (stale, fresh):
        with open(p, "wb") as f:
            f.write(b"z")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert store.cached_files() == []
    assert not os.path.exists(stale) and os.path.exists(fresh)


def test_paths_outside_the_root_are_refused(memory_store, tmp_path):
    for bad in ("../x", "/abs", "a//b", "s3://b/k"):
        with pytest.raises(CacheError):
            memory_store.read_bytes(bad)
        with pytest.raises(CacheError):
            LocalStore(str(tmp_path)).read_bytes(bad)


def test_open_store_picks_the_backend(tmp_path):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    store = open_store("memory://somewhere/else", cache_dir=str(tmp_path))
    assert isinstance(store, RemoteStore)
    assert store.cache_root.startswith(str(tmp_path))
    with pytest.raises(CacheError, match="nosuchproto://x"):
        open_store("nosuchproto://x").exists("manifest.json")
