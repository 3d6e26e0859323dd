"""Mixtures of caches: the proportional schedule, partitioning across ranks and workers, exact
resume of the micro-batch stream, and per-source loss settings applied to the right rows."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kd.losses import reference_kd_sft_loss
from kd.mixture import MixtureCollator, MixtureDataset, MixtureStream, ProportionalSchedule
from kd.source_loss import SourcesLoss, StepCounts, step_counts
from kd.stages import plan_stages
from kd.student import StudentWithHead
from kd.train import StepLoss
from logitcache.loader import LogitCacheDataset

from .conftest import DOMAIN_ROWS
from .test_train import config_for

# --------------------------------------------------------------------------------------------
# The schedule


@pytest.mark.parametrize("weights", [[0.8, 0.2], [5, 3, 2], [0.97, 0.03]])
def test_schedule_honours_proportions_over_every_window(weights):
    shares = [w / sum(weights) for w in weights]
    schedule = ProportionalSchedule(weights, seed=4)
    picked = np.array([next(schedule) for _ in range(10_000)])
    counts = np.bincount(picked, minlength=len(weights))
    for share, count in zip(shares, counts, strict=True):
        # Within the binomial tolerance of i.i.d. sampling (3 sigma), and far inside it.
        assert abs(count - 10_000 * share) <= 3 * math.sqrt(10_000 * share * (1 - share))
        assert abs(count - 10_000 * share) <= 2
    # Any window of a few hundred records holds each source within 2 + 2 S p of its share.
    onehot = np.eye(len(weights))[picked]
    cumulative = np.vstack([np.zeros(len(weights)), np.cumsum(onehot, axis=0)])
    for width in (100, 300):
        in_window = cumulative[width:] - cumulative[:-width]
        for s, share in enumerate(shares):
            worst = np.abs(in_window[:, s] - width * share).max()
            assert worst <= 2 + 2 * len(weights) * share, (width, s, worst)


def test_schedule_is_a_function_of_seed_and_draws():
    schedule = ProportionalSchedule([2, 1], seed=1)
    a = [next(schedule) for _ in range(300)]
    b = ProportionalSchedule([2, 1], seed=1)
    assert [next(b) for _ in range(300)] == a
    c = ProportionalSchedule([2, 1], seed=2)
    assert [next(c) for _ in range(300)] != a
    # Resuming from the draw counts alone continues the same sequence.
    first = ProportionalSchedule([2, 1], seed=1)
    head = [next(first) for _ in range(123)]
    rest = ProportionalSchedule([2, 1], seed=1, draws=first.draws)
    assert head + [next(rest) for _ in range(177)] == a


# --------------------------------------------------------------------------------------------
# Partitioning across ranks and workers


class DrawOrder:
    """A collate that keeps the draw order: [(source, sample id), ...] per group."""

    def __call__(self, records, sources):
        return [list(zip(sources, [r.sample_id for r in records], strict=True))]


def ranked_mixture(kd_inputs, domain, rank: int, world_size: int) -> MixtureDataset:
    sources = [
        LogitCacheDataset(str(url), seed=5, rank=rank, world_size=world_size)
        for url in (kd_inputs.cache, domain["cache"])
    ]
    return MixtureDataset(
        sources, [0.7, 0.3], ["general", "domain"], seed=5, group_records=10, collate=DrawOrder()
    )


def test_two_ranks_by_two_workers_never_repeat_a_record_within_an_epoch(kd_inputs, domain):
    records = {0: 96, 1: DOMAIN_ROWS}
    draws = {}  # (rank, worker, source) -> sample ids in draw order
    for rank in range(2):
        dataset = ranked_mixture(kd_inputs, domain, rank, 2)
        loader = DataLoader(dataset, batch_size=None, num_workers=2, collate_fn=lambda x: x)
        for n, item in enumerate(loader):
            for source, sample in item["micro_batches"][0]:
                draws.setdefault((rank, item["worker"], source), []).append(sample)
            if n == 2 * 30 - 1:  # 30 groups of 10 from each worker: 3+ epochs of the domain
                break
    for source, total in records.items():
        for epoch in range(2):
            seen = []
            for rank in range(2):
                for worker in range(2):
                    # Each of the 4 streams reads a quarter of every epoch of the source.
                    mine = draws[rank, worker, source]
                    seen += mine[epoch * total // 4 : (epoch + 1) * total // 4]
            assert len(seen) == total and len(set(seen)) == total, (source, epoch)
        first = [draws[0, 0, source][: total // 4], draws[0, 0, source][total // 4 : total // 2]]
        assert first[0] != first[1]  # a new order each epoch
    taken = Counter()
    for (_, _, source), ids in draws.items():
        taken[source] += len(ids)
    assert taken[0] / (taken[0] + taken[1]) == pytest.approx(0.7, abs=0.01)


# --------------------------------------------------------------------------------------------
# The micro-batch stream resumes exactly


def make_stream(kd_inputs, domain, workers: int):
    datasets = [LogitCacheDataset(str(url), seed=5) for url in (kd_inputs.cache, domain["cache"])]
    collate = MixtureCollator(
        3,
        positions=[d.positions for d in datasets],
        teacher=[True, True],
        group_by_length=True,
        packing=False,
        pack_length=0,
        pad_token_id=0,
    )
    dataset = MixtureDataset(
        datasets, [0.6, 0.4], ["general", "domain"], seed=5, group_records=12, collate=collate
    )
    return MixtureStream(dataset, num_workers=workers)


def batch_ids(batch) -> tuple:
    return tuple(zip(batch["sample_ids"], batch["record_source"].tolist(), strict=True))


def served_per_source(batches) -> list[int]:
    return [sum(source == s for batch in batches for _, source in batch) for s in (0, 1)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_anywhere_reproduces_the_stream(kd_inputs, domain, workers):
    stream = make_stream(kd_inputs, domain, workers)
    total = 60  # 15 groups of 4 micro-batches: past an epoch of the domain source
    reference = [batch_ids(next(stream)) for _ in range(total)]
    passes = stream.passes()
    assert passes[1] > 1.0  # the domain source went round more than once
    assert stream.source_draws() == served_per_source(reference)
    for cut in (1, 5, 8, 23, 41):
        stream = make_stream(kd_inputs, domain, workers)
        got = [batch_ids(next(stream)) for _ in range(cut)]
        assert stream.source_draws() == served_per_source(got)  # also inside a group
        state = json.loads(json.dumps(stream.state_dict()))  # JSON-able: it goes in checkpoints
        resumed = make_stream(kd_inputs, domain, workers)
        resumed.load_state_dict(state)
        assert resumed.state_dict() == state
        got.append(batch_ids(next(resumed)))
        again = make_stream(kd_inputs, domain, workers)
        again.load_state_dict(resumed.state_dict())
        got += [batch_ids(next(again)) for _ in range(total - cut - 1)]
        assert got == reference, cut
    state = make_stream(kd_inputs, domain, workers).state_dict()
    assert sum(len(d) for d in state["draws"]) == 2 * max(1, workers)  # a few integers per source
    with pytest.raises(ValueError, match="field 'num_workers'"):
        make_stream(kd_inputs, domain, 1 - min(workers, 1)).load_state_dict(state)


# --------------------------------------------------------------------------------------------
# Per-source loss settings apply to each source's rows


def test_each_source_is_scored_with_its_own_settings(kd_inputs, domain, tmp_path):
    """The head's loss and gradients equal a float64 reference that scores each source's rows
    with that source's settings, normalised by all target tokens of the step."""
    config = config_for(
        kd_inputs,
        tmp_path / "unused",
        cache="",
        sources=[
            {"name": "general", "cache": str(kd_inputs.cache), "weight": 0.6},
            {
                "name": "domain",
                "cache": str(domain["cache"]),
                "weight": 0.4,
                "mode": "teacher_renorm",
                "temperature": 2.0,
                "kd_weight": 0.5,
                "sft_weight": 1.0,
            },
        ],
        max_steps=1,
    )
    stage = plan_stages(config)[0]
    stream = make_stream(kd_inputs, domain, 0)
    batch = next(stream)
    while len(set(batch["record_source"].tolist())) < 2:
        batch = next(stream)
    counts = StepCounts.from_list(step_counts([batch], 2), 2)
    targets = counts.total_targets
    head = SourcesLoss([StepLoss(s.config, 383, targets, targets, 1) for s in stage.sources])

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(kd_inputs.student, dtype=torch.float64)
    wrapped = StudentWithHead(model)
    loss = wrapped(batch, head)
    loss.total.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    # Reference: full logits, each source's targets and teacher rows, its own settings.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    width = batch["input_ids"].shape[1]
    total = 0.0
    for s, source in enumerate(stage.sources):
        c = source.config
        rows = batch["teacher_rows"][s]
        flat = rows["kd_index"]
        z = logits.reshape(-1, logits.shape[-1])[flat - 1]
        y = batch["input_ids"].reshape(-1)[flat]
        part = reference_kd_sft_loss(
            z,
            y,
            rows["kd_ids"],
            rows["kd_logprobs"].double(),
            mode=c.mode,
            temperature=c.temperature,
            scale_by_t2=c.scale_by_t2,
            reduction="sum",
        )
        assert flat.numel() == counts.targets[s] and (flat % width > 0).all()
        total = total + (c.kd_weight * part.kd + c.sft_weight * part.ce) / targets
        assert loss.kd[s] == pytest.approx(float(part.kd.detach()), rel=1e-9)
        assert loss.ce[s] == pytest.approx(float(part.ce.detach()), rel=1e-9)
    torch.testing.assert_close(loss.total, total, rtol=1e-10, atol=0)
    total.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(fused[name], param.grad, rtol=1e-7, atol=1e-12, msg=name)


def run_mixture(kd_inputs, out, sources, **overrides):
    from kd.train import train

    config = config_for(
        kd_inputs, out, cache="", sources=sources, max_steps=4, batch_size=6, **overrides
    )
    train(config, progress=False)
    from kd.metrics import read_metrics

    return [r for r in read_metrics(str(out)) if r["kind"] == "train"]


def test_a_source_at_kd_weight_0_gives_no_kd_gradient(kd_inputs, domain, tmp_path):
    """Two caches of the same domain records from different teachers: with the domain source at
    kd_weight = 0 its teacher cannot matter; with kd_weight > 0 it does."""

    def sources(domain_cache, kd_weight):
        return [
            {"name": "general", "cache": str(kd_inputs.cache), "weight": 0.5},
            {
                "name": "domain",
                "cache": str(domain_cache),
                "weight": 0.5,
                "kd_weight": kd_weight,
                "sft_weight": 1.0,
            },
        ]

    runs = {}
    for teacher in ("cache", "other_teacher"):
        for kd_weight in (0.0, 1.0):
            out = tmp_path / f"{teacher}-{kd_weight}"
            runs[teacher, kd_weight] = run_mixture(
                kd_inputs, out, sources(domain[teacher], kd_weight)
            )
    same = runs["cache", 0.0], runs["other_teacher", 0.0]
    assert [r["loss"] for r in same[0]] == [r["loss"] for r in same[1]]
    differ = runs["cache", 1.0], runs["other_teacher", 1.0]
    assert [r["loss"] for r in differ[0]] != [r["loss"] for r in differ[1]]
    for record in same[0]:
        general, dom = record["sources"]["general"], record["sources"]["domain"]
        assert dom["kd"] is None and general["kd"] is not None  # no teacher rows were read
        assert dom["ce"] > 0 and general["records"] + dom["records"] == 6
    for record in differ[0]:
        assert record["sources"]["domain"]["kd"] is not None
