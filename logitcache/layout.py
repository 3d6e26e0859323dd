"""Names of the files inside a cache root, and which of them one writer owns.

Every writer run draws a fresh generation token and puts it in its shard names, so a new cache
is written beside an old one without a name in common; the manifest switches from one to the
other, and only then are the old shards removed (spec/FORMAT.md, sections 2 and 8).
"""

from __future__ import annotations

import re
import secrets

from .format import MANIFEST_NAME, PARTIAL_DIR, SHARD_DIR, SHARD_SUFFIX

_TMP = r"(\.tmp-[0-9a-f]{32})?"
PARTIAL_RE = re.compile(rf"^{PARTIAL_DIR}/rank-(\d{{5,}})\.json$")
PROGRESS_RE = re.compile(rf"^{PARTIAL_DIR}/progress(-rank-\d{{5,}})?\.json$")


def new_generation() -> str:
    """A random token unique to one writer run: 12 lowercase hex digits (48 bits)."""
    return secrets.token_hex(6)


def partial_manifest_name(rank: int) -> str:
    return f"{PARTIAL_DIR}/rank-{rank:05d}.json"


class WriterSlot:
    """The files of one writer: the single writer of a cache, or one rank of several.

    A slot owns shard names of its own pattern only (`shards/g<gen>-NNNNN.lgc`, or
    `shards/rRRRRR-g<gen>-NNNNN.lgc` for rank R), its commit file (manifest.json or its
    partial manifest) and its progress file; nothing else in the root is ever removed by it.
    """

    def __init__(self, rank: int | None):
        self.rank = rank
        prefix = "" if rank is None else f"r{rank:05d}-"
        self._prefix = f"{SHARD_DIR}/{prefix}"
        self._owned = re.compile(
            rf"^{re.escape(self._prefix)}g[0-9a-f]{{12}}-\d{{5,}}{re.escape(SHARD_SUFFIX)}{_TMP}$"
        )

    def shard_name(self, generation: str, index: int) -> str:
        return f"{self._prefix}g{generation}-{index:05d}{SHARD_SUFFIX}"

    def owns(self, rel: str) -> bool:
        """Whether `rel` is a shard (or a temporary shard file) of this slot's naming."""
        return self._owned.match(rel) is not None

    def owns_temporary(self, rel: str) -> bool:
        """Whether `rel` is a temporary file left by writing this slot's commit or progress."""
        return any(
            re.fullmatch(re.escape(name) + r"\.tmp-[0-9a-f]{32}", rel)
            for name in (self.commit_name, self.progress_name)
        )

    @property
    def commit_name(self) -> str:
        return MANIFEST_NAME if self.rank is None else partial_manifest_name(self.rank)

    @property
    def progress_name(self) -> str:
        suffix = "" if self.rank is None else f"-rank-{self.rank:05d}"
        return f"{PARTIAL_DIR}/progress{suffix}.json"

    def describe(self) -> str:
        return "this cache's writer" if self.rank is None else f"rank {self.rank}"
