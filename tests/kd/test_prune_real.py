"""kd prune on the real teacher (SmolLM2-135M-Instruct): the pruned directory loads and runs,
and activation importance beats random choices of the same shape on held-out code, for width
and for depth. Calibration is a few short standard-library functions, so this stays quick."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from kd.codedata import stdlib_functions
from kd.data import DataStats, ExampleBuilder
from kd.prune import (
    REPORT_NAME,
    collect_importance,
    count_parameters,
    heldout_loss,
    prune_model,
    shape_of,
)

SEEDS = (0, 1, 2)
TARGET = dict(params="50%", params_scope="non-embedding")


def code_examples(tokenizer, split: str, limit: int):
    builder = ExampleBuilder(tokenizer, max_length=128)
    rows = [f.row() for f in stdlib_functions(split, limit=limit)]
    built = [builder.build(row, split, i, DataStats()) for i, row in enumerate(rows)]
    return [e for e in built if e is not None]


@pytest.fixture(scope="module")
def calib(real_teacher):
    return code_examples(real_teacher.tokenizer, "train", 8)


@pytest.fixture(scope="module")
def heldout(real_teacher):
    return code_examples(real_teacher.tokenizer, "heldout", 8)


@pytest.fixture(scope="module")
def importance(real_teacher, calib):
    return collect_importance(real_teacher.model, calib, pad_id=2, progress=False)


@pytest.mark.parametrize("method", ["width", "depth"])
def test_activation_importance_beats_random_choices(real_teacher, importance, heldout, method):
    pruned = prune_model(
        real_teacher, None, method=method, importance=importance, progress=False, **TARGET
    )
    loss = heldout_loss(pruned.model, heldout)
    random_losses = []
    for seed in SEEDS:
        baseline = prune_model(
            real_teacher,
            None,
            method=method,
            selection="random",
            seed=seed,
            progress=False,
            **TARGET,
        )
        assert baseline.shape == pruned.shape
        random_losses.append(heldout_loss(baseline.model, heldout))
    assert loss < min(random_losses), (method, loss, random_losses)


def test_real_teacher_prunes_to_a_loadable_student(
    real_teacher, real_teacher_dir, importance, calib, heldout, tmp_path
):
    out = tmp_path / "student"
    result = prune_model(
        real_teacher,
        calib,
        str(out),
        method="both",
        importance=importance,
        progress=False,
        **TARGET,
    )
    teacher_count = count_parameters(real_teacher.model.config)
    model = AutoModelForCausalLM.from_pretrained(out)
    shape = shape_of(model.config)
    assert shape == result.shape and shape.num_layers < 30 and shape.hidden_size < 576
    params = sum(p.numel() for p in model.parameters())
    assert params == count_parameters(model.config).total
    non_embedding = count_parameters(model.config).non_embedding
    assert 0.45 * teacher_count.non_embedding < non_embedding <= 0.5 * teacher_count.non_embedding
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.from_numpy(heldout[0].input_ids).long()[None]
    with torch.inference_mode():
        assert torch.isfinite(model(ids).logits).all()
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["parameters"]["pruned"]["total"] == params
    assert report["teacher"]["architecture"] == "LlamaForCausalLM"
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()

    # The teacher's own shape keeps every weight: the same outputs.
    same = prune_model(
        real_teacher, None, num_layers=30, importance=importance, progress=False
    ).model
    with torch.inference_mode():
        torch.testing.assert_close(same(ids).logits, real_teacher.model(ids).logits, rtol=0, atol=0)
