"""The manifest: the JSON commit marker that describes a whole cache.

Parsing treats the file as untrusted input: every field is type- and range-checked, shard paths
must stay inside the cache, and totals must add up, before anything is opened or allocated.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from .format import (
    CHECKSUM_ALGORITHM,
    FORMAT_MAJOR,
    FORMAT_NAME,
    FORMAT_VERSION,
    HEADER_SIZE,
    MANIFEST_NAME,
    MAX_K,
    MAX_MANIFEST_BYTES,
    MAX_VOCAB_SIZE,
    PARTIAL_DIR,
    POSITIONS_MODES,
    TRAILER_SIZE,
    CacheError,
    CorruptCacheError,
    IncompatibleVersionError,
    NoCacheError,
)
from .layout import PARTIAL_RE, PROGRESS_RE, partial_manifest_name  # noqa: F401
from .sealed_json import check_seal, seal, strict_loads
from .storage import check_relative_path

_CHECKSUM_RE = re.compile(r"^xxh3_64:[0-9a-f]{16}$")
_HEX16_RE = re.compile(r"^[0-9a-f]{16}$")
_MAX_COUNT = 1 << 53  # integers JSON readers keep exactly


@dataclass(frozen=True)
class ShardEntry:
    path: str
    records: int
    tokens: int
    targets: int
    bytes: int
    checksum: str
    chunk_records: list[int]
    # XXH3-64 of the shard's footer, as its trailer records it (format 1.1): binds this entry
    # to one exact file, checked on every open at the cost of reading 24 bytes.
    footer_checksum: str | None = None

    def to_json(self) -> dict[str, Any]:
        obj = asdict(self)
        if self.footer_checksum is None:
            del obj["footer_checksum"]
        return obj


@dataclass
class Manifest:
    k: int
    vocab_size: int
    positions: str
    shards: list[ShardEntry]
    columns: dict[str, dict[str, Any]] = field(default_factory=dict)
    teacher: dict[str, Any] | None = None
    tokenizer: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    format_version: str = FORMAT_VERSION
    created_by: str = ""
    created_at: str = ""
    # Partial manifests of distributed writers: which rank wrote it, out of how many.
    rank: int | None = None
    world_size: int | None = None
    # Lossy caches (format 1.1, spec section 12): {"mode": "kl", "kl_budget", "grid_step", ...}.
    lossy: dict[str, Any] | None = None

    @property
    def records(self) -> int:
        return sum(s.records for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def targets(self) -> int:
        return sum(s.targets for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        obj = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "k": self.k,
            "vocab_size": self.vocab_size,
            "positions": self.positions,
            "checksum_algorithm": CHECKSUM_ALGORITHM,
            "columns": self.columns,
            "teacher": self.teacher,
            "tokenizer": self.tokenizer,
            "metadata": self.metadata,
            "records": self.records,
            "tokens": self.tokens,
            "targets": self.targets,
            "bytes": self.bytes,
            "shards": [s.to_json() for s in self.shards],
            "created_by": self.created_by,
            "created_at": self.created_at,
        }
        if self.rank is not None:
            obj["rank"] = self.rank
            obj["world_size"] = self.world_size
        if self.lossy is not None:
            obj["lossy"] = self.lossy
        return obj

    def dumps(self) -> bytes:
        """The manifest file: JSON sealed by its own checksum (spec section 3.1)."""
        return seal(self.to_json())

    @classmethod
    def loads(cls, data: bytes, *, source: str = MANIFEST_NAME) -> Manifest:
        obj = strict_loads(data, source=source)
        manifest = cls.from_json(obj, source=source)
        minor = int(manifest.format_version.split(".")[1])
        check_seal(data, obj, source=source, required=minor >= 1)
        return manifest

    @classmethod
    def from_json(cls, obj: Any, *, source: str = MANIFEST_NAME) -> Manifest:
        check = _Checker(source)
        check.that(isinstance(obj, dict), "top level must be a JSON object")
        check.that(obj.get("format") == FORMAT_NAME, f"'format' must be {FORMAT_NAME!r}")
        version = obj.get("format_version")
        match = re.fullmatch(r"(\d+)\.(\d+)", version) if isinstance(version, str) else None
        check.that(match is not None, f"'format_version' {version!r} must look like '1.0'")
        if int(match.group(1)) != FORMAT_MAJOR:
            raise IncompatibleVersionError(
                f"{source}: format version {version} has major {match.group(1)}, this reader "
                f"reads major {FORMAT_MAJOR}; use a logitcache release that supports it"
            )
        check.that(
            obj.get("checksum_algorithm") == CHECKSUM_ALGORITHM,
            f"'checksum_algorithm' {obj.get('checksum_algorithm')!r} must be "
            f"{CHECKSUM_ALGORITHM!r}, the only one this format defines",
        )
        k = check.int_field(obj, "k", 1, MAX_K)
        vocab = check.int_field(obj, "vocab_size", 1, MAX_VOCAB_SIZE)
        check.that(k <= vocab, f"'k' {k} exceeds 'vocab_size' {vocab}")
        positions = obj.get("positions")
        check.that(positions in POSITIONS_MODES, f"'positions' must be one of {POSITIONS_MODES}")
        shards_obj = obj.get("shards")
        check.that(isinstance(shards_obj, list), "'shards' must be a list")
        shards = [check.shard(i, s) for i, s in enumerate(shards_obj)]
        check.that(len({s.path for s in shards}) == len(shards), "two shards have the same path")
        for key in ("records", "tokens", "targets", "bytes"):
            if key in obj:
                total = sum(getattr(s, key) for s in shards)
                check.that(obj[key] == total, f"'{key}' {obj[key]!r} != sum over shards {total}")
        for key in ("teacher", "tokenizer"):
            check.that(
                obj.get(key) is None or isinstance(obj.get(key), dict),
                f"'{key}' must be an object or null",
            )
        rank = world_size = None
        if "rank" in obj or "world_size" in obj:
            world_size = check.int_field(obj, "world_size", 1, _MAX_COUNT)
            rank = check.int_field(obj, "rank", 0, world_size - 1)
        columns = obj.get("columns") or {}
        metadata = obj.get("metadata") or {}
        check.that(isinstance(columns, dict), "'columns' must be an object")
        check.that(isinstance(metadata, dict), "'metadata' must be an object")
        lossy = obj.get("lossy")
        if lossy is not None:
            budget = lossy.get("kl_budget") if isinstance(lossy, dict) else None
            check.that(
                isinstance(lossy, dict)
                and lossy.get("mode") == "kl"
                and isinstance(budget, (int, float))
                and not isinstance(budget, bool)
                and budget > 0,
                "'lossy' must be an object with mode 'kl' and a positive 'kl_budget'",
            )
        return cls(
            k=k,
            vocab_size=vocab,
            positions=positions,
            shards=shards,
            columns=columns,
            teacher=obj.get("teacher"),
            tokenizer=obj.get("tokenizer"),
            metadata=metadata,
            format_version=version,
            created_by=str(obj.get("created_by", "")),
            created_at=str(obj.get("created_at", "")),
            rank=rank,
            world_size=world_size,
            lossy=lossy,
        )


class _Checker:
    """Collects the source name so every validation error names the manifest and field."""

    def __init__(self, source: str):
        self.source = source

    def that(self, ok: bool, message: str) -> None:
        if not ok:
            raise CorruptCacheError(
                f"{self.source}: {message}; the manifest is invalid: re-download it or "
                "re-run the job that wrote the cache"
            )

    def int_field(self, obj: dict, key: str, low: int, high: int, where: str = "") -> int:
        value = obj.get(key)
        self.that(
            isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
            f"{where}'{key}' = {value!r} must be an integer in [{low}, {high}]",
        )
        return value

    def shard(self, index: int, obj: Any) -> ShardEntry:
        where = f"shard {index}: "
        self.that(isinstance(obj, dict), f"{where}must be an object")
        path = obj.get("path")
        try:
            check_relative_path(path, what=f"shard {index} path")
        except CacheError as exc:
            self.that(False, str(exc))
        ints = {
            key: self.int_field(obj, key, 0, _MAX_COUNT, where)
            for key in ("records", "tokens", "targets", "bytes")
        }
        self.that(ints["bytes"] >= HEADER_SIZE + TRAILER_SIZE, f"{where}'bytes' is too small")
        self.that(ints["tokens"] >= ints["records"], f"{where}fewer tokens than records")
        checksum = obj.get("checksum")
        self.that(
            isinstance(checksum, str) and _CHECKSUM_RE.match(checksum) is not None,
            f"{where}'checksum' {checksum!r} must be 'xxh3_64:' and 16 hex digits",
        )
        chunks = obj.get("chunk_records")
        self.that(
            isinstance(chunks, list)
            and all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in chunks)
            and sum(chunks) == ints["records"],
            f"{where}'chunk_records' must be positive integers summing to 'records'",
        )
        footer = obj.get("footer_checksum")
        self.that(
            footer is None or (isinstance(footer, str) and _HEX16_RE.match(footer) is not None),
            f"{where}'footer_checksum' {footer!r} must be 16 lowercase hex digits",
        )
        return ShardEntry(
            path=path,
            checksum=checksum,
            chunk_records=list(chunks),
            footer_checksum=footer,
            **ints,
        )


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_manifest(store, *, name: str = MANIFEST_NAME) -> Manifest:
    """Read and validate a manifest from a store; NoCacheError if it is not there."""
    try:
        data = store.read_bytes(name, max_bytes=MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise NoCacheError(
            f"no committed cache at {store.url}: {name} is missing{_why_missing(store)}"
        ) from None
    return Manifest.loads(data, source=f"{store.url}/{name}")


def _why_missing(store) -> str:
    """What the root holds instead of a manifest, and what to do about it."""
    names = store.list(PARTIAL_DIR)
    partials = [n for n in names if PARTIAL_RE.match(n)]
    progress = [n for n in names if PROGRESS_RE.match(n)]
    if partials:
        return (
            f"; {len(partials)} partial manifest(s) of distributed writers are there: once every "
            f"rank has finished, run `logitcache merge {store.url}` to commit the cache"
        )
    if progress:
        return (
            f"; an interrupted writer left its checkpoint ({progress[0]}): resume it "
            "(CacheWriter(..., resume=True), or re-run `kd cache`) to finish the cache"
        )
    return (
        " (a writer that did not finish leaves none); check the URL or re-run the job that "
        "writes the cache"
    )


def merge_partials(url: str, storage_options: dict | None = None, **kwargs) -> Manifest:
    """Join the partial manifests of distributed writers; see logitcache.merge."""
    from .merge import merge_partials as merge

    return merge(url, storage_options, **kwargs)
