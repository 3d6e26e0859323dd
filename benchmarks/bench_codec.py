"""Bytes per target token and single-core encode/decode speed of the top-K columns.

Our candidate codec pipelines against baselines measured in the same run on the same
synthetic teacher rows; prints one table per (K, vocab) and writes results/bench_codec.json.

Method notes
- Data: `logitcache.synthetic.SyntheticTeacher` rows (see its docstring for the model and the
  statistics printed here), split into chunks of chunk_bytes // (6 K) positions (3495 at
  K=100), as CacheWriter's default 2 MiB chunks are. Every encoder and decoder works chunk by
  chunk on the calling thread (pyarrow with use_threads=False and a one-thread pool).
  tokens/s = target positions / the median (>= 3 repeats) CPU seconds of the process over all
  chunks: single-core throughput that other load on a shared machine does not distort. The
  JSON also holds the median wall seconds.
- raw: int32 ids + fp16 logprobs bytes (6 K B/token); decode is a zero-copy view.
- zstd3(raw): python-zstandard level 3 of each raw column per chunk.
- parquet: pyarrow, one row per position, columns fixed_size_list<int32, K> and
  fixed_size_list<halffloat, K>, BYTE_STREAM_SPLIT, zstd level 3, no dictionary, one row group
  per chunk; decode reads the table and flattens both columns to numpy.
- nemo-jsonl: NeMo-Aligner compute_topk_logits.py style, one JSON line per 256 positions with
  topk_logits (max-shifted logprobs: logits up to a per-token constant), topk_token_ids and
  log_sum_exp_logits; bytes of the UTF-8 text (and its zstd-3). The values are fp16 logprobs
  shifted exactly (in float64), so their decimal forms are no longer than a real teacher's
  fp32 logits would print: this baseline is if anything small. Measured on at most 8192
  positions (JSON is slow).
- megatron: Megatron-LM offline KD style: fp16 logprobs, ids as uint16 plus the 17th bit
  bit-packed, zstd-3 per chunk; refuses vocabularies above 131072 as Megatron does.
- ours: logitcache codec pipelines (logitcache.codecs) per column; "ours default" uses the
  writer's default pipelines; "e2e" writes a real cache with CacheWriter (threads=1) from
  synthetic_records and reads it back with open_cache().iter_records(): bytes of the shard
  files (all columns, footers) per target token.
- real rows: the real teacher's rows from `tools/real_rows.py` (SmolLM2-135M-Instruct over
  standard-library source, positions "all", K=100 and K=128, V=49152), read from --real
  (default benchmarks/data/real-rows; build it with `python tools/real_rows.py
  benchmarks/data/real-rows`, about 3 minutes on one busy core). The same methods run on them,
  plus lossy mode (logitcache.lossy) at several budgets: bytes of both columns per target and
  the KL of every stored row against its lossless row (both renormalised over the stored ids;
  and over the stored ids plus the outside bucket, as the `tail` loss sees them), mean and max.
  The synthetic teacher's statistics are printed beside the real ones.
- ours entropy: `ans_ids` for the ids and `fp16_key_delta` + `ans_uint` for the logprobs
  (rANS, spec sections 6.8-6.10), `entropy_pipeline_configs(k)`; "ours entropy ids" codes
  only the ids with rANS and the logprobs with fp16_key_delta + shuffle2 + zstd level 1,
  `entropy_pipeline_configs(k, logprobs="zstd")`.
- bounds: log2 C(V, K) / 8 is the entropy of a uniformly drawn K-subset of the vocabulary;
  rows in canonical order also fix which id has which logprob, log2 K! bits more for
  uniformly drawn ids (log2 of V!/(V-K)! in all). H0 is the order-0 entropy of the ids' own
  histogram times K: what an ideal per-id entropy coder would reach ignoring order.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common import Timing, format_table, median_time, single_thread_env, write_results

single_thread_env()

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import zstandard  # noqa: E402

from logitcache.codecs import (  # noqa: E402
    Pipeline,
    default_pipeline_configs,
    entropy_pipeline_configs,
)
from logitcache.synthetic import (  # noqa: E402
    SyntheticTeacher,
    canonical_order,
    row_statistics,
    synthetic_records,
)

KS = (64, 100, 128)
VOCABS = (32000, 128256, 151936)
TARGET_K, TARGET_VOCAB = 100, 128256
TARGET_RAW_RATIO, TARGET_PARQUET_RATIO = 0.45, 0.85
TARGET_ENCODE, TARGET_DECODE = 300_000, 1_000_000
CHUNK_BYTES = 2 << 20
NEMO_MAX_POSITIONS = 8192
NEMO_LINE_POSITIONS = 256
MEGATRON_MAX_VOCAB = 1 << 17

Chunks = list[tuple[np.ndarray, np.ndarray]]  # (topk_ids [m, K] int32, topk_logprobs fp16)


def zstd3(level: int = 3) -> dict[str, Any]:
    return {"id": "zstd", "level": level}


def shuffle(size: int) -> dict[str, Any]:
    return {"id": "shuffle", "elementsize": size}


def ans_ids(k: int) -> dict[str, Any]:
    return {"id": "ans_ids", "row_length": k}


def ans_logprobs(k: int) -> list[dict[str, Any]]:
    return [
        {"id": "fp16_key_delta", "row_length": k},
        {"id": "ans_uint", "elementsize": 2, "row_length": k},
    ]


def ans_ids_zstd_logprobs(k: int) -> list[dict[str, Any]]:
    """The logprobs of entropy_pipeline_configs(k, logprobs="zstd")."""
    return entropy_pipeline_configs(k, logprobs="zstd")["topk_logprobs"]


def id_candidates(k: int) -> dict[str, list[dict[str, Any]]]:
    byte_bits = {"id": "byte_bit_shuffle", "elementsize": 4, "byte_planes": 2}
    return {
        "zstd3": [zstd3()],
        "shuffle4+zstd1": [shuffle(4), zstd3(1)],
        "shuffle4+zstd3": [shuffle(4), zstd3()],
        "shuffle4+zstd6": [shuffle(4), zstd3(6)],
        "varint+zstd3": [{"id": "varint"}, zstd3()],
        "byte_bit_shuffle4/2+zstd1": [byte_bits, zstd3(1)],
        "byte_bit_shuffle4/2+zstd3": [byte_bits, zstd3()],
        "byte_bit_shuffle4/0+zstd1": [{**byte_bits, "byte_planes": 0}, zstd3(1)],
        "int_delta+shuffle4+zstd3": [{"id": "int_delta"}, shuffle(4), zstd3()],
        "ans_ids": [ans_ids(k)],
    }


def logprob_candidates(k: int) -> dict[str, list[dict[str, Any]]]:
    key_delta = {"id": "fp16_key_delta", "row_length": k}
    return {
        "zstd3": [zstd3()],
        "shuffle2+zstd3": [shuffle(2), zstd3()],
        "key_delta+zstd3": [key_delta, zstd3()],
        "key_delta+shuffle2+zstd1": [key_delta, shuffle(2), zstd3(1)],
        "key_delta+shuffle2+zstd3": [key_delta, shuffle(2), zstd3()],
        "key_delta+shuffle2+zstd6": [key_delta, shuffle(2), zstd3(6)],
        "key_delta+ans_uint": ans_logprobs(k),
    }


@dataclass
class Result:
    """One method on one configuration: sizes, median timings, and the round trip check."""

    name: str
    kind: str  # baseline | ids | logprobs | ours | e2e
    bytes: int
    positions: int
    encode: Timing
    decode: Timing
    lossless: bool
    config: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.positions

    @property
    def encode_tps(self) -> float:
        """Target positions per CPU second."""
        return self.positions / self.encode.cpu_s if self.encode.cpu_s > 0 else math.inf

    @property
    def decode_tps(self) -> float:
        return self.positions / self.decode.cpu_s if self.decode.cpu_s > 0 else math.inf


def measure(
    name: str,
    kind: str,
    chunks: Chunks,
    encode: Callable[[Chunks], list],
    decode: Callable[[list], Chunks],
    size: Callable[[list], int],
    repeats: int,
    columns: tuple[bool, bool] = (True, True),
    config: Any = None,
    same_bits: bool = True,
) -> Result:
    """Time encode and decode of every chunk; check the decoded columns bit for bit, or by
    value where `same_bits` is False (JSON text keeps no sign of zero)."""
    encode_t, encoded = median_time(lambda: encode(chunks), repeats)
    decode_t, decoded = median_time(lambda: decode(encoded), repeats)
    lossless = len(decoded) == len(chunks)
    for (ids, lp), (ids2, lp2) in zip(chunks, decoded, strict=False):
        if columns[0]:
            lossless &= ids2 is not None and np.array_equal(ids, ids2)
        if columns[1]:
            if same_bits:
                lossless &= lp2 is not None and np.array_equal(
                    lp.view(np.uint16), lp2.view(np.uint16)
                )
            else:
                lossless &= lp2 is not None and np.array_equal(lp, lp2)
    positions = sum(c[0].shape[0] for c in chunks)
    return Result(name, kind, size(encoded), positions, encode_t, decode_t, lossless, config)


# -- baselines -----------------------------------------------------------------------------


def bench_raw(chunks: Chunks, repeats: int) -> Result:
    k = chunks[0][0].shape[1]

    def encode(cs: Chunks) -> list:
        return [ids.tobytes() + lp.tobytes() for ids, lp in cs]

    def decode(blobs: list) -> Chunks:
        out = []
        for blob in blobs:
            m = len(blob) // (6 * k)
            ids = np.frombuffer(blob, np.int32, m * k).reshape(m, k)
            lp = np.frombuffer(blob, np.float16, m * k, offset=4 * m * k).reshape(m, k)
            out.append((ids, lp))
        return out

    return measure("raw fp16+int32", "baseline", chunks, encode, decode, _sum_len, repeats)


def bench_zstd_raw(chunks: Chunks, repeats: int) -> Result:
    k = chunks[0][0].shape[1]
    cctx = zstandard.ZstdCompressor(level=3)
    dctx = zstandard.ZstdDecompressor()

    def encode(cs: Chunks) -> list:
        return [(cctx.compress(ids.tobytes()), cctx.compress(lp.tobytes())) for ids, lp in cs]

    def decode(blobs: list) -> Chunks:
        out = []
        for a, b in blobs:
            ids = np.frombuffer(dctx.decompress(a), np.int32).reshape(-1, k)
            lp = np.frombuffer(dctx.decompress(b), np.float16).reshape(-1, k)
            out.append((ids, lp))
        return out

    def size(blobs: list) -> int:
        return sum(len(a) + len(b) for a, b in blobs)

    return measure("zstd3(raw)", "baseline", chunks, encode, decode, size, repeats)


def bench_parquet(chunks: Chunks, repeats: int) -> Result:
    k = chunks[0][0].shape[1]
    rows_per_group = chunks[0][0].shape[0]
    leaf = {"topk_ids.list.element": "BYTE_STREAM_SPLIT"}
    leaf["topk_logprobs.list.element"] = "BYTE_STREAM_SPLIT"

    def encode(cs: Chunks) -> list:
        ids = np.concatenate([c[0] for c in cs]).reshape(-1)
        lp = np.concatenate([c[1] for c in cs]).reshape(-1)
        table = pa.table(
            {
                "topk_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids), k),
                "topk_logprobs": pa.FixedSizeListArray.from_arrays(pa.array(lp), k),
            }
        )
        buf = io.BytesIO()
        pq.write_table(
            table,
            buf,
            compression="zstd",
            compression_level=3,
            use_dictionary=False,
            column_encoding=leaf,
            row_group_size=rows_per_group,
        )
        return [buf.getvalue()]

    def decode(blobs: list) -> Chunks:
        table = pq.read_table(pa.BufferReader(blobs[0]), use_threads=False)
        out = []
        ids_col, lp_col = table.column("topk_ids"), table.column("topk_logprobs")
        for ids_chunk, lp_chunk in zip(ids_col.chunks, lp_col.chunks, strict=True):
            ids = ids_chunk.flatten().to_numpy().reshape(-1, k)
            lp = lp_chunk.flatten().to_numpy().reshape(-1, k)
            out.append((ids, lp))
        return _rechunk(out, [c[0].shape[0] for c in chunks])

    result = measure("parquet bss+zstd3", "baseline", chunks, encode, decode, _sum_len, repeats)
    meta = pq.ParquetFile(pa.BufferReader(encode(chunks[:1])[0])).metadata
    encodings = {meta.row_group(0).column(i).encodings for i in range(2)}
    if not all("BYTE_STREAM_SPLIT" in e for e in encodings):
        raise RuntimeError(f"parquet baseline did not use BYTE_STREAM_SPLIT: {encodings}")
    return result


def _rechunk(chunks: Chunks, sizes: list[int]) -> Chunks:
    """Split concatenated (ids, lp) back into chunks of the given sizes."""
    ids = np.concatenate([c[0] for c in chunks])
    lp = np.concatenate([c[1] for c in chunks])
    bounds = np.cumsum([0, *sizes])
    return [(ids[a:b], lp[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def bench_nemo_jsonl(chunks: Chunks, repeats: int, compress: bool) -> Result:
    ids_all = np.concatenate([c[0] for c in chunks])[:NEMO_MAX_POSITIONS]
    lp_all = np.concatenate([c[1] for c in chunks])[:NEMO_MAX_POSITIONS]
    sub = [
        (ids_all[i : i + NEMO_LINE_POSITIONS], lp_all[i : i + NEMO_LINE_POSITIONS])
        for i in range(0, len(ids_all), NEMO_LINE_POSITIONS)
    ]
    cctx = zstandard.ZstdCompressor(level=3)
    dctx = zstandard.ZstdDecompressor()

    def encode(cs: Chunks) -> list:
        lines = []
        for ids, lp in cs:
            # float64 keeps the max shift exact, so the round trip is checked bit for bit.
            lp64 = lp.astype(np.float64)
            top = lp64[:, :1]
            line = {
                "topk_logits": (lp64 - top).tolist(),  # NeMo shifts logits by their max
                "topk_token_ids": ids.tolist(),
                "log_sum_exp_logits": (-top[:, 0]).tolist(),
            }
            lines.append(json.dumps(line))
        text = ("\n".join(lines) + "\n").encode()
        return [cctx.compress(text) if compress else text]

    def decode(blobs: list) -> Chunks:
        text = dctx.decompress(blobs[0]) if compress else blobs[0]
        out = []
        for line in text.splitlines():
            doc = json.loads(line)
            logits = np.asarray(doc["topk_logits"], dtype=np.float64)
            lse = np.asarray(doc["log_sum_exp_logits"], dtype=np.float64)
            lp = (logits - lse[:, None]).astype(np.float16)
            out.append((np.asarray(doc["topk_token_ids"], dtype=np.int32), lp))
        return out

    name = "nemo-jsonl+zstd3" if compress else "nemo-jsonl"
    return measure(name, "baseline", sub, encode, decode, _sum_len, repeats, same_bits=False)


def bench_megatron(chunks: Chunks, repeats: int, vocab_size: int) -> Result | None:
    if vocab_size > MEGATRON_MAX_VOCAB:
        return None
    k = chunks[0][0].shape[1]
    cctx = zstandard.ZstdCompressor(level=3)
    dctx = zstandard.ZstdDecompressor()

    def encode(cs: Chunks) -> list:
        out = []
        for ids, lp in cs:
            low = (ids & 0xFFFF).astype(np.uint16)
            bit16 = np.packbits((ids >> 16).astype(np.uint8).reshape(-1))
            out.append((cctx.compress(low.tobytes() + bit16.tobytes() + lp.tobytes()), ids.size))
        return out

    def decode(blobs: list) -> Chunks:
        out = []
        for blob, n in blobs:
            raw = dctx.decompress(blob)
            low = np.frombuffer(raw, np.uint16, n)
            packed = (n + 7) // 8
            bits = np.unpackbits(np.frombuffer(raw, np.uint8, packed, offset=2 * n))[:n]
            ids = (low.astype(np.int32) | (bits.astype(np.int32) << 16)).reshape(-1, k)
            lp = np.frombuffer(raw, np.float16, n, offset=2 * n + packed).reshape(-1, k)
            out.append((ids, lp))
        return out

    def size(blobs: list) -> int:
        return sum(len(b) for b, _ in blobs)

    return measure("megatron 17bit+zstd3", "baseline", chunks, encode, decode, size, repeats)


def _sum_len(blobs: list) -> int:
    return sum(len(b) for b in blobs)


# -- our pipelines -------------------------------------------------------------------------


def bench_pipeline(
    chunks: Chunks, repeats: int, column: int, name: str, config: list[dict[str, Any]]
) -> Result:
    """One column (0: topk_ids, 1: topk_logprobs) through one codec pipeline, chunk by chunk."""
    pipe = Pipeline.from_config(config)
    k = chunks[0][0].shape[1]
    dtype = np.int32 if column == 0 else np.float16
    pipe.decode(pipe.encode(chunks[0][column][:4]), dtype, 4 * k)  # load numba kernels first

    def encode(cs: Chunks) -> list:
        return [(pipe.encode(c[column]), c[column].size) for c in cs]

    def decode(blobs: list) -> Chunks:
        out = []
        for blob, count in blobs:
            arr = pipe.decode(blob, dtype, count).reshape(-1, k)
            out.append((arr, None) if column == 0 else (None, arr))
        return out

    def size(blobs: list) -> int:
        return sum(len(b) for b, _ in blobs)

    columns = (column == 0, column == 1)
    kind = "ids" if column == 0 else "logprobs"
    return measure(name, kind, chunks, encode, decode, size, repeats, columns, config)


def bench_id_sorted_layout(chunks: Chunks, repeats: int) -> Result:
    """The alternative row layout: ids sorted ascending (delta-coded), logprobs in id order.

    Sorting by id turns the ids into a set that deltas compress well, but the logprobs lose
    the descending order that fp16_key_delta exploits; decode re-sorts to canonical order.
    """
    k = chunks[0][0].shape[1]
    ids_pipe = Pipeline.from_config([{"id": "int_delta"}, shuffle(4), zstd3()])
    lp_pipe = Pipeline.from_config([shuffle(2), zstd3()])

    def encode(cs: Chunks) -> list:
        out = []
        for ids, lp in cs:
            order = np.argsort(ids, axis=1, kind="stable")
            sorted_ids = np.take_along_axis(ids, order, axis=1)
            sorted_lp = np.take_along_axis(lp, order, axis=1)
            out.append((ids_pipe.encode(sorted_ids), lp_pipe.encode(sorted_lp), ids.size))
        return out

    def decode(blobs: list) -> Chunks:
        out = []
        for a, b, count in blobs:
            ids = ids_pipe.decode(a, np.int32, count).reshape(-1, k)
            lp = lp_pipe.decode(b, np.float16, count).reshape(-1, k)
            out.append(canonical_order(ids, lp))
        return out

    def size(blobs: list) -> int:
        return sum(len(a) + len(b) for a, b, _ in blobs)

    config = {"topk_ids": ids_pipe.get_config(), "topk_logprobs": lp_pipe.get_config()}
    name = "id-sorted rows (int_delta+shuffle4+zstd3 | shuffle2+zstd3)"
    return measure(name, "ours", chunks, encode, decode, size, repeats, config=config)


def combine(name: str, ids: Result, lp: Result) -> Result:
    """Both columns: sizes and single-core times add (one core encodes both in turn)."""
    return Result(
        name,
        "ours",
        ids.bytes + lp.bytes,
        ids.positions,
        Timing(ids.encode.wall_s + lp.encode.wall_s, ids.encode.cpu_s + lp.encode.cpu_s),
        Timing(ids.decode.wall_s + lp.decode.wall_s, ids.decode.cpu_s + lp.decode.cpu_s),
        ids.lossless and lp.lossless,
        {"topk_ids": ids.config, "topk_logprobs": lp.config},
    )


def bench_end_to_end(k: int, vocab_size: int, positions: int, repeats: int) -> Result:
    """A real cache: CacheWriter (one encode thread) then open_cache().iter_records()."""
    from logitcache import CacheWriter, open_cache

    n_records = max(1, positions // 140)  # synthetic records hold ~140 targets on average
    records = list(synthetic_records(n_records, k=k, vocab_size=vocab_size, seed=1))
    tmp = tempfile.mkdtemp(prefix="bench-codec-")
    url = f"{tmp}/cache"
    try:

        def write() -> Any:
            with CacheWriter(url, k=k, vocab_size=vocab_size, overwrite=True, threads=1) as w:
                for rec in records:
                    w.add(**rec)
            return w.manifest

        def read() -> int:
            rows = 0
            with open_cache(url) as cache:
                for rec in cache.iter_records():
                    rows += rec.topk_ids.shape[0]
            return rows

        write_t, manifest = median_time(write, repeats)
        read_t, rows = median_time(read, repeats)
        with open_cache(url) as cache:
            lossless = all(
                np.array_equal(a.topk_ids, rec["topk_ids"])
                and np.array_equal(
                    a.topk_logprobs.view(np.uint16), rec["topk_logprobs"].view(np.uint16)
                )
                and np.array_equal(a.input_ids, rec["input_ids"])
                for a, rec in zip(cache.iter_records(), records, strict=True)
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shard_bytes = sum(s.bytes for s in manifest.shards)
    result = Result(
        "e2e CacheWriter/open_cache", "e2e", shard_bytes, rows, write_t, read_t, lossless
    )
    result.extra = {
        "records": manifest.records,
        "tokens": manifest.tokens,
        "targets": manifest.targets,
        "records_per_cpu_s_write": manifest.records / write_t.cpu_s,
        "records_per_cpu_s_read": manifest.records / read_t.cpu_s,
        "records_per_wall_s_read": manifest.records / read_t.wall_s,
        "note": "bytes of shard files (all columns) per target token; writer threads=1; "
        "CPU seconds of all the process's threads",
    }
    return result


# -- the run -------------------------------------------------------------------------------


def entropy_bounds(k: int, vocab_size: int, ids: np.ndarray) -> dict[str, float]:
    log2_set = math.lgamma(vocab_size + 1) - math.lgamma(k + 1) - math.lgamma(vocab_size - k + 1)
    log2_set /= math.log(2)
    log2_perm = math.lgamma(k + 1) / math.log(2)
    counts = np.bincount(ids.reshape(-1), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    h0 = float(-(p * np.log2(p)).sum())
    return {
        "uniform_set_bytes": log2_set / 8,
        "uniform_ordered_bytes": (log2_set + log2_perm) / 8,
        "h0_ids_bytes": h0 * k / 8,
    }


def run_config(k: int, vocab_size: int, positions: int, repeats: int, e2e: bool) -> dict:
    t0 = time.perf_counter()
    ids, lp = SyntheticTeacher(vocab_size, k, seed=0).rows(positions)
    gen_s = time.perf_counter() - t0
    cfg = run_rows(k, vocab_size, ids, lp, repeats)
    if e2e:
        cfg["results"].append(bench_end_to_end(k, vocab_size, positions, repeats))
    return {**cfg, "data": "synthetic", "generate_s": gen_s}


def run_rows(k: int, vocab_size: int, ids: np.ndarray, lp: np.ndarray, repeats: int) -> dict:
    positions = ids.shape[0]
    rows_per_chunk = CHUNK_BYTES // (6 * k)
    chunks = [
        (ids[i : i + rows_per_chunk], lp[i : i + rows_per_chunk])
        for i in range(0, positions, rows_per_chunk)
    ]
    results: list[Result] = [
        bench_raw(chunks, repeats),
        bench_zstd_raw(chunks, repeats),
        bench_parquet(chunks, repeats),
        bench_nemo_jsonl(chunks, repeats, compress=False),
        bench_nemo_jsonl(chunks, repeats, compress=True),
    ]
    megatron = bench_megatron(chunks, repeats, vocab_size)
    if megatron is not None:
        results.append(megatron)
    id_results = [bench_pipeline(chunks, repeats, 0, n, c) for n, c in id_candidates(k).items()]
    lp_results = [
        bench_pipeline(chunks, repeats, 1, n, c) for n, c in logprob_candidates(k).items()
    ]
    defaults = default_pipeline_configs(k)
    ids_default = _find_or_run(id_results, defaults["topk_ids"], chunks, repeats, 0)
    lp_default = _find_or_run(lp_results, defaults["topk_logprobs"], chunks, repeats, 1)
    results.append(combine("ours default", ids_default, lp_default))
    best_ids = min(id_results, key=lambda r: r.bytes)
    best_lp = min(lp_results, key=lambda r: r.bytes)
    results.append(combine(f"ours smallest ({best_ids.name} | {best_lp.name})", best_ids, best_lp))
    ans_id = _find_or_run(id_results, [ans_ids(k)], chunks, repeats, 0)
    ans_lp = _find_or_run(lp_results, ans_logprobs(k), chunks, repeats, 1)
    results.append(combine("ours entropy (ans_ids | key_delta+ans_uint)", ans_id, ans_lp))
    zstd_lp = _find_or_run(lp_results, ans_ids_zstd_logprobs(k), chunks, repeats, 1)
    results.append(
        combine("ours entropy ids (ans_ids | key_delta+shuffle2+zstd1)", ans_id, zstd_lp)
    )
    results.append(bench_id_sorted_layout(chunks, repeats))
    return {
        "k": k,
        "vocab_size": vocab_size,
        "positions": positions,
        "rows_per_chunk": rows_per_chunk,
        "teacher_statistics": row_statistics(ids, lp),
        "bounds": entropy_bounds(k, vocab_size, ids),
        "results": results,
        "id_results": id_results,
        "lp_results": lp_results,
    }


def _find_or_run(
    results: list[Result], config: list, chunks: Chunks, repeats: int, column: int
) -> Result:
    for r in results:
        if r.config == config:
            return r
    result = bench_pipeline(chunks, repeats, column, "default", config)
    results.append(result)
    return result


def _row(r: Result, raw: Result, parquet: Result) -> list[Any]:
    return [
        r.name,
        r.bytes_per_token,
        r.bytes_per_token / raw.bytes_per_token,
        r.bytes_per_token / parquet.bytes_per_token,
        None if math.isinf(r.encode_tps) else r.encode_tps / 1e3,
        None if math.isinf(r.decode_tps) else r.decode_tps / 1e3,
        "yes" if r.lossless else "NO",
    ]


HEADERS = ["method", "B/token", "x raw", "x parquet", "enc ktok/s", "dec ktok/s", "lossless"]
COLUMN_HEADERS = ["pipeline", "B/token", "enc ktok/s", "dec ktok/s", "lossless"]


def print_config(cfg: dict) -> None:
    results: list[Result] = cfg["results"]
    raw, parquet = results[0], results[2]
    b = cfg["bounds"]
    print(
        f"\n== {cfg['data']} rows, K={cfg['k']} vocab={cfg['vocab_size']}: "
        f"{cfg['positions']} positions, "
        f"{cfg['rows_per_chunk']} per chunk; index-set bound {b['uniform_set_bytes']:.1f} B/token, "
        f"ordered {b['uniform_ordered_bytes']:.1f}, H0(ids) {b['h0_ids_bytes']:.1f}"
    )
    print(format_table(HEADERS, [_row(r, raw, parquet) for r in results]))
    for title, rows in (("topk_ids", cfg["id_results"]), ("topk_logprobs", cfg["lp_results"])):
        print(f"  {title} column:")
        table = format_table(
            COLUMN_HEADERS,
            [
                [
                    r.name,
                    r.bytes_per_token,
                    r.encode_tps / 1e3,
                    r.decode_tps / 1e3,
                    "yes" if r.lossless else "NO",
                ]
                for r in rows
            ],
        )
        print("\n".join("  " + line for line in table.splitlines()))


# -- real rows: entropy coding and lossy mode ------------------------------------------------

REAL_DIR = "benchmarks/data/real-rows"
LOSSY_BUDGETS = (0.001, 0.003, 0.005, 0.01, 0.02)
LOSSY_NO_TRUNCATION = (0.003, 0.01)  # budgets also run with every entry kept
REAL_TARGET_PARQUET_RATIO = 0.75
LOSSY_TARGET_BYTES, LOSSY_TARGET_MEAN_KL = 150.0, 1e-3


def read_real_rows(root: str, k: int) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(topk_ids, topk_logprobs, vocab_size) of the real-row cache root/k{K}, or None."""
    from logitcache import open_cache

    path = f"{root}/k{k}"
    try:
        cache = open_cache(path)
    except Exception:  # noqa: BLE001 - absent or unreadable: the caller says how to build it
        return None
    with cache:
        records = list(cache.iter_records())
        return (
            np.concatenate([r.topk_ids for r in records]),
            np.concatenate([r.topk_logprobs for r in records]),
            cache.manifest.vocab_size,
        )


def row_measures(
    ids: np.ndarray, lp: np.ndarray, out_ids: np.ndarray, out_lp: np.ndarray
) -> dict[str, np.ndarray]:
    """Per row KLs of stored rows against lossless ones, entries matched by id: renorm over
    the stored ids (both directions), tail (stored ids + outside bucket, both directions), and
    the truncation cost log(mass of all K / mass of the stored ids)."""
    n, k = ids.shape
    stored = out_lp.astype(np.float64) > -65504.0
    order = np.argsort(ids, axis=1)
    sorted_ids = np.take_along_axis(ids, order, axis=1)
    row = np.arange(n)[:, None]
    # Row r's sorted ids shifted by r << 32 make one sorted array: one searchsorted finds
    # every stored id in its row.
    flat = (sorted_ids.astype(np.int64) + (row << 32)).reshape(-1)
    keys = (out_ids.astype(np.int64) + (row << 32)).reshape(-1)
    where = np.searchsorted(flat, keys).reshape(n, k) - row * k
    src = np.take_along_axis(order, np.clip(where, 0, k - 1), axis=1)
    p_all = np.exp(lp.astype(np.float64))
    p = np.where(stored, np.take_along_axis(p_all, src, axis=1), 0.0)
    q = np.where(stored, np.exp(out_lp.astype(np.float64)), 0.0)
    mp, mq = p.sum(1), q.sum(1)

    def kl(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            t = a * (np.log(a) - np.log(b))
        t[a == 0] = 0.0
        return t.sum(-1) if t.ndim == 2 else t

    pn, qn = p / mp[:, None], q / mq[:, None]
    pt, qt = np.maximum(0, 1 - mp), np.maximum(0, 1 - mq)
    zp, zq = mp + pt, mq + qt
    tp, tq = p / zp[:, None], q / zq[:, None]
    return {
        "renorm_fwd": kl(pn, qn),
        "renorm_rev": kl(qn, pn),
        "tail_fwd": kl(tp, tq) + kl(pt / zp, qt / zq),
        "tail_rev": kl(tq, tp) + kl(qt / zq, pt / zp),
        "truncation": np.log(p_all.sum(1) / mp),
    }


def bench_lossy(ids: np.ndarray, lp: np.ndarray, repeats: int) -> list[dict[str, Any]]:
    """Lossy mode on the rows at each budget: size of both columns, speed, exact KLs."""
    variants = [(b, True) for b in LOSSY_BUDGETS] + [(b, False) for b in LOSSY_NO_TRUNCATION]
    return [_lossy_at(budget, truncate, ids, lp, repeats) for budget, truncate in variants]


def _lossy_at(
    budget: float, truncate: bool, ids: np.ndarray, lp: np.ndarray, repeats: int
) -> dict[str, Any]:
    from logitcache.lossy import LossyRows

    k = ids.shape[1]
    rows_per_chunk = CHUNK_BYTES // (6 * k)
    chunks = [
        (ids[i : i + rows_per_chunk], lp[i : i + rows_per_chunk])
        for i in range(0, len(ids), rows_per_chunk)
    ]
    lossy = LossyRows(budget, k, truncation=truncate)
    pipes = {name: Pipeline.from_config(c) for name, c in lossy.pipelines().items()}

    def encode(cs: Chunks) -> list:
        """The writer's work: lossy rows (quantise, truncate, check, sort), then the codecs."""
        blobs = []
        for a, b in cs:
            qa, qb = LossyRows(budget, k, truncation=truncate).apply(a.copy(), b.copy())
            blobs.append((pipes["topk_ids"].encode(qa), pipes["topk_logprobs"].encode(qb), qa, qb))
        return blobs

    def decode(blobs: list) -> list:
        return [
            (
                pipes["topk_ids"].decode(a, np.int32, qa.size).reshape(-1, k),
                pipes["topk_logprobs"].decode(b, np.float16, qb.size).reshape(-1, k),
            )
            for a, b, qa, qb in blobs
        ]

    encode_t, blobs = median_time(lambda: encode(chunks), repeats)
    decode_t, decoded = median_time(lambda: decode(blobs), repeats)
    exact = all(
        np.array_equal(x[0], blob[2])
        and np.array_equal(x[1].view(np.uint16), blob[3].view(np.uint16))
        for x, blob in zip(decoded, blobs, strict=True)
    )
    out_ids = np.concatenate([b[2] for b in blobs])
    out_lp = np.concatenate([b[3] for b in blobs])
    m = row_measures(ids, lp, out_ids, out_lp)
    lossy.apply(ids.copy(), lp.copy())  # the writer's own accounting (rows stored exactly)
    size = sum(len(a) + len(b) for a, b, _, _ in blobs)
    row_error = np.maximum.reduce(
        [m["renorm_fwd"], m["renorm_rev"] + m["truncation"], m["tail_fwd"], m["tail_rev"]]
    )
    return {
        "budget": budget,
        "truncation": truncate,
        "grid_step": lossy.step,
        "bytes_per_token": size / len(ids),
        "encode_tokens_per_s": len(ids) / encode_t.cpu_s,
        "decode_tokens_per_s": len(ids) / decode_t.cpu_s,
        "decoded_exactly": exact,
        "mean_entries": float((out_lp.astype(np.float64) > -65504).sum(1).mean()),
        "exact_rows": lossy.stats.exact_rows,
        **{f"mean_{key}": float(v.mean()) for key, v in m.items()},
        **{f"max_{key}": float(v.max()) for key, v in m.items()},
        "max_row_error": float(row_error.max()),
        "rows_within_budget": bool((row_error <= budget * (1 + 1e-9)).all()),
    }


LOSSY_HEADERS = [
    "budget",
    "truncation",
    "grid",
    "B/token",
    "entries",
    "mean KL renorm",
    "mean KL tail",
    "max row error",
    "enc ktok/s",
    "dec ktok/s",
    "in budget",
]


def print_lossy(rows: list[dict[str, Any]]) -> None:
    print("  lossy mode (both columns; KL of stored rows against the lossless ones):")
    table = format_table(
        LOSSY_HEADERS,
        [
            [
                r["budget"],
                "yes" if r["truncation"] else "no",
                r["grid_step"],
                r["bytes_per_token"],
                r["mean_entries"],
                f"{r['mean_renorm_fwd']:.2e}",
                f"{r['mean_tail_fwd']:.2e}",
                f"{r['max_row_error']:.2e}",
                r["encode_tokens_per_s"] / 1e3,
                r["decode_tokens_per_s"] / 1e3,
                "yes" if r["rows_within_budget"] else "NO",
            ]
            for r in rows
        ],
    )
    print("\n".join("  " + line for line in table.splitlines()))


def print_statistics(cfg: dict) -> None:
    """Real rows beside the synthetic teacher at the same K and vocabulary (quantiles)."""
    real, synth = cfg["teacher_statistics"], cfg["synthetic_statistics"]
    print("  statistics, real | synthetic (quantiles 10/25/50/75/90%):")
    for key in ("top1_prob", "topk_entropy_nats", "tail_mass"):
        print(f"    {key:<18} {real[key]} | {synth[key]}")
    print(f"    {'context_overlap':<18} {real['context_overlap']} | {synth['context_overlap']}")


def check_real_targets(configs: list[dict]) -> list[dict[str, Any]]:
    """The entropy-coding and lossy goals on the real rows at K=100."""
    cfg = next((c for c in configs if c["data"] == "real" and c["k"] == TARGET_K), None)
    if cfg is None:
        return []
    results: list[Result] = cfg["results"]
    parquet = results[2]
    checks = []
    for label, prefix in (("entropy", "ours entropy ("), ("entropy ids", "ours entropy ids (")):
        ours = next(r for r in results if r.name.startswith(prefix))
        checks += [
            (
                f"real: {label} size vs parquet",
                ours.bytes_per_token / parquet.bytes_per_token,
                "<=",
                REAL_TARGET_PARQUET_RATIO,
            ),
            (f"real: {label} encode tokens/s per core", ours.encode_tps, ">=", TARGET_ENCODE),
            (f"real: {label} decode tokens/s per core", ours.decode_tps, ">=", TARGET_DECODE),
        ]
    fitting = [
        r
        for r in cfg.get("lossy", [])
        if r["mean_renorm_fwd"] <= LOSSY_TARGET_MEAN_KL
        and r["mean_tail_fwd"] <= LOSSY_TARGET_MEAN_KL
        and r["rows_within_budget"]
    ]
    if fitting:
        best = min(fitting, key=lambda r: r["bytes_per_token"])
        checks.append(
            (
                f"real: lossy B/token at mean KL <= 1e-3 (budget {best['budget']})",
                best["bytes_per_token"],
                "<=",
                LOSSY_TARGET_BYTES,
            )
        )
    out = []
    for name, value, op, target in checks:
        met = value <= target if op == "<=" else value >= target
        out.append({"target": name, "value": value, "op": op, "goal": target, "met": met})
    return out


def check_targets(configs: list[dict]) -> list[dict[str, Any]]:
    cfg = next(
        (
            c
            for c in configs
            if c["data"] == "synthetic" and c["k"] == TARGET_K and c["vocab_size"] == TARGET_VOCAB
        ),
        None,
    )
    if cfg is None:
        return []
    results: list[Result] = cfg["results"]
    raw, parquet = results[0], results[2]
    ours = next(r for r in results if r.name == "ours default")
    checks = [
        ("size vs raw", ours.bytes_per_token / raw.bytes_per_token, "<=", TARGET_RAW_RATIO),
        (
            "size vs parquet",
            ours.bytes_per_token / parquet.bytes_per_token,
            "<=",
            TARGET_PARQUET_RATIO,
        ),
        ("encode tokens/s per core", ours.encode_tps, ">=", TARGET_ENCODE),
        ("decode tokens/s per core", ours.decode_tps, ">=", TARGET_DECODE),
    ]
    out = []
    for name, value, op, target in checks:
        met = value <= target if op == "<=" else value >= target
        out.append({"target": name, "value": value, "op": op, "goal": target, "met": met})
    return out


def _result_json(r: Result) -> dict[str, Any]:
    return {
        "name": r.name,
        "kind": r.kind,
        "bytes": r.bytes,
        "positions": r.positions,
        "bytes_per_token": r.bytes_per_token,
        "encode_wall_s": r.encode.wall_s,
        "encode_cpu_s": r.encode.cpu_s,
        "decode_wall_s": r.decode.wall_s,
        "decode_cpu_s": r.decode.cpu_s,
        "encode_tokens_per_s": None if math.isinf(r.encode_tps) else r.encode_tps,
        "decode_tokens_per_s": None if math.isinf(r.decode_tps) else r.decode_tps,
        "lossless": r.lossless,
        "config": r.config,
        **r.extra,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run for smoke tests")
    parser.add_argument("--positions", type=int, help="target positions per configuration")
    parser.add_argument("--repeats", type=int, help="timing repeats (median is reported)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the CacheWriter round trip")
    parser.add_argument("--output", default="bench_codec", help="results/NAME.json to write")
    parser.add_argument("--real", default=REAL_DIR, help="real-row caches (tools/real_rows.py)")
    parser.add_argument("--no-real", action="store_true", help="synthetic rows only")
    parser.add_argument("--real-only", action="store_true", help="real rows only")
    args = parser.parse_args(argv)
    positions = args.positions or (2048 if args.quick else 16384)
    repeats = args.repeats or 3
    grid = [(100, 128256)] if args.quick else [(k, v) for k in KS for v in VOCABS]
    if args.real_only:
        grid = []
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)

    start = time.perf_counter()
    configs = []
    for k, vocab_size in grid:
        cfg = run_config(k, vocab_size, positions, repeats, e2e=not args.no_e2e)
        print_config(cfg)
        configs.append(cfg)
    if not args.no_real:
        for k in (100, 128):
            rows = read_real_rows(args.real, k)
            if rows is None:
                print(
                    f"\nno real rows at {args.real}/k{k}: build them with `python "
                    f"tools/real_rows.py {args.real}` (or pass --no-real)"
                )
                break
            ids, lp, vocab_size = rows
            cfg = {**run_rows(k, vocab_size, ids, lp, repeats), "data": "real"}
            cfg["lossy"] = bench_lossy(ids, lp, repeats)
            cfg["synthetic_statistics"] = row_statistics(
                *SyntheticTeacher(vocab_size, k, seed=0).rows(len(ids))
            )
            print_config(cfg)
            print_lossy(cfg["lossy"])
            print_statistics(cfg)
            configs.append(cfg)
    targets = check_targets(configs) + check_real_targets(configs)
    if targets:
        print(f"\n== targets at K={TARGET_K}, vocab={TARGET_VOCAB} (ours default)")
        for t in targets:
            value = t["value"]
            shown = f"{value:.3f}" if value < 10 else f"{value:,.0f}"
            print(
                f"  {t['target']}: {shown} {t['op']} {t['goal']:,}: "
                f"{'met' if t['met'] else 'NOT met'}"
            )
    print(f"\ntotal {time.perf_counter() - start:.0f} s")

    payload = {
        "positions": positions,
        "repeats": repeats,
        "chunk_bytes": CHUNK_BYTES,
        "targets": targets,
        "configs": [
            {
                **{
                    key: cfg[key]
                    for key in ("data", "k", "vocab_size", "positions", "rows_per_chunk")
                },
                **{key: cfg[key] for key in ("lossy", "synthetic_statistics") if key in cfg},
                "teacher_statistics": cfg["teacher_statistics"],
                "bounds": cfg["bounds"],
                "results": [_result_json(r) for r in cfg["results"]],
                "topk_ids_pipelines": [_result_json(r) for r in cfg["id_results"]],
                "topk_logprobs_pipelines": [_result_json(r) for r in cfg["lp_results"]],
            }
            for cfg in configs
        ],
    }
    path = write_results(args.output, payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
