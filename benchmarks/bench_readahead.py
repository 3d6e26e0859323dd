"""Read-ahead on and off: a full scan and a shuffled stream, each in fresh processes.

`iter_records()` and `LogitCacheDataset` decode the next chunks on background threads
(logitcache.readahead; scans by default on 2 cores or more). This runs each case with
read_ahead=0 and with --depth (default: what a scan uses here), alternating in interleaved
rounds, each run in a new interpreter (loading the kernels included, as a user's job pays it),
and reports median wall and CPU seconds and their ratio. Writes results/bench_readahead.json.

    python bench_readahead.py                       # a synthetic cache, written first
    python bench_readahead.py --cache /path/to/cache
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

from common import format_table, run_snippet, write_results

from logitcache.readahead import scan_read_ahead

RUN = """
import json, sys, time
start, cpu = time.perf_counter(), time.process_time()
from logitcache import open_cache
what, url, depth = sys.argv[1], sys.argv[2], int(sys.argv[3])
targets = 0
if what == "scan":
    with open_cache(url) as cache:
        for record in cache.iter_records(read_ahead=depth):
            targets += record.topk_ids.shape[0]
else:
    from logitcache.loader import LogitCacheDataset
    for record in LogitCacheDataset(url, seed=0, read_ahead=depth):
        targets += record.topk_ids.shape[0]
print(json.dumps({"wall_s": time.perf_counter() - start,
                  "cpu_s": time.process_time() - cpu, "targets": targets}))
"""


def _run(what: str, url: str, depth: int) -> dict:
    return run_snippet(RUN, what, url, str(depth), what=f"{what} read_ahead={depth}")


def _write_cache(url: str, records: int) -> None:
    from tqdm import tqdm

    from logitcache import CacheWriter
    from logitcache.synthetic import synthetic_records

    with CacheWriter(url, k=100, vocab_size=128256) as writer:
        rows = synthetic_records(records, k=100, vocab_size=128256, mean_length=1000, seed=1)
        for record in tqdm(rows, total=records, desc="writing the cache", unit="record"):
            writer.add(**record)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="an existing cache to read (default: write one)")
    parser.add_argument("--records", type=int, default=1500, help="records of the written cache")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument(
        "--depth", type=int, default=scan_read_ahead() or 4, help="read-ahead depth to compare"
    )
    args = parser.parse_args(argv)
    if args.depth < 1 or args.repeats < 1:
        parser.error("--depth and --repeats must be at least 1")

    work = None
    url = args.cache
    if url is None:
        work = tempfile.mkdtemp(prefix="bench-readahead-")
        url = os.path.join(work, "cache")
        _write_cache(url, args.records)
    try:
        cases = [(what, depth) for what in ("scan", "stream") for depth in (0, args.depth)]
        runs: dict[tuple[str, int], list[dict]] = {case: [] for case in cases}
        for round_ in range(args.repeats):
            for case in cases:
                got = _run(case[0], url, case[1])
                runs[case].append(got)
                print(
                    f"round {round_ + 1} {case[0]:6s} read_ahead={case[1]}  "
                    f"{got['wall_s']:.3f} s wall  {got['cpu_s']:.3f} s cpu",
                    flush=True,
                )
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)

    rows, results = [], []
    for what in ("scan", "stream"):
        off, on = runs[(what, 0)], runs[(what, args.depth)]
        targets = off[0]["targets"]
        wall_off = statistics.median(r["wall_s"] for r in off)
        wall_on = statistics.median(r["wall_s"] for r in on)
        cpu_off = statistics.median(r["cpu_s"] for r in off)
        cpu_on = statistics.median(r["cpu_s"] for r in on)
        rows.append(
            [what, targets / wall_off, targets / wall_on, wall_off / wall_on, cpu_on / cpu_off]
        )
        results.append(
            {
                "case": what,
                "targets": targets,
                "off": {"median_wall_s": wall_off, "median_cpu_s": cpu_off, "runs": off},
                "on": {"median_wall_s": wall_on, "median_cpu_s": cpu_on, "runs": on},
                "speedup": wall_off / wall_on,
                "cpu_ratio": cpu_on / cpu_off,
            }
        )
    print(f"medians of {args.repeats} interleaved rounds, fresh processes")
    print(
        format_table(
            [
                "case",
                "tok/s read_ahead=0",
                f"tok/s read_ahead={args.depth}",
                "speedup",
                "CPU on / off",
            ],
            rows,
        )
    )
    path = write_results(
        "bench_readahead",
        {
            "cache": args.cache or f"synthetic, {args.records} records",
            "depth": args.depth,
            "repeats": args.repeats,
            "cases": results,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
