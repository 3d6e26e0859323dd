"""Bad input and faults: what the writer refuses, and how the reader treats damaged caches.

Every damaged or hostile cache must give a CacheError naming the shard (and chunk), never a
crash, a hang, a huge allocation or silently different records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xxhash
import zstandard

import logitcache
from logitcache import (
    CacheError,
    CacheWriter,
    CorruptCacheError,
    IncompatibleVersionError,
    NoCacheError,
    open_cache,
)
from logitcache.format import (
    BLOCK_ALIGN,
    HEADER_SIZE,
    MANIFEST_NAME,
    MAX_FOOTER_BYTES,
    TRAILER_SIZE,
)
from logitcache.manifest import Manifest
from logitcache.sealed_json import seal
from tests.conftest import (
    SMALL_K,
    SMALL_VOCAB,
    SmallCache,
    assert_record_equal,
    make_records,
    write_cache,
)
from tests.test_decode_kernels import read_path  # noqa: F401 (fixture)

REPO_ROOT = Path(__file__).resolve().parents[1]


# -- helpers -------------------------------------------------------------------------------


def read_all(path: Path, **kwargs) -> list[logitcache.Record]:
    with open_cache(str(path), **kwargs) as cache:
        return list(cache.iter_records())


def assert_same_records(path: Path, want: list[dict]) -> None:
    got = read_all(path)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_record_equal(g, w, where=f"record {i}")


def load_manifest_json(cache_dir: Path) -> dict:
    return json.loads((cache_dir / MANIFEST_NAME).read_text())


def save_manifest_json(cache_dir: Path, obj: dict) -> None:
    # Re-sealed, so the test reaches the checks behind the manifest's own checksum.
    (cache_dir / MANIFEST_NAME).write_bytes(seal(obj))


def split_shard(path: Path) -> tuple[bytes, dict]:
    """(bytes before the footer, footer object) of a well-formed shard file."""
    data = path.read_bytes()
    length, _, _ = struct.unpack_from("<QQ8s", data, len(data) - TRAILER_SIZE)
    start = len(data) - TRAILER_SIZE - length
    return data[:start], json.loads(data[start : start + length])


def append_block(body: bytearray, data: bytes) -> tuple[int, int]:
    """Append a block at the next aligned offset; returns (offset, length)."""
    body.extend(b"\0" * (-len(body) % BLOCK_ALIGN))
    offset = len(body)
    body.extend(data)
    return offset, len(data)


def write_shard(path: Path, body: bytes, footer: dict | bytes) -> None:
    """Write a shard whose footer checksum and trailer are valid for `footer` (an object,
    or the footer's exact bytes)."""
    body = bytes(body) + b"\0" * (-len(body) % BLOCK_ALIGN)
    data = footer if isinstance(footer, bytes) else json.dumps(footer, separators=(",", ":"))
    data = data if isinstance(data, bytes) else data.encode()
    trailer = struct.pack("<QQ8s", len(data), xxhash.xxh3_64_intdigest(data), b"LGCSHARD")
    path.write_bytes(body + data + trailer)


def resync_manifest(cache: SmallCache, shard: int = 0, **entry_updates) -> None:
    """Make the manifest agree with shard `shard` as it is now on disk (size, checksum), plus
    `entry_updates`, so that a test exercises the shard's own checks, not the manifest's."""
    manifest = Manifest.loads((cache.path / MANIFEST_NAME).read_bytes())
    entry = manifest.shards[shard]
    data = (cache.path / entry.path).read_bytes()
    _, footer_digest, _ = struct.unpack_from("<QQ8s", data, len(data) - TRAILER_SIZE)
    entry = dataclasses.replace(
        entry,
        bytes=len(data),
        checksum=f"xxh3_64:{xxhash.xxh3_64_hexdigest(data)}",
        footer_checksum=f"{footer_digest:016x}",
        **entry_updates,
    )
    manifest.shards[shard] = entry
    (cache.path / MANIFEST_NAME).write_bytes(manifest.dumps())


def block_checksum(data: bytes) -> str:
    return xxhash.xxh3_64_hexdigest(data)


@contextlib.contextmanager
def memory_ceiling(extra_bytes: int = 1 << 30):
    """Cap this process's address space at its current size plus `extra_bytes`.

    Inside, any attempt to allocate more (even lazily, as a huge np.empty or a zstd output
    buffer would) raises MemoryError instead of exhausting the machine.
    """
    with open("/proc/self/status") as f:
        vm_kb = int(re.search(r"VmSize:\s+(\d+)", f.read()).group(1))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm_kb * 1024 + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def zstd_frame_declaring(content_size: int, payload: bytes = b"abc") -> bytes:
    """A zstd frame whose header declares `content_size` but whose one raw block holds
    `payload` (RFC 8878: FHD 0xC0 = 8-byte Frame_Content_Size, window descriptor present)."""
    header = b"\x28\xb5\x2f\xfd" + bytes([0xC0, 0x00]) + struct.pack("<Q", content_size)
    block_header = (len(payload) << 3 | 0 << 1 | 1).to_bytes(3, "little")  # raw, last block
    return header + block_header + payload


def rle_frame_declaring(content_size: int, expands_to: int) -> bytes:
    """A frame declaring `content_size` whose single RLE block expands to `expands_to` bytes."""
    header = b"\x28\xb5\x2f\xfd" + bytes([0xC0, 0x0A << 3]) + struct.pack("<Q", content_size)
    block_header = (expands_to << 3 | 1 << 1 | 1).to_bytes(3, "little")  # RLE, last block
    return header + block_header + b"\x07"


# -- missing, foreign and truncated caches --------------------------------------------------


@pytest.mark.parametrize("layout", ["missing_dir", "empty_dir", "shards_only"])
def test_no_manifest_is_no_committed_cache(tmp_path, small_cache, layout):
    target = tmp_path / "target"
    if layout == "empty_dir":
        target.mkdir()
    elif layout == "shards_only":
        shutil.copytree(small_cache.path, target)
        (target / MANIFEST_NAME).unlink()
    with pytest.raises(NoCacheError, match="no committed cache at") as info:
        open_cache(str(target))
    assert str(target) in str(info.value)
    assert isinstance(info.value, FileNotFoundError)  # callers may catch the builtin


def test_unknown_major_version_in_manifest(small_cache):
    obj = load_manifest_json(small_cache.path)
    obj["format_version"] = "2.0"
    save_manifest_json(small_cache.path, obj)
    with pytest.raises(IncompatibleVersionError, match=r"2\.0"):
        open_cache(str(small_cache.path))


def test_newer_minor_version_and_unknown_fields_are_ignored(small_cache):
    obj = load_manifest_json(small_cache.path)
    obj["format_version"] = "1.7"
    obj["a_field_of_a_later_minor"] = {"anything": [1, 2, 3]}
    obj["shards"][0]["another_new_field"] = "x"
    save_manifest_json(small_cache.path, obj)
    assert_same_records(small_cache.path, small_cache.records)


@pytest.mark.parametrize("major", [0, 2, 65535])
def test_unknown_major_version_in_shard_header(small_cache, major):
    path = small_cache.shard_path(1)
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, 8, major)
    path.write_bytes(bytes(data))
    with open_cache(str(small_cache.path)) as cache:
        cache[0]  # shard 0 is intact
        with pytest.raises(IncompatibleVersionError, match=rf"major version {major}") as info:
            cache[small_cache.manifest.shards[0].records]  # the first record of shard 1
    assert small_cache.manifest.shards[1].path in str(info.value)


def test_unknown_major_version_in_shard_footer(small_cache):
    path = small_cache.shard_path(0)
    body, footer = split_shard(path)
    footer["format_version"] = "3.1"
    write_shard(path, body, footer)
    resync_manifest(small_cache)
    with pytest.raises(CacheError, match=r"3\.1") as info:
        read_all(small_cache.path)
    assert small_cache.manifest.shards[0].path in str(info.value)


@pytest.mark.parametrize(
    "keep, manifest_agrees",
    [
        ("empty", False),
        ("header_only", False),
        (39, False),
        ("half", False),
        ("all_but_one", False),
        # The manifest's size and checksum updated too: the shard's own checks must hold.
        (HEADER_SIZE + TRAILER_SIZE, True),
        ("half", True),
        ("all_but_one", True),
    ],
)
def test_truncated_shard(small_cache, keep, manifest_agrees):
    path = small_cache.shard_path(0)
    data = path.read_bytes()
    size = {"empty": 0, "header_only": HEADER_SIZE, "half": len(data) // 2}.get(
        keep, len(data) - 1 if keep == "all_but_one" else keep
    )
    path.write_bytes(data[:size])
    if manifest_agrees:
        resync_manifest(small_cache)
    with pytest.raises(CorruptCacheError) as info:
        read_all(small_cache.path)
    assert small_cache.manifest.shards[0].path in str(info.value)


@pytest.mark.parametrize("size", [0, 100, "half"])
def test_truncated_manifest(small_cache, size):
    path = small_cache.path / MANIFEST_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if size == "half" else size])
    with pytest.raises(CorruptCacheError, match="manifest"):
        open_cache(str(small_cache.path))


def test_missing_shard_file_is_a_cache_error(small_cache):
    small_cache.shard_path(1).unlink()
    with open_cache(str(small_cache.path)) as cache:
        cache[0]
        with pytest.raises(CacheError) as info:
            list(cache.iter_records())
    assert small_cache.manifest.shards[1].path in str(info.value)


# -- fuzz: flipped bytes ------------------------------------------------------------------


def shard_regions(path: Path) -> dict[str, list[tuple[int, int, int | None]]]:
    """Byte ranges of a shard by role: (start, stop, chunk index or None)."""
    data = path.read_bytes()
    body, footer = split_shard(path)
    footer_start = len(body)
    blocks = []
    for c, chunk in enumerate(footer["chunks"]):
        for block in chunk["blocks"].values():
            blocks.append((block["offset"], block["offset"] + block["length"], c))
    covered = np.zeros(footer_start, dtype=bool)
    covered[:HEADER_SIZE] = True
    for start, stop, _ in blocks:
        covered[start:stop] = True
    padding = [(int(i), int(i) + 1, None) for i in np.flatnonzero(~covered)]
    return {
        "header": [(0, HEADER_SIZE, None)],
        "blocks": blocks,
        "padding": padding,
        "footer": [(footer_start, len(data) - TRAILER_SIZE, None)],
        "trailer": [(len(data) - TRAILER_SIZE, len(data), None)],
    }


def pick_offsets(ranges, count: int, rng) -> list[tuple[int, int | None]]:
    """`count` distinct offsets spread over `ranges` (all of them when there are fewer)."""
    every = [(o, chunk) for start, stop, chunk in ranges for o in range(start, stop)]
    if len(every) <= count:
        return every
    picked = rng.choice(len(every), size=count, replace=False)
    return [every[i] for i in sorted(picked)]


def flip_and_read(cache_dir: Path, target: Path, offset: int, mask: int, want: list[dict]):
    """Flip one byte, read every record; returns the CacheError raised, or None when every
    record came back exactly. The byte is restored afterwards."""
    with open(target, "r+b") as f:
        f.seek(offset)
        original = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([original ^ mask]))
    try:
        try:
            got = read_all(cache_dir)
        except CacheError as exc:
            return exc
        assert len(got) == len(want), f"offset {offset}: {len(got)} records, not {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_record_equal(g, w, where=f"byte {offset} ^ {mask:#x}, record {i}")
        return None
    finally:
        with open(target, "r+b") as f:
            f.seek(offset)
            f.write(bytes([original]))


def test_fuzz_flipped_shard_bytes(small_cache):
    """~300 single-byte flips over every region of a real shard: each read raises a
    CacheError naming the shard (and chunk, for a block) or returns the exact records."""
    rng = np.random.default_rng(20240611)
    path = small_cache.shard_path(1)
    name = small_cache.manifest.shards[1].path
    regions = shard_regions(path)
    budget = {"header": 16, "trailer": 24, "padding": 40, "footer": 70, "blocks": 150}
    outcomes = {key: {"error": 0, "exact": 0} for key in budget}
    for region, count in budget.items():
        for offset, chunk in pick_offsets(regions[region], count, rng):
            mask = int(rng.integers(1, 256))
            error = flip_and_read(small_cache.path, path, offset, mask, small_cache.records)
            if error is not None:
                message = str(error)
                assert name in message, f"byte {offset} ({region}): {message}"
                if chunk is not None:
                    assert f"chunk {chunk}" in message, f"byte {offset} ({region}): {message}"
            outcomes[region]["error" if error else "exact"] += 1
            # verify() covers what a read may skip (padding, reserved header bytes).
            with open(path, "r+b") as f:
                f.seek(offset)
                byte = f.read(1)[0]
                f.seek(offset)
                f.write(bytes([byte ^ mask]))
            try:
                with open_cache(str(small_cache.path)) as cache:
                    problems = cache.verify(raise_errors=False)
                assert any(name in p for p in problems), f"byte {offset} ({region}) not reported"
            finally:
                with open(path, "r+b") as f:
                    f.seek(offset)
                    f.write(bytes([byte]))
    # Checksums guard every byte that carries data: those flips must never read back.
    for region in ("blocks", "footer", "trailer"):
        assert outcomes[region]["exact"] == 0, outcomes
    assert_same_records(small_cache.path, small_cache.records)


def manifest_path_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the shard path strings (with their quotes) in a manifest."""
    return [(m.start(1), m.end(1)) for m in re.finditer(r'"path":\s*("[^"]*")', text)]


def test_fuzz_flipped_manifest_bytes(small_cache):
    """~200 flips anywhere in the manifest: a CacheError or the exact records."""
    rng = np.random.default_rng(7)
    path = small_cache.path / MANIFEST_NAME
    size = path.stat().st_size
    offsets = np.sort(rng.choice(size, size=200, replace=False))
    errors = 0
    for offset in offsets.tolist():
        mask = int(rng.integers(1, 256))
        error = flip_and_read(small_cache.path, path, offset, mask, small_cache.records)
        errors += error is not None
    assert errors > 0
    assert_same_records(small_cache.path, small_cache.records)


def test_fuzz_flipped_manifest_path_bytes(small_cache):
    """Every byte of every shard path: a path that names no file is a CacheError too."""
    rng = np.random.default_rng(8)
    path = small_cache.path / MANIFEST_NAME
    spans = manifest_path_spans(path.read_text())
    offsets = [offset for start, stop in spans for offset in range(start, stop)]
    assert len(spans) == len(small_cache.manifest.shards)
    errors = []
    for offset in offsets:
        mask = int(rng.integers(1, 256))
        errors.append(flip_and_read(small_cache.path, path, offset, mask, small_cache.records))
    # Any other path names a missing file, a duplicate, or is not a valid path or JSON.
    assert all(error is not None for error in errors)


# -- hostile manifests: paths that escape the root --------------------------------------------


@pytest.mark.parametrize(
    "bad_path",
    [
        "../outside.lgc",
        "shards/../../outside.lgc",
        "ABSOLUTE",
        "s3://other-bucket/x.lgc",
        "file:///etc/passwd",
        "memory://x/shard.lgc",
        "shards\\..\\..\\outside.lgc",
        "..\\outside.lgc",
        "C:/Windows/shard.lgc",
        "shards//00000.lgc",
        "./shards/00000.lgc",
        "shards/./00000.lgc",
        "shards/00000.lgc/..",
        "",
        "shards/a\x00b.lgc",
        7,
        None,
    ],
)
def test_manifest_shard_path_escaping_the_root_is_rejected(tmp_path, small_cache, bad_path):
    # A valid shard really is there, so only the path check can stop the read.
    outside = tmp_path / "outside.lgc"
    shutil.copy(small_cache.shard_path(0), outside)
    if bad_path == "ABSOLUTE":
        bad_path = str(outside)
    obj = load_manifest_json(small_cache.path)
    obj["shards"][0]["path"] = bad_path
    save_manifest_json(small_cache.path, obj)
    with pytest.raises(CorruptCacheError, match="shard 0"):
        open_cache(str(small_cache.path))


# -- hostile footers and frames: rejected before allocation -----------------------------------


def rewrite_chunk0(small_cache: SmallCache, edit, *, extra_blocks=()) -> None:
    """Rewrite shard 0's footer with `edit(footer, new_block_positions)` applied, append
    `extra_blocks` to its chunk area first, and make the manifest agree with the result."""
    path = small_cache.shard_path(0)
    body, footer = split_shard(path)
    body = bytearray(body)
    positions = [append_block(body, data) for data in extra_blocks]
    entry_updates = edit(footer, positions) or {}
    write_shard(path, body, footer)
    resync_manifest(small_cache, **entry_updates)


def expect_rejected(
    small_cache: SmallCache, *, chunk: int | None = 0, match: str | None = None
) -> None:
    with memory_ceiling(), pytest.raises(CorruptCacheError, match=match) as info:
        read_all(small_cache.path)
    message = str(info.value)
    assert small_cache.manifest.shards[0].path in message
    if chunk is not None:
        assert f"chunk {chunk}" in message


def _more_tokens(lengths):
    lengths[0] += 1


def _first_token_supervised(mask):
    mask[0] = 1


def _mask_of_two(mask):
    mask[-1] = 2


def _sample_id_length_below_minus_one(lengths):
    lengths[0] = -2


def _sample_id_longer_than_its_bytes(lengths):
    lengths[0] += 1


@pytest.mark.parametrize(
    "column, damage, match",
    [
        ("record_lengths", _more_tokens, "record lengths do not add up"),
        ("loss_mask", _first_token_supervised, "true at the first token of a record"),
        ("loss_mask", _mask_of_two, "values other than 0 and 1"),
        ("sample_id_lengths", _sample_id_length_below_minus_one, "sample_id length out of"),
        ("sample_id_lengths", _sample_id_longer_than_its_bytes, "do not add up to its bytes"),
    ],
)
@pytest.mark.usefixtures("read_path")
def test_columns_breaking_the_rules_of_a_chunk(small_cache, column, damage, match):
    """Checksums valid, a column's values not (spec section 4.2): refused on both kernel
    sets, naming the shard, the chunk and the rule."""
    with open_cache(small_cache.path) as cache:
        shard = cache.shard_file(0)
        values = shard._column(0, column).copy()
    damage(values)
    frame = shard.pipelines[column].encode(values)

    def edit(footer, positions):
        block = footer["chunks"][0]["blocks"][column]
        block["offset"], block["length"] = positions[0]
        block["checksum"] = block_checksum(frame)

    rewrite_chunk0(small_cache, edit, extra_blocks=[frame])
    expect_rejected(small_cache, match=match)


@pytest.mark.parametrize("raw", [1 << 40, (2 << 30) + 4, 10**18])
def test_footer_declaring_a_huge_raw_length(small_cache, raw):
    def edit(footer, _):
        footer["chunks"][0]["blocks"]["topk_ids"]["raw_length"] = raw

    rewrite_chunk0(small_cache, edit)
    expect_rejected(small_cache, match="raw_length")


def test_footer_declaring_absurd_counts(small_cache):
    """Counts that make every implied raw_length consistent but far above the 2 GiB limit."""
    tokens = 1 << 40

    def edit(footer, _):
        chunk = footer["chunks"][0]
        records = chunk["records"]
        chunk["tokens"], chunk["targets"] = tokens, 0
        chunk["blocks"]["input_ids"]["raw_length"] = 4 * tokens
        chunk["blocks"]["loss_mask"]["raw_length"] = tokens
        chunk["blocks"]["topk_ids"]["raw_length"] = 0
        chunk["blocks"]["topk_logprobs"]["raw_length"] = 0
        footer["tokens"] = sum(c["tokens"] for c in footer["chunks"])
        footer["targets"] = sum(c["targets"] for c in footer["chunks"])
        assert records >= 1
        return {"tokens": footer["tokens"], "targets": footer["targets"]}

    rewrite_chunk0(small_cache, edit)
    expect_rejected(small_cache)


def test_footer_sample_id_bytes_above_the_per_record_limit(small_cache):
    def edit(footer, _):
        chunk = footer["chunks"][0]
        chunk["blocks"]["sample_id_bytes"]["raw_length"] = 4096 * chunk["records"] + 1

    rewrite_chunk0(small_cache, edit)
    expect_rejected(small_cache, match="sample_id_bytes")


@pytest.mark.parametrize(
    "where",
    ["past_end", "into_footer", "into_header", "negative", "huge_length", "not_an_int"],
)
def test_footer_block_outside_the_chunk_area(small_cache, where):
    size = small_cache.shard_path(0).stat().st_size

    def edit(footer, _):
        block = footer["chunks"][0]["blocks"]["topk_logprobs"]
        if where == "past_end":
            block["offset"] = size + 4096
        elif where == "into_footer":
            block["offset"] = size - TRAILER_SIZE - block["length"] // 2
        elif where == "into_header":
            block["offset"] = 4
        elif where == "negative":
            block["offset"] = -8
        elif where == "huge_length":
            block["length"] = 1 << 62
        else:
            block["offset"] = "16"

    rewrite_chunk0(small_cache, edit)
    expect_rejected(small_cache)


@pytest.mark.parametrize("length", [1 << 63, MAX_FOOTER_BYTES, "size"])
def test_trailer_declaring_a_footer_larger_than_the_file(small_cache, length):
    path = small_cache.shard_path(0)
    data = bytearray(path.read_bytes())
    value = len(data) - TRAILER_SIZE + 1 if length == "size" else length
    struct.pack_into("<Q", data, len(data) - TRAILER_SIZE, value)
    path.write_bytes(bytes(data))
    resync_manifest(small_cache)
    expect_rejected(small_cache, chunk=None, match="footer length")


@pytest.mark.parametrize("declared", [1 << 40, (1 << 31) - 8, 401])
def test_zstd_frame_declaring_a_huge_content_size(small_cache, declared):
    """The footer's raw_length is honest; the frame claims more: refused before decoding."""

    def edit(footer, positions):
        block = footer["chunks"][0]["blocks"]["record_lengths"]
        frame = frames[0]
        block["offset"], block["length"] = positions[0]
        block["checksum"] = block_checksum(frame)
        assert block["raw_length"] < declared

    frames = [zstd_frame_declaring(declared)]
    rewrite_chunk0(small_cache, edit, extra_blocks=frames)
    expect_rejected(small_cache, match="zstd")


def test_zstd_frame_that_expands_past_its_declared_size(small_cache):
    """An honest-looking header whose RLE block expands to 100 KB: no output past raw_length."""
    footer_raw = {}

    def edit(footer, positions):
        block = footer["chunks"][0]["blocks"]["loss_mask"]
        footer_raw["raw"] = block["raw_length"]
        block["offset"], block["length"] = positions[0]
        block["checksum"] = block_checksum(frames[0])

    _, footer = split_shard(small_cache.shard_path(0))
    raw = footer["chunks"][0]["blocks"]["loss_mask"]["raw_length"]
    frames = [rle_frame_declaring(raw, 100_000)]
    rewrite_chunk0(small_cache, edit, extra_blocks=frames)
    expect_rejected(small_cache, match="zstd")


def test_zstd_frame_without_a_content_size(small_cache):
    _, footer = split_shard(small_cache.shard_path(0))
    raw = footer["chunks"][0]["blocks"]["record_lengths"]["raw_length"]
    records = footer["chunks"][0]["records"]
    assert raw == 4 * records
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"\1\0\0\0" * records)

    def edit(footer, positions):
        block = footer["chunks"][0]["blocks"]["record_lengths"]
        block["offset"], block["length"] = positions[0]
        block["checksum"] = block_checksum(frame)

    rewrite_chunk0(small_cache, edit, extra_blocks=[frame])
    expect_rejected(small_cache, match="content size")


def test_consistent_huge_counts_with_a_matching_zstd_frame(small_cache):
    """A 10 KB shard whose footer declares a 2^29-record chunk (each raw_length within the
    2 GiB limit) and whose 17-byte zstd frame declares 2 GiB: refused from the stored length
    before the zstd output buffer is allocated (section 5's expansion bound)."""
    records = 1 << 29
    frame = zstd_frame_declaring(4 * records)

    def edit(footer, positions):
        chunk = footer["chunks"][0]
        chunk["records"] = chunk["tokens"] = records
        chunk["targets"] = 0
        blocks = chunk["blocks"]
        blocks.pop("sample_id_lengths")
        blocks.pop("sample_id_bytes")
        blocks["record_lengths"].update(
            offset=positions[0][0],
            length=positions[0][1],
            raw_length=4 * records,
            checksum=block_checksum(frame),
        )
        blocks["input_ids"]["raw_length"] = 4 * records
        blocks["loss_mask"]["raw_length"] = records
        blocks["topk_ids"]["raw_length"] = blocks["topk_logprobs"]["raw_length"] = 0
        for key in ("records", "tokens", "targets"):
            footer[key] = sum(c[key] for c in footer["chunks"])
        return {
            "records": footer["records"],
            "tokens": footer["tokens"],
            "targets": footer["targets"],
            "chunk_records": [c["records"] for c in footer["chunks"]],
        }

    rewrite_chunk0(small_cache, edit, extra_blocks=[frame])
    with (
        memory_ceiling(),
        pytest.raises(CorruptCacheError, match="chunk 0"),
        open_cache(str(small_cache.path)) as cache,
    ):
        cache[0]


@pytest.mark.parametrize(
    "field, value",
    [
        ("bytes", 1 << 53),
        ("records", 1 << 53),
        ("tokens", 1 << 60),
        ("k", 1 << 40),
        ("vocab_size", 1 << 40),
        ("chunk_records", [1 << 52, 1 << 52]),
    ],
)
def test_manifest_declaring_absurd_sizes(small_cache, field, value):
    obj = load_manifest_json(small_cache.path)
    if field in ("k", "vocab_size"):
        obj[field] = value
    else:
        entry = obj["shards"][0]
        entry[field] = value
        if field == "records":
            entry["chunk_records"] = [value]
            entry["tokens"] = value
        if field == "chunk_records":
            entry["records"] = entry["tokens"] = sum(value)
        for key in ("records", "tokens", "targets", "bytes"):
            obj[key] = sum(s[key] for s in obj["shards"])
    save_manifest_json(small_cache.path, obj)
    # Either the manifest is refused, or the shard it describes is.
    with (
        memory_ceiling(),
        pytest.raises(CorruptCacheError),
        open_cache(str(small_cache.path)) as cache,
    ):
        list(cache.iter_records(0, 2))


def test_oversized_manifest_is_refused_without_reading_it(small_cache):
    path = small_cache.path / MANIFEST_NAME
    with open(path, "r+b") as f:
        f.truncate((256 << 20) + 1)  # sparse: no disk used, but too large to be a manifest
    with memory_ceiling(64 << 20), pytest.raises(CacheError, match="larger than the limit"):
        open_cache(str(small_cache.path))


# -- the commit protocol under failure -------------------------------------------------------

_KILLED_WRITER = textwrap.dedent(
    """
    import sys
    from logitcache import CacheWriter
    from logitcache.synthetic import synthetic_records

    with CacheWriter(sys.argv[1], k=8, vocab_size=1000, chunk_bytes=1500, shard_bytes=4000) as w:
        seed = 0
        while True:
            for record in synthetic_records(20, k=8, vocab_size=1000, seed=seed, mean_length=24):
                w.add(**record)
            seed += 1
    """
)


def published_shards(cache_dir: Path) -> list[str]:
    shards = cache_dir / "shards"
    if not shards.is_dir():
        return []
    return sorted(p.name for p in shards.iterdir() if p.name.endswith(".lgc"))


def test_writer_killed_mid_run_commits_nothing(tmp_path):
    cache_dir = tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(cache_dir)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # Wait (bounded) until the writer has published shards, so the kill lands mid-run.
        deadline = time.monotonic() + 120
        while len(published_shards(cache_dir)) < 3:
            if proc.poll() is not None:
                pytest.fail(f"writer exited early: {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail("writer published no shards within 120 s")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (cache_dir / MANIFEST_NAME).exists()
    assert len(published_shards(cache_dir)) >= 3
    with pytest.raises(NoCacheError, match="no committed cache at"):
        open_cache(str(cache_dir))

    # A new writer to the same directory succeeds and owns every file there.
    records = make_records(5, seed=99)
    manifest = write_cache(cache_dir, records, k=SMALL_K, vocab_size=SMALL_VOCAB)
    assert_same_records(cache_dir, records)
    on_disk = sorted(p.name for p in (cache_dir / "shards").iterdir())
    assert on_disk == sorted(Path(s.path).name for s in manifest.shards)


@pytest.mark.parametrize("fail_after", [0, 3, 25])
def test_exception_inside_with_commits_nothing(tmp_path, fail_after):
    cache_dir = tmp_path / "cache"
    records = make_records(25)
    with (
        pytest.raises(RuntimeError, match="teacher crashed"),
        CacheWriter(
            str(cache_dir),
            k=SMALL_K,
            vocab_size=SMALL_VOCAB,
            chunk_bytes=1500,
            shard_bytes=4000,
        ) as writer,
    ):
        for record in records[:fail_after]:
            writer.add(**record)
        raise RuntimeError("teacher crashed")
    assert not (cache_dir / MANIFEST_NAME).exists()
    assert published_shards(cache_dir) == []
    leftovers = list((cache_dir / "shards").iterdir()) if (cache_dir / "shards").exists() else []
    assert leftovers == []
    with pytest.raises(NoCacheError):
        open_cache(str(cache_dir))


def test_bad_record_inside_with_commits_nothing(tmp_path):
    cache_dir = tmp_path / "cache"
    records = make_records(20)
    bad = dict(records[10], loss_mask=np.ones_like(records[10]["loss_mask"]))
    with (
        pytest.raises(ValueError, match="record 10"),
        CacheWriter(
            str(cache_dir), k=SMALL_K, vocab_size=SMALL_VOCAB, chunk_bytes=1500, shard_bytes=4000
        ) as writer,
    ):
        for record in [*records[:10], bad, *records[11:]]:
            writer.add(**record)
    assert not (cache_dir / MANIFEST_NAME).exists()
    assert published_shards(cache_dir) == []


# -- writer input validation ---------------------------------------------------------------


def _good() -> dict:
    return make_records(1, seed=5, mean_length=16)[0]


def _mutate(record: dict, case: str) -> tuple[dict, str]:
    """A copy of `record` broken as `case` says, and the field its error must name."""
    r = {key: (np.array(v) if isinstance(v, np.ndarray) else v) for key, v in record.items()}
    ids, lp = r["topk_ids"], r["topk_logprobs"]
    n, k = ids.shape
    assert n >= 3 and k == SMALL_K
    if case == "input_ids_float":
        r["input_ids"] = r["input_ids"].astype(np.float32)
    elif case == "input_ids_bool":
        r["input_ids"] = r["input_ids"] > 0
    elif case == "input_ids_2d":
        r["input_ids"] = r["input_ids"][None, :]
    elif case == "input_ids_empty":
        r["input_ids"] = np.zeros(0, np.int32)
    elif case == "input_ids_negative":
        r["input_ids"][3] = -1
    elif case == "input_ids_vocab":
        r["input_ids"][3] = SMALL_VOCAB
    elif case == "loss_mask_float":
        r["loss_mask"] = r["loss_mask"].astype(np.float32)
    elif case == "loss_mask_values":
        r["loss_mask"] = r["loss_mask"].astype(np.int8) * 2
    elif case == "loss_mask_length":
        r["loss_mask"] = np.append(r["loss_mask"], True)
    elif case == "loss_mask_first":
        r["loss_mask"][0] = True
        return r, "loss_mask[0]"
    elif case == "topk_ids_float":
        r["topk_ids"] = ids.astype(np.float64)
    elif case == "topk_ids_1d":
        r["topk_ids"] = ids.reshape(-1)
    elif case == "topk_ids_negative":
        ids[2, 3] = -5
        return r, "topk_ids row 2 column 3"
    elif case == "topk_ids_vocab":
        ids[2, 3] = SMALL_VOCAB
        return r, "topk_ids row 2 column 3"
    elif case == "topk_ids_too_big_for_int32":
        r["topk_ids"] = ids.astype(np.int64) + (1 << 33)
        return r, "topk_ids"
    elif case == "duplicate_id":
        ids[1, 5] = ids[1, 2]
        return r, "topk_ids row 1"
    elif case == "topk_logprobs_int":
        r["topk_logprobs"] = lp.astype(np.int32)
    elif case == "topk_logprobs_1d":
        r["topk_logprobs"] = lp.reshape(-1)
    elif case == "nan_fp16":
        lp[2, 3] = np.nan
        return r, "topk_logprobs row 2 column 3"
    elif case == "inf_fp16":
        lp[2, 3] = np.inf
        return r, "topk_logprobs row 2 column 3"
    elif case == "minus_inf_fp16":
        lp[2, 3] = -np.inf
        return r, "topk_logprobs row 2 column 3"
    elif case == "nan_fp32":
        lp = lp.astype(np.float32)
        lp[2, 3] = np.nan
        r["topk_logprobs"] = lp
        return r, "topk_logprobs row 2 column 3"
    elif case == "minus_inf_fp64":
        lp = lp.astype(np.float64)
        lp[2, 3] = -np.inf
        r["topk_logprobs"] = lp
        return r, "topk_logprobs row 2 column 3"
    elif case == "positive":
        lp[2, 3] = 0.5
        return r, "topk_logprobs row 2 column 3"
    elif case == "raw_logits":
        # Logits shifted by their max (as NeMo-Aligner stores them): <= 0 but not normalised.
        logits = lp.astype(np.float32) * 0.1
        r["topk_logprobs"] = logits - logits.max(axis=1, keepdims=True)
        return r, "topk_logprobs row 0"
    elif case == "rows_fewer_than_targets":
        r["topk_ids"], r["topk_logprobs"] = ids[:-1], lp[:-1]
        return r, "topk_ids"
    elif case == "rows_more_than_targets":
        r["topk_ids"] = np.concatenate([ids, ids[:1]])
        r["topk_logprobs"] = np.concatenate([lp, lp[:1]])
        return r, "topk_ids"
    elif case == "logprob_rows_mismatch":
        r["topk_logprobs"] = lp[:-1]
        return r, "topk_logprobs"
    elif case == "k_smaller":
        r["topk_ids"], r["topk_logprobs"] = ids[:, :-1], lp[:, :-1]
        return r, "topk_ids"
    elif case == "k_larger":
        r["topk_ids"] = np.concatenate([ids, ids[:, :1] + 1], axis=1)
        r["topk_logprobs"] = np.concatenate([lp, lp[:, :1]], axis=1)
        return r, "topk_ids"
    elif case == "sample_id_bytes":
        r["sample_id"] = b"not-a-str"
        return r, "sample_id"
    elif case == "sample_id_too_long":
        r["sample_id"] = "x" * 4097
        return r, "sample_id"
    else:
        raise AssertionError(case)
    return r, case.rsplit("_", 1)[0] if not case.startswith("input_ids") else "input_ids"


WRITER_CASES = [
    "input_ids_float",
    "input_ids_bool",
    "input_ids_2d",
    "input_ids_empty",
    "input_ids_negative",
    "input_ids_vocab",
    "loss_mask_float",
    "loss_mask_values",
    "loss_mask_length",
    "loss_mask_first",
    "topk_ids_float",
    "topk_ids_1d",
    "topk_ids_negative",
    "topk_ids_vocab",
    "topk_ids_too_big_for_int32",
    "duplicate_id",
    "topk_logprobs_int",
    "topk_logprobs_1d",
    "nan_fp16",
    "inf_fp16",
    "minus_inf_fp16",
    "nan_fp32",
    "minus_inf_fp64",
    "positive",
    "raw_logits",
    "rows_fewer_than_targets",
    "rows_more_than_targets",
    "logprob_rows_mismatch",
    "k_smaller",
    "k_larger",
    "sample_id_bytes",
    "sample_id_too_long",
]


@pytest.mark.parametrize("case", WRITER_CASES)
def test_writer_rejects_bad_record_naming_field_and_record(tmp_path, case):
    good = _good()
    bad, field = _mutate(good, case)
    cache_dir = tmp_path / "cache"
    with CacheWriter(str(cache_dir), k=SMALL_K, vocab_size=SMALL_VOCAB) as writer:
        writer.add(**good)
        writer.add(**good)
        with pytest.raises(ValueError) as info:
            writer.add(**bad)
        message = str(info.value)
        assert "record 2" in message, message
        assert field in message, message
        # The refused record left no trace: the writer goes on with the next one.
        writer.add(**good)
    got = read_all(cache_dir)
    assert len(got) == 3
    for record in got:
        assert_record_equal(record, good)


def test_writer_batch_errors_name_the_global_record_index(tmp_path):
    records = make_records(6, seed=3)
    records[4] = _mutate(records[4], "nan_fp16")[0]
    batch = records[1:]
    cache_dir = tmp_path / "c"
    with (
        pytest.raises(ValueError, match=r"record 4: topk_logprobs row 2 column 3"),
        CacheWriter(str(cache_dir), k=SMALL_K, vocab_size=SMALL_VOCAB) as writer,
    ):
        writer.add(**records[0])
        writer.add_batch(
            input_ids=[r["input_ids"] for r in batch],
            loss_mask=[r["loss_mask"] for r in batch],
            topk_ids=[r["topk_ids"] for r in batch],
            topk_logprobs=[r["topk_logprobs"] for r in batch],
            sample_ids=[r["sample_id"] for r in batch],
        )
    assert not (cache_dir / MANIFEST_NAME).exists()


def test_all_positions_mode_needs_t_minus_one_rows(tmp_path):
    record = make_records(1, seed=2, positions="all")[0]
    with CacheWriter(str(tmp_path / "c"), k=SMALL_K, vocab_size=SMALL_VOCAB, positions="all") as w:
        w.add(**record)
        short = dict(
            record, topk_ids=record["topk_ids"][1:], topk_logprobs=record["topk_logprobs"][1:]
        )
        with pytest.raises(ValueError, match=r"record 1: topk_ids .*positions='all'"):
            w.add(**short)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"k": 0}, "k="),
        ({"k": 5000}, "k="),
        ({"k": 8.0}, "k="),
        ({"vocab_size": 4}, "vocab_size="),
        ({"vocab_size": 1 << 25}, "vocab_size="),
        ({"positions": "some"}, "positions="),
        ({"rank": -1}, "rank="),
        ({"codecs": {"logits": [{"id": "zstd", "level": 3}]}}, "codecs"),
    ],
)
def test_writer_rejects_bad_configuration(tmp_path, kwargs, field):
    args = {"k": SMALL_K, "vocab_size": SMALL_VOCAB, **kwargs}
    with pytest.raises(ValueError, match=re.escape(field)):
        CacheWriter(str(tmp_path / "c"), **args)
