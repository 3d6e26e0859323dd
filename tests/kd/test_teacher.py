"""kd.teacher: the stored top-K equals a direct full-vocabulary forward, at exactly the targets.

Tiny Llama, Qwen2 and Gemma 2 teachers (random weights, built from configs) and the real
SmolLM2 teacher are run through `cache_teacher`; each record is compared with the model's own
`model(input_ids).logits.log_softmax(-1)` on that record alone, unpadded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kd.data import Example, ExampleBuilder, count_rows, iter_examples, source_fingerprint
from kd.models import LoadedModel, hash_files, load_model, packaged_gguf
from kd.scoring import HeadMismatchError, TopKScorer, topk_logprobs_
from kd.teacher import cache_teacher
from kd.teacher_batching import MAX_PADDING, stored_positions, token_budget_batches
from logitcache import open_cache
from logitcache.identity import tokenizer_identity

from .conftest import build_tokenizer

K = 16
CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "add two numbers"},
    {"role": "assistant", "content": "def add(a, b):\n    return a + b\n"},
    {"role": "user", "content": "and greet?"},
    {"role": "assistant", "content": 'def greet(name):\n    return f"hello {name}"\n'},
]


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def every_format(tokenizer) -> list[dict]:
    """Rows of each input shape, of varied lengths so batches need padding."""
    ids = tokenizer("import os\nimport sys\n\nclass Point:\n    def __init__(self, x, y):")[
        "input_ids"
    ]
    rows = [
        {"id": "chat", "messages": CHAT},
        {"id": "chat-short", "messages": CHAT[1:3]},
        {"prompt": "def add(a, b):\n", "response": "    return a + b\n"},
        {"prompt": "for i in range(10):\n", "response": "    print(i * i)\n" * 3},
        {"text": "The quick brown fox jumps over the lazy dog."},
        {"text": "Hello there, how are you today?"},
        {"input_ids": ids, "loss_mask": [0] * 5 + [1] * (len(ids) - 5)},
        {"input_ids": ids[:12], "labels": [-100] * 4 + ids[4:10] + [-100, ids[11]]},
    ]
    return rows + [{"id": f"text-{i}", "text": "x = 1\n" * (i + 1)} for i in range(6)]


def reference_logprobs(model, input_ids: np.ndarray) -> torch.Tensor:
    """[T, V] fp32 log-softmax of the model's own forward over one unpadded sequence."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor(input_ids, dtype=torch.int64)[None]).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def assert_rows_match_forward(model, record, positions: np.ndarray, k: int) -> None:
    """Stored rows at `positions` are the forward's top-k within fp16 rounding."""
    reference = reference_logprobs(model, record.input_ids)[positions - 1]
    stored = torch.as_tensor(record.topk_logprobs.astype(np.float32))
    ids = torch.as_tensor(record.topk_ids.astype(np.int64))
    assert stored.shape == (positions.size, k)
    # The stored value of each id is the forward's log-probability of that id...
    torch.testing.assert_close(reference.gather(1, ids), stored, atol=2e-3, rtol=1e-3)
    # ...and no id outside the stored set is more likely than the K-th stored one (up to the
    # fp16 rounding of the stored value: half a unit in the last place, 2**-11 relative).
    kth = reference.topk(k, dim=-1).values[:, -1]
    assert (kth <= stored[:, -1] + 2e-3 + 1e-3 * stored[:, -1].abs()).all()


def expected_examples(path: str, tokenizer, **options) -> dict[str, Example]:
    builder = ExampleBuilder(tokenizer, **options)
    return {e.sample_id: e for e in iter_examples(path, builder)}


@pytest.fixture(scope="module")
def tiny_teachers(tiny_llama_dir, tiny_qwen2_dir):
    return {
        "llama": load_model(str(tiny_llama_dir)),
        "qwen2": load_model(str(tiny_qwen2_dir)),
    }


def test_batches_keep_the_budget_every_example_and_their_order():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 60, size=203)
    examples = [
        Example(str(i), np.arange(n, dtype=np.int32) % 50, np.arange(n) % 3 == 1)
        for i, n in enumerate(lengths)
    ]

    def run():
        return list(
            token_budget_batches(examples, batch_tokens=128, sort_window=50, max_batch_size=6)
        )

    batches = run()
    assert [b.index for b in batches] == list(range(len(batches)))
    seen = [e.sample_id for b in batches for e in b.examples]
    assert sorted(seen, key=int) == [str(i) for i in range(203)]  # each exactly once
    for b in batches:
        assert len(b.examples) <= 6
        assert b.padded_tokens <= 128 or len(b.examples) == 1
        assert b.padded_tokens - b.tokens <= MAX_PADDING * b.padded_tokens
        assert list(b.lengths) == sorted(b.lengths, reverse=True)
        # Every row points at the hidden state just before a target of its own example.
        width = b.input_ids.shape[1]
        start = 0
        for i, (e, n) in enumerate(zip(b.examples, b.row_counts, strict=True)):
            want = i * width + stored_positions(e, "supervised") - 1
            np.testing.assert_array_equal(b.rows[start : start + n], want)
            np.testing.assert_array_equal(b.input_ids[i, : len(e.input_ids)], e.input_ids)
            start += n
    # Sorting happens only within windows of 50 examples, and the order is reproducible.
    first_window = {str(i) for i in range(50)}
    head = [e.sample_id for b in batches for e in b.examples][:50]
    assert set(head) == first_window
    assert [[e.sample_id for e in b.examples] for b in run()] == [
        [e.sample_id for e in b.examples] for b in batches
    ]


def test_rank_parts_are_disjoint_and_cover_the_rows(tiny_tokenizer, tmp_path):
    rows = [{"id": f"r{i}", "text": "x = 1\n" * (1 + i % 4)} for i in range(11)]
    write_jsonl(tmp_path / "a.jsonl", rows[:6])
    write_jsonl(tmp_path / "b.jsonl", rows[6:])
    with open(tmp_path / "b.jsonl", "a") as f:
        f.write("\n   \n")  # blank lines are not rows
    assert count_rows(str(tmp_path)) == 11
    builder = ExampleBuilder(tiny_tokenizer)
    parts = [
        [e.sample_id for e in iter_examples(str(tmp_path), builder, part=(r, 3), max_rows=10)]
        for r in range(3)
    ]
    assert parts[1] == ["r1", "r4", "r7"]
    assert sorted(sum(parts, []), key=lambda s: int(s[1:])) == [f"r{i}" for i in range(10)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_stored_rows_equal_a_full_forward_for_every_row_format(arch, tiny_teachers, tmp_path):
    teacher = tiny_teachers[arch]
    data = write_jsonl(tmp_path / "rows.jsonl", every_format(teacher.tokenizer))
    out = tmp_path / "cache"
    summary = cache_teacher(
        teacher, data, str(out), k=K, batch_tokens=96, sort_window=5, threads=1, progress=False
    )
    cache = open_cache(str(out))
    want = expected_examples(data, teacher.tokenizer)
    assert summary.records == len(cache) == len(want) == 14
    assert (
        summary.scored_targets
        == cache.manifest.targets
        == sum(e.num_targets for e in want.values())
    )
    for record in cache.iter_records():
        example = want[record.sample_id]
        # Exactly the tokens and targets the data module defines for the row.
        np.testing.assert_array_equal(record.input_ids, example.input_ids)
        np.testing.assert_array_equal(record.loss_mask, example.loss_mask)
        assert_rows_match_forward(teacher.model, record, np.flatnonzero(example.loss_mask), K)


def test_chat_template_prompts_and_all_positions(tiny_teachers, tmp_path):
    teacher = tiny_teachers["llama"]
    rows = [
        {"prompt": "def add(a, b):\n", "response": "    return a + b\n"},
        {"prompt": "greet", "response": 'def greet(name):\n    """Say hello."""\n'},
    ]
    data = write_jsonl(tmp_path / "pr.jsonl", rows)
    out = tmp_path / "cache"
    cache_teacher(
        teacher,
        data,
        str(out),
        k=8,
        positions="all",
        chat_template=True,
        threads=1,
        progress=False,
    )
    cache = open_cache(str(out))
    assert cache.manifest.positions == "all"
    want = expected_examples(data, teacher.tokenizer, chat_template=True)
    for record in cache.iter_records():
        example = want[record.sample_id]
        assert teacher.tokenizer.decode(example.input_ids).startswith("<|im_start|>user\n")
        np.testing.assert_array_equal(record.loss_mask, example.loss_mask)
        positions = np.arange(1, len(record.input_ids))
        assert_rows_match_forward(teacher.model, record, positions, 8)


def test_the_manifest_records_where_the_cache_came_from(tiny_teachers, tiny_llama_dir, tmp_path):
    teacher = tiny_teachers["llama"]
    data = write_jsonl(tmp_path / "rows.jsonl", every_format(teacher.tokenizer)[:4])
    out = tmp_path / "cache"
    cache_teacher(teacher, data, str(out), k=4, max_length=40, threads=1, progress=False)
    manifest = open_cache(str(out)).manifest
    assert manifest.k == 4 and manifest.positions == "supervised"
    assert manifest.vocab_size == teacher.identity["vocab_rows"]
    assert manifest.teacher["source"] == str(tiny_llama_dir)
    assert manifest.teacher["weights_hash"] == teacher.identity["weights_hash"]
    assert manifest.teacher["dtype"] == "float32"
    fingerprint = tokenizer_identity(teacher.tokenizer)["vocab_fingerprint"]
    assert manifest.tokenizer["vocab_fingerprint"] == fingerprint
    assert manifest.tokenizer["name"] == "tiny-llama"
    recorded = manifest.metadata["kd_cache"]
    assert recorded["data"] == {"url": data, "fingerprint": source_fingerprint(data)}
    assert recorded["options"]["max_length"] == 40
    assert recorded["options"]["overflow"] == "truncate"


def test_final_logit_softcapping_is_applied_like_the_model_does(tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tokenizer = build_tokenizer()
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        final_logit_softcapping=2.0,  # small, so that capping changes every logit a lot
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).eval()
    teacher = LoadedModel(model, tokenizer, "gemma2-tiny", {"name": "gemma2-tiny"})
    data = write_jsonl(tmp_path / "rows.jsonl", every_format(tokenizer)[2:6])
    cache_teacher(teacher, data, str(tmp_path / "c"), k=8, threads=1, progress=False)
    for record in open_cache(str(tmp_path / "c")).iter_records():
        assert_rows_match_forward(model, record, np.flatnonzero(record.loss_mask), 8)


@pytest.mark.parametrize("vocab", [49152, 50021, 300])
def test_blockwise_top_k_is_exact(vocab):
    """The two-step selection equals a plain top-K of the log-softmax, with a partial last
    block (50021), rows of many equal values, and a vocabulary too small for blocks (300)."""
    k = 50
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(24, vocab, generator=gen) * 4
    logits[3] = 1.0  # all tied
    logits[4, -7:] = 30.0  # the largest entries in the partial block
    logits[5, ::97] = 25.0  # spread over many blocks
    reference = torch.log_softmax(logits, dim=-1)
    values, ids = topk_logprobs_(logits.clone(), k)
    torch.testing.assert_close(values, reference.topk(k, dim=-1).values, atol=1e-5, rtol=0)
    torch.testing.assert_close(reference.gather(1, ids), values, atol=1e-5, rtol=0)
    assert (ids.sort(dim=-1).values.diff(dim=-1) > 0).all()  # k distinct ids per row


def test_a_head_or_padding_that_differs_from_the_forward_is_caught(tiny_teachers):
    model = tiny_teachers["llama"].model
    ids = np.arange(3, 40, dtype=np.int64)  # no 0: the check pads with id 0
    scorer = TopKScorer(model, k=8)
    assert scorer.check_against_forward(ids) < 1e-3
    scorer.softcap = 1.0  # a transformation the model itself does not apply
    with pytest.raises(HeadMismatchError, match="output layer differs from the model"):
        scorer.check_against_forward(ids)
    leaky = TopKScorer(model, k=8)
    body = leaky.hidden_states
    # States that depend on the padding of their row, as a non-causal model's would.
    leaky.hidden_states = lambda batch: body(batch) + (batch == 0).sum(1)[:, None, None]
    with pytest.raises(HeadMismatchError, match="padded batch differs from the model"):
        leaky.check_against_forward(ids)


def test_real_teacher_from_its_gguf_on_chat_rows(real_teacher, tmp_path):
    """SmolLM2-135M-Instruct, loaded from the GGUF file with the tokenizer it holds, on a few
    conversations: targets are exactly the assistant turns, rows equal the forward pass of the
    same weights (exported once as safetensors by the session fixture)."""
    tokenizer = real_teacher.tokenizer
    rows = [
        {"id": "add", "messages": CHAT[1:3]},
        {"id": "two-turns", "messages": CHAT},
        {
            "id": "sort",
            "messages": [
                {"role": "user", "content": "Sort a list in Python."},
                {"role": "assistant", "content": "Use sorted(items) or items.sort()."},
            ],
        },
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "cache"
    summary = cache_teacher(packaged_gguf(), data, str(out), k=K, threads=1, progress=False)
    cache = open_cache(str(out))
    assert summary.records == len(cache) == 3
    teacher = cache.manifest.teacher
    assert teacher["source"] == packaged_gguf() and teacher["architecture"] == "LlamaForCausalLM"
    assert teacher["weights_hash"] == hash_files([packaged_gguf()])
    assert (
        cache.manifest.tokenizer["vocab_fingerprint"]
        == (tokenizer_identity(tokenizer)["vocab_fingerprint"])
    )
    for record in cache.iter_records():
        mask = record.loss_mask
        spans = np.split(
            np.flatnonzero(mask), np.flatnonzero(np.diff(np.flatnonzero(mask)) > 1) + 1
        )
        texts = [tokenizer.decode(record.input_ids[s]) for s in spans]
        turns = [m for m in next(r for r in rows if r["id"] == record.sample_id)["messages"]]
        assert texts == [m["content"] + "<|im_end|>" for m in turns if m["role"] == "assistant"]
        assert_rows_match_forward(real_teacher.model, record, np.flatnonzero(mask), K)
