"""Run one cache operation many times in child processes and SIGKILL each at a random moment.

Used by tests/test_crash.py. This process runs the operation once itself to warm up
(imports, compiled kernels) and in three children to measure how long it takes (the median);
then, for every trial directory, it forks a child that runs the operation there and kills it
with SIGKILL after a delay drawn uniformly from [0, 1.1 x the measured duration]. Forking a
warmed-up process keeps each trial to tens of milliseconds. It prints one JSON line: the
measured duration and, per trial, the delay and whether the child was killed.

    python tests/crash_runner.py OPERATION SEED WARMUP_DIR TIMING_DIR*3 TRIAL_DIR...
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.conftest import SMALL_K, SMALL_VOCAB, make_records  # noqa: E402

WRITE = {"k": SMALL_K, "vocab_size": SMALL_VOCAB, "chunk_bytes": 700, "shard_bytes": 2500}
NEW_RECORDS = dict(n_records=18, seed=202)


def op_writer(root: str) -> None:
    """Replace the cache at root with a new one (overwrite=True)."""
    from logitcache import CacheWriter

    with CacheWriter(root, overwrite=True, **WRITE) as writer:
        for record in make_records(**NEW_RECORDS):
            writer.add(**record)


def op_convert(root: str) -> None:
    """`logitcache convert ROOT ROOT --k 4 --overwrite`: the source is the destination."""
    from logitcache.cli import main

    code = main(
        [
            "convert",
            root,
            root,
            "--k",
            "4",
            "--overwrite",
            "--no-progress",
            "--chunk-bytes",
            "700",
            "--shard-bytes",
            "2500",
        ]
    )
    if code:
        raise SystemExit(code)


def op_merge(root: str) -> None:
    from logitcache.manifest import merge_partials

    merge_partials(root)


def op_checkpointed(root: str) -> None:
    """Write CHECKPOINTED_RECORDS with a checkpoint every 4 records, resuming when possible."""
    from logitcache import CacheWriter

    records = make_records(**CHECKPOINTED_RECORDS)
    with CacheWriter(root, resume=True, **WRITE) as writer:
        start = (writer.resumed_progress or {}).get("next", 0)
        for i in range(start, len(records)):
            writer.add(**records[i])
            if (i + 1) % 4 == 0:
                writer.checkpoint({"next": i + 1})


CHECKPOINTED_RECORDS = dict(n_records=22, seed=303)
OPERATIONS = {
    "writer": op_writer,
    "convert": op_convert,
    "merge": op_merge,
    "checkpointed": op_checkpointed,
}


def run_child(operation, root: str) -> int:
    pid = os.fork()
    if pid == 0:  # the child: run the operation, then leave without any cleanup handlers
        # Its output must not mix with the report this process prints.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
        try:
            operation(root)
        except BaseException as exc:  # report, so a failing operation cannot pass as killed
            print(f"child failed: {exc!r}", file=sys.stderr)
            code = 3
        os._exit(code)
    return pid


def main() -> None:
    name, seed, warmup, *roots = sys.argv[1:]
    timing, trials = roots[:3], roots[3:]
    operation = OPERATIONS[name]
    rng = random.Random(int(seed))
    operation(warmup)  # here, so that every child inherits compiled kernels and imports
    durations = []
    for root in timing:
        start = time.perf_counter()
        _, status = os.waitpid(run_child(operation, root), 0)
        durations.append(time.perf_counter() - start)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"the unkilled {name} run failed")
    duration = sorted(durations)[1]
    results = []
    for root in trials:
        delay = rng.uniform(0.0, 1.1 * duration)
        pid = run_child(operation, root)
        time.sleep(delay)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code not in (0, -signal.SIGKILL):
            raise SystemExit(f"{name} in {root} exited with {code}")
        results.append({"root": root, "delay": delay, "killed": code == -signal.SIGKILL})
    print(json.dumps({"duration": duration, "trials": results}))


if __name__ == "__main__":
    main()
