"""Commit the cache that distributed writers left as partial manifests, one per rank.

Merging is refused unless the partials form exactly one complete set: every rank 0..W-1 of the
recorded world size present once, each shard they list present with its recorded size (and
checksum, on request), and all ranks agreeing on what they wrote. The old manifest's shards are
removed only after the new manifest is committed.
"""

from __future__ import annotations

import contextlib

from .format import MANIFEST_NAME, MAX_MANIFEST_BYTES, PARTIAL_DIR, CacheError, NoCacheError
from .layout import PARTIAL_RE, PROGRESS_RE
from .manifest import Manifest, now_iso
from .storage import open_store, store_checksum

_AGREE = ("k", "vocab_size", "positions", "teacher", "tokenizer")


def _fail(url: str, message: str) -> CacheError:
    return CacheError(f"{url}: {message}")


def merge_partials(
    url: str,
    storage_options: dict | None = None,
    *,
    allow_incomplete: bool = False,
    world_size: int | None = None,
    verify: bool = False,
) -> Manifest:
    """Join the partial manifests (`_partial/rank-RRRRR.json`) at `url` into manifest.json.

    Shards are ordered by rank. `world_size` is needed only for partials written without one
    (format 1.0). `allow_incomplete` commits the ranks that are there when some are missing
    (their records are then absent from the cache). `verify` also checks each shard's whole-file
    checksum, which reads every shard.
    """
    store = open_store(url, storage_options)
    try:
        return _merge(store, allow_incomplete, world_size, verify)
    finally:
        store.close()


def _merge(store, allow_incomplete: bool, world_size: int | None, verify: bool) -> Manifest:
    url = store.url
    names = store.list(PARTIAL_DIR)
    partial_names = [n for n in names if PARTIAL_RE.match(n)]
    if not partial_names:
        raise NoCacheError(
            f"{url}: no partial manifests under {PARTIAL_DIR}/; run the writers with "
            "rank=... and world_size=... first (each finished rank writes one)"
        )
    parts: dict[int, tuple[str, Manifest]] = {}
    for name in sorted(partial_names):
        rank = int(PARTIAL_RE.match(name).group(1))
        part = Manifest.loads(
            store.read_bytes(name, max_bytes=MAX_MANIFEST_BYTES), source=f"{url}/{name}"
        )
        if part.rank is not None and part.rank != rank:
            raise _fail(
                url,
                f"{name} holds the partial manifest of rank {part.rank}: it is a copy, not rank "
                f"{rank}'s own; remove it (and re-run rank {rank} if its partial is lost)",
            )
        if rank in parts:
            raise _fail(url, f"{name} and {parts[rank][0]} both claim rank {rank}; remove one")
        parts[rank] = (name, part)

    recorded = {p.world_size for _, p in parts.values() if p.world_size is not None}
    if len(recorded) > 1:
        sizes = ", ".join(f"{n}: {p.world_size}" for n, p in parts.values())
        raise _fail(
            url,
            f"partials disagree on the world size ({sizes}); these ranks did not "
            "run as one job: re-run them with one world size",
        )
    if recorded:
        size = recorded.pop()
        if world_size is not None and world_size != size:
            raise _fail(url, f"world_size={world_size} was given, the partials record {size}")
        world_size = size
    if world_size is None and not allow_incomplete:
        raise _fail(
            url,
            "the partials do not record how many ranks wrote the cache (format 1.0 writers); "
            "pass the world size (`logitcache merge --world-size N`) so a missing rank is caught",
        )
    if world_size is not None:
        extra = sorted(r for r in parts if r >= world_size)
        if extra:
            raise _fail(url, f"rank(s) {extra} are outside the world size {world_size}")
        missing = [r for r in range(world_size) if r not in parts]
        if missing and not allow_incomplete:
            unfinished = [n for n in names if PROGRESS_RE.match(n)]
            hint = (
                f" ({', '.join(unfinished)} show interrupted ranks: resume them)"
                if unfinished
                else ""
            )
            raise _fail(
                url,
                f"rank(s) {missing} of {world_size} have no partial manifest: they have not "
                f"finished{hint}; re-run them, or pass --allow-incomplete to commit a cache "
                "without their records",
            )

    ordered = [parts[r] for r in sorted(parts)]
    first_name, first = ordered[0]
    seen: dict[str, str] = {}
    for name, part in ordered:
        for key in _AGREE:
            if getattr(part, key) != getattr(first, key):
                raise _fail(
                    url,
                    f"{name}: {key} {getattr(part, key)!r} differs from {first_name} "
                    f"({getattr(first, key)!r}); these ranks did not write the same cache: "
                    "re-run them with one configuration",
                )
        if _lossy_mode(part.lossy) != _lossy_mode(first.lossy):
            raise _fail(
                url,
                f"{name}: lossy mode {_lossy_mode(part.lossy)!r} differs from {first_name} "
                f"({_lossy_mode(first.lossy)!r}); re-run the ranks with one budget",
            )
        for shard in part.shards:
            if shard.path in seen:
                raise _fail(
                    url,
                    f"shard {shard.path} is listed by both {seen[shard.path]} and {name}; one "
                    "of them is a copy: remove it and re-run that rank",
                )
            seen[shard.path] = name
            _check_shard(store, name, shard, verify)

    metadata = {**first.metadata, "ranks": len(ordered)}
    if world_size is not None:
        metadata["world_size"] = world_size
        missing = [r for r in range(world_size) if r not in parts]
        if missing:
            metadata["missing_ranks"] = missing
    merged = Manifest(
        k=first.k,
        vocab_size=first.vocab_size,
        positions=first.positions,
        shards=[s for _, part in ordered for s in part.shards],
        columns=first.columns,
        teacher=first.teacher,
        tokenizer=first.tokenizer,
        metadata=metadata,
        created_by=first.created_by,
        created_at=now_iso(),
        lossy=_merged_lossy([part.lossy for _, part in ordered]),
    )
    replaced = _listed_shards(store, MANIFEST_NAME)
    store.write_bytes(MANIFEST_NAME, merged.dumps())
    # Only now is the old cache gone: remove its shards that nothing lists any more.
    for rel in sorted(replaced - set(seen)):
        store.remove(rel)
    return merged


def _lossy_mode(lossy: dict | None) -> dict | None:
    """What ranks must agree on: the lossy configuration without what each measured."""
    return None if lossy is None else {k: v for k, v in lossy.items() if k != "measured"}


def _merged_lossy(parts: list[dict | None]) -> dict | None:
    """One lossy object for the merged cache: the shared configuration, measurements summed."""
    if parts[0] is None:
        return None
    measured = [p.get("measured") or {} for p in parts]
    rows = sum(m.get("rows", 0) for m in measured)
    merged = {
        "rows": rows,
        "exact_rows": sum(m.get("exact_rows", 0) for m in measured),
        "mean_entries": sum(m.get("mean_entries", 0) * m.get("rows", 0) for m in measured)
        / max(rows, 1),
        "mean_row_kl": sum(m.get("mean_row_kl", 0) * m.get("rows", 0) for m in measured)
        / max(rows, 1),
        "max_row_kl": max((m.get("max_row_kl", 0) for m in measured), default=0.0),
    }
    return {**_lossy_mode(parts[0]), "measured": merged}


def _check_shard(store, name: str, shard, verify: bool) -> None:
    try:
        size = store.size(shard.path)
    except FileNotFoundError:
        size = None
    if size is None:
        raise _fail(
            store.url,
            f"shard {shard.path} listed by {name} is missing; restore it or re-run that rank",
        )
    if size != shard.bytes:
        raise _fail(
            store.url,
            f"shard {shard.path} has {size} bytes, {name} records {shard.bytes}: it is not the "
            "file that rank wrote; restore it or re-run that rank",
        )
    if verify:
        got = store_checksum(store, shard.path)
        if got != shard.checksum:
            raise _fail(
                store.url,
                f"shard {shard.path}: checksum {got} differs from {shard.checksum} recorded by "
                f"{name}; the file is corrupt: restore it or re-run that rank",
            )


def _listed_shards(store, name: str) -> set[str]:
    """Shard paths listed by the manifest `name`, or none when it is absent or unreadable."""
    with contextlib.suppress(FileNotFoundError, CacheError):
        data = store.read_bytes(name, max_bytes=MAX_MANIFEST_BYTES)
        return {s.path for s in Manifest.loads(data, source=name).shards}
    return set()
