"""Lossy caches (CacheWriter lossy_kl): every stored row within its KL budget, padded rows that
readers return as they are and losses treat as the short rows they are, the manifest, inspect
and convert."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kd.losses import KD_MODES, kd_sft_loss
from logitcache import CacheError, CacheWriter, open_cache
from logitcache.loader import collate_kd
from logitcache.lossy import PAD_LOGPROB, LossyRows, row_entries
from logitcache.synthetic import SyntheticTeacher, canonical_order, synthetic_records

_SCRIPT = Path(sys.executable).with_name("logitcache")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "logitcache.cli"]


def kl(a: np.ndarray, b: np.ndarray) -> float:
    keep = a > 0
    return float((a[keep] * np.log(a[keep] / b[keep])).sum())


def row_error(lossless_ids, lossless_lp, stored_ids, stored_lp) -> dict[str, float]:
    """The measures of spec section 12, matched by id (written apart from logitcache.lossy)."""
    probs = np.exp(lossless_lp.astype(np.float64)).tolist()
    full = dict(zip(lossless_ids.tolist(), probs, strict=True))
    kept = stored_lp > PAD_LOGPROB
    ids = stored_ids[kept]
    q = np.exp(stored_lp[kept].astype(np.float64))
    p = np.array([full[i] for i in ids.tolist()])  # a stored id is one of the lossless row's
    if p.sum() == 0:
        return {"max": 0.0}
    pn, qn = p / p.sum(), q / q.sum()
    pt, qt = max(0.0, 1 - p.sum()), max(0.0, 1 - q.sum())
    tp = np.append(p, pt) / (p.sum() + pt)
    tq = np.append(q, qt) / (q.sum() + qt)
    if tp[-1] > 0 and tq[-1] == 0:
        tail_fwd = np.inf
    else:
        tail_fwd = kl(tp, tq)
    tail_rev = np.inf if tq[-1] > 0 and tp[-1] == 0 else kl(tq, tp)
    truncation = float(np.log(sum(full.values()) / p.sum()))
    measures = {
        "renorm_fwd": kl(pn, qn),
        "renorm_rev_with_truncation": kl(qn, pn) + truncation,
        "tail_fwd": tail_fwd,
        "tail_rev": tail_rev,
    }
    measures["max"] = max(measures.values())
    return measures


def teacher_rows(seed: int, n: int, k: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Canonical fp16 rows: synthetic teacher rows, or harder shapes."""
    rng = np.random.default_rng(seed)
    if kind == "synthetic":
        return SyntheticTeacher(5000, k, seed=seed).rows(n)
    ids = np.stack([rng.choice(5000, size=k, replace=False) for _ in range(n)]).astype(np.int32)
    if kind == "flat":  # nearly uniform rows with a tail of every size
        logits = rng.normal(scale=0.3, size=(n, k + 1))
    elif kind == "certain":  # near-certain rows: a tail mass far below the grid step
        logits = rng.normal(scale=1.0, size=(n, k + 1))
        logits[:, 0] += rng.uniform(8, 25, size=n)
    else:  # "full": all the mass inside the row, rounding pushing it over 1
        logits = rng.normal(scale=2.0, size=(n, k + 1))
        logits[:, -1] = -1e9
    logp = (logits - logits.max(1, keepdims=True)) - np.log(
        np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)
    )
    return canonical_order(ids, np.maximum(logp[:, :k], -65504).astype(np.float16))


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(["synthetic", "flat", "certain", "full"]),
    st.floats(1e-4, 0.5),
    st.integers(1, 40),
    st.integers(0, 10**6),
    st.booleans(),
)
def test_every_lossy_row_is_within_its_budget(kind, budget, k, seed, truncation):
    ids, lp = teacher_rows(seed, 30, k, kind)
    lossy = LossyRows(budget, k, truncation=truncation)
    out_ids, out_lp = lossy.apply(ids.copy(), lp.copy())
    assert out_ids.shape == ids.shape and out_lp.dtype == np.float16
    for r in range(ids.shape[0]):
        error = row_error(ids[r], lp[r], out_ids[r], out_lp[r])
        assert error["max"] <= budget * (1 + 1e-9), (r, error)
        # Canonical order, distinct ids, padding only at the end with the smallest free ids.
        values = out_lp[r].astype(np.float64)
        assert (np.diff(values) <= 0).all()
        assert len(set(out_ids[r].tolist())) == k
        real = int((values > PAD_LOGPROB).sum())
        assert real >= 1 and (values[real:] == PAD_LOGPROB).all()
        if not truncation:  # only entries whose probability underflows the grid are left out
            above = lp[r].astype(np.float64)
            assert (above > -64).sum() <= real <= (above > -64 - lossy.step).sum()
        free = sorted(set(range(k + real)) - set(out_ids[r, :real].tolist()))
        assert out_ids[r, real:].tolist() == free[: k - real]
    assert lossy.stats.error_max <= budget * (1 + 1e-9)


def test_budget_is_validated():
    for bad in (0, -1, float("nan"), float("inf"), 2.0, True, "0.1"):
        with pytest.raises(ValueError, match="lossy_kl"):
            CacheWriter("memory://lossy-bad", k=4, vocab_size=50, lossy_kl=bad)


@pytest.fixture(scope="module")
def lossy_cache(tmp_path_factory) -> tuple[Path, list[dict]]:
    path = tmp_path_factory.mktemp("lossy") / "cache"
    records = list(synthetic_records(30, k=16, vocab_size=3000, seed=4, mean_length=60))
    with CacheWriter(str(path), k=16, vocab_size=3000, lossy_kl=0.02, chunk_bytes=16 << 10) as w:
        for record in records:
            w.add(**record)
    return path, records


def test_lossy_cache_reads_back_within_budget(lossy_cache):
    path, records = lossy_cache
    with open_cache(str(path)) as cache:
        lossy = cache.manifest.lossy
        assert lossy["mode"] == "kl" and lossy["kl_budget"] == 0.02
        assert 0 < lossy["measured"]["max_row_kl"] <= 0.02
        assert cache.verify(raise_errors=True) == []
        short = 0
        for record, original in zip(cache, records, strict=True):
            np.testing.assert_array_equal(record.input_ids, original["input_ids"])
            assert record.topk_ids.shape == original["topk_ids"].shape
            for j in range(record.num_targets):
                error = row_error(
                    original["topk_ids"][j],
                    original["topk_logprobs"][j],
                    record.topk_ids[j],
                    record.topk_logprobs[j],
                )
                assert error["max"] <= 0.02 * (1 + 1e-9)
            short += int((row_entries(record.topk_logprobs) < 16).sum())
        assert short > 0  # some rows were cut short and padded
        columns = cache.manifest.columns
        assert columns["topk_ids"]["codecs"][0]["id"] == "ans_ids"
        assert [c["id"] for c in columns["topk_logprobs"]["codecs"]] == ["fp16_grid", "ans_uint"]


def test_padded_rows_give_the_loss_of_the_short_rows(lossy_cache):
    """collate_kd packs padded rows as they are; every KD mode then sees the short row."""
    path, _ = lossy_cache
    with open_cache(str(path)) as cache:
        record = next(r for r in cache if (r.topk_logprobs <= PAD_LOGPROB).any())
    batch = collate_kd([record], positions="supervised")
    padded = batch["kd_logprobs"].float() <= PAD_LOGPROB
    row = int(padded.any(1).nonzero()[0, 0])
    real = int((~padded[row]).sum())
    torch.manual_seed(0)
    vocab, dim = 3000, 16
    hidden = torch.randn(1, dim, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, dim, dtype=torch.float64, requires_grad=True)
    target = batch["labels"].reshape(-1)[batch["kd_index"][row : row + 1]]
    ids, lps = batch["kd_ids"][row : row + 1], batch["kd_logprobs"][row : row + 1]
    for mode in KD_MODES:
        whole = kd_sft_loss(hidden, weight, target, ids, lps, mode=mode)
        grads = torch.autograd.grad(whole.total, (hidden, weight))
        cut = kd_sft_loss(hidden, weight, target, ids[:, :real], lps[:, :real], mode=mode)
        cut_grads = torch.autograd.grad(cut.total, (hidden, weight))
        assert torch.isfinite(whole.total)
        torch.testing.assert_close(whole.kd, cut.kd)
        for a, b in zip(grads, cut_grads, strict=True):
            torch.testing.assert_close(a, b)


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_convert_writes_a_lossy_cache_and_inspect_shows_it(lossy_cache, tmp_path):
    src, _ = lossy_cache
    lossless = tmp_path / "lossless"
    done = run("convert", src, lossless, "--no-progress")
    assert done.returncode == 0, done.stderr
    shown = run("inspect", lossless, "--no-progress")
    assert "mode             lossless" in shown.stdout, shown.stdout
    # The rows came from a lossy cache, and the copy's metadata says so.
    assert open_cache(str(lossless)).manifest.metadata["lossy_source"]["kl_budget"] == 0.02
    dst = tmp_path / "lossy"
    done = run("convert", lossless, dst, "--lossy-kl", "0.005", "--no-progress")
    assert done.returncode == 0, done.stderr
    shown = run("inspect", dst, "--no-progress")
    assert shown.returncode == 0, shown.stderr
    assert "lossy: KL budget 0.005 nats per row" in shown.stdout
    report = json.loads(run("inspect", dst, "--json", "--no-progress").stdout)
    assert report["lossy"]["kl_budget"] == 0.005
    bad = run("convert", lossless, tmp_path / "x", "--lossy-kl", "-1")
    assert bad.returncode == 2 and "--lossy-kl" in bad.stderr
    bad = run("convert", lossless, tmp_path / "x.parquet", "--lossy-kl", "0.01")
    assert bad.returncode == 1 and "Parquet" in bad.stderr


def test_resume_refuses_another_budget(tmp_path):
    url = str(tmp_path / "cache")
    records = list(synthetic_records(4, k=4, vocab_size=100, seed=1, mean_length=20))
    writer = CacheWriter(url, k=4, vocab_size=100, lossy_kl=0.01)
    writer.add(**records[0])
    writer.checkpoint({"next": 1})
    writer.abort()
    with pytest.raises(CacheError, match="cannot resume"):
        CacheWriter(url, k=4, vocab_size=100, lossy_kl=0.02, resume=True)
    with CacheWriter(url, k=4, vocab_size=100, lossy_kl=0.01, resume=True) as writer:
        assert writer.resumed_progress == {"next": 1}
        for record in records[1:]:
            writer.add(**record)
    assert len(open_cache(url)) == 4


def test_merge_keeps_the_lossy_mode_and_refuses_mixed_budgets(tmp_path):
    from logitcache.manifest import merge_partials

    records = list(synthetic_records(6, k=4, vocab_size=100, seed=2, mean_length=20))
    url = str(tmp_path / "cache")
    for rank in range(2):
        with CacheWriter(url, k=4, vocab_size=100, lossy_kl=0.01, rank=rank, world_size=2) as w:
            for record in records[rank::2]:
                w.add(**record)
    manifest = merge_partials(url)
    assert manifest.lossy["kl_budget"] == 0.01
    assert manifest.lossy["measured"]["rows"] == sum(len(r["topk_ids"]) for r in records)
    assert open_cache(url).manifest.lossy == manifest.lossy
    mixed = str(tmp_path / "mixed")
    for rank, budget in enumerate((0.01, 0.02)):
        with CacheWriter(mixed, k=4, vocab_size=100, lossy_kl=budget, rank=rank, world_size=2) as w:
            w.add(**records[rank])
    with pytest.raises(CacheError, match="lossy mode"):
        merge_partials(mixed)


@pytest.mark.parametrize(
    "lossy",
    [{"mode": "bits", "kl_budget": 0.01}, {"mode": "kl"}, {"mode": "kl", "kl_budget": 0}, []],
)
def test_a_manifest_with_a_bad_lossy_object_is_refused(lossy_cache, tmp_path, lossy):
    import shutil

    from logitcache.format import MANIFEST_NAME
    from logitcache.sealed_json import seal

    path, _ = lossy_cache
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    obj = json.loads((copy / MANIFEST_NAME).read_text())
    obj.pop("manifest_checksum")
    obj["lossy"] = lossy
    (copy / MANIFEST_NAME).write_bytes(seal(obj))
    with pytest.raises(CacheError, match="lossy"):
        open_cache(str(copy))
