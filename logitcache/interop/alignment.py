"""Check from the data itself that imported teacher rows sit on the tokens they describe.

Tools disagree on whether row t describes token t or token t + 1, and data read in the wrong
layout imports one position off with no other symptom. A teacher ranks the token that really
follows highly, so under the right alignment the actual token is usually its top-1 and almost
always inside its top-K, while one position off it rarely is. The check counts both under the
claimed alignment and its two neighbours and refuses when a neighbour fits clearly better.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..format import POSITIONS_ALL

# Rows compared before the verdict (more are not needed to tell 90% from 10%), and the fewest
# rows a verdict is drawn from.
SAMPLE_ROWS = 4096
MIN_ROWS = 32
# A neighbour "fits clearly better" when its in-top-K rate beats the claimed one by this much
# in absolute terms and by this factor.
MARGIN = 0.2
FACTOR = 1.5
SHIFTS = (-1, 0, 1)


class AlignmentEvidence:
    """How often the actual token is the row's top-1 / inside its top-K, per shift."""

    def __init__(self, positions: str):
        self.positions = positions
        self.rows = dict.fromkeys(SHIFTS, 0)
        self.top1 = dict.fromkeys(SHIFTS, 0)
        self.topk = dict.fromkeys(SHIFTS, 0)

    @property
    def compared(self) -> int:
        return self.rows[0]

    def add(self, record: dict) -> None:
        ids = np.asarray(record["input_ids"])
        rows = np.asarray(record["topk_ids"])
        if rows.shape[0] == 0:
            return
        if self.positions == POSITIONS_ALL:
            where = np.arange(1, ids.shape[0])
        else:
            where = np.flatnonzero(np.asarray(record["loss_mask"]))
        best = np.asarray(record["topk_logprobs"], dtype=np.float32).argmax(axis=1)
        top1 = rows[np.arange(rows.shape[0]), best]
        for shift in SHIFTS:
            q = where + shift
            ok = (q >= 0) & (q < ids.shape[0])
            actual = ids[q[ok]]
            self.rows[shift] += int(ok.sum())
            self.top1[shift] += int((top1[ok] == actual).sum())
            self.topk[shift] += int((rows[ok] == actual[:, None]).any(axis=1).sum())

    def rate(self, counts: dict[int, int], shift: int) -> float:
        return counts[shift] / self.rows[shift] if self.rows[shift] else 0.0

    def better_neighbour(self) -> int | None:
        """The shift that fits clearly better than the claimed alignment, if any."""
        if self.compared < MIN_ROWS:
            return None
        claimed = self.rate(self.topk, 0)
        best = max((s for s in SHIFTS if s), key=lambda s: self.rate(self.topk, s))
        other = self.rate(self.topk, best)
        if self.rows[best] >= MIN_ROWS and other >= claimed + MARGIN and other >= FACTOR * claimed:
            return best
        return None

    def describe(self, shift: int) -> str:
        return (
            f"top-1 {100 * self.rate(self.top1, shift):.1f}%, "
            f"top-K {100 * self.rate(self.topk, shift):.1f}%"
        )


def checked_alignment(
    records: Iterator[tuple[str, dict]],
    *,
    source: str,
    claimed: str,
    positions: str,
    hints: dict[int, str],
) -> Iterator[tuple[str, dict]]:
    """Pass `records` through, refusing with the evidence when the rows fit a neighbouring
    alignment clearly better than the claimed one. The verdict comes after SAMPLE_ROWS rows
    (before much is written) or at the end of a smaller source, before anything is committed.
    """
    evidence = AlignmentEvidence(positions)
    judged = False
    for where, record in records:
        if not judged:
            evidence.add(record)
            if evidence.compared >= SAMPLE_ROWS:
                _judge(evidence, source, claimed, hints)
                judged = True
        yield where, record
    if not judged:
        _judge(evidence, source, claimed, hints)


def _judge(evidence: AlignmentEvidence, source: str, claimed: str, hints: dict[int, str]) -> None:
    shift = evidence.better_neighbour()
    if shift is None:
        return
    direction = "one position later" if shift > 0 else "one position earlier"
    fix = hints.get(shift)
    advice = (
        f"import with {fix}"
        if fix
        else "the rows are not laid out as this format says: check how they were produced"
    )
    raise ValueError(
        f"{source}: the teacher rows do not line up with the tokens under {claimed}. Over "
        f"{evidence.compared} rows the actual token is the teacher's {evidence.describe(0)}; "
        f"with every row {direction} it would be {evidence.describe(shift)} (the other side: "
        f"{evidence.describe(-shift)}). Imported as they are, the student would learn each "
        f"token's neighbour; {advice}"
    )
