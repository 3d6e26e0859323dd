"""Bring teacher outputs made by other tools into logitcache, and take caches out to Parquet.

This module reads the rows of a source (JSON lines or Parquet files) and recognises its format;
`parquet`, `nemo` and `axolotl` turn rows into `CacheWriter.add` keyword arguments.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

FORMAT_CACHE = "cache"
FORMAT_PARQUET = "parquet"
FORMAT_NEMO = "nemo"
FORMAT_AXOLOTL = "axolotl"
SOURCE_FORMATS = (FORMAT_CACHE, FORMAT_PARQUET, FORMAT_NEMO, FORMAT_AXOLOTL)

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
SOURCE_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _fs(path: str, storage_options: dict | None):
    """(fsspec filesystem, path inside it) of a local path or URL."""
    import fsspec.core

    return fsspec.core.url_to_fs(path, **(storage_options or {}))


def source_files(path: str, storage_options: dict | None = None) -> list[str]:
    """The data files of a source: the file, or the JSON lines / Parquet files in a directory
    (local, or under any fsspec URL such as s3://bucket/prefix)."""
    if not is_remote(path):
        if os.path.isdir(path):
            names = sorted(os.listdir(path))
            files = [os.path.join(path, n) for n in names if n.lower().endswith(SOURCE_SUFFIXES)]
            if not files:
                raise ValueError(
                    f"{path}: no .jsonl or .parquet files in this directory; "
                    "point at a data file or a directory of them"
                )
            return files
        if not os.path.exists(path):
            raise ValueError(f"{path}: no such file or directory")
        return [path]
    fs, inner = _fs(path, storage_options)
    if fs.isdir(inner):
        protocol = path.split("://", 1)[0]
        files = sorted(
            f"{protocol}://{name}"
            for name in fs.ls(inner, detail=False)
            if name.lower().endswith(SOURCE_SUFFIXES)
        )
        if not files:
            raise ValueError(f"{path}: no .jsonl or .parquet files under this prefix")
        return files
    if not fs.exists(inner):
        raise ValueError(f"{path}: no such object")
    return [path]


def open_binary(file: str, storage_options: dict | None = None):
    """A binary file object for a local path or URL."""
    if not is_remote(file):
        return open(file, "rb")  # noqa: SIM115 - the caller closes it
    fs, inner = _fs(file, storage_options)
    return fs.open(inner, "rb")


def parquet_file(file: str, storage_options: dict | None = None):
    """A pyarrow ParquetFile for a local path or URL; ValueError naming the file otherwise."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(file if not is_remote(file) else open_binary(file, storage_options))
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise ValueError(f"{file}: not a readable Parquet file ({e})") from None


def is_parquet(file: str, storage_options: dict | None = None) -> bool:
    if file.lower().endswith(PARQUET_SUFFIXES):
        return True
    with open_binary(file, storage_options) as f:
        return f.read(4) == b"PAR1"


def iter_rows(
    path: str, *, columns: list[str] | None = None, storage_options: dict | None = None
) -> Iterator[tuple[str, dict]]:
    """Yield (location, row dict) for every example of a source. The location names the file
    and the line ("FILE line 7") or Parquet row ("FILE row 6"), for error messages.

    JSON lines are parsed one at a time and Parquet files one row group at a time, so a source
    of any size streams in bounded memory.
    """
    for file in source_files(path, storage_options):
        if is_parquet(file, storage_options):
            yield from _iter_parquet_rows(file, columns, storage_options)
        else:
            yield from _iter_jsonl_rows(file, storage_options)


def _iter_jsonl_rows(file: str, storage_options: dict | None) -> Iterator[tuple[str, dict]]:
    with open_binary(file, storage_options) as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(
                    f"{file} line {line_number}: not UTF-8 text; is this a binary file? JSON "
                    "lines sources hold one JSON object per line"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{file} line {line_number}: not valid JSON ({e.msg}); "
                    "each line must hold one JSON object"
                ) from None
            except RecursionError:
                raise ValueError(f"{file} line {line_number}: JSON nested too deeply") from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{file} line {line_number}: expected a JSON object, got {type(row).__name__}"
                )
            yield f"{file} line {line_number}", row


def _iter_parquet_rows(
    file: str, columns: list[str] | None, storage_options: dict | None
) -> Iterator[tuple[str, dict]]:
    pf = parquet_file(file, storage_options)
    present = set(pf.schema_arrow.names)
    wanted = None if columns is None else [c for c in columns if c in present]
    index = 0
    for group in range(pf.num_row_groups):
        for row in pf.read_row_group(group, columns=wanted).to_pylist():
            yield f"{file} row {index}", row
            index += 1


def first_row(path: str, storage_options: dict | None = None) -> tuple[str, dict] | None:
    """The first example of a source and its location, or None when the source has no rows."""
    for where, row in iter_rows(path, storage_options=storage_options):
        return where, row
    return None


def detect_format(path: str, storage_options: dict | None = None) -> str:
    """Recognise a source: a logitcache cache, a logitcache Parquet export, NeMo or axolotl data.

    Raises ValueError naming the path and the fields it expected when nothing matches.
    """
    if not is_remote(path):
        if os.path.isdir(path) and os.path.exists(os.path.join(path, "manifest.json")):
            return FORMAT_CACHE
    elif not path.rstrip("/").lower().endswith(SOURCE_SUFFIXES):
        return FORMAT_CACHE  # a remote prefix is a cache unless it names a data file
    for file in source_files(path, storage_options):
        if is_parquet(file, storage_options):
            from .parquet import read_export_header

            if read_export_header(file, storage_options) is not None:
                return FORMAT_PARQUET
        break
    found = first_row(path, storage_options)
    if found is None:
        raise ValueError(f"{path}: the source has no rows")
    where, row = found
    keys = set(row)
    if {"topk_logits", "topk_token_ids"} <= keys:
        return FORMAT_NEMO
    if {"target_token_ids", "target_logprobs"} <= keys:
        return FORMAT_AXOLOTL
    if {"input_ids", "loss_mask", "topk_ids", "topk_logprobs"} <= keys:
        return FORMAT_PARQUET
    raise ValueError(
        f"{where}: cannot tell the source format from its fields {sorted(keys)[:12]}; expected "
        "NeMo-Aligner KD fields (topk_logits, topk_token_ids, log_sum_exp_logits), axolotl KD "
        "fields (target_token_ids, target_logprobs, target_mask) or a logitcache Parquet export; "
        "pass --from to name the format"
    )


def int_vector(value: Any, where: str, field: str) -> np.ndarray:
    """The token ids of `field` as int64, refusing what would silently change them: floats
    (999.7 is not id 999), booleans (true is not id 1), strings and nested lists."""
    array = np.asarray(value) if not isinstance(value, np.ndarray) else value
    kind = array.dtype.kind
    if kind in "iu" and isinstance(value, list) and _holds_bool(value):
        kind = "b"  # [1, true] became [1, 1]
    if kind not in "iu":
        what = {"b": "booleans", "f": "floats", "U": "strings", "S": "bytes", "c": "complex"}.get(
            kind, "values that are not integers"
        )
        sample = next(
            (x for x in np.asarray(value, dtype=object).reshape(-1) if not _is_int(x)), None
        )
        raise ValueError(
            f"{where}: field {field!r} holds {what} (e.g. {sample!r}); token ids must be JSON "
            "integers: fix the export that wrote this file"
        )
    if array.ndim != 1:
        raise ValueError(f"{where}: field {field!r} must be a flat list of integers")
    return array.astype(np.int64, copy=False)


def int_matrix(value: Any, where: str, field: str) -> np.ndarray:
    """Like int_vector for a [rows][K] field; ValueError naming the field when ragged."""
    try:
        rows = [int_vector(row, f"{where} row {i}", field) for i, row in enumerate(value)]
    except TypeError:
        raise ValueError(f"{where}: field {field!r} must be a [positions][K] list") from None
    if rows and len({r.shape[0] for r in rows}) != 1:
        raise ValueError(
            f"{where}: field {field!r} must be a rectangular [positions][K] array "
            "(every row the same length)"
        )
    return np.stack(rows) if rows else np.zeros((0, 0), np.int64)


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _holds_bool(value: list) -> bool:
    return any(isinstance(x, bool) for x in value)


# The most negative finite float16; the writer clamps to it too (probability 0 at any precision).
FP16_MIN = -65504.0


def to_fp16_logprobs(values: np.ndarray) -> np.ndarray:
    """Round log-probabilities to float16 once, from full precision, as the writer would."""
    return np.maximum(np.asarray(values, dtype=np.float64), FP16_MIN).astype(np.float16)


def require_field(row: dict, names: tuple[str, ...], *, where: str) -> Any:
    """The value of the first of `names` present in `row`; ValueError naming them otherwise."""
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    wanted = " or ".join(repr(n) for n in names)
    raise ValueError(f"{where}: missing field {wanted} (fields present: {sorted(row)[:12]})")
