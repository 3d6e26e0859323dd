"""Micro-batch layouts: padded rows (one record per row) or packed rows (several records per row).

A packed row holds whole records one after another; position ids restart at 0 for each record,
and transformers turns restarting position ids (with no attention mask and no KV cache) into a
block-diagonal causal mask, so a record attends only to itself: its losses are those it has in
a padded batch, with fewer pad tokens computed. `check_packing_support` verifies this on the
model at hand before a packed run starts, since a model whose attention ignores it would
silently train on records that see each other.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from logitcache.format import Record
from logitcache.loader import IGNORE_INDEX, collate_kd


def collate_micro_batch(
    records: Sequence[Record],
    *,
    positions: str,
    teacher: bool = True,
    packing: bool = False,
    pack_length: int = 0,
    pad_token_id: int = 0,
) -> dict[str, torch.Tensor]:
    """One micro-batch for the student: padded (collate_kd's layout) or packed.

    Keys: input_ids, labels [R, W] (long); attention_mask [R, W] when padded, position_ids
    [R, W] when packed; kd_ids [M, K] (int32), kd_logprobs [M, K] (fp16), kd_index [M] (flat
    index into [R, W]); segments [B, 3] (row, start, length of each record, in input order).
    With ``teacher=False`` (SFT only) the teacher columns are not copied: M is 0.
    """
    if teacher:
        batch = collate_kd(records, positions=positions, pad_token_id=pad_token_id)
    else:
        batch = _collate_tokens(records, pad_token_id)
    lengths = [r.num_tokens for r in records]
    if not packing:
        batch["segments"] = torch.tensor(
            [[b, 0, n] for b, n in enumerate(lengths)], dtype=torch.long
        ).reshape(-1, 3)
        return batch
    return _pack(batch, lengths, pack_length, pad_token_id)


def _collate_tokens(records: Sequence[Record], pad_token_id: int) -> dict[str, torch.Tensor]:
    """collate_kd's token tensors alone: the SFT baseline never touches the teacher rows."""
    width = max(r.num_tokens for r in records)
    input_ids = np.full((len(records), width), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(records), width), dtype=np.int64)
    labels = np.full((len(records), width), IGNORE_INDEX, dtype=np.int64)
    for b, r in enumerate(records):
        t = r.num_tokens
        input_ids[b, :t] = r.input_ids
        attention_mask[b, :t] = 1
        labels[b, :t] = np.where(r.loss_mask, r.input_ids, IGNORE_INDEX)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "labels": torch.from_numpy(labels),
        "kd_ids": torch.zeros((0, 1), dtype=torch.int32),
        "kd_logprobs": torch.zeros((0, 1), dtype=torch.float16),
        "kd_index": torch.zeros(0, dtype=torch.long),
    }


def pack_rows(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """First-fit decreasing: record indices per row, each row's lengths summing to <= row_length
    (a record longer than row_length gets a row of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        for r, space in enumerate(free):
            if n <= space:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(max(0, row_length - n))
    return rows


def _pack(
    padded: dict[str, torch.Tensor], lengths: list[int], pack_length: int, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Move each record of a padded batch into a packed row, remapping the teacher rows."""
    longest = max(lengths)
    row_length = max(pack_length, longest) if pack_length else longest
    rows = pack_rows(lengths, row_length)
    width = max(sum(lengths[i] for i in row) for row in rows)
    n_rows, padded_width = len(rows), padded["input_ids"].shape[1]
    input_ids = torch.full((n_rows, width), pad_token_id, dtype=torch.long)
    labels = torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    segments = torch.zeros((len(lengths), 3), dtype=torch.long)
    # flat position b * padded_width + p of the padded batch -> its flat position when packed
    new_flat = torch.full((len(lengths) * padded_width,), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for b in row:
            n = lengths[b]
            input_ids[r, start : start + n] = padded["input_ids"][b, :n]
            labels[r, start : start + n] = padded["labels"][b, :n]
            position_ids[r, start : start + n] = torch.arange(n)
            new_flat[b * padded_width : b * padded_width + n] = torch.arange(
                r * width + start, r * width + start + n
            )
            segments[b] = torch.tensor([r, start, n])
            start += n
        # The row's padding is a sequence of its own (positions restart), so no record sees it.
        position_ids[r, start:] = torch.arange(width - start)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "kd_ids": padded["kd_ids"],
        "kd_logprobs": padded["kd_logprobs"],
        "kd_index": new_flat[padded["kd_index"]],
        "segments": segments,
    }


def padding_fraction(batch: dict[str, torch.Tensor], lengths: Sequence[int]) -> float:
    """Share of the batch's token slots that hold padding."""
    slots = batch["input_ids"].numel()
    return 1.0 - sum(lengths) / max(1, slots)


@torch.no_grad()
def check_packing_support(model, *, vocab_rows: int, tolerance: float = 1e-3) -> None:
    """Raise ValueError unless `model` keeps packed records apart (same outputs as unpacked).

    Two short random records are run separately and packed into one row; the packed run must
    reproduce both records' hidden states. Costs three forwards over a few tokens.
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, vocab_rows, (1, 6), generator=gen)
    b = torch.randint(0, vocab_rows, (1, 5), generator=gen)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        body = model.base_model
        alone = [
            body(input_ids=x.to(device), use_cache=False).last_hidden_state[0].float()
            for x in (a, b)
        ]
        packed_ids = torch.cat([a, b], dim=1).to(device)
        positions = torch.cat([torch.arange(6), torch.arange(5)])[None].to(device)
        packed = body(input_ids=packed_ids, position_ids=positions, use_cache=False)
        packed = packed.last_hidden_state[0].float()
    finally:
        model.train(was_training)
    diff = max(
        float((packed[:6] - alone[0]).abs().max()), float((packed[6:] - alone[1]).abs().max())
    )
    scale = max(1.0, float(alone[1].abs().max()))
    if not diff <= tolerance * scale:
        raise ValueError(
            f"packing: {type(model).__name__} with attention {model.config._attn_implementation!r} "
            f"does not keep packed records apart (hidden states differ by {diff:.3g} from "
            "unpacked); set packing=false, or use an attention implementation that reads "
            "restarting position ids (sdpa, eager, flash_attention_2)"
        )
