"""CacheWriter.checkpoint() and resume=True: what a resumed run keeps, refuses and commits.

The SIGKILL-and-resume test is in test_crash.py; these tests cover the rules one at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from logitcache import CacheError, CacheWriter, NoCacheError, open_cache
from logitcache.format import MANIFEST_NAME
from logitcache.manifest import merge_partials
from tests.conftest import SMALL_K, SMALL_VOCAB, assert_record_equal, make_records

OPTIONS = {"k": SMALL_K, "vocab_size": SMALL_VOCAB, "chunk_bytes": 700, "shard_bytes": 2500}
PROGRESS = "_partial/progress.json"


def interrupted(root: Path, records: list[dict], upto: int, **kwargs) -> None:
    """A run that checkpoints after record `upto`, adds two more, and dies (here: aborts)."""
    writer = CacheWriter(str(root), **OPTIONS, **kwargs)
    for record in records[:upto]:
        writer.add(**record)
    writer.checkpoint({"next": upto, "data": "sft-v1"})
    for record in records[upto : upto + 2]:
        writer.add(**record)
    writer.abort()


def test_checkpoint_then_resume_commits_every_record_once(tmp_path):
    records = make_records(20, seed=1)
    interrupted(tmp_path, records, 9)
    progress = json.loads((tmp_path / PROGRESS).read_text())
    assert progress["progress"] == {"next": 9, "data": "sft-v1"}
    assert progress["records"] == 9 and progress["identity"]["k"] == SMALL_K
    with pytest.raises(NoCacheError, match="resume it"):
        open_cache(str(tmp_path))
    kept = {s["path"] for s in progress["shards"]}
    assert kept <= {f"shards/{p.name}" for p in (tmp_path / "shards").iterdir()}

    with CacheWriter(str(tmp_path), resume=True, **OPTIONS) as writer:
        assert writer.resumed_progress == {"next": 9, "data": "sft-v1"}
        for record in records[writer.resumed_progress["next"] :]:
            writer.add(**record)
    manifest = writer.manifest
    assert [s.path for s in manifest.shards][: len(kept)] == [s["path"] for s in progress["shards"]]
    assert not (tmp_path / PROGRESS).exists()
    with open_cache(str(tmp_path)) as cache:
        assert len(cache) == 20
        for i, record in enumerate(cache):
            assert_record_equal(record, records[i], where=f"record {i}")
        assert cache.verify() == []


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    with CacheWriter(str(tmp_path), resume=True, **OPTIONS) as writer:
        assert writer.resumed_progress is None
        writer.add(**make_records(1)[0])
    with open_cache(str(tmp_path)) as cache:
        assert len(cache) == 1


@pytest.mark.parametrize(
    "change, field",
    [
        ({"metadata": {"data_sha256": "other"}}, "metadata"),
        ({"teacher": {"name": "another-teacher"}}, "teacher"),
        ({"positions": "all"}, "positions"),
        ({"codecs": {"topk_ids": [{"id": "zstd", "level": 3}]}}, "codecs"),
    ],
)
def test_resume_with_another_identity_is_refused_naming_the_field(tmp_path, change, field):
    base = {"metadata": {"data_sha256": "abc"}, "teacher": {"name": "t"}}
    interrupted(tmp_path, make_records(8, seed=2), 4, **base)
    with pytest.raises(CacheError, match=f"cannot resume: {field} differs"):
        CacheWriter(str(tmp_path), resume=True, **OPTIONS, **{**base, **change})
    # Refused before touching anything: the checkpoint is still there to resume.
    with CacheWriter(str(tmp_path), resume=True, **OPTIONS, **base) as writer:
        assert writer.resumed_progress["next"] == 4


def test_a_checkpoint_is_not_silently_discarded(tmp_path):
    records = make_records(8, seed=3)
    interrupted(tmp_path, records, 4)
    with pytest.raises(CacheError, match="resume=True to continue it, or overwrite=True"):
        CacheWriter(str(tmp_path), **OPTIONS)
    with CacheWriter(str(tmp_path), overwrite=True, **OPTIONS) as writer:
        assert writer.resumed_progress is None
        writer.add(**records[7])
    with open_cache(str(tmp_path)) as cache:
        assert len(cache) == 1
        listed = {s.path for s in cache.manifest.shards}
    assert {f"shards/{p.name}" for p in (tmp_path / "shards").iterdir()} == listed


def test_resuming_a_complete_cache_is_an_error(tmp_path):
    with CacheWriter(str(tmp_path), **OPTIONS) as writer:
        writer.add(**make_records(1)[0])
    with pytest.raises(CacheError, match="complete"):
        CacheWriter(str(tmp_path), resume=True, **OPTIONS)


def test_a_missing_or_changed_checkpointed_shard_is_refused(tmp_path):
    interrupted(tmp_path, make_records(12, seed=4), 8)
    kept = json.loads((tmp_path / PROGRESS).read_text())["shards"]
    victim = tmp_path / kept[0]["path"]
    data = bytearray(victim.read_bytes())
    data[20] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=f"{kept[0]['path']} does not match its recorded checksum"):
        CacheWriter(str(tmp_path), resume=True, **OPTIONS)
    victim.unlink()
    with pytest.raises(CacheError, match=f"{kept[0]['path']} is missing"):
        CacheWriter(str(tmp_path), resume=True, **OPTIONS)


def test_an_exception_keeps_the_checkpointed_shards(tmp_path):
    records = make_records(10, seed=5)
    with (
        pytest.raises(RuntimeError, match="teacher crashed"),
        CacheWriter(str(tmp_path), **OPTIONS) as writer,
    ):
        for record in records[:6]:
            writer.add(**record)
        writer.checkpoint({"next": 6})
        writer.add(**records[6])
        raise RuntimeError("teacher crashed")
    kept = {s["path"] for s in json.loads((tmp_path / PROGRESS).read_text())["shards"]}
    assert {f"shards/{p.name}" for p in (tmp_path / "shards").iterdir()} == kept
    assert not (tmp_path / MANIFEST_NAME).exists()


def test_checkpoint_progress_must_be_json(tmp_path):
    writer = CacheWriter(str(tmp_path), **OPTIONS)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        writer.checkpoint({"next": float("nan")})
    with pytest.raises(ValueError, match="must be a dict"):
        writer.checkpoint([1, 2])
    writer.abort()


def test_ranks_checkpoint_resume_and_merge(tmp_path):
    parts = [make_records(9, seed=10), make_records(7, seed=11)]
    ranks = {"world_size": 2, **OPTIONS}
    interrupted(tmp_path, parts[1], 3, rank=1, world_size=2)
    assert (tmp_path / "_partial" / "progress-rank-00001.json").exists()
    for rank, records in enumerate(parts):
        with CacheWriter(str(tmp_path), rank=rank, resume=True, **ranks) as writer:
            start = (writer.resumed_progress or {}).get("next", 0)
            assert start == (3 if rank == 1 else 0)
            for record in records[start:]:
                writer.add(**record)
    with pytest.raises(CacheError, match="complete"):
        CacheWriter(str(tmp_path), rank=1, resume=True, **ranks)
    merged = merge_partials(str(tmp_path))
    assert merged.records == 16
    with open_cache(str(tmp_path)) as cache:
        for i, (got, want) in enumerate(zip(cache, parts[0] + parts[1], strict=True)):
            assert_record_equal(got, want, where=f"record {i}")


def test_a_second_writer_on_the_same_root_cannot_leave_a_broken_cache(tmp_path):
    """Started by mistake while the first runs, the second clears the first's unlisted shards;
    the first then refuses to commit rather than list missing files."""
    records = make_records(12, seed=6)
    first = CacheWriter(str(tmp_path), **OPTIONS)
    for record in records:
        first.add(**record)
    first.checkpoint({"next": 12})  # its shards are listed by its progress file now...
    (tmp_path / PROGRESS).unlink()  # ...which a careless user deletes
    with CacheWriter(str(tmp_path), **OPTIONS) as second:
        second.add(**records[0])
    with pytest.raises(CacheError, match="another writer started on the same URL"):
        first.close()
    with open_cache(str(tmp_path)) as cache:
        assert len(cache) == 1 and cache.verify() == []
