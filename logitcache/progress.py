"""The progress file of a writer that checkpoints: which shards it has published, who it is,
and the caller's own position, so a run killed after days resumes without losing or repeating
a record (spec/FORMAT.md, section 8.2). Readers of the cache ignore it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .format import FORMAT_VERSION, MAX_MANIFEST_BYTES, CacheError, CorruptCacheError
from .manifest import Manifest, ShardEntry, now_iso
from .sealed_json import check_seal, seal, strict_loads

PROGRESS_FORMAT = "logitcache-progress"
# The fields of a writer's identity that must be equal for a run to resume another.
IDENTITY_FIELDS = (
    "k",
    "vocab_size",
    "positions",
    "teacher",
    "tokenizer",
    "metadata",
    "codecs",
    "rank",
    "world_size",
)


def as_json(value: Any, *, what: str) -> Any:
    """`value` as it reads back from JSON (tuples become lists); ValueError if it cannot be."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable (no NaN): {exc}") from None


@dataclass
class Progress:
    identity: dict[str, Any]
    shards: list[ShardEntry]
    progress: Any
    generation: str

    def dumps(self) -> bytes:
        return seal(
            {
                "format": PROGRESS_FORMAT,
                "format_version": FORMAT_VERSION,
                "identity": self.identity,
                "generation": self.generation,
                "shards": [s.to_json() for s in self.shards],
                "records": sum(s.records for s in self.shards),
                "progress": self.progress,
                "created_at": now_iso(),
            }
        )

    @classmethod
    def loads(cls, data: bytes, *, source: str) -> Progress:
        what = "the progress file"
        obj = strict_loads(data, source=source, what=what)
        if not isinstance(obj, dict) or obj.get("format") != PROGRESS_FORMAT:
            raise CorruptCacheError(f"{source}: not a logitcache progress file")
        check_seal(data, obj, source=source, required=True)
        identity = obj.get("identity")
        if not isinstance(identity, dict) or set(IDENTITY_FIELDS) - set(identity):
            raise CorruptCacheError(f"{source}: 'identity' is missing fields")
        # The shard entries are validated exactly as a manifest's are.
        entries = Manifest.from_json(
            {
                "format": "logitcache",
                "format_version": FORMAT_VERSION,
                "checksum_algorithm": "xxh3_64",
                "k": identity["k"],
                "vocab_size": identity["vocab_size"],
                "positions": identity["positions"],
                "shards": obj.get("shards"),
            },
            source=source,
        ).shards
        return cls(
            identity=identity,
            shards=entries,
            progress=obj.get("progress"),
            generation=str(obj.get("generation", "")),
        )


def read_progress(store, name: str) -> Progress | None:
    """The progress file `name` of a store, or None when there is none."""
    try:
        data = store.read_bytes(name, max_bytes=MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        return None
    return Progress.loads(data, source=f"{store.url}/{name}")


def identity_mismatch(recorded: dict[str, Any], mine: dict[str, Any], source: str) -> None:
    """Raise CacheError naming the first identity field that differs between a checkpoint and
    a writer that wants to resume it."""
    for key in IDENTITY_FIELDS:
        if recorded.get(key) != mine.get(key):
            raise CacheError(
                f"{source}: cannot resume: {key} differs (checkpoint: "
                f"{_short(recorded.get(key))}, this writer: {_short(mine.get(key))}); a resumed "
                "run must write the same data with the same teacher and options. Restore them, "
                "or start over with overwrite=True (the checkpointed shards are then discarded)"
            )


def _short(value: Any, limit: int = 200) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."
