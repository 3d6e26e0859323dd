"""kd eval: held-out cross-entropy, token accuracy and KL to the teacher's top-K, checked against
a plain computation from the model's logits."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from kd.data import DataError
from kd.evaluate import evaluate, evaluate_model, load_eval_set
from kd.losses import IGNORE_INDEX, reference_kd_sft_loss
from kd.models import load_model
from logitcache import open_cache
from logitcache.format import CacheError

from .conftest import build_tokenizer, cli_env
from .kd_helpers import build_kd_cache, sft_rows


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is fastest, and steady on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def plain_scores(model, records) -> tuple[float, float, float | None]:
    """CE, accuracy and renormalised top-K KL, one record at a time from full logits."""
    ce_sum = correct = targets = 0.0
    kl_sum, kl_rows = 0.0, 0
    for r in records:
        ids = torch.from_numpy(np.asarray(r.input_ids, dtype=np.int64))[None]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].double()
        labels = torch.where(torch.from_numpy(np.asarray(r.loss_mask))[1:], ids[0, 1:], -100)
        scored = labels != IGNORE_INDEX
        ce_sum += float(
            torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
        )
        correct += float((logits.argmax(1)[scored] == labels[scored]).sum())
        targets += float(scored.sum())
        if r.topk_ids is not None:
            kl = reference_kd_sft_loss(
                logits[scored],
                torch.full((int(scored.sum()),), IGNORE_INDEX),
                torch.from_numpy(np.asarray(r.topk_ids)),
                torch.from_numpy(np.asarray(r.topk_logprobs, dtype=np.float64)),
                mode="renorm",
                reduction="sum",
            )
            kl_sum += float(kl.kd)
            kl_rows += int(scored.sum())
    return ce_sum / targets, correct / targets, (kl_sum / kl_rows if kl_rows else None)


@pytest.mark.parametrize("source", ["cache", "jsonl"])
@pytest.mark.parametrize("batch_size", [1, 5])
def test_scores_equal_a_plain_computation(kd_inputs, source, batch_size):
    loaded = load_model(str(kd_inputs.teacher))
    data = kd_inputs.heldout_cache if source == "cache" else kd_inputs.heldout_jsonl
    eval_set = load_eval_set(str(data), loaded.tokenizer)
    assert eval_set.has_teacher == (source == "cache")
    assert len(eval_set.records) == 24
    result = evaluate(loaded.model, eval_set, batch_size=batch_size)
    ce, accuracy, kl = plain_scores(loaded.model, eval_set.records)
    assert result.ce == pytest.approx(ce, rel=1e-5)
    assert result.accuracy == pytest.approx(accuracy, abs=1e-9)
    assert result.targets == eval_set.targets
    if source == "cache":
        assert result.kl == pytest.approx(kl, rel=1e-4, abs=1e-6)
        # The teacher scored against its own cached top-K: only fp16 rounding separates them.
        assert result.kl < 1e-3
    else:
        assert result.kl is None


def test_a_positions_all_cache_scores_like_a_supervised_one(kd_inputs, tmp_path):
    rows = sft_rows(6, seed=8)
    supervised = build_kd_cache(tmp_path / "supervised", kd_inputs.teacher, rows)
    every = build_kd_cache(tmp_path / "all", kd_inputs.teacher, rows, positions="all")
    with open_cache(str(every)) as cache:
        assert cache.manifest.positions == "all"
    a = evaluate_model(str(kd_inputs.student), str(supervised), batch_size=4)
    b = evaluate_model(str(kd_inputs.student), str(every), batch_size=4)
    assert a.as_dict() == pytest.approx(b.as_dict())


def test_one_eval_set_scores_several_models(kd_inputs):
    loaded = load_model(str(kd_inputs.student))
    eval_set = load_eval_set(str(kd_inputs.heldout_cache), loaded.tokenizer, max_records=10)
    assert len(eval_set.records) == 10
    student = evaluate_model(str(kd_inputs.student), eval_set)
    teacher = evaluate_model(str(kd_inputs.teacher), eval_set)
    assert teacher.ce < student.ce and teacher.kl < student.kl
    assert teacher.accuracy > student.accuracy


def test_cli_prints_scores_and_json(kd_inputs):
    kd = [sys.executable, "-m", "kd.cli", "eval", "--model", str(kd_inputs.teacher)]
    run = subprocess.run(
        [*kd, "--data", str(kd_inputs.heldout_cache)],
        capture_output=True,
        text=True,
        env=cli_env(),
    )
    assert run.returncode == 0, run.stderr
    assert "cross-entropy" in run.stdout and "token accuracy" in run.stdout
    assert "KL to teacher" in run.stdout
    run = subprocess.run(
        [*kd, "--data", str(kd_inputs.heldout_jsonl), "--json", "--max-records", "7"],
        capture_output=True,
        text=True,
        env=cli_env(),
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["records"] == 7 and result["kl"] is None  # jsonl rows carry no teacher
    assert 0 < result["ce"] < 10 and 0 < result["accuracy"] <= 1


def test_missing_data_and_a_mismatched_cache_are_clear_errors(kd_inputs, tmp_path):
    with pytest.raises(DataError, match="absent.jsonl: no such file or directory"):
        evaluate_model(str(kd_inputs.teacher), str(tmp_path / "absent.jsonl"))
    other = build_tokenizer(vocab_size=380)
    with pytest.raises(CacheError, match="differs from the one the held-out cache"):
        load_eval_set(str(kd_inputs.heldout_cache), other)


def test_jsonl_rows_can_be_rendered_with_the_chat_template(kd_inputs):
    tok = kd_inputs.tokenizer
    plain = load_eval_set(str(kd_inputs.heldout_jsonl), tok, max_records=3)
    chat = load_eval_set(str(kd_inputs.heldout_jsonl), tok, max_records=3, chat_template=True)
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert all(start not in r.input_ids.tolist() for r in plain.records)
    assert all(r.input_ids.tolist().count(start) == 2 for r in chat.records)  # user, assistant
    # The targets are the response either way (plus the end token that closes it).
    for a, b in zip(plain.records, chat.records, strict=True):
        assert abs(int(a.loss_mask.sum()) - int(b.loss_mask.sum())) <= 1
