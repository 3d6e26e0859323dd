"""Target tokens per second delivered as collated KD batches: local, S3 (cold, warm), Parquet.

The same synthetic records (K=100) are read through LogitCacheLoader from a local cache
(memory-mapped), from moto's S3 server on loopback with a cold and a warm local shard cache,
and from a Parquet export read with pyarrow; each with 0, 1 and 2 DataLoader workers.

Method notes
- Data: logitcache.synthetic.synthetic_records(--records, k=100, vocab_size=32000, mean
  length 256), written once with CacheWriter (shard_bytes 8 MiB so there are several shards).
- A run iterates one epoch with --batch-size records per batch (8 by default) and collate_kd
  (shuffle on, window 4096).
  tokens/s = teacher rows (kd_index entries) delivered / wall time of the whole epoch, worker
  start-up and the first shuffle window included. Forkserver workers fork from a server that
  has preloaded torch and logitcache; one untimed warm-up epoch per configuration runs first
  (numba compiles its kernels once per process). Medians of --repeats runs.
- S3 cold: an empty local shard cache per run (every shard is downloaded during the epoch,
  prefetched 2 ahead). S3 warm: the shard cache was filled by an earlier run. moto runs as a
  separate process on 127.0.0.1; forkserver workers for S3, fork for local and Parquet.
- Parquet: logitcache.interop.parquet.write_parquet with float16 logprobs, 64 records per row
  group; an IterableDataset reads row groups (split across workers) with pyarrow and builds
  Records from the flat Arrow buffers, then the same collate_kd.
- The machine is shared: other processes may take CPU time; "per core" is the 0-worker row.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from common import format_table, write_results  # noqa: I001 -- puts the repo on sys.path
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from logitcache import CacheWriter, Record, open_cache
from logitcache.interop.parquet import export_header, write_parquet
from logitcache.loader import LogitCacheDataset, LogitCacheLoader, collate_kd
from logitcache.synthetic import synthetic_records

K = 100
VOCAB = 32000
BATCH = 8
WINDOW = 4096  # records per shuffle window, fixed so runs compare across cache sizes


class ParquetKD(IterableDataset):
    """Records of a Parquet export, row groups split across DataLoader workers."""

    def __init__(self, path: str):
        self.path = path

    def __iter__(self):
        import pyarrow.parquet as pq

        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        pf = pq.ParquetFile(self.path)
        for group in range(worker, pf.num_row_groups, workers):
            table = pf.read_row_group(group)
            yield from _records(table)


def _flat(column):
    """(values, offsets) of a list<...> column with one chunk."""
    arr = column.combine_chunks()
    return arr.values, arr.offsets.to_numpy()


def _records(table):
    ids_v, ids_o = _flat(table.column("input_ids"))
    mask_v, _ = _flat(table.column("loss_mask"))
    tok_v, tok_o = _flat(table.column("topk_ids"))
    lp_v, _ = _flat(table.column("topk_logprobs"))
    input_ids = ids_v.to_numpy()
    loss_mask = mask_v.to_numpy(zero_copy_only=False)
    topk_ids = tok_v.values.to_numpy().reshape(-1, K)
    topk_lp = lp_v.values.to_numpy().reshape(-1, K)
    sample_ids = table.column("sample_id").to_pylist()
    for i in range(table.num_rows):
        t0, t1 = ids_o[i], ids_o[i + 1]
        n0, n1 = tok_o[i], tok_o[i + 1]
        yield Record(
            input_ids[t0:t1], loss_mask[t0:t1], topk_ids[n0:n1], topk_lp[n0:n1], sample_ids[i]
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def _epoch_rate(loader) -> tuple[float, int]:
    """(target tokens per second over one whole epoch, target tokens delivered)."""
    start = time.perf_counter()
    total = 0
    for batch in loader:
        total += batch["kd_index"].numel()
    return total / (time.perf_counter() - start), total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch-size", type=int, default=BATCH, help="records per batch")
    ap.add_argument("--output", default="bench_loader_sources", help="results/NAME.json to write")
    args = ap.parse_args()
    import multiprocessing

    multiprocessing.set_forkserver_preload(["torch", "logitcache.loader", "logitcache.storage"])

    work = tempfile.mkdtemp(prefix="bench-loader-")
    moto, endpoint = _start_moto()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    options = {
        "key": "bench",
        "secret": "bench",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    try:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        ).create_bucket(Bucket="bench")
        local = os.path.join(work, "cache")
        s3_url = "s3://bench/cache"
        t0 = time.perf_counter()
        records = list(
            synthetic_records(args.records, k=K, vocab_size=VOCAB, mean_length=256, seed=0)
        )
        for url, opts in ((local, None), (s3_url, options)):
            with CacheWriter(
                url, k=K, vocab_size=VOCAB, storage_options=opts, shard_bytes=8 << 20
            ) as w:
                for kw in records:
                    w.add(**kw)
        with open_cache(local) as cache:
            manifest = cache.manifest
            parquet = os.path.join(work, "records.parquet")
            header = export_header(k=K, vocab_size=VOCAB, positions=manifest.positions)
            write_parquet(
                cache.iter_records(),
                parquet,
                header=header,
                logprob_dtype="float16",
                records_per_group=64,
            )
        del records
        print(
            f"{manifest.records} records, {manifest.targets:,} target tokens, "
            f"{len(manifest.shards)} shards, {manifest.bytes / 2**20:.1f} MiB "
            f"(parquet {os.path.getsize(parquet) / 2**20:.1f} MiB); setup "
            f"{time.perf_counter() - t0:.0f}s",
            flush=True,
        )

        warm_dir = os.path.join(work, "warm")

        def run(source: str, workers: int) -> tuple[float, int]:
            if source == "parquet":
                loader = DataLoader(
                    ParquetKD(parquet),
                    batch_size=args.batch_size,
                    num_workers=workers,
                    collate_fn=collate_kd,
                )
                return _epoch_rate(loader)
            if source == "local":
                ds = LogitCacheDataset(local, shuffle_window=WINDOW)
            else:
                cache_dir = warm_dir if source == "s3 warm" else tempfile.mkdtemp(dir=work)
                ds = LogitCacheDataset(
                    s3_url, storage_options=options, cache_dir=cache_dir, shuffle_window=WINDOW
                )
            rate = _epoch_rate(LogitCacheLoader(ds, args.batch_size, num_workers=workers))
            if source == "s3 cold":
                shutil.rmtree(cache_dir, ignore_errors=True)
            return rate

        # Fill the warm shard cache once.
        list(LogitCacheDataset(s3_url, storage_options=options, cache_dir=warm_dir))

        rows, results = [], []
        for workers in args.workers:
            base = None
            for source in ("local", "s3 cold", "s3 warm", "parquet"):
                rates = []
                run(source, workers)  # warm-up
                for _ in range(args.repeats):
                    rate, tokens = run(source, workers)
                    assert tokens == manifest.targets, (source, workers, tokens)
                    rates.append(rate)
                median = statistics.median(rates)
                base = base or median
                results.append(
                    {"source": source, "workers": workers, "tokens_per_s": median, "runs": rates}
                )
                rows.append([source, workers, median, median / base])
                print(
                    format_table(
                        ["source", "workers", "target tok/s", "x local"], rows[-1:]
                    ).splitlines()[-1],
                    flush=True,
                )
        print()
        print(format_table(["source", "workers", "target tok/s", "x local"], rows))
        path = write_results(
            args.output,
            {
                "records": manifest.records,
                "targets": manifest.targets,
                "k": K,
                "vocab_size": VOCAB,
                "batch_size": args.batch_size,
                "shards": len(manifest.shards),
                "cache_bytes": manifest.bytes,
                "parquet_bytes": os.path.getsize(parquet),
                "repeats": args.repeats,
                "torch": torch.__version__,
                "numpy": np.__version__,
                "results": results,
            },
        )
        print(f"wrote {path}")
    finally:
        moto.kill()
        moto.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
