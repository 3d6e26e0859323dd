"""logitcache: a compact, versioned, columnar cache of a teacher's top-K next-token distributions."""

from .format import (
    FORMAT_VERSION,
    CacheError,
    CorruptCacheError,
    IncompatibleVersionError,
    NoCacheError,
    Record,
)

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "CacheError",
    "CorruptCacheError",
    "IncompatibleVersionError",
    "NoCacheError",
    "Record",
    "__version__",
]
