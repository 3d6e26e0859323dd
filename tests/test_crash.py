"""SIGKILL at random moments: a convert that overwrites its own source, a writer replacing a
cache, a merge replacing a merged cache, and a checkpointing writer that resumes.

After every kill the destination must be the complete old cache or the complete new one,
checked record by record and by verify(); a file logitcache did not create must survive. The
children are forked from one warmed-up runner process (tests/crash_runner.py), so each of the
50 trials per operation costs tens of milliseconds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from logitcache import CacheWriter, NoCacheError, open_cache
from logitcache.format import MANIFEST_NAME
from logitcache.manifest import merge_partials
from tests.conftest import SMALL_K, SMALL_VOCAB, assert_record_equal, make_records
from tests.crash_runner import CHECKPOINTED_RECORDS, NEW_RECORDS, WRITE

ROOT = Path(__file__).resolve().parents[1]
TRIALS = 50
FOREIGN = "shards/model-00001.safetensors"  # a file logitcache did not create
PROGRESS = "_partial/progress.json"


def run_trials(operation: str, template: Path, base: Path, seed: int) -> dict:
    """Copy `template` into TRIALS directories (plus four for warm-up and timing) and let the
    runner kill the operation in each; returns the runner's report."""
    roots = []
    names = ["warmup", "timing-0", "timing-1", "timing-2"]
    for name in [*names, *(f"trial-{i:02d}" for i in range(TRIALS))]:
        root = base / name
        shutil.copytree(template, root)
        roots.append(str(root))
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "crash_runner.py"), operation, str(seed), *roots],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report["trials"]) == TRIALS
    # Shown with `pytest -s`: the measured run time the kill delays were drawn from.
    print(f"\n{operation}: one unkilled run takes {1000 * report['duration']:.1f} ms")
    return report


def records_of(root: str) -> list:
    with open_cache(root) as cache:
        assert cache.verify() == []
        return [
            (
                r.input_ids.copy(),
                r.loss_mask.copy(),
                r.topk_ids.copy(),
                r.topk_logprobs.copy(),
                r.sample_id,
            )
            for r in cache
        ]


def same(got: list, want: list[dict]) -> bool:
    if len(got) != len(want):
        return False
    for (ids, mask, topk, lp, sid), w in zip(got, want, strict=True):
        if not (
            np.array_equal(ids, w["input_ids"])
            and np.array_equal(mask, w["loss_mask"])
            and np.array_equal(topk, w["topk_ids"])
            and np.array_equal(lp.view(np.uint16), np.asarray(w["topk_logprobs"]).view(np.uint16))
            and sid == w.get("sample_id")
        ):
            return False
    return True


def check_old_or_new(report: dict, old: list[dict], new: list[dict]) -> dict[str, int]:
    """Every trial holds exactly the old or the new cache, and the foreign file; counts both."""
    outcome = {"old": 0, "new": 0, "killed": 0}
    for trial in report["trials"]:
        root = trial["root"]
        got = records_of(root)
        if same(got, old):
            outcome["old"] += 1
        elif same(got, new):
            outcome["new"] += 1
        else:
            pytest.fail(f"{root} (killed after {trial['delay']:.4f} s) holds neither cache")
        assert (Path(root) / FOREIGN).read_bytes() == b"not logitcache's"
        outcome["killed"] += trial["killed"]
    return outcome


def assert_spread(outcome: dict[str, int]) -> None:
    print(f"outcome of {TRIALS} kills: {outcome}")
    # Kills landed both before and after the commit, and many children were really killed
    # (loose bounds: on a loaded machine a run can take longer or shorter than measured).
    assert outcome["old"] >= 1 and outcome["new"] >= 1, outcome
    assert outcome["killed"] >= TRIALS // 5, outcome


def old_cache(root: Path) -> list[dict]:
    old = make_records(15, seed=101)
    with CacheWriter(str(root), **WRITE) as writer:
        for record in old:
            writer.add(**record)
    (root / FOREIGN).write_bytes(b"not logitcache's")
    return old


def test_killed_writer_leaves_the_old_or_the_new_cache(tmp_path):
    old = old_cache(tmp_path / "template")
    report = run_trials("writer", tmp_path / "template", tmp_path, seed=1)
    outcome = check_old_or_new(report, old, make_records(**NEW_RECORDS))
    assert_spread(outcome)
    # The next run clears what the killed ones left and owns every shard there.
    root = report["trials"][0]["root"]
    with CacheWriter(root, overwrite=True, **WRITE) as writer:
        writer.add(**make_records(1, seed=7)[0])
    listed = {s.path for s in writer.manifest.shards}
    on_disk = {f"shards/{p.name}" for p in (Path(root) / "shards").iterdir()}
    assert on_disk == listed | {FOREIGN}


def test_killed_convert_over_its_own_source_leaves_the_old_or_the_new_cache(tmp_path):
    old = old_cache(tmp_path / "template")
    truncated = [
        {**r, "topk_ids": r["topk_ids"][:, :4], "topk_logprobs": r["topk_logprobs"][:, :4]}
        for r in old
    ]
    report = run_trials("convert", tmp_path / "template", tmp_path, seed=2)
    assert_spread(check_old_or_new(report, old, truncated))


def test_killed_merge_leaves_the_old_or_the_new_cache(tmp_path):
    template = tmp_path / "template"
    ranks = {"chunk_bytes": 700, "shard_bytes": 2500, "world_size": 2}
    old = [make_records(6, seed=11), make_records(5, seed=12)]
    new = [make_records(7, seed=13), make_records(4, seed=14)]
    for records in (old, new):  # the ranks re-ran after the first merge
        for rank, part in enumerate(records):
            with CacheWriter(
                str(template), k=SMALL_K, vocab_size=SMALL_VOCAB, rank=rank, overwrite=True, **ranks
            ) as writer:
                for record in part:
                    writer.add(**record)
        if records is old:
            merge_partials(str(template))
    (template / FOREIGN).write_bytes(b"not logitcache's")
    report = run_trials("merge", template, tmp_path, seed=3)
    assert_spread(check_old_or_new(report, old[0] + old[1], new[0] + new[1]))


def test_killed_checkpointing_writer_resumes_to_the_uninterrupted_cache(tmp_path):
    template = tmp_path / "template"
    template.mkdir()
    (template / "shards").mkdir()
    (template / FOREIGN).write_bytes(b"not logitcache's")
    report = run_trials("checkpointed", template, tmp_path, seed=4)
    want = make_records(**CHECKPOINTED_RECORDS)
    resumed = 0
    for trial in report["trials"]:
        root = Path(trial["root"])
        extra = {PROGRESS}  # killed after its commit, before removing its progress file
        if not (root / MANIFEST_NAME).exists():
            extra = set()
            with pytest.raises(NoCacheError):
                open_cache(str(root))
            # What the killed run left: resume it here, re-adding what it had not checkpointed.
            with CacheWriter(str(root), resume=True, **WRITE) as writer:
                start = (writer.resumed_progress or {}).get("next", 0)
                resumed += start > 0
                for record in want[start:]:
                    writer.add(**record)
        with open_cache(str(root)) as cache:
            assert len(cache) == len(want)
            for i, record in enumerate(cache):
                assert_record_equal(record, want[i], where=f"{root} record {i}")
            listed = {s.path for s in cache.manifest.shards}
        # No progress file, no leftovers: the listed shards and the foreign file only.
        files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
        assert (
            listed | {MANIFEST_NAME, FOREIGN} <= files <= listed | {MANIFEST_NAME, FOREIGN} | extra
        )
    print(f"{resumed} of {TRIALS} killed runs resumed from a checkpoint")
    assert resumed >= 1
