"""The tools bench_loader.py compares, each behind the same three questions, plus the data set.

For every tool: `write(tool, records_cache, out)` stores the benchmark records in its format
from a logitcache cache; `Reader(tool, path)` answers `len`, `get(i) -> Record` (random
access) and `scan() -> Records in storage order`; `loader(tool, path, ...)` is the tool's own
way to feed a shuffled torch DataLoader. Every path ends in the same `collate_kd`.

Run as a script (`python loader_peers.py measure ...`) it measures one tool in a fresh
process and prints one JSON line; bench_loader.py starts it once per tool, measure and round.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import types
from collections.abc import Iterator

# Time to first batch counts from here: what a training script pays beyond `import torch`.
T_START = time.perf_counter()
import torch  # noqa: E402

T_TORCH = time.perf_counter()
CPU_TORCH = time.process_time()

if os.environ.get("LOGITCACHE_SRC"):  # measure another checkout's logitcache (e.g. main's)
    sys.path.insert(0, os.environ["LOGITCACHE_SRC"])
else:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

K = 100
VOCAB = 128256
MIN_TOKENS, MAX_TOKENS = 128, 2048
BLOCK = 64  # records per read block of the block-shuffled peers (a Parquet row group)
TOOLS = (
    "logitcache",
    "logitcache-jit",
    "logitcache@main",
    "mds",
    "mds-zstd",
    "hf-arrow",
    "parquet",
    "lance",
)


# -- the data set ------------------------------------------------------------------------


def synthetic_benchmark_records(n: int, seed: int = 0) -> Iterator[dict]:
    """n records of 128..2048 tokens (uniform), the second half supervised, K=100 rows of
    the synthetic teacher over V=128256 (Zipf-like ids; logitcache.synthetic)."""
    from logitcache.synthetic import SyntheticTeacher

    teacher = SyntheticTeacher(VOCAB, K, seed=seed)
    rng = np.random.default_rng([seed, 15])
    for i in range(n):
        t = int(rng.integers(MIN_TOKENS, MAX_TOKENS + 1))
        prompt = t // 2
        mask = np.zeros(t, dtype=bool)
        mask[prompt:] = True
        ids, logprobs = teacher.rows(t - prompt)
        input_ids = teacher.sample_prior_ids(t).astype(np.int32)
        input_ids[prompt:] = ids[:, 0]  # the teacher's top token follows
        yield {
            "input_ids": input_ids,
            "loss_mask": mask,
            "topk_ids": ids,
            "topk_logprobs": logprobs,
            "sample_id": f"bench-{i:06d}",
        }


def _arrow_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("input_ids", pa.list_(pa.int32())),
            ("loss_mask", pa.list_(pa.bool_())),
            ("topk_ids", pa.list_(pa.int32())),  # [N*K], row-major
            ("topk_logprobs", pa.list_(pa.float16())),
            ("sample_id", pa.string()),
        ]
    )


def _arrow_batches(cache_path: str, per_batch: int = BLOCK):
    """Record batches of the cache's records with flat list columns (N*K values per row)."""
    import pyarrow as pa

    from logitcache import open_cache

    schema = _arrow_schema()

    def lists(arrays, dtype):
        offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
        np.cumsum([a.size for a in arrays], out=offsets[1:])
        values = pa.array(np.concatenate([a.reshape(-1) for a in arrays]), type=dtype)
        return pa.ListArray.from_arrays(pa.array(offsets), values)

    with open_cache(cache_path) as cache:
        records = cache.iter_records()
        while True:
            batch = [r for _, r in zip(range(per_batch), records, strict=False)]
            if not batch:
                return
            yield pa.RecordBatch.from_arrays(
                [
                    lists([r.input_ids for r in batch], pa.int32()),
                    lists([r.loss_mask for r in batch], pa.bool_()),
                    lists([r.topk_ids for r in batch], pa.int32()),
                    lists([r.topk_logprobs for r in batch], pa.float16()),
                    pa.array([r.sample_id for r in batch], pa.string()),
                ],
                schema=schema,
            )


def write(tool: str, cache_path: str, out: str) -> None:
    """Store the records of the logitcache cache at `cache_path` in `tool`'s format at `out`."""
    import pyarrow as pa

    if tool == "parquet":
        import pyarrow.parquet as pq

        columns = ["input_ids", "topk_ids", "topk_logprobs"]
        with pq.ParquetWriter(
            out,
            _arrow_schema(),
            compression="zstd",
            use_dictionary=False,  # so that byte stream split applies
            column_encoding={f"{c}.list.element": "BYTE_STREAM_SPLIT" for c in columns},
        ) as writer:
            for batch in _arrow_batches(cache_path):
                writer.write_batch(batch, row_group_size=BLOCK)
    elif tool == "lance":
        import lance

        reader = pa.RecordBatchReader.from_batches(_arrow_schema(), _arrow_batches(cache_path))
        lance.write_dataset(reader, out)
    elif tool == "hf-arrow":
        import datasets

        features = datasets.Features(
            {
                "input_ids": datasets.Sequence(datasets.Value("int32")),
                "loss_mask": datasets.Sequence(datasets.Value("bool")),
                "topk_ids": datasets.Sequence(datasets.Value("int32")),
                "topk_logprobs": datasets.Sequence(datasets.Value("float16")),
                "sample_id": datasets.Value("string"),
            }
        )
        table = pa.Table.from_batches(list(_arrow_batches(cache_path)), schema=_arrow_schema())
        datasets.Dataset(table).cast(features).save_to_disk(out)
    elif tool in ("mds", "mds-zstd"):
        from logitcache import open_cache

        streaming = _import_streaming()
        columns = {
            "input_ids": "ndarray:int32",
            "loss_mask": "ndarray:uint8",
            "topk_ids": "ndarray:int32",
            "topk_logprobs": "ndarray:float16",
            "sample_id": "str",
        }
        compression = "zstd" if tool == "mds-zstd" else None
        with (
            streaming.MDSWriter(out=out, columns=columns, compression=compression) as writer,
            open_cache(cache_path) as cache,
        ):
            for r in cache.iter_records():
                writer.write(
                    {
                        "input_ids": np.asarray(r.input_ids),
                        "loss_mask": r.loss_mask.view(np.uint8),
                        "topk_ids": r.topk_ids.reshape(-1),
                        "topk_logprobs": r.topk_logprobs.reshape(-1),
                        "sample_id": r.sample_id,
                    }
                )
    else:
        raise ValueError(f"no writer for {tool!r}")


def _import_streaming():
    # MosaicML streaming's package __init__ imports its vision, text and multimodal dataset
    # zoos (torchvision and more); the MDS reader and writer need none of them.
    for name in ("streaming.vision", "streaming.text", "streaming.multimodal"):
        sys.modules.setdefault(name, types.ModuleType(name))
    import streaming
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    return streaming


def _decompressed_mds(path: str) -> list[str]:
    """Raw shards MDS wrote beside its zstd shards when it read them (it reads those after)."""
    if not os.path.isdir(path):
        return []
    names = set(os.listdir(path))
    return [os.path.join(path, n) for n in names if n + ".zstd" in names]


def reset_mds_zstd(path: str) -> None:
    """Back to the compressed shards only, so every run pays MDS's decompression."""
    for name in _decompressed_mds(path):
        os.remove(name)


def disk_bytes(path: str) -> int:
    """Bytes of a tool's copy of the data (MDS's decompressed copies of zstd shards excluded)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    skip = set(_decompressed_mds(path))
    return sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, files in os.walk(path)
        for f in files
        if os.path.join(d, f) not in skip
    )


def warm_page_cache(path: str) -> None:
    """Read every file once, so that measurements start with the data in the page cache."""
    files = (
        [path]
        if os.path.isfile(path)
        else [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
    )
    for name in files:
        with open(name, "rb") as f:
            while f.read(16 << 20):
                pass


# -- reading -----------------------------------------------------------------------------


def _record(input_ids, loss_mask, topk_ids, topk_logprobs, sample_id):
    from logitcache import Record

    return Record(
        input_ids,
        np.asarray(loss_mask).view(np.bool_) if loss_mask.dtype != np.bool_ else loss_mask,
        topk_ids.reshape(-1, K),
        topk_logprobs.reshape(-1, K),
        sample_id,
    )


def _arrow_records(table) -> list:
    """Records of an Arrow table with the flat list columns (zero-copy views where possible)."""

    def flat(name):
        arr = table.column(name).combine_chunks()
        return arr.values.to_numpy(zero_copy_only=False), arr.offsets.to_numpy()

    ids, ids_o = flat("input_ids")
    mask, _ = flat("loss_mask")
    tk, tk_o = flat("topk_ids")
    lp, _ = flat("topk_logprobs")
    names = table.column("sample_id").to_pylist()
    return [
        _record(
            ids[ids_o[i] : ids_o[i + 1]],
            mask[ids_o[i] : ids_o[i + 1]],
            tk[tk_o[i] : tk_o[i + 1]],
            lp[tk_o[i] : tk_o[i + 1]],
            names[i],
        )
        for i in range(table.num_rows)
    ]


def _mds_record(sample: dict):
    return _record(
        sample["input_ids"],
        sample["loss_mask"],
        sample["topk_ids"],
        sample["topk_logprobs"],
        sample["sample_id"],
    )


class Reader:
    """Random access and storage-order scans of one tool's copy of the records."""

    def __init__(self, tool: str, path: str):
        self.tool = tool
        if tool.startswith("logitcache"):
            from logitcache import open_cache

            self._cache = open_cache(path)
            self.n = len(self._cache)
        elif tool in ("mds", "mds-zstd"):
            streaming = _import_streaming()
            self._ds = streaming.StreamingDataset(local=path, batch_size=1)
            self.n = len(self._ds)
        elif tool == "hf-arrow":
            import datasets

            self._ds = datasets.load_from_disk(path).with_format("arrow")
            self.n = len(self._ds)
        elif tool == "parquet":
            import pyarrow.parquet as pq

            self._pf = pq.ParquetFile(path, memory_map=True)
            counts = [
                self._pf.metadata.row_group(g).num_rows for g in range(self._pf.num_row_groups)
            ]
            self._starts = np.concatenate([[0], np.cumsum(counts)])
            self.n = int(self._starts[-1])
        elif tool == "lance":
            import lance

            self._ds = lance.dataset(path)
            self.n = self._ds.count_rows()
        else:
            raise ValueError(tool)

    def get(self, i: int):
        tool = self.tool
        if tool.startswith("logitcache"):
            return self._cache[i]
        if tool in ("mds", "mds-zstd"):
            return _mds_record(self._ds[i])
        if tool == "hf-arrow":
            return _arrow_records(self._ds[i : i + 1])[0]
        if tool == "parquet":
            g = int(np.searchsorted(self._starts, i, side="right") - 1)
            table = self._pf.read_row_group(g).slice(i - int(self._starts[g]), 1)
            return _arrow_records(table)[0]
        return _arrow_records(self._ds.take([i]))[0]

    def scan(self) -> Iterator:
        tool = self.tool
        if tool.startswith("logitcache"):
            yield from self._cache.iter_records()
        elif tool in ("mds", "mds-zstd"):
            for i in range(self.n):
                yield _mds_record(self._ds[i])
        elif tool == "hf-arrow":
            for lo in range(0, self.n, BLOCK):
                yield from _arrow_records(self._ds[lo : lo + BLOCK])
        elif tool == "parquet":
            for g in range(self._pf.num_row_groups):
                yield from _arrow_records(self._pf.read_row_group(g))
        else:
            for batch in self._ds.to_batches(batch_size=BLOCK):
                import pyarrow as pa

                yield from _arrow_records(pa.Table.from_batches([batch]))


class BlockShuffled(torch.utils.data.IterableDataset):
    """A shuffled epoch for the table formats: blocks of BLOCK consecutive records in random
    order, split across DataLoader workers, records shuffled within each block (the access
    pattern of a Parquet row-group loader)."""

    def __init__(self, tool: str, path: str, seed: int):
        self.tool, self.path, self.seed = tool, path, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        reader = Reader(self.tool, self.path)
        rng = np.random.default_rng(self.seed)
        blocks = rng.permutation(-(-reader.n // BLOCK))
        for b in blocks[worker::workers].tolist():
            lo, hi = b * BLOCK, min(reader.n, (b + 1) * BLOCK)
            if self.tool == "parquet":
                records = _arrow_records(reader._pf.read_row_group(b))
            elif self.tool == "lance":
                records = _arrow_records(reader._ds.take(list(range(lo, hi))))
            else:
                records = _arrow_records(reader._ds[lo:hi])
            for j in rng.permutation(len(records)).tolist():
                yield records[j]


class _Converted(torch.utils.data.IterableDataset):
    def __init__(self, dataset, convert):
        self.dataset, self.convert = dataset, convert

    def __iter__(self):
        return map(self.convert, iter(self.dataset))


def loader(tool: str, path: str, *, batch_size: int, workers: int, seed: int):
    """The tool's shuffled DataLoader of collate_kd batches."""
    from torch.utils.data import DataLoader

    from logitcache.loader import collate_kd

    if tool.startswith("logitcache"):
        from logitcache.loader import LogitCacheDataset, LogitCacheLoader

        return LogitCacheLoader(LogitCacheDataset(path, seed=seed), batch_size, num_workers=workers)
    if tool in ("mds", "mds-zstd"):
        streaming = _import_streaming()
        ds = streaming.StreamingDataset(
            local=path, shuffle=True, shuffle_seed=seed, batch_size=batch_size
        )
        dataset = _Converted(ds, _mds_record)
    else:
        dataset = BlockShuffled(tool, path, seed)
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_kd)


# -- measuring one tool in this process ---------------------------------------------------


class MemorySampler:
    """Peak of the summed proportional anonymous memory (Pss_Anon) of this process and its
    children, sampled every 20 ms: shared copy-on-write pages of forked workers count once."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self):
        while not self._stop.wait(0.02):
            self.sample()

    def sample(self):
        total = 0
        for pid in _process_tree(os.getpid()):
            try:
                with open(f"/proc/{pid}/smaps_rollup") as f:
                    for line in f:
                        if line.startswith("Pss_Anon:"):
                            total += int(line.split()[1]) * 1024
                            break
            except OSError:
                pass
        self.peak = max(self.peak, total)


def _process_tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def measure_random(tool: str, path: str, reads: int, seconds: float, seed: int) -> dict:
    """Random single-record reads: `reads` of them, or as many as fit in `seconds`."""
    reader = Reader(tool, path)
    reader.get(0)  # opened and warm: the rate of reads, not of opening
    order = np.random.default_rng(seed).integers(0, reader.n, reads).tolist()
    start, cpu = time.perf_counter(), time.process_time()
    done = 0
    for i in order:
        reader.get(i)
        done += 1
        if time.perf_counter() - start > seconds and done >= 20:
            break
    return {
        "random_records_per_s": done / (time.perf_counter() - start),
        "random_records_per_cpu_s": done / (time.process_time() - cpu),
        "random_reads": done,
    }


def measure_scan(tool: str, path: str) -> dict:
    """Every record in storage order, to numpy Records."""
    start, cpu = time.perf_counter(), time.process_time()
    targets = 0
    for record in Reader(tool, path).scan():
        targets += record.topk_ids.shape[0]
    wall = time.perf_counter() - start
    return {
        "scan_targets_per_s": targets / wall,
        "scan_targets_per_cpu_s": targets / (time.process_time() - cpu),
        "scan_targets": targets,
    }


def measure_loader(tool: str, path: str, workers: int, batch: int, limit: int, seed: int) -> dict:
    """Time to first batch from `import torch`, then target tokens per second over the first
    `limit` records (startup included), and the peak anonymous memory meanwhile."""
    with MemorySampler() as memory:
        dl = loader(tool, path, batch_size=batch, workers=workers, seed=seed)
        targets = records = 0
        first = first_cpu = None
        for batch_out in dl:
            if first is None:
                first = time.perf_counter() - T_TORCH
                first_cpu = time.process_time() - CPU_TORCH
            targets += batch_out["kd_index"].numel()
            records += batch_out["input_ids"].shape[0]
            if records >= limit:
                break
        wall = time.perf_counter() - T_TORCH
    del dl
    return {
        "first_batch_s": first,
        "first_batch_cpu_s": first_cpu,
        "loader_targets_per_s": targets / wall,
        "loader_targets": targets,
        "peak_anon_bytes": memory.peak,
        "torch_import_s": T_TORCH - T_START,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="measure one tool (used by bench_loader.py)")
    ap.add_argument("command", choices=["measure", "write"])
    ap.add_argument("--tool", required=True)
    ap.add_argument("--path", required=True)
    ap.add_argument("--what", choices=["random", "scan", "loader"])
    ap.add_argument("--cache", help="write: the logitcache cache to copy")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--limit", type=int, default=2000, help="records per loader run")
    ap.add_argument("--reads", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=15.0, help="random: time cap")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.command == "write":
        write(args.tool, args.cache, args.path)
        return
    if args.what == "random":
        result = measure_random(args.tool, args.path, args.reads, args.seconds, args.seed)
    elif args.what == "scan":
        result = measure_scan(args.tool, args.path)
    else:
        result = measure_loader(
            args.tool, args.path, args.workers, args.batch_size, args.limit, args.seed
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
