"""Where cache files live: a local directory or any fsspec URL, behind one small interface.

The writer builds files locally and publishes them whole; the reader asks for a local path it
can memory-map. Remote stores fetch whole shards into a size-bounded local cache.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import uuid

from .format import CacheError


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


class LocalStore:
    """A cache in a local directory: files are read in place (memory-mapped)."""

    is_local = True

    def __init__(self, url: str):
        root = url[len("file://") :] if url.startswith("file://") else url
        self.root = os.path.abspath(os.path.expanduser(root))
        self.url = self.root

    def _path(self, rel: str) -> str:
        return os.path.join(self.root, *check_relative_path(rel).split("/"))

    def exists(self, rel: str) -> bool:
        return os.path.exists(self._path(rel))

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
        path = self._path(rel_dir)
        if not os.path.isdir(path):
            return []
        return sorted(f"{rel_dir}/{name}" for name in os.listdir(path))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write atomically: a reader sees the old file, the new file, or none, never half."""
        path = self._path(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def new_local_file(self, rel: str) -> str:
        """A local path to build the file destined for `rel`; publish it with put_file."""
        path = self._path(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return f"{path}.tmp-{uuid.uuid4().hex}"

    def put_file(self, local_path: str, rel: str) -> None:
        os.replace(local_path, self._path(rel))

    def remove(self, rel: str) -> None:
        try:
            os.remove(self._path(rel))
        except FileNotFoundError:
            pass

    def local_shard_path(self, rel: str, *, size: int, checksum: str) -> str:
        """A local path to memory-map; for a local store the file itself."""
        return self._path(rel)

    def prefetch(self, rels: list[tuple[str, int, str]]) -> None:
        """Hint that these (path, size, checksum) shards will be read soon; local: no-op."""

    def close(self) -> None:
        pass


def open_store(
    url: str,
    storage_options: dict | None = None,
    *,
    cache_dir: str | None = None,
    cache_limit_bytes: int | None = None,
):
    """Open the store behind a cache URL (a local path or file:// URL for now)."""
    if _is_local_url(url):
        return LocalStore(url)
    raise CacheError(
        f"{url}: remote URLs are not supported by this build; use a local directory"
    )


def default_cache_dir() -> str:
    return os.environ.get(
        "LOGITCACHE_CACHE_DIR", os.path.join(tempfile.gettempdir(), "logitcache-shards")
    )
