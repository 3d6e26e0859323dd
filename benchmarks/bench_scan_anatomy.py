"""Where a full scan's time goes, at the writer's default chunk size and at 2 MiB chunks.

A scan does three kinds of work. Checksums and zstd over every block run in C and grow with
bytes: no change to the Python around them can lower that floor. The decoders after zstd (the
id unshuffle, the logprob key-delta, their checks) also grow with bytes. The rest is Python
paid per chunk: its directory entry, the checks of spec section 4.2, one codec pipeline per
block, cutting records. Small chunks make random reads cheap (a read decodes one chunk) and
pay that rest more often in a scan.

This writes the same records (bench_loader's data) at both chunk sizes, then measures in one
process, numba loaded, page cache warm, interleaved rounds, medians:

  scan       iter_records(read_ahead=0) over every record, shards already open
  C floor    xxh3 of every block and zstd of every block that ends in it, nothing else
  decoders   Pipeline.finish of every block's unzipped bytes (Pipeline.unpack's output)

and reports rest = scan - C floor - decoders, per chunk. Writes results/bench_scan_anatomy.json.

    python bench_scan_anatomy.py                    # writes 1,500 records at both sizes first
    python bench_scan_anatomy.py --cache SMALL --cache-2mib LARGE    # existing caches
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import xxhash
import zstandard
from common import format_table, write_results

from logitcache import CacheWriter, open_cache
from logitcache.codecs import Zstd, kernels
from logitcache.directory import COLUMN_INDEX
from logitcache.writer import DEFAULT_CHUNK_BYTES

LARGE_CHUNK_BYTES = 2 << 20  # the chunk size before random reads decoded one record's chunk


def _write_caches(work: str, records: int) -> tuple[str, str]:
    from loader_peers import VOCAB, K, synthetic_benchmark_records
    from tqdm import tqdm

    small, large = os.path.join(work, "default"), os.path.join(work, "2mib")
    with (
        CacheWriter(small, k=K, vocab_size=VOCAB) as a,
        CacheWriter(large, k=K, vocab_size=VOCAB, chunk_bytes=LARGE_CHUNK_BYTES) as b,
    ):
        rows = synthetic_benchmark_records(records)
        for record in tqdm(rows, total=records, desc="writing both caches", unit="record"):
            a.add(**record)
            b.add(**record)
    return small, large


def _blocks(cache):
    """(codec pipeline, stored bytes, raw length) of every block of the cache."""
    for s in range(len(cache.manifest.shards)):
        shard = cache.shard_file(s)
        for chunk in range(len(shard.chunks)):
            for name, column in COLUMN_INDEX.items():
                offset, length, raw = shard.chunks.blocks[chunk, column].tolist()
                if offset >= 0:
                    yield shard.pipelines[name], shard.buf[offset : offset + length], raw


def _scan(url: str) -> tuple[float, int]:
    with open_cache(url) as cache:
        for s in range(len(cache.manifest.shards)):
            cache.shard_file(s)  # opening is not part of the scan measured here
        start, targets = time.perf_counter(), 0
        for record in cache.iter_records(read_ahead=0):  # one thread: the work, not overlap
            targets += record.topk_ids.shape[0]
        return time.perf_counter() - start, targets


def _c_floor(url: str) -> float:
    zstd = zstandard.ZstdDecompressor()
    with open_cache(url) as cache:
        work = [
            (data, raw, bool(pipeline.codecs) and isinstance(pipeline.codecs[-1], Zstd))
            for pipeline, data, raw in _blocks(cache)
        ]
        start = time.perf_counter()
        for data, raw, zipped in work:
            xxhash.xxh3_64_intdigest(data)
            if zipped:
                zstd.decompress(data, max_output_size=raw)
        return time.perf_counter() - start


def _decoders(url: str) -> float:
    spent = 0.0
    with open_cache(url) as cache:
        for pipeline, data, raw in _blocks(cache):
            unzipped = pipeline.unpack(data, raw)
            start = time.perf_counter()
            pipeline.finish(unzipped, raw)
            spent += time.perf_counter() - start
    return spent


def _shape(url: str) -> dict:
    with open_cache(url) as cache:
        m = cache.manifest
        chunks = sum(len(s.chunk_records) for s in m.shards)
        stored = sum(s.bytes for s in m.shards)
        return {"records": m.records, "targets": m.targets, "chunks": chunks, "bytes": stored}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="an existing cache at the default chunk size")
    parser.add_argument("--cache-2mib", help="the same records at 2 MiB chunks")
    parser.add_argument("--records", type=int, default=1500, help="records to write")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    args = parser.parse_args(argv)
    if (args.cache is None) != (args.cache_2mib is None):
        parser.error("give both --cache and --cache-2mib, or neither")
    if args.repeats < 1 or args.records < 1:
        parser.error("--repeats and --records must be at least 1")

    work = None
    if args.cache is None:
        work = tempfile.mkdtemp(prefix="bench-scan-anatomy-")
        urls = dict(zip(("default", "2mib"), _write_caches(work, args.records), strict=True))
    else:
        urls = {"default": args.cache, "2mib": args.cache_2mib}
    try:
        kernels()  # numba's load is a one-off per process, not part of any scan measured here
        shapes = {label: _shape(url) for label, url in urls.items()}
        if shapes["default"]["targets"] != shapes["2mib"]["targets"]:
            raise SystemExit("the two caches hold different records")
        parts = ("scan", "c_floor", "decoders")
        runs = {label: {part: [] for part in parts} for label in urls}
        for url in urls.values():  # warm the page cache and the kernels
            _scan(url)
        for round_ in range(args.repeats):
            for label, url in urls.items():
                runs[label]["scan"].append(_scan(url)[0])
                runs[label]["c_floor"].append(_c_floor(url))
                runs[label]["decoders"].append(_decoders(url))
                got = runs[label]
                print(
                    f"round {round_ + 1} {label:7s} scan {got['scan'][-1]:.3f} s  "
                    f"C floor {got['c_floor'][-1]:.3f} s  decoders {got['decoders'][-1]:.3f} s",
                    flush=True,
                )
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)

    results, rows = {}, []
    for label in urls:
        median = {part: statistics.median(runs[label][part]) for part in parts}
        rest = median["scan"] - median["c_floor"] - median["decoders"]
        shape = shapes[label]
        results[label] = {
            **shape,
            "median_s": median,
            "rest_s": rest,
            "rest_us_per_chunk": rest / shape["chunks"] * 1e6,
            "scan_targets_per_s": shape["targets"] / median["scan"],
            "runs_s": runs[label],
        }
        rows.append(
            [
                label,
                shape["chunks"],
                shape["bytes"] / shape["targets"],
                median["scan"],
                median["c_floor"],
                median["decoders"],
                rest,
                rest / shape["chunks"] * 1e6,
                shape["targets"] / median["scan"],
            ]
        )
    small, large = results["default"], results["2mib"]
    comparison = {
        "scan_speed_default_vs_2mib": large["median_s"]["scan"] / small["median_s"]["scan"],
        "file_bytes_default_vs_2mib": small["bytes"] / large["bytes"],
        "extra_scan_s": small["median_s"]["scan"] - large["median_s"]["scan"],
        "of_which_c_floor_s": small["median_s"]["c_floor"] - large["median_s"]["c_floor"],
        "of_which_decoders_s": small["median_s"]["decoders"] - large["median_s"]["decoders"],
        "of_which_rest_s": small["rest_s"] - large["rest_s"],
    }
    print(f"medians of {args.repeats} interleaved rounds, one process, numba loaded, warm cache")
    print(
        format_table(
            [
                "chunks of",
                "chunks",
                "B/target",
                "scan s",
                "C floor s",
                "decoders s",
                "rest s",
                "rest us/chunk",
                "scan tok/s",
            ],
            rows,
        )
    )
    print(
        f"default-size scan at {comparison['scan_speed_default_vs_2mib']:.2f}x the speed of "
        f"2 MiB chunks: {comparison['extra_scan_s']:.3f} s more, of which C floor "
        f"{comparison['of_which_c_floor_s']:.3f} s, decoders "
        f"{comparison['of_which_decoders_s']:.3f} s, rest {comparison['of_which_rest_s']:.3f} s"
    )
    path = write_results(
        "bench_scan_anatomy",
        {
            "repeats": args.repeats,
            "chunk_bytes": {"default": DEFAULT_CHUNK_BYTES, "2mib": LARGE_CHUNK_BYTES},
            "caches": results,
            "comparison": comparison,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
