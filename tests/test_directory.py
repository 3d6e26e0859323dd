"""The chunk directory's array checks agree with the per-chunk parser: the same directory
from a well-formed footer, and None (leaving the parser to name the fault) for each fault."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from logitcache import open_cache
from logitcache.directory import ChunkDirectory
from logitcache.format import CorruptCacheError
from tests.conftest import _small_cache
from tests.test_faults import split_shard


def _fast(shard, chunks):
    return ChunkDirectory.from_entries(
        chunks,
        k=shard.k,
        positions=shard.positions,
        footer_start=shard.footer_start,
        expansion={name: p.max_expansion() for name, p in shard.pipelines.items()},
    )


def _slow(shard, chunks):
    return ChunkDirectory.from_parsed([shard._parse_chunk(i, c) for i, c in enumerate(chunks)])


@pytest.fixture(scope="module", params=["supervised", "all"])
def opened(request, tmp_path_factory):
    """(an open shard 0, its footer's chunk entries) of a cache with sample_ids."""
    cache = _small_cache(tmp_path_factory.mktemp("dir") / "cache", positions=request.param)
    _, footer = split_shard(cache.shard_path(0))
    with open_cache(cache.path) as reader:
        yield reader.shard_file(0), footer["chunks"]


def test_well_formed_footers_give_the_parsers_directory(opened):
    shard, chunks = opened
    fast, slow = _fast(shard, chunks), _slow(shard, chunks)
    assert fast is not None
    assert len(fast) == len(slow) >= 2
    for name in ("counts", "blocks", "checksums"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(slow, name))
        assert getattr(fast, name).dtype == getattr(slow, name).dtype
    assert [fast[i] for i in range(len(fast))] == [slow[i] for i in range(len(slow))]


def test_a_footer_without_sample_ids_gives_the_parsers_directory(opened):
    shard, chunks = opened
    chunks = copy.deepcopy(chunks)
    for chunk in chunks:
        del chunk["blocks"]["sample_id_lengths"], chunk["blocks"]["sample_id_bytes"]
    fast = _fast(shard, chunks)
    assert fast is not None
    np.testing.assert_array_equal(fast.blocks, _slow(shard, chunks).blocks)
    assert not fast.has(0, "sample_id_bytes")


def _set(column, field, value):
    def edit(chunk):
        chunk["blocks"][column][field] = value

    return edit


def _count(key, value):
    def edit(chunk):
        chunk[key] = value

    return edit


def _drop(column):
    def edit(chunk):
        del chunk["blocks"][column]

    return edit


FAULTS = {
    "records zero": _count("records", 0),
    "records a bool": _count("records", True),
    "tokens below records": lambda c: c.update(tokens=c["records"] - 1),
    "targets above tokens": lambda c: c.update(targets=c["tokens"] + 1),
    "count a float": _count("targets", 3.0),
    "count negative": _count("tokens", -1),
    "count huge": _count("tokens", 1 << 70),
    "chunk not an object": lambda c: c.clear(),
    "blocks not an object": lambda c: c.update(blocks=[1, 2]),
    "block not an object": lambda c: c["blocks"].update(topk_ids="abc"),
    "required column missing": _drop("loss_mask"),
    "sample ids half present": _drop("sample_id_bytes"),
    "offset in the header": _set("topk_ids", "offset", 4),
    "offset a string": _set("topk_ids", "offset", "64"),
    "block into the footer": _set("topk_logprobs", "length", 1 << 39),
    "raw_length off by one": lambda c: c["blocks"]["input_ids"].update(
        raw_length=c["blocks"]["input_ids"]["raw_length"] + 1
    ),
    "sample id bytes too many": lambda c: c["blocks"]["sample_id_bytes"].update(
        raw_length=4096 * c["records"] + 1
    ),
    "raw beyond the pipeline's expansion": lambda c: c["blocks"]["topk_ids"].update(length=0),
    "checksum short": _set("topk_ids", "checksum", "abc"),
    "checksum upper case": _set("topk_ids", "checksum", "ABCDEF0123456789"),
    "checksum with a space": _set("topk_ids", "checksum", "abcdef01 3456789"),
    "checksum an int": _set("topk_ids", "checksum", 12),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("where", [0, -1])
def test_each_fault_leaves_the_naming_to_the_parser(opened, fault, where):
    shard, chunks = opened
    chunks = copy.deepcopy(chunks)
    FAULTS[fault](chunks[where])
    assert _fast(shard, chunks) is None
    with pytest.raises(CorruptCacheError, match=f"chunk {where % len(chunks)}"):
        _slow(shard, chunks)


def test_positions_all_needs_targets_equal_tokens_minus_records(opened):
    shard, chunks = opened
    chunks = copy.deepcopy(chunks)
    chunk = chunks[0]
    chunk["targets"] -= 1
    chunk["blocks"]["topk_ids"]["raw_length"] -= 4 * shard.k
    chunk["blocks"]["topk_logprobs"]["raw_length"] -= 2 * shard.k
    fast = _fast(shard, chunks)
    if shard.positions == "all":
        assert fast is None
        with pytest.raises(CorruptCacheError, match="positions 'all'"):
            _slow(shard, chunks)
    else:
        assert fast is not None
        np.testing.assert_array_equal(fast.counts, _slow(shard, chunks).counts)
