"""Single-flight background fetching: each key is fetched once, by whoever asks first.

A remote store hands shard downloads to a Prefetcher so that a prefetch started on a
background thread and a reader asking for the same shard share one download.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Prefetcher(Generic[K, V]):
    """Runs `fetch(key)` at most once at a time per key, ahead of need or on demand.

    `submit(key)` starts a background fetch (a no-op if one is in flight); `get(key)` waits for
    the in-flight fetch of `key` or runs it on the calling thread. Finished fetches are
    forgotten, so a later `get` fetches again (the store decides whether that is a cache hit).
    """

    def __init__(self, fetch: Callable[[K], V], *, threads: int = 4, name: str = "prefetch"):
        if threads < 1:
            raise ValueError(f"prefetch threads must be >= 1, got {threads}")
        self._fetch = fetch
        self._threads = threads
        self._name = name
        self._lock = threading.Lock()
        self._in_flight: dict[K, Future] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False

    def in_flight(self) -> list[K]:
        with self._lock:
            return list(self._in_flight)

    def submit(self, key: K) -> Future:
        """Start fetching `key` on a background thread unless it is already in flight."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name}: prefetcher is closed")
            fut = self._in_flight.get(key)
            if fut is not None:
                return fut
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix=self._name)
            fut = Future()
            self._in_flight[key] = fut
            self._executor.submit(self._run, key, fut)
            return fut

    def get(self, key: K) -> V:
        """The value of `fetch(key)`: joins an in-flight fetch or runs one here."""
        with self._lock:
            fut = self._in_flight.get(key)
            owner = fut is None
            if owner:
                fut = Future()
                self._in_flight[key] = fut
        if owner:
            self._run(key, fut)
        return fut.result()

    def _run(self, key: K, fut: Future) -> None:
        if not fut.set_running_or_notify_cancel():
            self._forget(key, fut)
            return
        try:
            value = self._fetch(key)
        except BaseException as exc:  # delivered to every waiter via the future
            self._forget(key, fut)
            fut.set_exception(exc)
        else:
            self._forget(key, fut)
            fut.set_result(value)

    def _forget(self, key: K, fut: Future) -> None:
        with self._lock:
            if self._in_flight.get(key) is fut:
                del self._in_flight[key]

    def close(self) -> None:
        """Cancel queued fetches and wait for running ones to finish."""
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
            pending = list(self._in_flight.values())
        for fut in pending:
            fut.cancel()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
