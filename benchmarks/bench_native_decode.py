"""A chunk decoded in one call (logitcache/native.py) against codec by codec, on one cache.

Each case runs with LOGITCACHE_NATIVE_DECODE=1 and =0 in fresh interpreters, alternating, in
interleaved rounds: a full scan on one thread (read_ahead=0), a full scan with the default
read-ahead (2 threads on 2 cores) and random single-record reads. Reports medians and the
ratio one call / codec by codec. Writes results/bench_native_decode.json.

    python bench_native_decode.py --cache /tmp/bench-loader-5000/logitcache --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics

from common import format_table, run_snippet, write_results

RUN = """
import json, sys, time
import numpy as np
from logitcache import open_cache
what, url, reads = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open_cache(url) as cache:
    if what == "random":
        cache[0]  # opened and warm: the rate of reads, not of opening
        order = np.random.default_rng(0).integers(0, len(cache), reads).tolist()
        start, cpu = time.perf_counter(), time.process_time()
        for i in order:
            cache[i]
        done = len(order)
    else:
        start, cpu = time.perf_counter(), time.process_time()
        done = 0
        for record in cache.iter_records(read_ahead=0 if what == "scan_1_thread" else None):
            done += record.topk_ids.shape[0]
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
print(json.dumps({"rate": done / wall, "wall_s": wall, "cpu_s": cpu}))
"""

CASES = {
    "scan_1_thread": "target tok/s",
    "scan_read_ahead": "target tok/s",
    "random": "records/s",
}
SWITCH = "LOGITCACHE_NATIVE_DECODE"


def _run(what: str, url: str, reads: int, native: bool) -> dict:
    os.environ[SWITCH] = "1" if native else "0"
    try:
        return run_snippet(RUN, what, url, str(reads), what=f"{what} native={native}")
    finally:
        del os.environ[SWITCH]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="a cache written with default codecs")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--reads", type=int, default=1000, help="random reads per run")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.reads < 1:
        parser.error("--rounds and --reads must be at least 1")

    runs: dict[tuple[str, bool], list[dict]] = {
        (what, native): [] for what in CASES for native in (True, False)
    }
    for round_ in range(args.rounds):
        for what in CASES:
            for native in (True, False) if round_ % 2 == 0 else (False, True):
                got = _run(what, args.cache, args.reads, native)
                runs[(what, native)].append(got)
                print(
                    f"round {round_ + 1} {what:16s} {'one call' if native else 'by codec':8s} "
                    f"{got['rate']:12,.0f} {CASES[what]}  cpu {got['cpu_s']:.2f} s",
                    flush=True,
                )

    rows, results = [], []
    for what, unit in CASES.items():
        one = statistics.median(r["rate"] for r in runs[(what, True)])
        codec = statistics.median(r["rate"] for r in runs[(what, False)])
        cpu_one = statistics.median(r["cpu_s"] for r in runs[(what, True)])
        cpu_codec = statistics.median(r["cpu_s"] for r in runs[(what, False)])
        rows.append([what, unit, codec, one, one / codec, cpu_one / cpu_codec])
        results.append(
            {
                "case": what,
                "unit": unit,
                "codec_by_codec": {"median_rate": codec, "median_cpu_s": cpu_codec},
                "one_call": {"median_rate": one, "median_cpu_s": cpu_one},
                "speedup": one / codec,
                "cpu_ratio": cpu_one / cpu_codec,
                "runs": {
                    "one_call": runs[(what, True)],
                    "codec_by_codec": runs[(what, False)],
                },
            }
        )
    print(f"medians of {args.rounds} interleaved rounds, fresh processes")
    print(
        format_table(
            ["case", "unit", "codec by codec", "one call", "speedup", "cpu one/codec"], rows
        )
    )
    write_results(
        "bench_native_decode",
        {"cache": args.cache, "rounds": args.rounds, "reads": args.reads, "cases": results},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
