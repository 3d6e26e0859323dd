"""Export a cache to Parquet with plain list columns, and import such a file back.

One Parquet row per record; any Arrow reader (pyarrow, duckdb, pandas, polars) reads it. The
cache's identity (K, vocab size, positions mode, teacher, tokenizer) rides in the file's
key-value metadata under `logitcache`, so an import restores it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

import numpy as np

from ..format import MAX_K, MAX_VOCAB_SIZE

PARQUET_METADATA_KEY = b"logitcache"
PARQUET_EXPORT_FORMAT = "logitcache-parquet"
PARQUET_EXPORT_VERSION = 1
LOGPROB_DTYPES = ("float32", "float16")
RECORD_COLUMNS = ["input_ids", "loss_mask", "topk_ids", "topk_logprobs", "sample_id"]


def parquet_schema(logprob_dtype: str = "float32", header: dict | None = None):
    """The Arrow schema of an export: plain (nested) list columns, header in the metadata.

    float32 logprobs are the default because every Parquet reader supports them and every
    float16 value is exactly a float32 value, so the round trip is exact; float16 halves the
    column but needs a reader that knows Parquet's FLOAT16 logical type.
    """
    import pyarrow as pa

    if logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"logprob dtype {logprob_dtype!r}: choose one of {LOGPROB_DTYPES}")
    value_type = pa.float32() if logprob_dtype == "float32" else pa.float16()
    metadata = None
    if header is not None:
        metadata = {PARQUET_METADATA_KEY: json.dumps(header, sort_keys=True).encode()}
    return pa.schema(
        [
            pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("loss_mask", pa.list_(pa.bool_()), nullable=False),
            pa.field("topk_ids", pa.list_(pa.list_(pa.int32())), nullable=False),
            pa.field("topk_logprobs", pa.list_(pa.list_(value_type)), nullable=False),
            pa.field("sample_id", pa.string(), nullable=True),
        ],
        metadata=metadata,
    )


def export_header(
    *,
    k: int,
    vocab_size: int,
    positions: str,
    teacher: dict | None = None,
    tokenizer: dict | None = None,
    metadata: dict | None = None,
    cache_format_version: str | None = None,
) -> dict:
    """The JSON header stored in an export's key-value metadata."""
    return {
        "format": PARQUET_EXPORT_FORMAT,
        "version": PARQUET_EXPORT_VERSION,
        "k": int(k),
        "vocab_size": int(vocab_size),
        "positions": positions,
        "teacher": teacher,
        "tokenizer": tokenizer,
        "metadata": metadata,
        "cache_format_version": cache_format_version,
    }


def _list_array(lengths: np.ndarray, values):
    import pyarrow as pa

    offsets = np.zeros(lengths.size + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def records_to_table(records: list, *, schema):
    """An Arrow table of `records` (objects with the Record fields) in the export schema."""
    import pyarrow as pa

    value_dtype = (
        np.float16
        if schema.field("topk_logprobs").type.value_type.value_type == pa.float16()
        else np.float32
    )
    n_tokens = np.array([r.input_ids.shape[0] for r in records], dtype=np.int64)
    n_rows = np.array([r.topk_ids.shape[0] for r in records], dtype=np.int64)
    k = records[0].topk_ids.shape[1] if records else 0
    ids = (
        np.concatenate([r.input_ids for r in records]).astype(np.int32)
        if records
        else np.zeros(0, np.int32)
    )
    mask = (
        np.concatenate([r.loss_mask for r in records]).astype(bool)
        if records
        else np.zeros(0, bool)
    )
    topk_ids = (
        np.concatenate([r.topk_ids.reshape(-1) for r in records]).astype(np.int32)
        if records
        else np.zeros(0, np.int32)
    )
    topk_lps = (
        np.concatenate([r.topk_logprobs.reshape(-1) for r in records]).astype(value_dtype)
        if records
        else np.zeros(0, value_dtype)
    )
    row_lengths = np.full(int(n_rows.sum()), k, dtype=np.int64)
    columns = [
        _list_array(n_tokens, pa.array(ids)),
        _list_array(n_tokens, pa.array(mask)),
        _list_array(n_rows, _list_array(row_lengths, pa.array(topk_ids))),
        _list_array(n_rows, _list_array(row_lengths, pa.array(topk_lps))),
        pa.array([r.sample_id for r in records], type=pa.string()),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def write_parquet(
    records: Iterable,
    path: str,
    *,
    header: dict,
    logprob_dtype: str = "float32",
    records_per_group: int = 1024,
    storage_options: dict | None = None,
) -> int:
    """Write `records` to one Parquet file at `path` (local or fsspec URL); returns the count.

    Row groups hold `records_per_group` records so readers can stream the file. The file is
    written under a temporary name and renamed, so a failed export leaves no partial file.
    """
    import fsspec
    import pyarrow.parquet as pq

    schema = parquet_schema(logprob_dtype, header)
    fs, _, (target,) = fsspec.get_fs_token_paths(path, storage_options=storage_options or {})
    tmp = f"{target}.tmp-export"
    count = 0
    try:
        with (
            fs.open(tmp, "wb") as f,
            pq.ParquetWriter(f, schema, compression="zstd", use_dictionary=["sample_id"]) as writer,
        ):
            batch: list = []
            for record in records:
                batch.append(record)
                if len(batch) >= records_per_group:
                    writer.write_table(records_to_table(batch, schema=schema))
                    count += len(batch)
                    batch = []
            if batch or count == 0:
                writer.write_table(records_to_table(batch, schema=schema))
                count += len(batch)
        fs.mv(tmp, target)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise
    return count


def read_export_header(path: str, storage_options: dict | None = None) -> dict | None:
    """The logitcache header of a Parquet file (local or URL), or None when it has none.

    The identity fields are checked here, so that a damaged header is reported with its file.
    """
    from . import parquet_file

    meta = parquet_file(path, storage_options).metadata.metadata or {}
    raw = meta.get(PARQUET_METADATA_KEY)
    if raw is None:
        return None
    try:
        header = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(
            f"{path}: the 'logitcache' key-value metadata is not JSON; re-export the file"
        ) from None
    if not isinstance(header, dict) or header.get("format") != PARQUET_EXPORT_FORMAT:
        raise ValueError(f"{path}: the 'logitcache' metadata is not a logitcache export header")
    version = header.get("version", 0)
    if not _is_count(version):
        raise ValueError(f"{path}: the export header's version {version!r} is not an integer")
    if version > PARQUET_EXPORT_VERSION:
        raise ValueError(
            f"{path}: export version {header.get('version')} is newer than this reader "
            f"({PARQUET_EXPORT_VERSION}); upgrade logitcache"
        )
    for key, low, high in (("k", 1, MAX_K), ("vocab_size", 1, MAX_VOCAB_SIZE)):
        value = header.get(key)
        if value is not None and not (_is_count(value) and low <= value <= high):
            raise ValueError(
                f"{path}: the export header's {key} {value!r} is not an integer in "
                f"[{low}, {high}]; the file is damaged or was not written by logitcache: pass "
                "--vocab-size to override, or re-export it"
            )
    for key in ("teacher", "tokenizer", "metadata"):
        if header.get(key) is not None and not isinstance(header.get(key), dict):
            raise ValueError(f"{path}: the export header's {key} must be an object or null")
    return header


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _nested_values(
    column, *, where: str, field: str, k: int | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """(rows per record, [total rows, K] values, K) of a list<list<...>> column chunk."""
    import pyarrow.compute as pc

    if column.null_count:
        raise ValueError(f"{where}: column {field!r} has null records")
    rows = column.flatten()
    if rows.null_count:
        raise ValueError(f"{where}: column {field!r} has null rows")
    lengths = np.asarray(pc.list_value_length(rows), dtype=np.int64)
    width = k if k is not None else (int(lengths[0]) if lengths.size else 0)
    if lengths.size and np.any(lengths != width):
        bad = int(np.flatnonzero(lengths != width)[0])
        raise ValueError(
            f"{where}: column {field!r} row {bad} of this row group has {int(lengths[bad])} "
            f"entries, expected K = {width}; every teacher row must have K entries"
        )
    values = rows.flatten().to_numpy(zero_copy_only=False)
    per_record = np.asarray(pc.list_value_length(column), dtype=np.int64)
    return (
        per_record,
        values.reshape(-1, width) if width else values.reshape(lengths.size, 0),
        width,
    )


def _flat_values(column, *, where: str, field: str) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.compute as pc

    if column.null_count:
        raise ValueError(f"{where}: column {field!r} has null records")
    lengths = np.asarray(pc.list_value_length(column), dtype=np.int64)
    values = column.flatten()
    if values.null_count:
        raise ValueError(f"{where}: column {field!r} has null entries")
    return lengths, values.to_numpy(zero_copy_only=False)


def iter_parquet_records(
    path: str, *, k: int | None = None, storage_options: dict | None = None
) -> Iterator[tuple[str, dict]]:
    """Yield (location, `CacheWriter.add` kwargs) for every row of Parquet files in the export
    layout.

    Reads one row group at a time. Logprobs of any float type are rounded to float16 (exact
    for files written by `write_parquet`). K is taken from the header, else from the data.
    """
    from . import parquet_file, source_files

    for file in source_files(path, storage_options):
        header = read_export_header(file, storage_options)
        file_k = k if k is not None else (header or {}).get("k")
        pf = parquet_file(file, storage_options)
        missing = [c for c in RECORD_COLUMNS[:4] if c not in pf.schema_arrow.names]
        if missing:
            raise ValueError(
                f"{file}: missing column(s) {missing}; a logitcache Parquet file has columns "
                f"{RECORD_COLUMNS}"
            )
        has_sample_id = "sample_id" in pf.schema_arrow.names
        first = 0
        for group in range(pf.num_row_groups):
            table = pf.read_row_group(
                group, columns=RECORD_COLUMNS if has_sample_id else RECORD_COLUMNS[:4]
            )
            where = f"{file} row group {group} (records {first}..{first + table.num_rows - 1})"
            columns = {name: table.column(name).combine_chunks() for name in table.column_names}
            n_tok, ids = _flat_values(columns["input_ids"], where=where, field="input_ids")
            n_mask, mask = _flat_values(columns["loss_mask"], where=where, field="loss_mask")
            if not np.array_equal(n_tok, n_mask):
                raise ValueError(
                    f"{where}: input_ids and loss_mask differ in length for some record"
                )
            n_rows, topk_ids, width = _nested_values(
                columns["topk_ids"], where=where, field="topk_ids", k=file_k
            )
            n_rows2, topk_lps, _ = _nested_values(
                columns["topk_logprobs"], where=where, field="topk_logprobs", k=width
            )
            if not np.array_equal(n_rows, n_rows2):
                raise ValueError(
                    f"{where}: topk_ids and topk_logprobs differ in rows for some record"
                )
            if file_k is None:
                file_k = width
            sample_ids = (
                columns["sample_id"].to_pylist() if has_sample_id else [None] * table.num_rows
            )
            tok_at = np.concatenate([[0], np.cumsum(n_tok)])
            row_at = np.concatenate([[0], np.cumsum(n_rows)])
            for i in range(table.num_rows):
                yield (
                    f"{file} record {first + i}",
                    {
                        "input_ids": ids[tok_at[i] : tok_at[i + 1]].astype(np.int32),
                        "loss_mask": mask[tok_at[i] : tok_at[i + 1]].astype(bool),
                        "topk_ids": topk_ids[row_at[i] : row_at[i + 1]].astype(np.int32),
                        "topk_logprobs": topk_lps[row_at[i] : row_at[i + 1]].astype(np.float16),
                        "sample_id": sample_ids[i],
                    },
                )
            first += table.num_rows
