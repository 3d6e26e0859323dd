"""collate_kd on hand-made records: padding, labels, and where every teacher row lands."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from logitcache.format import Record
from logitcache.loader import IGNORE_INDEX, collate_kd

K = 3


def _record(ids: list[int], mask: list[bool], positions: str, seed: int) -> Record:
    rng = np.random.default_rng(seed)
    mask_arr = np.array(mask, dtype=bool)
    n = int(mask_arr.sum()) if positions == "supervised" else len(ids) - 1
    lp = -np.sort(rng.uniform(0.1, 5.0, (n, K)), axis=1).astype(np.float16)
    topk = rng.integers(0, 100, (n, K)).astype(np.int32)
    return Record(np.array(ids, dtype=np.int32), mask_arr, topk, lp, f"s{seed}")


@pytest.fixture
def supervised() -> list[Record]:
    return [
        _record([5, 6, 7, 8, 9], [False, False, True, True, True], "supervised", 0),
        _record([1, 2], [False, True], "supervised", 1),
        _record([3, 4, 5, 6], [False, True, False, True], "supervised", 2),
    ]


def test_supervised_batch(supervised):
    out = collate_kd(supervised)
    B, L = 3, 5
    assert out["input_ids"].shape == (B, L) and out["input_ids"].dtype == torch.long
    assert out["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]
    assert out["labels"].tolist() == [
        [-100, -100, 7, 8, 9],
        [-100, 2, -100, -100, -100],
        [-100, 4, -100, 6, -100],
    ]
    assert out["kd_ids"].dtype == torch.int32 and out["kd_logprobs"].dtype == torch.float16
    assert out["kd_index"].tolist() == [2, 3, 4, L + 1, 2 * L + 1, 2 * L + 3]
    assert torch.equal(
        out["kd_ids"], torch.from_numpy(np.concatenate([r.topk_ids for r in supervised]))
    )
    assert torch.equal(
        out["kd_logprobs"], torch.from_numpy(np.concatenate([r.topk_logprobs for r in supervised]))
    )
    labels = out["labels"].flatten()
    assert (labels[out["kd_index"]] != IGNORE_INDEX).all()
    assert int((labels != IGNORE_INDEX).sum()) == out["kd_index"].numel()


def test_all_positions_keep_only_target_rows():
    rec = _record([3, 4, 5, 6], [False, True, False, True], "all", 7)
    assert rec.num_targets == 3  # rows for positions 1, 2, 3
    out = collate_kd([rec])
    assert out["kd_index"].tolist() == [1, 3]
    assert torch.equal(out["kd_ids"], torch.from_numpy(rec.topk_ids[[0, 2]]))
    assert torch.equal(out["kd_logprobs"], torch.from_numpy(rec.topk_logprobs[[0, 2]]))
    assert torch.equal(collate_kd([rec], positions="all")["kd_index"], out["kd_index"])


def test_full_mask_is_the_same_in_both_modes():
    rec = _record([3, 4, 5], [False, True, True], "all", 3)
    a = collate_kd([rec], positions="all")
    b = collate_kd([rec], positions="supervised")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pad_to_multiple_and_pad_token(supervised):
    out = collate_kd(supervised, pad_to_multiple_of=8, pad_token_id=-1)
    assert out["input_ids"].shape == (3, 8)
    assert out["input_ids"][1].tolist() == [1, 2] + [-1] * 6
    assert out["kd_index"].tolist() == [2, 3, 4, 9, 17, 19], "flat indices use the padded width"
    assert (out["labels"][:, 5:] == IGNORE_INDEX).all()


def test_bad_batches_name_the_record(supervised):
    odd = Record(
        np.array([1, 2, 3], np.int32),
        np.array([False, True, True]),
        np.zeros((2, K + 1), np.int32),
        np.zeros((2, K + 1), np.float16),
        "wide",
    )
    with pytest.raises(ValueError, match=r"record 3 \('wide'\): K=4, batch has 3"):
        collate_kd([*supervised, odd])
    wrong = Record(
        np.array([1, 2, 3, 4], np.int32),
        np.array([False, True, False, False]),
        np.zeros((2, K), np.int32),
        np.zeros((2, K), np.float16),
        "rows",
    )
    with pytest.raises(ValueError, match=r"record 0 \('rows'\): 2 teacher rows fit neither"):
        collate_kd([wrong])
    with pytest.raises(ValueError, match="at least one record"):
        collate_kd([])


def test_pin_memory(supervised):
    if torch.cuda.is_available():
        out = collate_kd(supervised, pin_memory=True)
        assert all(t.is_pinned() for t in out.values())
    else:
        with pytest.warns(UserWarning, match="no CUDA device"):
            out = collate_kd(supervised, pin_memory=True)
        assert not any(t.is_pinned() for t in out.values())
