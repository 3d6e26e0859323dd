"""Import NeMo-Aligner knowledge-distillation data (compute_topk_logits.py JSON lines).

One example holds the SFT fields after NeMo's collate step plus the teacher's top-K logits;
docs/interop.md gives the exact position mapping onto logitcache's convention.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..format import POSITIONS_ALL, POSITIONS_MODES, POSITIONS_SUPERVISED
from . import int_matrix, int_vector, iter_rows, require_field, to_fp16_logprobs

IGNORE_INDEX = -100
NEMO_COLUMNS = [
    "tokens",
    "input_ids",
    "labels",
    "loss_mask",
    "topk_logits",
    "topk_token_ids",
    "log_sum_exp_logits",
    "index",
]


def _matrix(value, *, dtype, where: str, field: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=dtype)
    except (ValueError, TypeError):
        raise ValueError(
            f"{where}: field {field!r} must be a rectangular [positions][K] array "
            "(every row the same length)"
        ) from None
    if arr.ndim != 2:
        raise ValueError(
            f"{where}: field {field!r} must be 2-D [positions][K], got shape {arr.shape}"
        )
    return arr


def _vector(value, *, dtype, where: str, field: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=dtype)
    except (ValueError, TypeError):
        raise ValueError(f"{where}: field {field!r} must be a flat list of numbers") from None
    if arr.ndim != 1:
        raise ValueError(f"{where}: field {field!r} must be 1-D, got shape {arr.shape}")
    return arr


def nemo_example_to_record(
    example: dict, *, where: str, positions: str = POSITIONS_SUPERVISED
) -> dict | None:
    """Convert one NeMo-Aligner KD example to `CacheWriter.add` keyword arguments.

    NeMo row t is the teacher's distribution after reading tokens[0..t], i.e. for
    labels[t] = tokens[t + 1]; it becomes the row of logitcache position p = t + 1.
    logprob = topk_logit - log_sum_exp (both are max-shifted by NeMo; the shift cancels).
    Positions after the last supervised token are NeMo's batch padding and are dropped.
    Returns None for an example without any supervised token (it carries no teacher signal).
    """
    if positions not in POSITIONS_MODES:
        raise ValueError(f"positions={positions!r}: must be one of {POSITIONS_MODES}")
    tokens = int_vector(
        require_field(example, ("tokens", "input_ids"), where=where), where, "tokens"
    )
    n_rows = tokens.shape[0]
    labels = example.get("labels")
    if labels is not None:
        labels = int_vector(labels, where, "labels")
    if example.get("loss_mask") is not None:
        mask = _vector(example["loss_mask"], dtype=np.float64, where=where, field="loss_mask") != 0
    elif labels is not None:
        mask = labels != IGNORE_INDEX
    else:
        raise ValueError(f"{where}: needs 'loss_mask' or 'labels' to know which tokens are targets")
    logits = _matrix(example.get("topk_logits"), dtype=np.float64, where=where, field="topk_logits")
    ids = int_matrix(
        require_field(example, ("topk_token_ids",), where=where), where, "topk_token_ids"
    )
    lse = _vector(
        require_field(example, ("log_sum_exp_logits",), where=where),
        dtype=np.float64,
        where=where,
        field="log_sum_exp_logits",
    )
    lengths = {
        "tokens": n_rows,
        "loss_mask": mask.shape[0],
        "topk_logits": logits.shape[0],
        "topk_token_ids": ids.shape[0],
        "log_sum_exp_logits": lse.shape[0],
    }
    if labels is not None:
        lengths["labels"] = labels.shape[0]
    if len(set(lengths.values())) != 1:
        raise ValueError(
            f"{where}: per-position fields differ in length {lengths}; they must agree"
        )
    if logits.shape != ids.shape:
        raise ValueError(
            f"{where}: topk_logits {logits.shape} and topk_token_ids {ids.shape} differ in shape"
        )

    targets = np.flatnonzero(mask)
    if targets.size == 0:
        return None
    # The sequence is tokens[0] followed by the label of every row; it ends one token after the
    # last supervised row (what follows is padding added by NeMo's collate step).
    t_last = int(targets[-1])
    length = t_last + 2
    input_ids = np.empty(length, dtype=np.int64)
    input_ids[:-1] = tokens[: length - 1]
    # The label of a row is its target; tokens[t + 1] is padding after the last real row.
    if labels is not None and labels[t_last] != IGNORE_INDEX:
        input_ids[-1] = labels[t_last]
    elif t_last + 1 < n_rows:
        input_ids[-1] = tokens[t_last + 1]
    else:
        raise ValueError(
            f"{where}: the last row is supervised but its target token is unknown "
            "(no 'labels' value); keep the 'labels' field in the export"
        )
    if labels is not None:
        # NeMo's labels are its tokens shifted by one; anything else means another convention.
        lab = labels[: length - 1]
        known = lab != IGNORE_INDEX
        if not np.array_equal(lab[known], input_ids[1:][known]):
            bad = int(np.flatnonzero(known & (lab != input_ids[1:]))[0])
            raise ValueError(
                f"{where}: labels[{bad}] = {int(lab[bad])} but tokens[{bad + 1}] = "
                f"{int(input_ids[bad + 1])}; NeMo-Aligner data has labels[t] == tokens[t + 1]. "
                "If rows are not shifted this way, this is not NeMo-Aligner KD output"
            )

    loss_mask = np.zeros(length, dtype=bool)
    loss_mask[1:] = mask[: length - 1]
    rows = np.arange(length - 1) if positions == POSITIONS_ALL else targets
    logprobs = logits[rows] - lse[rows, None]
    if not np.all(np.isfinite(logprobs)):
        bad = int(rows[np.flatnonzero(~np.all(np.isfinite(logprobs), axis=1))[0]])
        raise ValueError(f"{where}: row {bad}: topk_logits or log_sum_exp_logits is not finite")
    sample_id = example.get("index")
    return {
        "input_ids": _as_int32(input_ids, where=where, field="tokens"),
        "loss_mask": loss_mask,
        "topk_ids": _as_int32(ids[rows], where=where, field="topk_token_ids"),
        "topk_logprobs": to_fp16_logprobs(logprobs),
        "sample_id": None if sample_id is None else str(sample_id),
    }


def _as_int32(arr: np.ndarray, *, where: str, field: str) -> np.ndarray:
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{where}: field {field!r} holds ids outside 0..2^31-1")
    return arr.astype(np.int32)


def iter_nemo_records(
    path: str,
    *,
    positions: str = POSITIONS_SUPERVISED,
    skipped: list | None = None,
    storage_options: dict | None = None,
) -> Iterator[tuple[str, dict]]:
    """Yield (location, `CacheWriter.add` kwargs) for every example of NeMo-Aligner KD data.

    The location ("FILE line N") lets callers name the example in later errors. Examples
    without a supervised token are left out; their locations are appended to `skipped`.
    """
    for where, row in iter_rows(path, columns=NEMO_COLUMNS, storage_options=storage_options):
        record = nemo_example_to_record(row, where=where, positions=positions)
        if record is None:
            if skipped is not None:
                skipped.append(where)
            continue
        yield where, record
