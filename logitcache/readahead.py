"""Read-ahead: the chunks after the one in hand are decoded on background threads.

Most of decoding a chunk runs without the GIL: a chunk of the default codecs in one call
(native.py), others through zstd (python-zstandard releases it) and the kernels, which release
it too. A reader that knows which chunks come next hands them to a few threads that decode
them whole while its own thread hands out the records of the chunk before. On 2 cores two
threads made scans 1.50x as fast (the median of benchmarks/bench_readahead.py's rounds;
single rounds 1.44x to 1.51x; decoding codec by codec, which takes the GIL some twenty times
a chunk, they were 1.29x, single rounds 0.94x to 1.38x). Scans
(iter_records) read ahead by default when the process may use more than one core
(scan_read_ahead); the streaming dataset only when asked (`read_ahead=`): DataLoader workers
are already one process per core. Results are the same bytes either way, and a corrupt block
raises the same error, naming shard, chunk and column, when its chunk is taken.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Chunks decoded ahead per thread: enough to ride out one slow chunk, little memory (a default
# chunk decodes to about 0.5 MB). Two threads is what was measured (on 2 cores); the Python
# part of each chunk holds the GIL, which bounds what more threads could add.
DEPTH_PER_THREAD = 2
MAX_THREADS = 2


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this platform
        return os.cpu_count() or 1


def threads_for(depth: int) -> int:
    """Decoding threads for a read-ahead of `depth` chunks: at most MAX_THREADS, and at most
    one per usable core (one thread still overlaps decoding with the reader's own work)."""
    return max(1, min(MAX_THREADS, usable_cpus(), depth)) if depth else 0


def scan_read_ahead() -> int:
    """The depth a scan reads ahead with by default: 0 on a single core, where threads only
    take turns."""
    threads = min(MAX_THREADS, usable_cpus())
    return DEPTH_PER_THREAD * threads if threads > 1 else 0


class ReadAhead(Generic[K, V]):
    """`work(key)` for each of `keys` in order on `threads_for(depth)` threads, up to `depth`
    keys ahead of the one taken.

    `take(key)` must name the keys in the order given; it waits for that key's result (or
    re-raises its error) and starts the next. With depth 0 nothing runs in the background and
    `take` returns None: the caller decodes the chunk itself. `close` drops what is not yet
    taken and stops the threads, from any thread; `take` then returns None, so a scan whose
    cache was closed under it goes on decoding by itself. Use it as a context manager so a
    scan stopped early stops its threads.
    """

    def __init__(self, work: Callable[[K], V], keys: Iterable[K], depth: int):
        if depth < 0:
            raise ValueError(f"read-ahead depth must be >= 0, got {depth}")
        self._work = work
        self._lock = threading.Lock()  # take and close may run on different threads
        self._keys = iter(keys) if depth else iter(())
        self._pending: deque[tuple[K, Future]] = deque()
        self._executor = (
            ThreadPoolExecutor(threads_for(depth), thread_name_prefix="logitcache-readahead")
            if depth
            else None
        )
        for _ in range(depth):
            if not self._submit_next():
                break

    def _submit_next(self) -> bool:
        key = next(self._keys, None)
        if key is None:
            return False
        self._pending.append((key, self._executor.submit(self._work, key)))
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
            executor.shutdown(wait=True)  # outside the lock: running work may finish

    def __enter__(self) -> ReadAhead[K, V]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
