"""Constants of the logitcache format (spec/FORMAT.md) and the Record a cache holds.

Everything a second implementation needs to agree on lives here: magic bytes, versions,
column names and dtypes, and the sanity limits a reader applies to untrusted input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORMAT_NAME = "logitcache"
FORMAT_MAJOR = 1
FORMAT_MINOR = 1
FORMAT_VERSION = f"{FORMAT_MAJOR}.{FORMAT_MINOR}"

MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"
SHARD_SUFFIX = ".lgc"
PARTIAL_DIR = "_partial"

SHARD_MAGIC = b"LGCSHARD"
HEADER_SIZE = 16  # magic (8) + major (u16) + minor (u16) + reserved (u32)
TRAILER_SIZE = 24  # footer length (u64) + footer checksum (u64) + magic (8)
BLOCK_ALIGN = 8

POSITIONS_SUPERVISED = "supervised"
POSITIONS_ALL = "all"
POSITIONS_MODES = (POSITIONS_SUPERVISED, POSITIONS_ALL)

CHECKSUM_ALGORITHM = "xxh3_64"

# Column blocks of a chunk, in the order they are written.
COL_RECORD_LENGTHS = "record_lengths"
COL_INPUT_IDS = "input_ids"
COL_LOSS_MASK = "loss_mask"
COL_TOPK_IDS = "topk_ids"
COL_TOPK_LOGPROBS = "topk_logprobs"
COL_SAMPLE_ID_LENGTHS = "sample_id_lengths"
COL_SAMPLE_ID_BYTES = "sample_id_bytes"

COLUMN_DTYPES: dict[str, np.dtype] = {
    COL_RECORD_LENGTHS: np.dtype("<i4"),
    COL_INPUT_IDS: np.dtype("<i4"),
    COL_LOSS_MASK: np.dtype("u1"),
    COL_TOPK_IDS: np.dtype("<i4"),
    COL_TOPK_LOGPROBS: np.dtype("<f2"),
    COL_SAMPLE_ID_LENGTHS: np.dtype("<i4"),
    COL_SAMPLE_ID_BYTES: np.dtype("u1"),
}
REQUIRED_COLUMNS = (
    COL_RECORD_LENGTHS,
    COL_INPUT_IDS,
    COL_LOSS_MASK,
    COL_TOPK_IDS,
    COL_TOPK_LOGPROBS,
)
OPTIONAL_COLUMNS = (COL_SAMPLE_ID_LENGTHS, COL_SAMPLE_ID_BYTES)

# Limits on untrusted input, checked before anything is allocated or decoded.
MAX_K = 4096
MAX_VOCAB_SIZE = 1 << 24
MAX_MANIFEST_BYTES = 256 << 20
MAX_FOOTER_BYTES = 64 << 20
MAX_BLOCK_RAW_BYTES = 2 << 30
MAX_SAMPLE_ID_BYTES = 4096
# A row of logprobs may hold at most this much probability mass (fp16 rounding slack);
# more means the input was raw logits, not log-probabilities.
MAX_ROW_MASS = 1.05


@dataclass(frozen=True)
class Record:
    """One training sequence with the teacher's top-K distribution at each stored position.

    `topk_ids[j]` / `topk_logprobs[j]` describe the j-th stored target position: the j-th
    position p with `loss_mask[p]` true in "supervised" mode, position j + 1 in "all" mode.
    Rows are in canonical order: logprob descending, ties by token id ascending.
    """

    input_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # bool [T]
    topk_ids: np.ndarray  # int32 [N, K]
    topk_logprobs: np.ndarray  # float16 [N, K]
    sample_id: str | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_targets(self) -> int:
        return int(self.topk_ids.shape[0])

    def target_positions(self, positions: str = POSITIONS_SUPERVISED) -> np.ndarray:
        """Token positions (into input_ids) that the teacher rows describe, in row order."""
        if positions == POSITIONS_ALL:
            return np.arange(1, self.num_tokens, dtype=np.int64)
        return np.flatnonzero(self.loss_mask).astype(np.int64)


class CacheError(Exception):
    """Base class of every error logitcache raises about a cache."""


class CorruptCacheError(CacheError):
    """The bytes of a cache do not match what its manifest and footers promise."""


class NoCacheError(CacheError, FileNotFoundError):
    """No committed cache (no manifest.json) at the given URL."""


class IncompatibleVersionError(CacheError):
    """The cache was written by a format major version this reader does not know."""
