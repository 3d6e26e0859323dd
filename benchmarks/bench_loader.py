"""logitcache against its peers as a KD data loader: size, random access, scans, DataLoader
throughput, time to first batch and peak memory, every tool measured in the same run.

Tools: logitcache (this checkout, default writer settings, with the decoders compiled for this
machine by `make kernels` when built: the results record whether they were), logitcache-jit
(the same cache and code with them turned off: numpy, then numba), logitcache@main (the code
of git ref --baseline, by default the `main` branch, reading a cache with 2 MiB chunks: the
"before" of a comparison; the results record its commit),
MosaicML streaming MDS raw and with zstd, HF datasets (Arrow on disk), Parquet (pyarrow, zstd,
byte stream split, 64-record row groups) and Lance. The peers are installed by `make
bench-deps` (benchmarks/constraints-bench.txt); `make test` does not need them.

Method notes
- Data: 5,000 records of 128..2048 tokens (uniform), the second half of each supervised,
  K=100 rows of logitcache.synthetic's teacher over V=128256 (Zipf-like ids), written once
  with CacheWriter and copied losslessly into every other format (flat list columns for the
  table formats: N*K values per row). Files stay in the page cache (warm).
- Every tool hands out the same logitcache Record (numpy arrays) and every batch goes
  through the same collate_kd (batch 8).
- random: records/s of `get(i)` for --reads random indices (or as many as --seconds allow)
  after one warm-up read (logitcache
  `cache[i]`, MDS `StreamingDataset[i]`, HF `ds[i:i+1]`, Parquet: the row group, Lance
  `take([i])`).
- scan: target tokens/s of every record in storage order, to numpy Records.
- loader: target tokens/s of a shuffled DataLoader over the first --limit records, counted
  from `import torch` (start-up included), with 0 and 2 workers (fork). logitcache:
  LogitCacheDataset + LogitCacheLoader; MDS: StreamingDataset(shuffle=True); the table formats:
  blocks of 64 records in random order split across workers, shuffled within each block.
- first batch: seconds from the end of `import torch` to the first batch in a fresh process
  with 0 workers (library imports, opening, planning, decoding, collating), wall and CPU.
- memory: the peak, sampled every 20 ms, of the summed Pss_Anon (proportional anonymous
  memory: shared copy-on-write pages count once) of the process and its workers.
- Each measurement is a fresh process (loader_peers.py). Rounds are interleaved (every tool
  once per round, the order rotated each round) and the table shows medians over rounds.
- The machine is shared: wall-clock figures move with other people's load (the load average
  is recorded); ratios within a round are what to compare. The CPU-time rates (records or
  tokens per CPU second of the measuring process) move less with load; for multi-threaded
  tools (Lance) they overstate what one core delivers.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from common import format_table, write_results  # noqa: I001 -- puts the repo on sys.path

from logitcache import CacheWriter, open_cache
from logitcache.convert import convert

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = os.path.join(HERE, "loader_peers.py")
sys.path.insert(0, HERE)
from loader_peers import (  # noqa: E402
    TOOLS,
    VOCAB,
    K,
    disk_bytes,
    reset_mds_zstd,
    synthetic_benchmark_records,
    warm_page_cache,
)

MAIN_CHUNK_BYTES = 2 << 20  # the writer's default on main


def _run(args: list[str], env: dict | None = None, timeout: int = 900) -> dict:
    proc = subprocess.run(
        [sys.executable, PEERS, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def prepare(work: str, records: int, tools: list[str]) -> dict[str, str]:
    """Write the data set once per tool (kept in `work` for later runs); returns tool -> path."""
    os.makedirs(work, exist_ok=True)
    paths = {tool: os.path.join(work, tool.replace("@", "-")) for tool in tools}
    paths["parquet"] = os.path.join(work, "records.parquet")
    source = paths["logitcache"] = os.path.join(work, "logitcache")
    paths["logitcache-jit"] = source  # the same cache, read without the compiled decoders
    marker = os.path.join(work, "records.json")
    if _read_json(marker) != {"records": records}:
        shutil.rmtree(source, ignore_errors=True)
        for done in glob.glob(os.path.join(work, "*.done")):
            os.remove(done)  # every copy is made from this cache: made again from the new one
        t0 = time.perf_counter()
        with CacheWriter(source, k=K, vocab_size=VOCAB, overwrite=True) as w:
            for record in synthetic_benchmark_records(records):
                w.add(**record)
        with open(marker, "w") as f:
            json.dump({"records": records}, f)
        print(f"logitcache cache written in {time.perf_counter() - t0:.0f} s", flush=True)
    for tool in tools:
        path = paths[tool]
        if tool in ("logitcache", "logitcache-jit") or os.path.exists(path + ".done"):
            continue
        t0 = time.perf_counter()
        shutil.rmtree(path, ignore_errors=True)
        if tool == "logitcache@main":
            convert(source, path, chunk_bytes=MAIN_CHUNK_BYTES, progress=False)
        else:
            _run(["write", "--tool", tool, "--cache", source, "--path", path], timeout=3600)
        open(path + ".done", "w").close()
        print(f"{tool}: written in {time.perf_counter() - t0:.0f} s", flush=True)
    return paths


def main_snapshot(work: str, ref: str) -> tuple[str, str] | None:
    """The logitcache package at git `ref`, extracted for logitcache@main; (path, commit)."""
    out = os.path.join(work, "main-src")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    repo = ["git", "-C", os.path.dirname(HERE)]
    try:
        commit = subprocess.run(
            [*repo, "rev-parse", ref], capture_output=True, text=True, check=True
        ).stdout.strip()
        archive = subprocess.run(
            [*repo, "archive", commit, "logitcache"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", out], input=archive, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out, commit


MEASURES = [
    # (key, label, higher is better)
    ("bytes_per_target", "bytes / target", False),
    ("random_records_per_s", "random records/s", True),
    ("random_records_per_cpu_s", "random records/cpu-s", True),
    ("scan_targets_per_s", "scan target tok/s", True),
    ("scan_targets_per_cpu_s", "scan tok/cpu-s", True),
    ("loader0_targets_per_s", "loader 0w tok/s", True),
    ("loader2_targets_per_s", "loader 2w tok/s", True),
    ("first_batch_s", "first batch s", False),
    ("first_batch_cpu_s", "first batch cpu s", False),
    ("peak_anon0_mb", "peak anon 0w MB", False),
    ("peak_anon2_mb", "peak anon 2w MB", False),
]


def _load() -> float:
    return os.getloadavg()[0]


def measure(tools, paths, args, main_src) -> tuple[dict, list]:
    runs: dict[str, dict[str, list[float]]] = {t: {} for t in tools}
    loads = []
    for rnd in range(args.repeats):
        order = tools[rnd % len(tools) :] + tools[: rnd % len(tools)]
        for tool in order:
            env = {"LOGITCACHE_SRC": main_src} if tool == "logitcache@main" else {}
            if tool == "logitcache-jit":
                env = {"LOGITCACHE_COMPILED_KERNELS": "0"}
            common = ["measure", "--tool", tool, "--path", paths[tool], "--seed", str(rnd)]
            got: dict[str, float] = {}
            loads.append(_load())
            for what, extra in (
                ("random", ["--reads", str(args.reads), "--seconds", str(args.seconds)]),
                ("scan", []),
                ("loader0", ["--workers", "0"]),
                ("loader2", ["--workers", "2"]),
            ):
                if tool == "mds-zstd":
                    reset_mds_zstd(paths[tool])
                warm_page_cache(paths[tool])
                if what.startswith("loader"):
                    extra += ["--limit", str(args.limit), "--batch-size", str(args.batch_size)]
                out = _run([*common, "--what", what.rstrip("02"), *extra], env)
                if what == "loader0":
                    got["first_batch_s"] = out["first_batch_s"]
                    got["first_batch_cpu_s"] = out["first_batch_cpu_s"]
                if what.startswith("loader"):
                    got[f"{what}_targets_per_s"] = out["loader_targets_per_s"]
                    got[f"peak_anon{what[-1]}_mb"] = out["peak_anon_bytes"] / 2**20
                else:
                    got.update(out)
            for key, value in got.items():
                runs[tool].setdefault(key, []).append(value)
            print(
                f"round {rnd + 1} {tool:16s} random {got['random_records_per_s']:8.0f}/s  "
                f"scan {got['scan_targets_per_s']:10,.0f}  2w {got['loader2_targets_per_s']:9,.0f}"
                f"  first {got['first_batch_s']:.2f}s  mem {got['peak_anon0_mb']:.0f}/"
                f"{got['peak_anon2_mb']:.0f} MB  (load {loads[-1]:.1f})",
                flush=True,
            )
    return runs, loads


def goals(med: dict) -> list[str]:
    """The issue's goals, each with whether this run reached it."""
    lc, before = med["logitcache"], med.get("logitcache@main", {})
    out = []

    def line(ok: bool, text: str) -> None:
        out.append(f"[{'reached' if ok else 'NOT reached'}] {text}")

    if "lance" in med:
        r = lc["random_records_per_s"] / med["lance"]["random_records_per_s"]
        line(r >= 2, f"random access {r:.2f}x Lance (goal >= 2x)")
    line(
        lc["random_records_per_s"] >= 2000,
        f"random access {lc['random_records_per_s']:,.0f} records/s, "
        f"{lc['random_records_per_cpu_s']:,.0f} per CPU second (goal >= 2,000)",
    )
    if before:
        size = lc["bytes_per_target"] / before["bytes_per_target"] - 1
        line(size <= 0.02, f"files {size:+.1%} vs 2 MiB chunks (goal <= +2%)")
        scan = lc["scan_targets_per_s"] / before["scan_targets_per_s"]
        line(scan >= 1, f"scan {scan:.2f}x logitcache@main (goal >= 1x)")
    if "mds" in med:
        mds = med["mds"]
        r = lc["scan_targets_per_s"] / mds["scan_targets_per_s"]
        rc = lc["scan_targets_per_cpu_s"] / mds["scan_targets_per_cpu_s"]
        line(r >= 1, f"full scan {r:.2f}x raw MDS, {rc:.2f}x per CPU second (goal >= 1x)")
        for w in (0, 2):
            d = lc[f"peak_anon{w}_mb"] - mds[f"peak_anon{w}_mb"]
            line(d <= 100, f"peak anon memory, {w} workers: {d:+.0f} MB vs raw MDS (goal <= +100)")
    line(
        lc["first_batch_s"] <= 1.0,
        f"first batch {lc['first_batch_s']:.2f} s wall, {lc['first_batch_cpu_s']:.2f} s CPU "
        "beyond import torch (goal <= 1.0 s)",
    )
    return out


def plot(med: dict, tools: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [m for m in MEASURES if "cpu" not in m[0]]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (key, label, higher) in zip(axes.flat, keys, strict=False):
        values = [med[t].get(key, 0) for t in tools]
        colors = ["tab:blue" if t == "logitcache" else "tab:gray" for t in tools]
        ax.barh(range(len(tools)), values, color=colors)
        ax.set_yticks(range(len(tools)), tools, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{label} ({'higher' if higher else 'lower'} is better)", fontsize=9)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:,.0f}" if v >= 100 else f" {v:.2f}", va="center", fontsize=7)
        ax.set_xlim(0, max(values) * 1.25 if max(values) > 0 else 1)
    fig.suptitle("KD data loaders, same data and run (medians of interleaved rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--reads", type=int, default=1000, help="random reads per round")
    ap.add_argument("--seconds", type=float, default=15.0, help="time cap of the random reads")
    ap.add_argument("--limit", type=int, default=2000, help="records per DataLoader run")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    ap.add_argument("--work", default=None, help="data directory, kept for later runs")
    ap.add_argument("--output", default="bench_loader")
    ap.add_argument("--prepare-only", action="store_true", help="write the data sets and stop")
    ap.add_argument(
        "--baseline",
        default="main",
        help="git ref whose logitcache code is measured as logitcache@main (2 MiB chunks)",
    )
    args = ap.parse_args()
    tools = list(dict.fromkeys(["logitcache", *args.tools]))
    work = args.work or os.path.join("/tmp", f"bench-loader-{args.records}")
    snapshot = main_snapshot(work, args.baseline) if "logitcache@main" in tools else None
    main_src, baseline = snapshot or (None, None)
    if "logitcache@main" in tools and main_src is None:
        print(f"no git ref {args.baseline!r} to compare with: logitcache@main skipped")
        tools.remove("logitcache@main")
    paths = prepare(work, args.records, tools)
    if args.prepare_only:
        return
    with open_cache(paths["logitcache"]) as cache:
        m = cache.manifest
        targets, n_records = m.targets, m.records
    sizes = {t: disk_bytes(paths[t]) for t in tools}
    from logitcache import compiled

    compiled_module = compiled.load()  # what the `logitcache` rows decode with
    print(f"compiled decoders: {compiled_module.path if compiled_module else 'not built'}")
    print(f"{n_records} records, {targets:,} targets, load {_load():.1f}", flush=True)

    runs, loads = measure(tools, paths, args, main_src)
    med = {t: {k: statistics.median(v) for k, v in runs[t].items()} for t in tools}
    for t in tools:
        med[t]["bytes_per_target"] = sizes[t] / targets
        assert runs[t]["scan_targets"][0] == targets, (t, runs[t]["scan_targets"])
    headers = ["tool", *[label for _, label, _ in MEASURES]]
    rows = [[t, *[med[t][key] for key, _, _ in MEASURES]] for t in tools]
    print()
    print(format_table(headers, rows))
    ratio_rows = []
    for t in tools:
        ratio_rows.append(
            [t]
            + [
                med["logitcache"][key] / med[t][key]
                if higher
                else med[t][key] / med["logitcache"][key]
                for key, _, higher in MEASURES
            ]
        )
    print("\nlogitcache's advantage (>1: logitcache better; lower-is-better measures inverted)")
    print(format_table(headers, ratio_rows))
    verdicts = goals(med)
    print("\n" + "\n".join(verdicts))
    png = os.path.join(HERE, "results", f"{args.output}.png")
    os.makedirs(os.path.dirname(png), exist_ok=True)
    plot(med, tools, png)
    path = write_results(
        args.output,
        {
            "records": n_records,
            "targets": targets,
            "baseline": {"ref": args.baseline, "commit": baseline},
            "compiled_decoders": str(compiled_module.path) if compiled_module else None,
            "k": K,
            "vocab_size": VOCAB,
            "batch_size": args.batch_size,
            "reads": args.reads,
            "loader_records": args.limit,
            "repeats": args.repeats,
            "load_average_during_rounds": loads,
            "disk_bytes": sizes,
            "median": med,
            "runs": runs,
            "goals": verdicts,
            "plot": os.path.relpath(png, HERE),
        },
    )
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
