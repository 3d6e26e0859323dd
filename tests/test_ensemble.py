"""logitcache ensemble: caches of several teachers over the same records combined into the top-K
of the weighted mixture of their distributions (probabilities mixed, not logprobs averaged).

Rows are checked against a float64 mixture computed here from the source rows; the bounds the
module promises are checked against teachers whose whole distributions are known; records or
tokenizers that differ are refused naming the record or the cache."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest

from logitcache import CacheWriter, open_cache
from logitcache.ensemble import ensemble_caches, mix_topk
from logitcache.synthetic import SyntheticTeacher

from .conftest import make_records

VOCAB = 1000
TOKENIZER = {"name": "tok", "vocab_tokens": VOCAB, "vocab_fingerprint": "xxh3_64:00aa11bb22cc33dd"}


def teacher_cache(path, base: list[dict], *, k: int, seed: int, tokenizer=TOKENIZER, **kwargs):
    """A cache of `base`'s records (tokens, masks, sample ids) with another teacher's rows."""
    teacher = SyntheticTeacher(VOCAB, k, seed=seed)
    with CacheWriter(
        str(path),
        k=k,
        vocab_size=VOCAB,
        teacher={"name": f"teacher-{seed}"},
        tokenizer=tokenizer,
        chunk_bytes=8 << 10,
        **kwargs,
    ) as writer:
        for r in base:
            ids, lps = teacher.rows(int(r["loss_mask"].sum()))
            writer.add(
                input_ids=r["input_ids"],
                loss_mask=r["loss_mask"],
                topk_ids=ids,
                topk_logprobs=lps,
                sample_id=r["sample_id"],
            )
    return str(path)


@pytest.fixture(scope="module")
def base_records():
    return make_records(30, k=8, vocab_size=VOCAB, seed=3, mean_length=20)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, base_records):
    """Three teachers over the same 30 records: K = 8, 8 and 5."""
    root = tmp_path_factory.mktemp("teachers")
    return [
        teacher_cache(root / name, base_records, k=k, seed=seed)
        for name, k, seed in (("a", 8, 1), ("b", 8, 2), ("c", 5, 3))
    ]


def reference_rows(records, weights, k, tail="lower", vocab=VOCAB):
    """The float64 mixture of each target row, its top k as [(id, mass)], written plainly."""
    out = []
    for rows in zip(*[zip(r.topk_ids, r.topk_logprobs, strict=True) for r in records], strict=True):
        mass = defaultdict(float)
        for w, (ids, lps) in zip(weights, rows, strict=True):
            for i, lp in zip(ids.tolist(), lps.astype(np.float64).tolist(), strict=True):
                mass[i] += w * np.exp(lp)
        if tail == "uniform":
            for w, (ids, lps) in zip(weights, rows, strict=True):
                tail_mass = max(0.0, 1.0 - float(np.exp(lps.astype(np.float64)).sum()))
                listed = set(ids.tolist())
                for i in mass:
                    if i not in listed:
                        mass[i] += w * tail_mass / (vocab - len(ids))
        out.append(sorted(mass.items(), key=lambda kv: (-kv[1], kv[0]))[:k])
    return out


def check_against_reference(dst, sources, weights, k, tail):
    caches = [open_cache(s) for s in sources]
    out = open_cache(dst)
    assert len(out) == len(caches[0]) and out.manifest.k == k
    compared = 0
    for i in range(len(out)):
        got = out[i]
        inputs = [c[i] for c in caches]
        np.testing.assert_array_equal(got.input_ids, inputs[0].input_ids)
        np.testing.assert_array_equal(got.loss_mask, inputs[0].loss_mask)
        assert got.sample_id == inputs[0].sample_id
        for row, want in enumerate(reference_rows(inputs, weights, k, tail)):
            want_ids = [i for i, _ in want]
            want_lp = np.log(np.array([m for _, m in want]))
            stored = dict(zip(got.topk_ids[row].tolist(), got.topk_logprobs[row], strict=True))
            assert sorted(stored) == sorted(want_ids), (i, row)
            got_lp = np.array([stored[i] for i in want_ids], dtype=np.float64)
            if tail == "lower":  # the same float64 sums, rounded to fp16 once
                np.testing.assert_array_equal(got_lp, want_lp.astype(np.float16))
            else:
                spacing = np.spacing(np.abs(want_lp).astype(np.float16)).astype(np.float64)
                assert np.all(np.abs(got_lp - want_lp) <= spacing), (i, row)
            compared += 1
    assert compared > 200


@pytest.mark.parametrize(
    ("members", "weights", "tail"),
    [
        ([0, 1], [0.7, 0.3], "lower"),
        ([0, 1, 2], [5, 3, 2], "lower"),
        ([0, 2], [0.25, 0.75], "uniform"),
    ],
)
def test_rows_are_the_top_k_of_the_float64_mixture(teachers, tmp_path, members, weights, tail):
    sources = [teachers[m] for m in members]
    result = ensemble_caches(
        sources, str(tmp_path / "mix"), weights=weights, tail=tail, progress=False
    )
    normalised = [w / sum(weights) for w in weights]
    assert result.weights == pytest.approx(normalised)
    assert result.k == 8 and result.records == 30
    check_against_reference(str(tmp_path / "mix"), sources, normalised, 8, tail)
    manifest = open_cache(str(tmp_path / "mix")).manifest
    assert manifest.metadata["ensemble"]["tail"] == tail
    assert [m["cache"] for m in manifest.teacher["members"]] == sources
    assert manifest.tokenizer == TOKENIZER
    assert 0 < result.exact_share < 1 and result.max_gap > 0


def test_k_can_be_smaller_and_equal_weights_are_the_default(teachers, tmp_path):
    result = ensemble_caches(teachers[:2], str(tmp_path / "mix"), k=4, progress=False)
    assert result.k == 4 and result.weights == [0.5, 0.5]
    check_against_reference(str(tmp_path / "mix"), teachers[:2], [0.5, 0.5], 4, "lower")


def test_stored_values_bound_the_true_mixture():
    """Teachers whose whole distributions are known: "lower" rows are lower bounds within the
    reported gap, "uniform" rows lie inside the same bounds."""
    rng = np.random.default_rng(0)
    vocab, n, k = 60, 400, 6
    weights = [0.5, 0.3, 0.2]
    dense = []
    for j in range(3):
        logits = rng.normal(0, 1.5 + j, (n, vocab))
        dense.append(np.exp(logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)))
    truth = sum(w * p for w, p in zip(weights, dense, strict=True))
    ids = [np.argsort(-p, axis=1)[:, :k].astype(np.int32) for p in dense]
    lps = [np.log(np.take_along_axis(p, i, axis=1)) for p, i in zip(dense, ids, strict=True)]
    lower = mix_topk(ids, lps, weights, k=k, vocab_sizes=[vocab] * 3, tail="lower")
    uniform = mix_topk(ids, lps, weights, k=k, vocab_sizes=[vocab] * 3, tail="uniform")
    true_at = np.take_along_axis(truth, lower.topk_ids.astype(np.int64), axis=1)
    stored = np.exp(lower.topk_logprobs)
    assert np.all(stored <= true_at * (1 + 1e-12))
    assert np.all(true_at - stored <= lower.gap * (1 + 1e-12) + 1e-15)
    exact = lower.listed_by_all
    assert exact.any() and (~exact).any()
    np.testing.assert_allclose(stored[exact], true_at[exact], rtol=1e-12)
    true_u = np.take_along_axis(truth, uniform.topk_ids.astype(np.int64), axis=1)
    stored_u = np.exp(uniform.topk_logprobs)
    assert np.all(true_u - stored_u <= uniform.gap + 1e-12)
    assert np.all(stored_u <= true_u + uniform.gap + 1e-12)
    # Mixing probabilities is not averaging logprobs: the two pick different rows here.
    averaged = sum(w * np.log(p) for w, p in zip(weights, dense, strict=True))
    assert (np.argmax(averaged, axis=1) != np.argmax(truth, axis=1)).any()
    # An id no teacher ranked first can still win the mixture; the lower bound finds it mostly.
    assert np.mean(lower.topk_ids[:, 0] == np.argmax(truth, axis=1)) > 0.9


def test_different_records_are_refused_naming_the_record(base_records, teachers, tmp_path):
    changed = [dict(r) for r in base_records]
    ids = changed[3]["input_ids"].copy()
    ids[2] = (ids[2] + 1) % VOCAB
    changed[3] = {**changed[3], "input_ids": ids}
    other = teacher_cache(tmp_path / "other", changed, k=8, seed=9)
    with pytest.raises(ValueError, match=r"record 3 \('synthetic-3-00000003'.* input_ids differs"):
        ensemble_caches([teachers[0], other], str(tmp_path / "mix"), progress=False)
    assert not (tmp_path / "mix" / "manifest.json").exists()  # nothing committed
    fewer = teacher_cache(tmp_path / "fewer", base_records[:20], k=8, seed=9)
    with pytest.raises(ValueError, match="holds 20 records, .* holds 30"):
        ensemble_caches([teachers[0], fewer], str(tmp_path / "mix"), progress=False)


def test_different_or_unknown_tokenizers_are_refused(base_records, teachers, tmp_path):
    other_tok = {**TOKENIZER, "name": "other", "vocab_fingerprint": "xxh3_64:ffffffffffffffff"}
    other = teacher_cache(tmp_path / "other", base_records, k=8, seed=9, tokenizer=other_tok)
    with pytest.raises(ValueError, match=r"other.* was written with another tokenizer"):
        ensemble_caches([teachers[0], other], str(tmp_path / "mix"), progress=False)
    unknown = teacher_cache(tmp_path / "unknown", base_records, k=8, seed=9, tokenizer=None)
    with pytest.raises(ValueError, match="records no tokenizer fingerprint"):
        ensemble_caches([teachers[0], unknown], str(tmp_path / "mix"), progress=False)
    ensemble_caches(
        [teachers[0], unknown], str(tmp_path / "mix"), check_tokenizers=False, progress=False
    )


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "logitcache.cli", "ensemble", *map(str, args)],
        capture_output=True,
        text=True,
    )


def test_cli(teachers, tmp_path):
    dst = tmp_path / "mix"
    done = run_cli(*teachers, dst, "--weights", "0.5,0.3,0.2", "--no-progress", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["records"] == 30 and result["weights"] == pytest.approx([0.5, 0.3, 0.2])
    check_against_reference(str(dst), teachers, [0.5, 0.3, 0.2], 8, "lower")
    # An existing cache is replaced only on request (and then atomically, by CacheWriter).
    again = run_cli(*teachers[:2], dst, "--no-progress")
    assert again.returncode == 1 and "already there; pass overwrite" in again.stderr
    again = run_cli(*teachers[:2], dst, "--no-progress", "--overwrite")
    assert again.returncode == 0 and "lower bounds" in again.stdout, again.stderr
    assert len(open_cache(str(dst)).manifest.teacher["members"]) == 2
    bad = run_cli(*teachers[:2], dst, "--weights", "1,2,3", "--overwrite")
    assert bad.returncode == 1
    assert (
        bad.stderr.strip()
        == "logitcache ensemble: error: 3 weights for 2 source caches; give one per cache"
    )
    usage = run_cli(teachers[0], dst, "--weights", "1,-1")
    assert usage.returncode == 2 and "must be a finite number > 0" in usage.stderr
