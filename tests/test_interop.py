"""Importers of NeMo-Aligner and axolotl KD data and the Parquet layout, at the library level.

The sources are produced here the way their tools produce them (NeMo's collate shift and
max-shifted top-K logits; axolotl's right-aligned, renormalised rows), from a small teacher whose
distribution peaks on the true next token, so an off-by-one in the mapping cannot go unseen.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from logitcache import Record
from logitcache.convert import truncate_topk
from logitcache.interop import FORMAT_AXOLOTL, FORMAT_NEMO, FORMAT_PARQUET, detect_format
from logitcache.interop.axolotl import axolotl_example_to_record, iter_axolotl_records
from logitcache.interop.nemo import iter_nemo_records, nemo_example_to_record
from logitcache.interop.parquet import (
    export_header,
    iter_parquet_records,
    read_export_header,
    write_parquet,
)

VOCAB = 64
K = 8
EOS = 1


def teacher_log_softmax(prefix: np.ndarray, next_token: int) -> np.ndarray:
    """Full-vocabulary log-softmax of a toy teacher after `prefix`, peaked on `next_token`."""
    rng = np.random.default_rng([len(prefix), int(prefix[-1])])
    logits = rng.normal(0.0, 1.0, VOCAB)
    logits[next_token] += 6.0
    logits -= logits.max()
    return logits - np.log(np.exp(logits).sum())


def make_sequence(seed: int, length: int, prompt: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, VOCAB, size=length)
    mask = np.zeros(length, dtype=bool)
    mask[prompt:] = True
    return ids, mask


def nemo_example(ids: np.ndarray, mask: np.ndarray, *, pad_to: int, index: int) -> dict:
    """One line of compute_topk_logits.py output for the full sequence `ids` (with EOS)."""
    tokens = list(ids[:-1]) + [EOS] * (pad_to - (len(ids) - 1))
    labels = list(ids[1:]) + [EOS] * (pad_to - (len(ids) - 1))
    loss_mask = [int(m) for m in mask[1:]] + [0] * (pad_to - (len(ids) - 1))
    topk_logits, topk_ids, lse = [], [], []
    for t in range(pad_to):
        nxt = labels[t]
        logits = teacher_log_softmax(np.asarray(tokens[: t + 1]), nxt) + 3.0  # raw logits
        shifted = logits - logits.max()  # NeMo subtracts the max before everything else
        order = np.argsort(-shifted, kind="stable")[:K]
        topk_logits.append(shifted[order].tolist())
        topk_ids.append(order.tolist())
        lse.append(float(np.log(np.exp(shifted).sum())))
    return {
        "tokens": [int(x) for x in tokens],
        "labels": [int(x) for x in labels],
        "loss_mask": loss_mask,
        "topk_logits": topk_logits,
        "topk_token_ids": topk_ids,
        "log_sum_exp_logits": lse,
        "index": index,
    }


def axolotl_example(ids: np.ndarray, mask: np.ndarray, *, sample_id: str) -> dict:
    """One row as axolotl's ChatTemplateStrategyWithKD.transform_logprobs leaves it."""
    t = len(ids)
    labels = [int(x) if m else -100 for x, m in zip(ids, mask, strict=True)]
    # vLLM prompt logprobs: position p >= 1 holds the distribution of token p; the first
    # (null) one is pruned, so there are T - 1 rows and axolotl pads one row in front.
    target_ids = [list(range(K))]
    target_lps = [[-float("inf")] * K]
    target_mask = [[0] * K]
    for p in range(1, t):
        lp = teacher_log_softmax(ids[:p], int(ids[p]))
        order = np.argsort(-lp, kind="stable")[:K]
        probs = np.exp(lp[order])
        target_ids.append(order.tolist())
        target_lps.append(np.log(probs / probs.sum()).tolist())  # axolotl renormalises over k
        target_mask.append([1 if labels[p] != -100 else 0] * K)
    return {
        "input_ids": [int(x) for x in ids],
        "labels": labels,
        "target_token_ids": target_ids,
        "target_logprobs": target_lps,
        "target_mask": target_mask,
        "sample_id": sample_id,
    }


def write_jsonl(path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


# -- NeMo-Aligner -------------------------------------------------------------------------


def test_nemo_rows_land_on_the_positions_they_predict():
    ids, mask = make_sequence(0, 20, prompt=7)
    rec = nemo_example_to_record(nemo_example(ids, mask, pad_to=32, index=5), where="ex")
    np.testing.assert_array_equal(rec["input_ids"], ids)  # padding dropped, EOS-free tail kept
    np.testing.assert_array_equal(rec["loss_mask"], mask)
    assert rec["sample_id"] == "5"
    positions = np.flatnonzero(mask)
    assert rec["topk_ids"].shape == (positions.size, K)
    # The teacher peaks on the true token, so each row's best id is the token at its position.
    np.testing.assert_array_equal(rec["topk_ids"][:, 0], ids[positions])
    for j, p in enumerate(positions):
        expected = teacher_log_softmax(ids[:p], int(ids[p]))[rec["topk_ids"][j]]
        np.testing.assert_array_equal(rec["topk_logprobs"][j], expected.astype(np.float16))


def test_nemo_all_positions_and_unpadded_input():
    ids, mask = make_sequence(1, 12, prompt=4)
    example = nemo_example(ids, mask, pad_to=11, index=0)  # no padding at all
    rec = nemo_example_to_record(example, where="ex", positions="all")
    np.testing.assert_array_equal(rec["input_ids"], ids)
    assert rec["topk_ids"].shape == (len(ids) - 1, K)
    np.testing.assert_array_equal(rec["topk_ids"][:, 0], ids[1:])


def test_nemo_example_without_targets_is_skipped(tmp_path):
    ids, mask = make_sequence(2, 10, prompt=3)
    rows = [
        nemo_example(ids, mask, pad_to=16, index=0),
        nemo_example(ids, mask, pad_to=16, index=1),
    ]
    rows[1]["loss_mask"] = [0] * 16
    path = tmp_path / "kd.jsonl"
    write_jsonl(path, rows)
    skipped: list[str] = []
    records = list(iter_nemo_records(str(path), skipped=skipped))
    assert [r["sample_id"] for _, r in records] == ["0"]
    assert skipped == [f"{path} line 2"]
    assert detect_format(str(path)) == FORMAT_NEMO


def test_nemo_unshifted_labels_are_refused():
    ids, mask = make_sequence(3, 10, prompt=3)
    example = nemo_example(ids, mask, pad_to=12, index=0)
    example["labels"] = example["tokens"]  # labels not shifted: another convention
    with pytest.raises(ValueError, match=r"labels\[0\].*tokens\[1\]"):
        nemo_example_to_record(example, where="kd.jsonl example 0")


def test_nemo_ragged_or_misaligned_fields_name_the_example():
    ids, mask = make_sequence(4, 10, prompt=3)
    example = nemo_example(ids, mask, pad_to=12, index=0)
    example["topk_logits"][3] = example["topk_logits"][3][:-1]
    with pytest.raises(
        ValueError, match="kd.jsonl example 9: field 'topk_logits' must be a rectangular"
    ):
        nemo_example_to_record(example, where="kd.jsonl example 9")
    example = nemo_example(ids, mask, pad_to=12, index=0)
    example["log_sum_exp_logits"] = example["log_sum_exp_logits"][:-1]
    with pytest.raises(ValueError, match="differ in length"):
        nemo_example_to_record(example, where="ex")
    del example["log_sum_exp_logits"]
    with pytest.raises(ValueError, match="missing field 'log_sum_exp_logits'"):
        nemo_example_to_record(example, where="ex")


# -- axolotl ------------------------------------------------------------------------------


def test_axolotl_rows_are_unshifted_and_padding_row_dropped():
    ids, mask = make_sequence(5, 18, prompt=6)
    rec = axolotl_example_to_record(axolotl_example(ids, mask, sample_id="a"), where="ex")
    np.testing.assert_array_equal(rec["input_ids"], ids)
    np.testing.assert_array_equal(rec["loss_mask"], mask)
    positions = np.flatnonzero(mask)
    np.testing.assert_array_equal(rec["topk_ids"][:, 0], ids[positions])
    for j, p in enumerate(positions):
        lp = teacher_log_softmax(ids[:p], int(ids[p]))[rec["topk_ids"][j]]
        renorm = np.log(np.exp(lp) / np.exp(lp).sum())
        np.testing.assert_array_equal(rec["topk_logprobs"][j], renorm.astype(np.float16))
    assert rec["sample_id"] == "a"


def test_axolotl_first_label_is_never_a_target_and_k_truncates_by_value():
    ids, mask = make_sequence(6, 10, prompt=0)  # labels[0] is not -100 (HF convention)
    example = axolotl_example(ids, mask, sample_id="b")
    rec = axolotl_example_to_record(example, where="ex", k=3)
    assert not rec["loss_mask"][0] and rec["loss_mask"][1:].all()
    assert rec["topk_ids"].shape == (len(ids) - 1, 3)
    full = axolotl_example_to_record(example, where="ex")
    expect_ids, expect_lps = truncate_topk(full["topk_ids"], full["topk_logprobs"], 3)
    np.testing.assert_array_equal(rec["topk_ids"], expect_ids)
    np.testing.assert_array_equal(rec["topk_logprobs"], expect_lps)


def test_axolotl_ragged_rows_ask_for_k(tmp_path):
    ids, mask = make_sequence(7, 10, prompt=2)
    example = axolotl_example(ids, mask, sample_id="c")
    example["target_token_ids"][5] = example["target_token_ids"][5][:-2]
    example["target_logprobs"][5] = example["target_logprobs"][5][:-2]
    example["target_mask"][5] = example["target_mask"][5][:-2]
    path = tmp_path / "ax.jsonl"
    write_jsonl(path, [example])
    with pytest.raises(ValueError, match=r"line 1 position 5: 6 teacher entries.*--k"):
        list(iter_axolotl_records(str(path)))
    ((_, rec),) = list(iter_axolotl_records(str(path), k=6))
    assert rec["topk_ids"].shape[1] == 6


def test_axolotl_from_parquet_and_shifted_labels_refused(tmp_path):
    rows = [
        axolotl_example(*make_sequence(s, 9 + s, prompt=3), sample_id=f"s{s}") for s in range(3)
    ]
    for row in rows:  # Parquet cannot hold -inf padding rows from JSON; use a large negative
        row["target_logprobs"][0] = [-1e9] * K
    path = tmp_path / "ax.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert detect_format(str(path)) == FORMAT_AXOLOTL
    got = list(iter_axolotl_records(str(path)))
    assert [r["sample_id"] for _, r in got] == ["s0", "s1", "s2"]
    bad = dict(rows[0])
    bad["labels"] = bad["labels"][1:] + [-100]  # labels shifted left: not axolotl's layout
    with pytest.raises(ValueError, match="unshifted labels"):
        axolotl_example_to_record(bad, where="ex")


# -- Parquet ------------------------------------------------------------------------------


def _records(n: int, k: int = K, seed: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = int(rng.integers(2, 30))
        mask = rng.random(t) < 0.6
        mask[0] = False
        n_rows = int(mask.sum())
        lps = -np.sort(rng.exponential(2.0, size=(n_rows, k)), axis=1) - 0.01
        out.append(
            Record(
                input_ids=rng.integers(0, VOCAB, t).astype(np.int32),
                loss_mask=mask,
                topk_ids=rng.integers(0, VOCAB, (n_rows, k)).astype(np.int32),
                topk_logprobs=lps.astype(np.float16),
                sample_id=None if i % 3 == 0 else f"id-{i}",
            )
        )
    return out


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_parquet_round_trip_is_exact(tmp_path, dtype):
    records = _records(37)
    header = export_header(k=K, vocab_size=VOCAB, positions="supervised", teacher={"name": "t"})
    path = str(tmp_path / "x.parquet")
    assert (
        write_parquet(iter(records), path, header=header, logprob_dtype=dtype, records_per_group=10)
        == 37
    )
    assert read_export_header(path)["teacher"] == {"name": "t"}
    assert detect_format(path) == FORMAT_PARQUET
    back = list(iter_parquet_records(path))
    assert len(back) == 37
    for (where, got), want in zip(back, records, strict=True):
        assert where.startswith(path)
        for name in ("input_ids", "loss_mask", "topk_ids", "topk_logprobs"):
            np.testing.assert_array_equal(got[name], getattr(want, name))
            assert got[name].dtype == getattr(want, name).dtype
        assert got["sample_id"] == want.sample_id
    table = pq.read_table(path)  # any Arrow reader sees plain list columns
    assert table.schema.field("topk_ids").type == pa.list_(pa.list_(pa.int32()))
    assert table.num_rows == 37 and pq.ParquetFile(path).num_row_groups == 4


def test_parquet_with_wrong_row_width_names_the_row_group(tmp_path):
    records = _records(3)
    table = pa.table(
        {
            "input_ids": [r.input_ids.tolist() for r in records],
            "loss_mask": [r.loss_mask.tolist() for r in records],
            "topk_ids": [r.topk_ids[:, : K - (i == 2)].tolist() for i, r in enumerate(records)],
            "topk_logprobs": [r.topk_logprobs.astype(np.float32).tolist() for r in records],
        }
    )
    path = str(tmp_path / "plain.parquet")
    pq.write_table(table, path)
    assert read_export_header(path) is None
    with pytest.raises(ValueError, match=r"row group 0 .*'topk_ids' row \d+ .* expected K = 8"):
        list(iter_parquet_records(path))
