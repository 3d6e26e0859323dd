"""Which layers, heads, neurons and channels a target shape keeps, chosen by importance.

Kept indices are always listed in the teacher's order, so pruning to the teacher's own shape
keeps everything in place and returns the teacher unchanged.

Grouped-query attention: a query head reads the key/value head of its own group, so heads are
chosen group by group. Within each teacher group the `heads / kv_heads` most important query
heads are kept (query heads are pruned evenly across groups); a group's score is the sum of the
scores it keeps, and the `kv_heads` best groups survive with their key/value heads. Both ways
of shrinking attention (fewer query heads per group, fewer groups) come from one rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .importance import Importance
from .shapes import Shape


@dataclass
class PrunePlan:
    """The kept teacher indices of every prunable dimension."""

    shape: Shape  # the pruned model's shape
    layers: list[int]  # kept teacher layers
    channels: list[int]  # kept hidden channels (embedding columns, norm entries)
    heads: list[list[int]]  # per kept layer: kept query heads, grouped by kept kv head
    kv_heads: list[list[int]]  # per kept layer: kept key/value heads
    neurons: list[list[int]]  # per kept layer: kept MLP neurons

    def as_report(self) -> dict:
        return {
            "layers": self.layers,
            "channels": self.channels,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "neurons": self.neurons,
        }


def top_sorted(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the k highest scores, in ascending index order (ties: lower index first)."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.arange(len(scores)), -scores))  # by score descending, then index
    return sorted(int(i) for i in order[:k])


def choose_heads(scores: np.ndarray, teacher: Shape, target: Shape) -> tuple[list[int], list[int]]:
    """(kept query heads, kept kv heads) of one layer; query heads come grouped by kv head."""
    group, keep_per_group = teacher.group_size, target.group_size
    picks, group_scores = [], []
    for kv in range(teacher.num_kv_heads):
        members = np.arange(kv * group, (kv + 1) * group)
        kept = [int(members[i]) for i in top_sorted(scores[members], keep_per_group)]
        picks.append(kept)
        group_scores.append(float(np.sum(scores[kept])))
    kv_heads = top_sorted(np.asarray(group_scores), target.num_kv_heads)
    return [h for kv in kv_heads for h in picks[kv]], kv_heads


def make_plan(importance: Importance, teacher: Shape, target: Shape) -> PrunePlan:
    """The units `target` keeps: layers by block importance, then per kept layer its heads and
    neurons, and the hidden channels by their importance summed over the kept layers."""
    layers = top_sorted(importance.layers, target.num_layers)
    channels = top_sorted(importance.channel_scores(layers), target.hidden_size)
    heads, kv_heads, neurons = [], [], []
    for layer in layers:
        q, kv = choose_heads(importance.heads[layer], teacher, target)
        heads.append(q)
        kv_heads.append(kv)
        neurons.append(top_sorted(importance.neurons[layer], target.intermediate_size))
    return PrunePlan(target, layers, channels, heads, kv_heads, neurons)
