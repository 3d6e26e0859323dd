"""Read-ahead for scans: the chunks after the one in hand are unpacked on a second thread.

About half of decoding a chunk is checksumming its blocks and undoing their zstd stage, and
both run in C without the GIL (xxhash and python-zstandard release it). A reader that knows
which chunks come next hands those to one background thread (ShardFile.unpack_chunk) while
its own thread runs the decoders and checks of the chunk before: on a machine with a core to
spare, a scan can use it (`read_ahead=` on iter_records and LogitCacheDataset; off by
default, see SUGGESTED_DEPTH). Results are the same bytes either way, and a corrupt block
raises the same error, naming shard, chunk and column, when its chunk is taken.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# A depth that rides out one slow chunk and holds little memory (a default chunk unpacks to
# about 0.5 MB), for callers that turn read-ahead on. It is off by default: on a 2-core VM it
# made scans slower (0.91x with the compiled decoders, 0.79x before them), although two threads
# do unzip twice as fast as one there, and a GIL switch interval 50x shorter changed nothing
# (benchmarks/bench_readahead.py measures it on and off, fresh processes).
SUGGESTED_DEPTH = 4


class ReadAhead(Generic[K, V]):
    """`unpack(key)` for each of `keys` in order, up to `depth` keys ahead of the one taken.

    `take(key)` must name the keys in the order given; it waits for that key's result (or
    re-raises its error) and starts the next. With depth 0 nothing runs in the background and
    `take` returns None: the caller decodes the whole chunk itself. `close` drops what is not
    yet taken and stops the thread, from any thread; `take` then returns None, so a scan whose
    cache was closed under it goes on decoding by itself. Use it as a context manager so a
    scan stopped early stops its thread.
    """

    def __init__(self, unpack: Callable[[K], V], keys: Iterable[K], depth: int):
        if depth < 0:
            raise ValueError(f"read-ahead depth must be >= 0, got {depth}")
        self._unpack = unpack
        self._lock = threading.Lock()  # take and close may run on different threads
        self._keys = iter(keys) if depth else iter(())
        self._pending: deque[tuple[K, Future]] = deque()
        self._executor = (
            ThreadPoolExecutor(1, thread_name_prefix="logitcache-readahead") if depth else None
        )
        for _ in range(depth):
            if not self._submit_next():
                break

    def _submit_next(self) -> bool:
        key = next(self._keys, None)
        if key is None:
            return False
        self._pending.append((key, self._executor.submit(self._unpack, key)))
        return True

    def pending(self) -> list[K]:
        """Keys submitted and not yet taken, in order."""
        with self._lock:
            return [key for key, _ in self._pending]

    def take(self, key: K) -> V | None:
        with self._lock:
            if self._executor is None:
                return None
            if not self._pending or self._pending[0][0] != key:
                expected = self._pending[0][0] if self._pending else "nothing"
                raise RuntimeError(f"read-ahead: asked for {key!r}, next in order is {expected!r}")
            _, future = self._pending.popleft()
            self._submit_next()
        return future.result()

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
            for _, future in self._pending:
                future.cancel()
            self._pending.clear()
        if executor is not None:
            executor.shutdown(wait=True)  # outside the lock: the running unpack may finish

    def __enter__(self) -> ReadAhead[K, V]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
