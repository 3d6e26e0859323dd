"""Distributed writers and merge: one complete, consistent set of partials or a refusal that
names what is wrong; the old manifest's shards are removed only after the new one commits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from logitcache import CacheError, CacheWriter, NoCacheError, open_cache
from logitcache.format import MANIFEST_NAME
from logitcache.manifest import Manifest, merge_partials, partial_manifest_name
from logitcache.sealed_json import seal
from tests.conftest import SMALL_K, SMALL_VOCAB, assert_record_equal, make_records


def write_rank(url, rank: int, records: list[dict], world_size: int = 2, **kwargs) -> Manifest:
    with CacheWriter(
        str(url),
        k=SMALL_K,
        vocab_size=SMALL_VOCAB,
        rank=rank,
        world_size=world_size,
        chunk_bytes=1000,
        shard_bytes=2500,
        teacher={"name": "synthetic", "revision": "1"},
        **kwargs,
    ) as writer:
        for record in records:
            writer.add(**record)
    return writer.manifest


def shard_names(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "shards").iterdir())


def test_merge_joins_ranks_in_rank_order(tmp_path):
    url = tmp_path / "cache"
    rank0, rank1 = make_records(7, seed=10), make_records(9, seed=11)
    # Rank 1 finishes first: the order must still be rank 0, then rank 1.
    part1 = write_rank(url, 1, rank1)
    with pytest.raises(NoCacheError, match="logitcache merge"):
        open_cache(str(url))
    part0 = write_rank(url, 0, rank0)
    assert not (url / MANIFEST_NAME).exists()
    assert all(s.path.startswith("shards/r00001-g") for s in part1.shards)
    assert len(part0.shards) >= 2 and len(part1.shards) >= 2
    recorded = json.loads((url / partial_manifest_name(1)).read_text())
    assert (recorded["rank"], recorded["world_size"]) == (1, 2)

    merged = merge_partials(str(url))
    assert [s.path for s in merged.shards] == [s.path for s in part0.shards + part1.shards]
    assert merged.records == 16
    assert merged.metadata["ranks"] == 2 and merged.metadata["world_size"] == 2
    assert merged.teacher == {"name": "synthetic", "revision": "1"}
    with open_cache(str(url)) as cache:
        assert len(cache) == 16
        for i, (got, want) in enumerate(zip(cache, rank0 + rank1, strict=True)):
            assert_record_equal(got, want, where=f"record {i}")
        assert cache.verify() == []


def test_a_missing_rank_is_refused_unless_incomplete_is_allowed(tmp_path):
    url = tmp_path / "cache"
    write_rank(url, 0, make_records(3, seed=1), world_size=3)
    write_rank(url, 2, make_records(4, seed=2), world_size=3)
    with pytest.raises(CacheError, match=r"rank\(s\) \[1\] of 3 have no partial manifest"):
        merge_partials(str(url))
    assert not (url / MANIFEST_NAME).exists()
    merged = merge_partials(str(url), allow_incomplete=True)
    assert merged.records == 7
    assert merged.metadata["missing_ranks"] == [1]


def test_a_missing_or_changed_shard_is_refused_naming_it(tmp_path):
    url = tmp_path / "cache"
    write_rank(url, 0, make_records(3, seed=1))
    part1 = write_rank(url, 1, make_records(5, seed=2))
    victim = url / part1.shards[0].path
    saved = victim.read_bytes()
    victim.write_bytes(saved[:-1])
    with pytest.raises(CacheError, match=f"{part1.shards[0].path} has {len(saved) - 1} bytes"):
        merge_partials(str(url))
    victim.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))  # same size, other bytes
    merge_partials(str(url))  # sizes are checked always, checksums on request
    (url / MANIFEST_NAME).unlink()
    with pytest.raises(CacheError, match="checksum"):
        merge_partials(str(url), verify=True)
    victim.unlink()
    with pytest.raises(CacheError, match=f"{part1.shards[0].path} listed by .* is missing"):
        merge_partials(str(url))
    assert not (url / MANIFEST_NAME).exists()


def test_a_duplicated_partial_is_refused(tmp_path):
    url = tmp_path / "cache"
    write_rank(url, 0, make_records(3, seed=1), world_size=3)
    write_rank(url, 1, make_records(3, seed=2), world_size=3)
    shutil.copy(url / partial_manifest_name(0), url / partial_manifest_name(2))
    with pytest.raises(CacheError, match="rank-00002.json holds the partial manifest of rank 0"):
        merge_partials(str(url))
    # A copy whose rank field was edited to match still lists the same shards.
    obj = json.loads((url / partial_manifest_name(0)).read_text())
    obj["rank"] = 2
    (url / partial_manifest_name(2)).write_bytes(seal(obj))
    with pytest.raises(CacheError, match="is listed by both"):
        merge_partials(str(url))
    assert not (url / MANIFEST_NAME).exists()


def test_ranks_that_disagree_are_refused(tmp_path):
    url = tmp_path / "cache"
    write_rank(url, 0, make_records(3, seed=1))
    with CacheWriter(
        str(url), k=SMALL_K, vocab_size=SMALL_VOCAB, rank=1, world_size=2, positions="all"
    ) as writer:
        for record in make_records(3, seed=2, positions="all"):
            writer.add(**record)
    with pytest.raises(CacheError, match="positions") as info:
        merge_partials(str(url))
    assert partial_manifest_name(1) in str(info.value)
    assert not (url / MANIFEST_NAME).exists()


def test_partials_of_different_world_sizes_are_refused(tmp_path):
    url = tmp_path / "cache"
    write_rank(url, 0, make_records(3, seed=1), world_size=2)
    write_rank(url, 1, make_records(3, seed=2), world_size=3)
    with pytest.raises(CacheError, match="disagree on the world size"):
        merge_partials(str(url))


def test_partials_without_a_world_size_need_one(tmp_path):
    url = tmp_path / "cache"
    for rank in (0, 1):
        write_rank(url, rank, make_records(3, seed=rank))
        obj = json.loads((url / partial_manifest_name(rank)).read_text())
        del obj["rank"], obj["world_size"]  # as a format 1.0 writer left them
        (url / partial_manifest_name(rank)).write_bytes(seal(obj))
    with pytest.raises(CacheError, match="--world-size"):
        merge_partials(str(url))
    with pytest.raises(CacheError, match=r"rank\(s\) \[2\] of 3"):
        merge_partials(str(url), world_size=3)
    assert merge_partials(str(url), world_size=2).records == 6


def test_merge_without_partials(tmp_path):
    with pytest.raises(NoCacheError, match="no partial manifests"):
        merge_partials(str(tmp_path))


def test_a_rank_needs_the_world_size(tmp_path):
    with pytest.raises(ValueError, match="world_size"):
        CacheWriter(str(tmp_path), k=SMALL_K, vocab_size=SMALL_VOCAB, rank=0)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        CacheWriter(str(tmp_path), k=SMALL_K, vocab_size=SMALL_VOCAB, rank=2, world_size=2)


def test_rerunning_a_rank_keeps_the_merged_cache_until_the_next_merge(tmp_path):
    url = tmp_path / "cache"
    first0 = write_rank(url, 0, make_records(4, seed=1))
    part1 = write_rank(url, 1, make_records(4, seed=2))
    merge_partials(str(url))
    rerun = make_records(5, seed=3)
    part0 = write_rank(url, 0, rerun, overwrite=True)
    # The merged manifest still lists rank 0's first shards: they stay until it is replaced.
    with open_cache(str(url)) as cache:
        assert len(cache) == 8 and cache.verify() == []
    merged = merge_partials(str(url))
    assert merged.records == 9
    assert shard_names(url) == sorted(s.path.split("/")[1] for s in part0.shards + part1.shards)
    assert not {s.path for s in first0.shards} & {s.path for s in merged.shards}
    with open_cache(str(url)) as cache:
        for got, want in zip(cache, rerun, strict=False):
            assert_record_equal(got, want)


def test_merge_command_refuses_a_missing_rank_and_takes_the_flag(tmp_path):
    url = tmp_path / "cache"
    write_rank(url, 0, make_records(3, seed=1), world_size=2)
    cmd = [sys.executable, "-m", "logitcache.cli", "merge", str(url)]
    refused = subprocess.run(cmd, capture_output=True, text=True)
    assert refused.returncode == 1
    assert "rank(s) [1] of 2" in refused.stderr and "--allow-incomplete" in refused.stderr
    done = subprocess.run([*cmd, "--allow-incomplete"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "3 records" in done.stdout
