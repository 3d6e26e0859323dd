"""Where cache files live: a local directory or any fsspec URL, behind one small interface.

The writer builds files locally and publishes them whole; the reader asks for a local path it
can memory-map. Remote stores fetch whole shards into a size-bounded local cache.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import posixpath
import re
import shutil
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

import xxhash

from .format import CHECKSUM_ALGORITHM, CacheError
from .prefetch import Prefetcher
from .retry import (
    RetryPolicy,
    TransientDownloadError,
    call_with_retry,
)

T = TypeVar("T")


def check_relative_path(rel: str, *, what: str = "path") -> str:
    """Return `rel` if it is a safe path inside the cache root, else raise CacheError.

    Manifests are untrusted input: a shard path must not escape the root by `..`, be
    absolute, carry a URL scheme, or use backslashes.
    """
    if not isinstance(rel, str) or not rel:
        raise CacheError(f"{what} {rel!r}: must be a non-empty relative path")
    if "\\" in rel or "\x00" in rel or "://" in rel or ":" in rel.split("/")[0]:
        raise CacheError(f"{what} {rel!r}: must be a plain relative path inside the cache")
    if rel.startswith("/") or posixpath.isabs(rel):
        raise CacheError(f"{what} {rel!r}: absolute paths are not allowed in a cache")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise CacheError(f"{what} {rel!r}: must not contain '..', '.' or empty segments")
    return rel


def _is_local_url(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _with_path(exc: OSError, path: str) -> OSError:
    """The same OS error naming `path` (a failed write() says "No space left on device" alone)."""
    if exc.filename is not None:
        return exc
    return type(exc)(exc.errno, f"{exc.strerror or exc}", path)


class LocalStore:
    """A cache in a local directory: files are read in place (memory-mapped)."""

    is_local = True

    def __init__(self, url: str):
        root = url[len("file://") :] if url.startswith("file://") else url
        self.root = os.path.abspath(os.path.expanduser(root))
        self.url = self.root
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise CacheError(
                f"{self.root} is a file, not a cache directory; a cache is a directory holding "
                "manifest.json and shards/ (to read a Parquet or JSON lines file, import it "
                "with `logitcache convert FILE CACHE_DIR`)"
            )

    def _path(self, rel: str) -> str:
        return os.path.join(self.root, *check_relative_path(rel).split("/"))

    def exists(self, rel: str) -> bool:
        return os.path.exists(self._path(rel))

    def check_writable(self, rel: str) -> None:
        """Refuse to replace `rel` unless it is absent or a regular file: a writer never
        writes into a device, a pipe or a directory that happens to carry a cache's name."""
        path = self._path(rel)
        with contextlib.suppress(FileNotFoundError):
            mode = os.lstat(path).st_mode
            if not stat.S_ISREG(mode):
                raise CacheError(
                    f"{path} exists and is not a regular file; logitcache writes only regular "
                    "files: move it away or choose another destination"
                )
        parent = os.path.dirname(path)
        while parent != self.root and len(parent) > len(self.root):
            if os.path.exists(parent) and not os.path.isdir(parent):
                raise CacheError(f"{parent} exists and is not a directory; move it away")
            parent = os.path.dirname(parent)

    def read_bytes(self, rel: str, *, max_bytes: int | None = None) -> bytes:
        path = self._path(rel)
        size = os.path.getsize(path)
        if max_bytes is not None and size > max_bytes:
            raise CacheError(f"{path}: {size} bytes is larger than the limit of {max_bytes}")
        with open(path, "rb") as f:
            return f.read()

    def size(self, rel: str) -> int:
        return os.path.getsize(self._path(rel))

    def list(self, rel_dir: str) -> list[str]:
        """Paths of the entries of `rel_dir` ("" for the root), relative to the root."""
        path = self._path(rel_dir) if rel_dir else self.root
        if not os.path.isdir(path):
            return []
        prefix = f"{rel_dir}/" if rel_dir else ""
        return sorted(f"{prefix}{name}" for name in os.listdir(path))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write atomically: a reader sees the old file, the new file, or none, never half."""
        path = self._path(rel)
        self.check_writable(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise _with_path(exc, path) from None
        _fsync_dir(os.path.dirname(path))

    def new_local_file(self, rel: str) -> str:
        """A local path to build the file destined for `rel`; publish it with put_file."""
        path = self._path(rel)
        self.check_writable(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return f"{path}.tmp-{uuid.uuid4().hex}"

    def put_file(self, local_path: str, rel: str) -> None:
        self.check_writable(rel)
        os.replace(local_path, self._path(rel))
        _fsync_dir(os.path.dirname(self._path(rel)))

    def remove(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._path(rel))

    def local_shard_path(self, rel: str, *, size: int, checksum: str) -> str:
        """A local path to memory-map; for a local store the file itself."""
        return self._path(rel)

    @contextlib.contextmanager
    def shard_to_map(self, rel: str, *, size: int, checksum: str) -> Iterator[str]:
        """local_shard_path(), for mapping inside the `with`; a local store evicts nothing."""
        yield self._path(rel)

    def prefetch(self, rels: list[tuple[str, int, str]]) -> None:
        """Hint that these (path, size, checksum) shards will be read soon; local: no-op."""

    def close(self) -> None:
        pass


def _fsync_dir(path: str) -> None:
    """Make a rename in `path` durable, so a power cut cannot undo a commit."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_CHECKSUM_RE = re.compile(rf"^{CHECKSUM_ALGORITHM}:([0-9a-f]{{16}})$")


def file_checksum(path: str, *, block: int = 8 << 20) -> str:
    """The checksum string the manifest records for a whole file: "xxh3_64:<16 hex>"."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
    return f"{CHECKSUM_ALGORITHM}:{h.hexdigest()}"


def store_checksum(store, rel: str) -> str:
    """The whole-file checksum of `rel` in any store (a remote one reads the whole object)."""
    if store.is_local:
        return file_checksum(store._path(rel))
    return f"{CHECKSUM_ALGORITHM}:{xxhash.xxh3_64_hexdigest(store.read_bytes(rel))}"


def _checksum_hex(checksum: str, rel: str) -> str:
    m = _CHECKSUM_RE.match(checksum or "")
    if m is None:
        raise CacheError(
            f"shard {rel}: checksum {checksum!r} is not of the form "
            f"'{CHECKSUM_ALGORITHM}:<16 hex digits>'; the manifest is damaged"
        )
    return m.group(1)


def _mapped_files() -> set[str] | None:
    """Paths this process has memory-mapped (Linux), or None where that cannot be known."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    paths = set()
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            paths.add(parts[5].removesuffix(" (deleted)"))
    return paths


# Temp files older than this in the shard cache belong to a process that died mid-download.
_STALE_TMP_S = 3600.0
_TMP_MARK = ".tmp-"


class RemoteStore:
    """A cache behind any fsspec URL (s3://, gs://, memory://, ...).

    Shards are fetched whole into `cache_dir` (temp file + rename, checksum verified before the
    rename), kept under `cache_limit_bytes` by LRU eviction (file mtime is the access time, so
    processes sharing the directory agree), and prefetched by background threads. The fsspec
    filesystem is created lazily in each process and never pickled: a pickled store carries only
    its URL and options, so DataLoader workers build their own clients.

    Eviction never removes a shard this process has memory-mapped, is downloading, or has
    prefetched and not yet handed out. Another process sharing the directory may unlink a file
    this one has mapped; on POSIX the mapping stays valid, and the next request downloads again.
    """

    is_local = False

    def __init__(
        self,
        url: str,
        storage_options: dict | None = None,
        *,
        cache_dir: str | None = None,
        cache_limit_bytes: int | None = None,
        prefetch_threads: int = 4,
        part_bytes: int = 16 << 20,
        retry: RetryPolicy | None = None,
    ):
        if cache_limit_bytes is not None and cache_limit_bytes <= 0:
            raise ValueError(f"cache_limit_bytes must be positive, got {cache_limit_bytes}")
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.cache_limit_bytes = cache_limit_bytes
        self.prefetch_threads = prefetch_threads
        self.part_bytes = part_bytes
        self.retry = retry or RetryPolicy()
        self.cache_root = os.path.join(
            os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir())),
            _url_key(self.url),
        )
        self._init_process_state()

    def _init_process_state(self) -> None:
        self._pid = os.getpid()
        self._fs = None
        self._root = None
        self._lock = threading.Lock()
        self._downloading: set[str] = set()  # local paths being written now
        self._prefetched: set[str] = set()  # local paths fetched ahead, not yet handed out
        self._to_map: collections.Counter[str] = collections.Counter()  # handed out, not mapped
        self._prefetcher: Prefetcher | None = None
        self._staging: str | None = None

    def __getstate__(self) -> dict:
        keep = (
            "url",
            "storage_options",
            "cache_limit_bytes",
            "prefetch_threads",
            "part_bytes",
            "retry",
            "cache_root",
        )
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_process_state()

    def __repr__(self) -> str:
        return f"RemoteStore({self.url!r}, cache_root={self.cache_root!r})"

    # -- the filesystem, created lazily per process ------------------------------------------

    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():
            import fsspec.core

            if self._pid != os.getpid():
                self._init_process_state()
            try:
                fs, root = fsspec.core.url_to_fs(
                    self.url, **_with_default_timeouts(self.url, self.storage_options)
                )
            except (ImportError, ValueError) as exc:
                raise CacheError(f"{self.url}: cannot open this URL with fsspec: {exc}") from exc
            self._root = root.rstrip("/")
            self._fs = fs
        return self._fs

    def _remote(self, rel: str) -> str:
        self.fs  # noqa: B018 -- resolves self._root in this process
        return f"{self._root}/{check_relative_path(rel)}"

    def _remote_root(self) -> str:
        self.fs  # noqa: B018 -- resolves self._root in this process
        return self._root

    def _url(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def _retry(self, rel: str, what: str, fn: Callable[[], T]) -> T:
        return call_with_retry(fn, url=self._url(rel), what=what, policy=self.retry)

    # -- small objects: manifests, listings ------------------------------------------------

    def exists(self, rel: str) -> bool:
        path = self._remote(rel)

        def run() -> bool:
            self.fs.invalidate_cache(path)
            return bool(self.fs.exists(path))

        return self._retry(rel, "check whether it exists", run)

    def size(self, rel: str) -> int:
        path = self._remote(rel)

        def run() -> int:
            self.fs.invalidate_cache(path)
            return int(self.fs.size(path))

        return self._retry(rel, "read its size", run)

    def read_bytes(self, rel: str, *, max_bytes: int | None = None) -> bytes:
        path = self._remote(rel)
        if max_bytes is not None:
            size = self.size(rel)
            if size > max_bytes:
                raise CacheError(
                    f"{self._url(rel)}: {size} bytes is larger than the limit of {max_bytes}"
                )
        return self._retry(rel, "read it", lambda: bytes(self.fs.cat_file(path)))

    def list(self, rel_dir: str) -> list[str]:
        """Paths of the entries of `rel_dir` ("" for the root), relative to the root."""
        path = self._remote(rel_dir) if rel_dir else self._remote_root()
        prefix = f"{rel_dir}/" if rel_dir else ""

        def run() -> list[str]:
            self.fs.invalidate_cache(path)
            try:
                names = self.fs.ls(path, detail=False)
            except FileNotFoundError:
                return []
            return sorted(
                f"{prefix}{posixpath.basename(n.rstrip('/'))}"
                for n in names
                if n.rstrip("/") != path.rstrip("/")
            )

        return self._retry(rel_dir or ".", "list it", run)

    # -- writing: whole objects, uploaded once they are complete -----------------------------

    def check_writable(self, rel: str) -> None:
        """Objects are always plain files; nothing to refuse."""
        check_relative_path(rel)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Upload `data` as one object; object stores make a single PUT atomic."""
        path = self._remote(rel)
        self._retry(rel, "write it", lambda: self.fs.pipe_file(path, bytes(data)))

    def new_local_file(self, rel: str) -> str:
        """A local staging path to build the file destined for `rel`; publish with put_file."""
        check_relative_path(rel)
        with self._lock:
            if self._staging is None:
                self._staging = tempfile.mkdtemp(prefix="logitcache-upload-")
        return os.path.join(self._staging, f"{uuid.uuid4().hex}-{posixpath.basename(rel)}")

    def put_file(self, local_path: str, rel: str) -> None:
        """Upload a finished local file whole, then delete the local copy."""
        path = self._remote(rel)
        self._retry(rel, "upload it", lambda: self.fs.put_file(local_path, path))
        os.remove(local_path)

    def remove(self, rel: str) -> None:
        path = self._remote(rel)

        def run() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)
            self.fs.invalidate_cache(path)

        self._retry(rel, "remove it", run)

    # -- shards: fetched whole into the local cache directory --------------------------------

    def _local_path(self, rel: str, checksum: str) -> str:
        # The checksum is part of the name: a cache rewritten in place never hits a stale copy.
        digest = _checksum_hex(checksum, rel)
        return os.path.join(self.cache_root, *check_relative_path(rel).split("/")) + f".{digest}"

    def local_shard_path(self, rel: str, *, size: int, checksum: str) -> str:
        """A local, checksum-verified copy of shard `rel` to memory-map (downloaded if needed)."""
        local = self._local_path(rel, checksum)
        path = self._get_prefetcher().get((rel, int(size), checksum))
        with self._lock:
            self._prefetched.discard(local)
        return path

    @contextlib.contextmanager
    def shard_to_map(self, rel: str, *, size: int, checksum: str) -> Iterator[str]:
        """local_shard_path(), kept from eviction until the `with` ends: a download on another
        thread evicts what is not mapped, and a file counts as mapped only once it is, so
        the caller maps it inside the `with`."""
        local = self._local_path(rel, checksum)
        with self._lock:
            self._to_map[local] += 1
        try:
            yield self.local_shard_path(rel, size=size, checksum=checksum)
        finally:
            with self._lock:
                self._to_map[local] -= 1
                if not self._to_map[local]:
                    del self._to_map[local]

    def prefetch(self, rels: list[tuple[str, int, str]]) -> None:
        """Start background downloads of these (path, size, checksum) shards, in order.

        Only as many as fit beside the shards already held for use are started, so a prefetch
        never evicts what it fetched a moment ago; the rest are fetched on demand.
        """
        prefetcher = self._get_prefetcher()
        in_flight = set(prefetcher.in_flight())
        budget = self.cache_limit_bytes
        if budget is not None:
            budget -= self._held_bytes()
        for rel, size, checksum in rels:
            key = (rel, int(size), checksum)
            local = self._local_path(rel, checksum)
            if key in in_flight:
                continue
            if os.path.exists(local) and os.path.getsize(local) == size:
                self._touch(local)
                continue
            if budget is not None:
                if size > budget:
                    break
                budget -= size
            with self._lock:
                self._prefetched.add(local)
            prefetcher.submit(key)

    def _held_bytes(self) -> int:
        with self._lock:
            held = self._downloading | self._prefetched
        return sum(os.path.getsize(p) for p in held if os.path.exists(p))

    def _get_prefetcher(self) -> Prefetcher:
        if self._pid != os.getpid():
            self._init_process_state()
        with self._lock:
            if self._prefetcher is None:
                self._prefetcher = Prefetcher(
                    self._ensure_local, threads=self.prefetch_threads, name="logitcache-fetch"
                )
            return self._prefetcher

    def _ensure_local(self, key: tuple[str, int, str]) -> str:
        rel, size, checksum = key
        local = self._local_path(rel, checksum)
        if os.path.exists(local) and os.path.getsize(local) == size:
            self._touch(local)
            return local
        with self._lock:
            self._downloading.add(local)
        try:
            self._retry(rel, "download it", lambda: self._download(rel, size, checksum, local))
        finally:
            with self._lock:
                self._downloading.discard(local)
        self.evict(keep={local})
        return local

    def _download(self, rel: str, size: int, checksum: str, local: str) -> None:
        """One attempt: fetch `rel` in ranged parts to a temp file, verify, rename into place."""
        remote = self._remote(rel)
        expected = _checksum_hex(checksum, rel)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = f"{local}{_TMP_MARK}{uuid.uuid4().hex}"
        try:
            h = xxhash.xxh3_64()
            with open(tmp, "wb") as out:
                for start in range(0, max(size, 1), self.part_bytes):
                    end = min(size, start + self.part_bytes)
                    if end <= start:
                        break
                    part = self.fs.cat_file(remote, start=start, end=end)
                    if len(part) != end - start:
                        raise TransientDownloadError(
                            f"{self._url(rel)}: bytes {start}-{end} came back with "
                            f"{len(part)} bytes (truncated transfer)"
                        )
                    h.update(part)
                    out.write(part)
                out.flush()
                os.fsync(out.fileno())
            got = h.hexdigest()
            if got != expected:
                raise TransientDownloadError(
                    f"{self._url(rel)}: checksum mismatch after download (expected "
                    f"{CHECKSUM_ALGORITHM}:{expected}, got {CHECKSUM_ALGORITHM}:{got})"
                )
            remote_size = os.path.getsize(tmp)
            if remote_size != size:
                raise TransientDownloadError(
                    f"{self._url(rel)}: downloaded {remote_size} bytes, manifest says {size}"
                )
            os.replace(tmp, local)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @staticmethod
    def _touch(path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)

    def cached_files(self) -> list[tuple[str, int, float]]:
        """(local path, bytes, last use) of every complete shard in the local cache."""
        out = []
        now = time.time()
        for dirpath, _, names in os.walk(self.cache_root):
            for name in names:
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                if _TMP_MARK in name:
                    if now - st.st_mtime > _STALE_TMP_S:
                        _remove_quietly(path)  # left by a process that died mid-download
                    continue
                out.append((path, st.st_size, st.st_mtime))
        return out

    def evict(self, *, keep: set[str] = frozenset()) -> list[str]:
        """Remove least recently used shards until the cache fits its limit; returns removed."""
        if self.cache_limit_bytes is None:
            return []
        files = self.cached_files()
        total = sum(size for _, size, _ in files)
        if total <= self.cache_limit_bytes:
            return []
        mapped = _mapped_files() or set()
        with self._lock:
            protected = set(keep) | self._downloading | self._prefetched | set(self._to_map)
            protected |= mapped
        removed = []
        for path, size, _ in sorted(files, key=lambda f: f[2]):
            if total <= self.cache_limit_bytes:
                break
            if path in protected:
                continue
            if _remove_quietly(path):
                removed.append(path)
                total -= size
        return removed

    def clear_local_cache(self) -> None:
        """Delete every local copy of this cache's shards (remote objects are untouched)."""
        shutil.rmtree(self.cache_root, ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            prefetcher, self._prefetcher = self._prefetcher, None
            staging, self._staging = self._staging, None
        if prefetcher is not None:
            prefetcher.close()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


# botocore waits 60 s for a connection by default, several times over, before anything is
# reported; an endpoint that cannot be reached should say so sooner.
S3_CONNECT_TIMEOUT_S = 10


def _with_default_timeouts(url: str, options: dict) -> dict:
    if not url.startswith(("s3://", "s3a://")):
        return options
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("connect_timeout", S3_CONNECT_TIMEOUT_S)
    return {**options, "config_kwargs": config}


def _remove_quietly(path: str) -> bool:
    try:
        os.remove(path)
        return True
    except FileNotFoundError:
        return False


def _url_key(url: str) -> str:
    """A directory name for a URL: readable, and unique thanks to a hash of the whole URL."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", url.split("://", 1)[-1]).strip("-")[-48:]
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return f"{readable}-{digest}" if readable else digest


def open_store(
    url: str | os.PathLike,
    storage_options: dict | None = None,
    *,
    cache_dir: str | None = None,
    cache_limit_bytes: int | None = None,
):
    """Open the store behind a cache URL: a local path (str or os.PathLike), a file:// URL
    or any fsspec URL."""
    url = os.fspath(url)
    if _is_local_url(url):
        return LocalStore(url)
    return RemoteStore(
        url, storage_options, cache_dir=cache_dir, cache_limit_bytes=cache_limit_bytes
    )


def default_cache_dir() -> str:
    return os.environ.get(
        "LOGITCACHE_CACHE_DIR", os.path.join(tempfile.gettempdir(), "logitcache-shards")
    )
