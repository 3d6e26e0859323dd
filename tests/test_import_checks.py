"""Imports that used to be accepted silently wrong: rows one position off, ids given as floats,
booleans or strings, binary files and damaged Parquet headers."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from logitcache import open_cache
from logitcache.convert import convert
from tests.test_cli import run
from tests.test_interop import (
    VOCAB,
    axolotl_example,
    make_sequence,
    nemo_example,
    write_jsonl,
)

SEQUENCES = [make_sequence(40 + s, 12, prompt=2) for s in range(10)]


def token_layout_rows() -> list[dict]:
    rows = [
        axolotl_example(ids, mask, sample_id=f"a{i}") for i, (ids, mask) in enumerate(SEQUENCES)
    ]
    for row in rows:
        row["target_logprobs"][0] = [-1e9] * len(row["target_logprobs"][0])  # JSON has no -inf
    return rows


def next_token_layout_rows() -> list[dict]:
    """The same teacher rows as axolotl's online-teacher collator lays them out: row t is the
    distribution of token t + 1, and the last row (of a token past the end) is padding."""
    rows = token_layout_rows()
    for row in rows:
        for field in ("target_token_ids", "target_logprobs", "target_mask"):
            row[field] = row[field][1:] + [row[field][0]]
    return rows


def test_axolotl_next_token_data_is_refused_under_the_token_layout(tmp_path):
    source = tmp_path / "online.jsonl"
    write_jsonl(source, next_token_layout_rows())
    out = run("convert", source, tmp_path / "c", "--vocab-size", str(VOCAB), "--no-progress")
    assert out.returncode == 1
    assert "do not line up" in out.stderr and "--layout next-token" in out.stderr
    assert "top-K 100.0%" in out.stderr  # the evidence: the neighbour fits every row
    assert not (tmp_path / "c" / "manifest.json").exists()

    good = run(
        "convert", source, tmp_path / "c", "--vocab-size", str(VOCAB), "--layout", "next-token"
    )
    assert good.returncode == 0, good.stderr
    reference = tmp_path / "token.jsonl"
    write_jsonl(reference, token_layout_rows())
    assert run("convert", reference, tmp_path / "ref", "--vocab-size", str(VOCAB)).returncode == 0
    with open_cache(str(tmp_path / "c")) as got, open_cache(str(tmp_path / "ref")) as want:
        assert len(got) == len(want) == len(SEQUENCES)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a.input_ids, b.input_ids)
            np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
            np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
            np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)


def test_axolotl_token_data_is_refused_under_the_next_token_layout(tmp_path):
    source = tmp_path / "transform.jsonl"
    write_jsonl(source, token_layout_rows())
    with pytest.raises(ValueError, match="--layout token"):
        convert(str(source), str(tmp_path / "c"), vocab_size=VOCAB, layout="next-token")


def test_nemo_rows_one_position_off_are_refused(tmp_path):
    rows = [nemo_example(ids, mask, pad_to=16, index=i) for i, (ids, mask) in enumerate(SEQUENCES)]
    for row in rows:  # each row now describes the token before the one NeMo's layout says
        for field in ("topk_logits", "topk_token_ids", "log_sum_exp_logits"):
            row[field] = [row[field][0]] + row[field][:-1]
    source = tmp_path / "nemo.jsonl"
    write_jsonl(source, rows)
    with pytest.raises(ValueError, match="one position earlier") as info:
        convert(str(source), str(tmp_path / "c"), vocab_size=VOCAB)
    assert "NeMo-Aligner's layout" in str(info.value) and "top-1" in str(info.value)
    # The same data unshifted imports.
    write_jsonl(
        source, [nemo_example(ids, m, pad_to=16, index=i) for i, (ids, m) in enumerate(SEQUENCES)]
    )
    assert convert(str(source), str(tmp_path / "d"), vocab_size=VOCAB).records == len(SEQUENCES)


@pytest.mark.parametrize(
    "field, bad, what",
    [
        ("topk_token_ids", 999.7, "floats"),
        ("topk_token_ids", True, "booleans"),
        ("topk_token_ids", "7", "strings"),
        ("tokens", 3.0, "floats"),
        ("labels", False, "booleans"),
    ],
)
def test_nemo_ids_that_are_not_integers_are_refused(tmp_path, field, bad, what):
    ids, mask = SEQUENCES[0]
    rows = [nemo_example(ids, mask, pad_to=16, index=0) for _ in range(3)]
    if field == "topk_token_ids":
        rows[2][field][1][3] = bad
    else:
        rows[2][field][4] = bad
    source = tmp_path / "nemo.jsonl"
    write_jsonl(source, rows)
    out = run("convert", source, tmp_path / "c", "--vocab-size", str(VOCAB), "--no-progress")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "nemo.jsonl line 3" in out.stderr
    assert f"'{field}' holds {what}" in out.stderr


def test_a_binary_file_is_named(tmp_path):
    source = tmp_path / "data.jsonl"
    source.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(128, 256)))  # an image, misnamed
    for extra in (["--from", "nemo"], []):
        out = run("convert", source, tmp_path / "c", "--vocab-size", "10", *extra)
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert "data.jsonl line 1: not UTF-8 text" in out.stderr


@pytest.mark.parametrize("vocab", ["many", -5, 10**12, True])
def test_a_parquet_header_with_a_bad_vocab_size_is_named(tmp_path, vocab):
    table = pa.table({"input_ids": [[1, 2]], "loss_mask": [[False, True]]})
    header = {"format": "logitcache-parquet", "version": 1, "k": 1, "vocab_size": vocab}
    table = table.replace_schema_metadata({"logitcache": json.dumps(header)})
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    with pytest.raises(ValueError, match=r"bad\.parquet: the export header's vocab_size"):
        convert(str(path), str(tmp_path / "c"))
