"""The loss of a micro-batch whose records come from several sources, each with its own settings.

Each source's rows are scored by their own head (`kd.train.StepLoss` with that source's mode,
weights and temperature) in one pass of the student body; the step's loss is the mean over all
of its target tokens of each token's own loss,

    total = sum_s (kd_weight_s * KD_s + sft_weight_s * CE_s) / (target tokens of the step),

with KD_s and CE_s summed over source s's rows. A source supplying 20% of the tokens therefore
gets 20% of the step, whatever its settings, and one source reduces to the single-cache loss
exactly. `step_counts` gives the per-source counts the heads are normalised by (all-reduced
over ranks before any backward), and `SourceSums` the per-source metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch

from .losses import IGNORE_INDEX

# Per source: target tokens, teacher rows, records.
_PER_SOURCE = 3


def source_parts(batch: dict[str, Any], sources: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(source, the batch as that source's head sees it) for the sources with records here.

    A single-cache micro-batch is source 0's whole. In a mixture's micro-batch (see
    `kd.mixture.collate_mixture`) the other sources' tokens are masked out of the labels and
    the teacher rows are the source's own.
    """
    if "teacher_rows" not in batch:
        yield 0, batch
        return
    present = set(batch["record_source"].tolist())
    for s in range(sources):
        if s not in present:
            continue
        labels = batch["labels"].masked_fill(batch["token_source"] != s, IGNORE_INDEX)
        yield s, {**batch, **batch["teacher_rows"][s], "labels": labels}


def step_counts(micro_batches: Sequence[dict[str, Any]], sources: int) -> list[int]:
    """Counts of one optimizer step, to be summed over ranks: per source (targets, teacher rows,
    records), then tokens and token slots."""
    counts = [0] * (_PER_SOURCE * sources + 2)
    for batch in micro_batches:
        labels = batch["labels"] != IGNORE_INDEX
        if "teacher_rows" not in batch:
            per_source = [(labels, batch["kd_ids"], batch["segments"].shape[0])]
        else:
            owner = batch["record_source"]
            per_source = [
                (
                    labels & (batch["token_source"] == s),
                    batch["teacher_rows"][s]["kd_ids"],
                    int((owner == s).sum()),
                )
                for s in range(sources)
            ]
        for s, (targets, rows, records) in enumerate(per_source):
            counts[_PER_SOURCE * s] += int(targets.sum())
            counts[_PER_SOURCE * s + 1] += int(rows.shape[0])
            counts[_PER_SOURCE * s + 2] += int(records)
        counts[-2] += int(batch["num_tokens"])
        counts[-1] += int(batch["input_ids"].numel())
    return counts


class StepCounts(NamedTuple):
    targets: list[int]  # per source
    rows: list[int]  # teacher rows per source
    records: list[int]  # per source
    tokens: int
    slots: int

    @classmethod
    def from_list(cls, counts: Sequence[float], sources: int) -> StepCounts:
        c = [int(v) for v in counts]
        per = [c[_PER_SOURCE * s : _PER_SOURCE * (s + 1)] for s in range(sources)]
        return cls(
            targets=[p[0] for p in per],
            rows=[p[1] for p in per],
            records=[p[2] for p in per],
            tokens=c[-2],
            slots=c[-1],
        )

    @property
    def total_targets(self) -> int:
        return sum(self.targets)


class SourcesLossResult(NamedTuple):
    total: torch.Tensor  # what to backpropagate
    kd: list[float]  # per source: KD summed over its rows (0.0 where it had none)
    ce: list[float]  # per source: CE summed over its targets


class SourcesLoss:
    """Head function (see kd.student.StudentWithHead): each source's rows through its own head.

    `heads[s]` is None for a source with no records in the step.
    """

    def __init__(self, heads: Sequence[Callable | None]):
        self.heads = list(heads)

    def __call__(self, hidden, weight, bias, batch) -> SourcesLossResult:
        n = len(self.heads)
        kd, ce, totals = [0.0] * n, [0.0] * n, []
        for s, part in source_parts(batch, n):
            loss = self.heads[s](hidden, weight, bias, part)
            totals.append(loss.total)
            kd[s], ce[s] = float(loss.kd), float(loss.ce)
        total = totals[0] if len(totals) == 1 else torch.stack(totals).sum()
        return SourcesLossResult(total, kd, ce)


class SourceSums:
    """Per-source sums over the steps between two log lines, and their means when written.

    The means weigh every token alike: a source's KD over its teacher rows, CE over its
    targets, and its share of the records taken.
    """

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        n = len(names)
        self.kd, self.ce = [0.0] * n, [0.0] * n
        self.rows, self.targets, self.records = [0] * n, [0] * n, [0] * n

    def add(self, kd: Sequence[float], ce: Sequence[float], counts: StepCounts) -> None:
        for s in range(len(self.names)):
            self.kd[s] += kd[s]
            self.ce[s] += ce[s]
            self.rows[s] += counts.rows[s]
            self.targets[s] += counts.targets[s]
            self.records[s] += counts.records[s]

    def means(self, passes: Sequence[float] | None = None) -> dict[str, dict[str, Any]]:
        records = max(1, sum(self.records))
        out = {}
        for s, name in enumerate(self.names):
            out[name] = {
                "kd": self.kd[s] / self.rows[s] if self.rows[s] else None,
                "ce": self.ce[s] / self.targets[s] if self.targets[s] else None,
                "records": self.records[s],
                "share": self.records[s] / records,
                "targets": self.targets[s],
            }
            if passes is not None:
                out[name]["passes"] = passes[s]
        return out
