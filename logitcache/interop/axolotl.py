"""Import axolotl-style knowledge-distillation datasets (input_ids, labels, target_* fields).

axolotl data comes in two row layouts (LAYOUTS); the importer is told which, and convert checks
from the data that the rows fit it. docs/interop.md gives the exact position mappings.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..format import POSITIONS_ALL, POSITIONS_MODES, POSITIONS_SUPERVISED
from . import int_vector, iter_rows, require_field, to_fp16_logprobs

IGNORE_INDEX = -100
# "token": row p is the distribution of token p, rows right-aligned to input_ids (axolotl's
# dataset transform pads rows in front; its first KD trainer compared logits[:, :-1] with
# rows[:, 1:]). "next-token": row t is the distribution of token t + 1, left-aligned (axolotl's
# online-teacher collator; its fused Liger KD loss since v0.11 pairs logits t with row t).
LAYOUT_TOKEN = "token"
LAYOUT_NEXT_TOKEN = "next-token"
LAYOUTS = (LAYOUT_TOKEN, LAYOUT_NEXT_TOKEN)
AXOLOTL_COLUMNS = [
    "input_ids",
    "labels",
    "target_token_ids",
    "target_logprobs",
    "target_mask",
    "sample_id",
    "id",
]


def _row_entries(
    ids_row, logprobs_row, mask_row, *, where: str, position: int
) -> tuple[np.ndarray, np.ndarray]:
    ids = int_vector(ids_row, f"{where} position {position}", "target_token_ids")
    lps = np.asarray(logprobs_row, dtype=np.float64).reshape(-1)
    if ids.shape != lps.shape:
        raise ValueError(
            f"{where} position {position}: target_token_ids has {ids.size} entries but "
            f"target_logprobs has {lps.size}"
        )
    if mask_row is not None:
        keep = np.asarray(mask_row).reshape(-1)
        if keep.shape == ids.shape:
            ids, lps = ids[keep != 0], lps[keep != 0]
    return ids, lps


def axolotl_example_to_record(
    example: dict,
    *,
    where: str,
    k: int | None = None,
    positions: str = POSITIONS_SUPERVISED,
    layout: str = LAYOUT_TOKEN,
) -> dict | None:
    """Convert one axolotl KD example to `CacheWriter.add` keyword arguments.

    With T tokens and R teacher rows (R <= T): in layout "token", row j belongs to token
    position p = j + T - R (rows right-aligned, row p the distribution of token p: logitcache's
    convention); in layout "next-token", row t belongs to p = t + 1 (row t the distribution of
    token t + 1; a row for p = T is dropped). Targets are positions p >= 1 that have a row, with
    labels[p] != -100 (and a non-zero target_mask row when given). Entries whose target_mask is
    0 are padding and are dropped. With `k`, every row keeps its top k by value. Returns None
    for an example without a target.
    """
    if positions not in POSITIONS_MODES:
        raise ValueError(f"positions={positions!r}: must be one of {POSITIONS_MODES}")
    if layout not in LAYOUTS:
        raise ValueError(f"--layout {layout!r}: choose one of {LAYOUTS}")
    input_ids = int_vector(require_field(example, ("input_ids",), where=where), where, "input_ids")
    labels = int_vector(require_field(example, ("labels",), where=where), where, "labels")
    target_ids = require_field(example, ("target_token_ids",), where=where)
    target_logprobs = require_field(example, ("target_logprobs",), where=where)
    target_mask = example.get("target_mask")
    n_tokens = input_ids.shape[0]
    if input_ids.ndim != 1 or labels.shape != input_ids.shape:
        raise ValueError(
            f"{where}: input_ids and labels must be flat lists of the same length "
            f"(got {input_ids.shape} and {labels.shape})"
        )
    n_rows = len(target_ids)
    if len(target_logprobs) != n_rows or (target_mask is not None and len(target_mask) != n_rows):
        raise ValueError(
            f"{where}: target_token_ids, target_logprobs and target_mask must have one row "
            "per position each"
        )
    if n_rows > n_tokens:
        raise ValueError(
            f"{where}: {n_rows} teacher rows for {n_tokens} tokens; rows must not outnumber tokens"
        )
    offset = n_tokens - n_rows if layout == LAYOUT_TOKEN else 1
    supervised = labels != IGNORE_INDEX
    wrong = supervised & (labels != input_ids)
    if wrong.any():
        p = int(np.flatnonzero(wrong)[0])
        raise ValueError(
            f"{where}: labels[{p}] = {int(labels[p])} but input_ids[{p}] = {int(input_ids[p])}; "
            "axolotl datasets carry unshifted labels (a copy of input_ids with -100 where not "
            "trained)"
        )
    mask = supervised.copy()
    mask[: max(1, offset)] = False
    mask[offset + n_rows :] = False  # positions without a row
    if target_mask is not None:
        for p in np.flatnonzero(mask):
            if not np.any(np.asarray(target_mask[p - offset]) != 0):
                mask[p] = False
    if not mask.any():
        return None

    if positions == POSITIONS_ALL:
        if offset > 1 or offset + n_rows < n_tokens:
            raise ValueError(
                f"{where}: positions 'all' needs a teacher row for every position 1..T-1, but "
                f"{n_rows} rows in layout {layout!r} do not cover them; import with positions "
                "'supervised'"
            )
        rows = np.arange(1, n_tokens)
    else:
        rows = np.flatnonzero(mask)
    ids_out, lps_out = [], []
    width = k
    for p in rows:
        j = int(p) - offset
        row_mask = None if target_mask is None else target_mask[j]
        ids, lps = _row_entries(
            target_ids[j], target_logprobs[j], row_mask, where=where, position=int(p)
        )
        if width is None:
            width = ids.size
        if ids.size < width or (k is None and ids.size != width):
            raise ValueError(
                f"{where} position {int(p)}: {ids.size} teacher entries where other rows have "
                f"{width}; pass --k with the smallest row length to keep the top k of every row"
            )
        if ids.size > width:
            top = np.argsort(-lps, kind="stable")[:width]
            ids, lps = ids[top], lps[top]
        if not np.all(np.isfinite(lps)):
            raise ValueError(
                f"{where} position {int(p)}: target_logprobs is not finite at a target position"
            )
        ids_out.append(ids)
        lps_out.append(lps)
    if width == 0:
        raise ValueError(f"{where}: teacher rows are empty (k = 0)")
    topk_ids = np.stack(ids_out) if ids_out else np.zeros((0, width), np.int64)
    topk_lps = np.stack(lps_out) if lps_out else np.zeros((0, width))
    if topk_ids.size and (topk_ids.min() < 0 or topk_ids.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{where}: target_token_ids holds ids outside 0..2^31-1")
    sample_id = example.get("sample_id", example.get("id"))
    return {
        "input_ids": input_ids.astype(np.int32),
        "loss_mask": mask,
        "topk_ids": topk_ids.astype(np.int32),
        "topk_logprobs": to_fp16_logprobs(topk_lps),
        "sample_id": None if sample_id is None else str(sample_id),
    }


def iter_axolotl_records(
    path: str,
    *,
    k: int | None = None,
    positions: str = POSITIONS_SUPERVISED,
    skipped: list | None = None,
    layout: str = LAYOUT_TOKEN,
    storage_options: dict | None = None,
) -> Iterator[tuple[str, dict]]:
    """Yield (location, `CacheWriter.add` kwargs) for every example of an axolotl KD dataset.

    Rows are placed by `layout` (LAYOUTS). Without `k`, K is taken from the first target row
    and every row must have K entries.
    Examples without a target are left out and their locations appended to `skipped`.
    """
    first_k = None
    for where, row in iter_rows(path, columns=AXOLOTL_COLUMNS, storage_options=storage_options):
        record = axolotl_example_to_record(
            row, where=where, k=k, positions=positions, layout=layout
        )
        if record is None:
            if skipped is not None:
                skipped.append(where)
            continue
        width = record["topk_ids"].shape[1]
        if first_k is None:
            first_k = width
        elif width != first_k:
            raise ValueError(
                f"{where}: rows have {width} teacher entries but earlier examples have "
                f"{first_k}; pass --k with the smallest row length to keep the top k of every row"
            )
        yield where, record
