"""kd.prune.shapes and kd.prune.plan: parameter counts, target validation, the budget rule and
grouped-query head choice. Configs only (no weights) except where real models are counted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from kd.prune import (
    Shape,
    ShapeError,
    choose_heads,
    count_parameters,
    parse_param_count,
    resolve_target,
    shape_for_params,
    shape_of,
)
from kd.prune.shapes import architecture, hidden_step

TINY = dict(
    vocab_size=300,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
)
# SmolLM2-135M-Instruct's shape (the real teacher), as a config without weights.
SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    tie_word_embeddings=True,
)


def real_count(config) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(**TINY),
        LlamaConfig(**TINY, tie_word_embeddings=True),
        LlamaConfig(**TINY, attention_bias=True, mlp_bias=True),
        Qwen2Config(**TINY),
        MistralConfig(**TINY),
        LlamaConfig(**SMOLLM2),
    ],
    ids=["llama", "llama-tied", "llama-biases", "qwen2", "mistral", "smollm2"],
)
def test_count_parameters_matches_the_model(config):
    count = count_parameters(config)
    assert count.total == real_count(config)
    assert count.total == count.embedding + count.non_embedding
    # A pruned shape counts exactly too: 2 layers, hidden 16, MLP 40, 2 heads / 1 kv head.
    head_dim = shape_of(config).head_dim
    shape = Shape(2, 16, 40, 2, 1, head_dim)
    fields = dict(
        num_hidden_layers=2,
        hidden_size=16,
        intermediate_size=40,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    if config.model_type != "qwen2":  # Qwen2 derives head_dim: 16 / 2 = 8, the teacher's
        fields["head_dim"] = head_dim
    data = config.to_dict() | fields
    if data.get("layer_types"):
        data["layer_types"] = data["layer_types"][:2]
    pruned = type(config).from_dict(data)
    assert count_parameters(config, shape).total == real_count(pruned)


def test_smollm2_counts_as_published():
    count = count_parameters(LlamaConfig(**SMOLLM2))
    assert count.total == 134_515_008  # what transformers counts for SmolLM2-135M
    assert count.embedding == 49152 * 576


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("60M", (60_000_000, None)),
        ("1.5B", (1_500_000_000, None)),
        ("45000000", (45_000_000, None)),
        ("12_500k", (12_500_000, None)),
        ("50%", (None, 0.5)),
        ("0.25", (None, 0.25)),
        (0.5, (None, 0.5)),
        (123456, (123456, None)),
    ],
)
def test_parse_param_count(text, expected):
    assert parse_param_count(text) == expected


@pytest.mark.parametrize("text", ["lots", "-5M", "150%", "0", "5 million"])
def test_parse_param_count_rejects(text):
    with pytest.raises(ShapeError, match="parameter target"):
        parse_param_count(text)


def test_method_follows_from_the_dimensions_given():
    config = LlamaConfig(**TINY)
    assert resolve_target(config, num_layers=2) == ("depth", Shape(2, 32, 64, 4, 2, 8))
    assert resolve_target(config, intermediate_size=32)[0] == "width"
    assert resolve_target(config, num_layers=2, hidden_size=16)[0] == "both"
    assert resolve_target(config, params="50%")[0] == "width"
    # Fewer query heads alone keep every kv head that still divides them.
    assert resolve_target(config, num_heads=2)[1].num_kv_heads == 2


@pytest.mark.parametrize(
    ("config", "options", "message"),
    [
        (LlamaConfig(**TINY), {"num_heads": 8}, "--num-heads 8: the teacher has only 4"),
        (LlamaConfig(**TINY), {"num_kv_heads": 3}, "--num-kv-heads 3: the teacher has only 2"),
        (LlamaConfig(**TINY), {"num_layers": 4}, "--layers 4: the teacher has only 3"),
        (LlamaConfig(**TINY), {"hidden_size": 64}, "--hidden-size 64: the teacher has only 32"),
        (LlamaConfig(**TINY), {"intermediate_size": 0}, "--intermediate-size 0: must be"),
        (
            LlamaConfig(**(TINY | {"num_key_value_heads": 4})),
            {"num_heads": 3, "num_kv_heads": 2},
            "--num-kv-heads 2 does not divide --num-heads 3",
        ),
        (
            LlamaConfig(**TINY),
            {"num_heads": 4, "num_kv_heads": 1},
            "puts 4 query heads on each key/value head, but the teacher has 2",
        ),
        (
            LlamaConfig(**TINY),
            {"hidden_size": 30},
            "--hidden-size 30 is not a multiple of --num-heads 4",
        ),
        (
            Qwen2Config(**TINY),
            {"hidden_size": 24},
            r"--hidden-size 24 with --num-heads 4: qwen2 configs have no head_dim.*"
            r"--hidden-size 32",
        ),
        (LlamaConfig(**TINY), {"method": "depth", "num_heads": 2}, "--method depth removes"),
        (LlamaConfig(**TINY), {"method": "width", "num_layers": 2}, "--method width keeps"),
        (LlamaConfig(**TINY), {"params": "10M"}, "the teacher has only"),
        (LlamaConfig(**TINY), {"params": "50%", "num_layers": 2}, "not both"),
        (LlamaConfig(**TINY), {}, "no target"),
        (LlamaConfig(**TINY), {"method": "sideways", "num_layers": 2}, "--method 'sideways'"),
        (
            LlamaConfig(**TINY),
            {"params": 100, "method": "depth"},
            "the smallest shape this method reaches",
        ),
        (GPT2Config(n_embd=32, n_layer=2, n_head=4), {"num_layers": 1}, "gpt2 models is not"),
    ],
)
def test_bad_targets_are_clear_errors(config, options, message):
    with pytest.raises(ShapeError, match=message):
        resolve_target(config, **options)


def test_mistral_takes_any_hidden_size():
    # Mistral's config declares head_dim and does not tie it to hidden / heads.
    method, shape = resolve_target(MistralConfig(**TINY), hidden_size=30)
    assert shape.hidden_size == 30 and shape.head_dim == 8


def test_qwen2_heads_set_the_hidden_size():
    _, shape = resolve_target(Qwen2Config(**TINY), num_heads=2, num_kv_heads=1)
    assert (shape.hidden_size, shape.num_heads, shape.head_dim) == (16, 2, 8)


@pytest.mark.parametrize("method", ["depth", "width", "both"])
@pytest.mark.parametrize("scope", ["total", "non-embedding"])
def test_budget_rule_fits_and_is_maximal(method, scope):
    config = LlamaConfig(**SMOLLM2)
    teacher = shape_of(config)
    full = count_parameters(config).scoped(scope)
    budget = full // 2
    shape = shape_for_params(config, budget, method=method, scope=scope)
    used = count_parameters(config, shape).scoped(scope)
    assert used <= budget
    assert shape.hidden_size % shape.num_heads == 0  # LlamaConfig requires it
    if method == "depth":
        assert shape.as_dict() | {"num_layers": 0} == teacher.as_dict() | {"num_layers": 0}
        bigger = Shape(**(shape.as_dict() | {"num_layers": shape.num_layers + 1}))
        assert count_parameters(config, bigger).scoped(scope) > budget
        return
    if method == "width":
        assert shape.num_layers == teacher.num_layers
    else:
        assert shape.num_layers == round(30 * 0.5**0.5)
    assert (shape.num_heads, shape.num_kv_heads) == (9, 3)  # width keeps the heads
    step = hidden_step(architecture(config), teacher)
    assert step == 9 and shape.hidden_size % step == 0  # 576 / lcm(8, 9) leaves only 8 sizes
    # The MLP filled what the hidden size left: one more MLP step would not fit.
    wider = Shape(**(shape.as_dict() | {"intermediate_size": shape.intermediate_size + 64}))
    assert count_parameters(config, wider).scoped(scope) > budget
    assert used > 0.9 * budget


def test_budget_rule_for_qwen2_moves_heads_with_hidden():
    config = Qwen2Config(
        **(TINY | {"num_attention_heads": 8, "num_key_value_heads": 4, "hidden_size": 64})
    )
    shape = shape_for_params(config, count_parameters(config).total // 2, method="width")
    assert shape.hidden_size == shape.num_heads * 8
    assert shape.num_heads % shape.num_kv_heads == 0 and shape.group_size <= 2
    assert count_parameters(config, shape).total <= count_parameters(config).total // 2


def test_budget_equal_to_the_teacher_keeps_its_shape():
    config = LlamaConfig(**TINY)
    assert shape_for_params(config, count_parameters(config).total, method="width") == shape_of(
        config
    )


def test_choose_heads_within_groups():
    teacher = Shape(1, 64, 64, 8, 2, 8)  # two groups of four query heads
    scores = np.array([0.1, 0.9, 0.8, 0.2, 0.5, 0.4, 0.3, 0.6])
    # Two heads per group, both groups kept: the best two of each group, in teacher order.
    assert choose_heads(scores, teacher, Shape(1, 64, 64, 4, 2, 8)) == ([1, 2, 4, 7], [0, 1])
    # The teacher's own heads: everything in order.
    assert choose_heads(scores, teacher, teacher) == (list(range(8)), [0, 1])
    # A group is scored by the heads it would keep: one strong head, or four middling ones.
    scores = np.array([0.95, 0.05, 0.05, 0.05, 0.4, 0.4, 0.4, 0.4])
    assert choose_heads(scores, teacher, Shape(1, 64, 64, 4, 1, 8)) == ([4, 5, 6, 7], [1])
    assert choose_heads(scores, teacher, Shape(1, 64, 64, 1, 1, 8)) == ([0], [0])
    assert choose_heads(scores, teacher, Shape(1, 64, 64, 2, 2, 8)) == ([0, 4], [0, 1])
