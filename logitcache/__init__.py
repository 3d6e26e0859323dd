"""logitcache: a compact, versioned, columnar cache of a teacher's top-K next-token
distributions, with a writer, a memory-mapped reader and PyTorch loaders."""

__version__ = "0.1.0"

from .format import (  # noqa: E402
    FORMAT_VERSION,
    CacheError,
    CorruptCacheError,
    IncompatibleVersionError,
    NoCacheError,
    Record,
)
from .reader import LogitCache, open_cache  # noqa: E402
from .writer import CacheWriter  # noqa: E402

__all__ = [
    "FORMAT_VERSION",
    "CacheError",
    "CacheWriter",
    "CorruptCacheError",
    "IncompatibleVersionError",
    "LogitCache",
    "NoCacheError",
    "Record",
    "__version__",
    "open_cache",
]
