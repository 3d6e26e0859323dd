"""Chunk size against random access and scans: the same records written at several
`chunk_bytes`, each read in fresh processes in interleaved rounds.

A chunk is the unit a reader decodes: a random read of one record pays for its whole chunk,
and a scan pays a fixed cost per chunk (its zstd frames, checksums and Python) on top of its
bytes. Smaller chunks make random reads cheaper and scans dearer; this measures by how much,
so a writer can pick `chunk_bytes` (`CacheWriter(chunk_bytes=...)`, `logitcache convert
--chunk-bytes`) for how its cache will be read. Per size: files (bytes per target and the
change against the writer's default), chunks and records per chunk, random single-record
reads/s (`cache[i]`), and full scans to numpy with read-ahead (the default on 2 cores or more)
and without (`read_ahead=0`). Medians over rounds; ratios against the default size. Writes
results/bench_chunking.json and .png.

    python bench_chunking.py --cache /tmp/bench-loader-5000/logitcache   # bench_loader's data
    python bench_chunking.py            # writes --records records of bench_loader's kind first
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

from common import format_table, run_snippet, write_results

from logitcache import CacheWriter, open_cache
from logitcache.cli import byte_size
from logitcache.convert import convert
from logitcache.writer import DEFAULT_CHUNK_BYTES

RUN = """
import json, sys, time
import numpy as np
from logitcache import open_cache
what, url, reads, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with open_cache(url) as cache:
    if what == "random":
        cache[0]  # opened and warm: the rate of reads, not of opening
        order = np.random.default_rng(seed).integers(0, len(cache), reads).tolist()
        start = time.perf_counter()
        for i in order:
            cache[i]
        print(json.dumps({"rate": reads / (time.perf_counter() - start)}))
    else:
        depth = None if what == "scan" else 0
        start, targets = time.perf_counter(), 0
        for record in cache.iter_records(read_ahead=depth):
            targets += record.topk_ids.shape[0]
        print(json.dumps({"rate": targets / (time.perf_counter() - start)}))
"""

MEASURES = (
    ("random", "random reads/s"),
    ("scan", "scan tok/s, read-ahead"),
    ("scan-1", "scan tok/s, read_ahead=0"),
)


def _label(size: int) -> str:
    return f"{size >> 20} MiB" if size % (1 << 20) == 0 else f"{size >> 10} KiB"


def _measure(what: str, url: str, reads: int, seed: int) -> float:
    got = run_snippet(RUN, what, url, str(reads), str(seed), what=f"{what} of {url}")
    return got["rate"]


def _rewrite(src: str, dst: str, chunk_bytes: int) -> None:
    """The records of `src`, in order, written again with `chunk_bytes` (default codecs)."""
    convert(src, dst, chunk_bytes=chunk_bytes, progress=True)


def _layout(url: str) -> dict:
    """Bytes on disk, targets, chunks and records per chunk of a cache."""
    with open_cache(url) as cache:
        m = cache.manifest
        chunks = sum(len(s.chunk_records) for s in m.shards)
        size = sum(s.bytes for s in m.shards)
        return {
            "bytes": size,
            "targets": m.targets,
            "bytes_per_target": size / m.targets,
            "chunks": chunks,
            "records_per_chunk": m.records / chunks,
            "single_record_chunks": sum(c == 1 for s in m.shards for c in s.chunk_records),
        }


def _write_source(url: str, records: int) -> None:
    from loader_peers import synthetic_benchmark_records
    from tqdm import tqdm

    with CacheWriter(url, k=100, vocab_size=128256) as writer:
        for record in tqdm(synthetic_benchmark_records(records), total=records, desc="records"):
            writer.add(**record)


def plot(sizes: list[int], med: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MEASURES), figsize=(4.2 * len(MEASURES), 3.6))
    kib = [s >> 10 for s in sizes]
    for ax, (key, label) in zip(axes, MEASURES, strict=True):
        values = [med[s][key] for s in sizes]
        ax.plot(kib, values, marker="o")
        ax.axvline(DEFAULT_CHUNK_BYTES >> 10, color="tab:gray", ls=":", label="default")
        ax.set_xscale("log", base=2)
        ax.set_xticks(kib, [_label(s) for s in sizes], fontsize=8)
        ax.set_xlabel("chunk_bytes")
        ax.set_title(f"{label} (higher is better)", fontsize=9)
        ax.set_ylim(0, max(values) * 1.15)
        ax.legend(fontsize=8)
    fig.suptitle("Chunk size: random reads against scans (medians of interleaved rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="the records to rewrite (default: write --records)")
    parser.add_argument("--records", type=int, default=2000, help="records written without --cache")
    parser.add_argument(
        "--sizes",
        type=lambda text: [byte_size(size) for size in text.split(",")],
        default="64K,128K,256K,512K,2M",
        help="chunk_bytes to compare, comma-separated",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--reads", type=int, default=1000, help="random reads per measurement")
    args = parser.parse_args(argv)
    sizes = sorted({*args.sizes, DEFAULT_CHUNK_BYTES})
    if args.rounds < 1 or args.reads < 1:
        parser.error("--rounds and --reads must be positive")

    work = tempfile.mkdtemp(prefix="bench-chunking-")
    try:
        source = args.cache
        if source is None:
            source = os.path.join(work, "source")
            _write_source(source, args.records)
        urls = {s: os.path.join(work, f"chunks-{s}") for s in sizes}
        for size, url in urls.items():
            _rewrite(source, url, size)
        layouts = {s: _layout(u) for s, u in urls.items()}
        runs: dict[int, dict[str, list[float]]] = {s: {k: [] for k, _ in MEASURES} for s in sizes}
        cases = [(s, key) for s in sizes for key, _ in MEASURES]
        for round_ in range(args.rounds):
            shift = round_ * len(MEASURES) % len(cases)
            for size, key in cases[shift:] + cases[:shift]:
                rate = _measure(key, urls[size], args.reads, seed=round_)
                runs[size][key].append(rate)
                print(f"round {round_ + 1} {_label(size):>8s} {key:7s} {rate:12,.0f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {s: {k: statistics.median(v) for k, v in runs[s].items()} for s in sizes}
    base, base_bytes = med[DEFAULT_CHUNK_BYTES], layouts[DEFAULT_CHUNK_BYTES]["bytes"]
    rows, results = [], []
    for s in sizes:
        lay = layouts[s]
        ratios = {k: med[s][k] / base[k] for k, _ in MEASURES}
        rows.append(
            [
                _label(s),
                lay["chunks"],
                lay["records_per_chunk"],
                lay["bytes_per_target"],
                f"{(lay['bytes'] / base_bytes - 1) * 100:+.2f}%",
                *[f"{med[s][k]:,.0f} ({ratios[k]:.2f}x)" for k, _ in MEASURES],
            ]
        )
        results.append(
            {"chunk_bytes": s, **lay, "medians": med[s], "ratios": ratios, "runs": runs[s]}
        )
    print(f"medians of {args.rounds} interleaved rounds, fresh processes; (x) against the default")
    headers = [
        "chunk_bytes",
        "chunks",
        "records/chunk",
        "B/target",
        "bytes",
        *[m[1] for m in MEASURES],
    ]
    print(format_table(headers, rows))
    png = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_chunking.png")
    path = write_results(
        "bench_chunking",
        {
            "cache": args.cache or f"bench_loader's kind of records, {args.records}",
            "default_chunk_bytes": DEFAULT_CHUNK_BYTES,
            "rounds": args.rounds,
            "reads": args.reads,
            "sizes": results,
        },
    )
    plot(sizes, med, png)
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
