"""SFT rows to examples: every row shape, exact assistant targets, truncation and bad rows."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from kd.data import DataError, DataStats, ExampleBuilder, iter_examples, source_fingerprint

from .conftest import build_tokenizer


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def targets_text(tokenizer, example) -> str:
    return tokenizer.decode(example.input_ids[example.loss_mask])


def test_messages_targets_are_exactly_the_assistant_turns(tiny_tokenizer, tmp_path):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "add?"},
        {"role": "assistant", "content": "def add(a, b):\n    return a + b\n"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"id": "c1", "messages": messages}])
    (example,) = iter_examples(path, ExampleBuilder(tiny_tokenizer))
    assert example.sample_id == "c1"
    # The whole sequence is the template's rendering, token for token.
    whole = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert tiny_tokenizer.decode(example.input_ids) == whole
    # Targets: each turn's content and its end-of-turn token, nothing of the prompts.
    mask = example.loss_mask
    runs = np.split(np.flatnonzero(mask), np.flatnonzero(np.diff(np.flatnonzero(mask)) > 1) + 1)
    texts = [tiny_tokenizer.decode(example.input_ids[r]) for r in runs]
    assert texts == ["hello there<|im_end|>", "def add(a, b):\n    return a + b\n<|im_end|>"]
    # The tokens before each turn are what the template renders with the generation prompt.
    prompt = tiny_tokenizer.apply_chat_template(
        messages[:2], tokenize=False, add_generation_prompt=True
    )
    assert tiny_tokenizer.decode(example.input_ids[: runs[0][0]]) == prompt


def test_prompt_response_and_chat_template_option(tiny_tokenizer):
    row = {"prompt": "def add(a, b):\n", "response": "    return a + b\n"}
    stats = DataStats()
    plain = ExampleBuilder(tiny_tokenizer).build(row, "w", 7, stats)
    assert plain.sample_id == "7"
    assert targets_text(tiny_tokenizer, plain) == "    return a + b\n<|im_end|>"
    assert tiny_tokenizer.decode(plain.input_ids[~plain.loss_mask]) == "def add(a, b):\n"
    chat = ExampleBuilder(tiny_tokenizer, chat_template=True).build(row, "w", 0, stats)
    assert tiny_tokenizer.decode(chat.input_ids).startswith("<|im_start|>user\ndef add")
    assert targets_text(tiny_tokenizer, chat) == "    return a + b\n<|im_end|>"
    no_eos = ExampleBuilder(tiny_tokenizer, add_eos=False).build(row, "w", 0, stats)
    assert targets_text(tiny_tokenizer, no_eos) == "    return a + b\n"


def test_text_and_pretokenized_rows(tiny_tokenizer):
    builder = ExampleBuilder(tiny_tokenizer)
    stats = DataStats()
    text = builder.build({"text": "for i in range(10):"}, "w", 0, stats)
    assert not text.loss_mask[0] and text.loss_mask[1:].all()
    ids = [5, 6, 7, 8, 9]
    by_mask = builder.build({"input_ids": ids, "loss_mask": [1, 0, 1, True, 0]}, "w", 0, stats)
    np.testing.assert_array_equal(by_mask.loss_mask, [False, False, True, True, False])
    labels = builder.build({"input_ids": ids, "labels": [5, -100, 7, 8, -100]}, "w", 0, stats)
    np.testing.assert_array_equal(labels.loss_mask, [False, False, True, True, False])
    everything = builder.build({"input_ids": ids}, "w", 0, stats)
    assert everything.loss_mask.sum() == 4
    assert by_mask.input_ids.dtype == np.int32


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "role is 'bot'"),
        ({"messages": [{"role": "assistant", "content": 3}]}, "content must be a string"),
        ({"prompt": "x", "response": ""}, "'response' is empty"),
        ({"prompt": 1, "response": "x"}, "'prompt' must be a string"),
        ({"text": ""}, "non-empty string"),
        ({"input_ids": [1, 2.5]}, r"input_ids\[1\] = 2.5 is not an integer"),
        ({"input_ids": [1, True]}, r"input_ids\[1\] = True"),
        ({"input_ids": [1, 99999]}, "outside the vocabulary"),
        ({"input_ids": [1, 2], "loss_mask": [0, 2]}, "0/1"),
        ({"input_ids": [1, 2, 3], "labels": [-100, 3, 3]}, "unshifted copies"),
        ({"other": 1}, "no known fields"),
    ],
)
def test_bad_rows_name_the_row_and_field(tiny_tokenizer, row, message):
    with pytest.raises(DataError, match=message) as info:
        ExampleBuilder(tiny_tokenizer).build(row, "data.jsonl:line 3", 2, DataStats())
    assert "data.jsonl:line 3" in str(info.value)


def test_messages_need_a_chat_template(tmp_path):
    tokenizer = build_tokenizer(chat_template=False)
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(DataError, match="chat template"):
        ExampleBuilder(tokenizer).build(row, "w", 0, DataStats())


def test_a_template_that_rewrites_earlier_turns_is_refused(tiny_tokenizer):
    tokenizer = build_tokenizer()
    # Renders the last message differently from earlier ones: prefixes are not prefixes.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m['content'] }}|"
        "{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(DataError, match="cannot be found exactly"):
        ExampleBuilder(tokenizer).build(row, "w", 0, DataStats())


def test_max_length_truncates_or_skips_and_counts(tiny_tokenizer, tmp_path):
    rows = [
        {"text": "for i in range(10):\n    print(i * i)\n" * 4},
        {"prompt": "x " * 40, "response": "y"},  # the response falls beyond max_length
        {"text": "hi there"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    stats = DataStats()
    out = list(iter_examples(path, ExampleBuilder(tiny_tokenizer, max_length=16), stats=stats))
    assert [len(e.input_ids) for e in out][0] == 16
    assert (stats.truncated, stats.skipped_no_target, stats.examples) == (2, 1, 2)
    stats = DataStats()
    builder = ExampleBuilder(tiny_tokenizer, max_length=16, overflow="skip")
    out = list(iter_examples(path, builder, stats=stats))
    assert (stats.skipped_too_long, stats.examples) == (2, 1)
    assert "skipped as longer than --max-length" in stats.summary()


def test_malformed_lines_fail_with_line_number_or_are_counted(tiny_tokenizer, tmp_path):
    rows = [{"text": "a b"}, "{not json", "[1, 2]", "", {"text": "c d"}, {"nope": 1}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"d.jsonl:line 2: not valid JSON"):
        list(iter_examples(path, ExampleBuilder(tiny_tokenizer)))
    stats = DataStats()
    out = list(iter_examples(path, ExampleBuilder(tiny_tokenizer), skip_bad_rows=True, stats=stats))
    assert len(out) == 2 and stats.skipped_bad == 3
    assert "line 3: a row must be a JSON object" in stats.first_bad[1]
    # Row numbers (the sample_id default) count rows, not blank lines.
    assert [e.sample_id for e in out] == ["0", "3"]


def test_parquet_gzip_directories_and_the_fingerprint(tiny_tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(
        pa.table({"text": ["one two", "three four"], "id": ["a", "b"]}), data / "0.parquet"
    )
    with gzip.open(data / "1.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "five six"}) + "\n")
    (data / "notes.txt").write_text("ignored")
    out = list(iter_examples(str(data), ExampleBuilder(tiny_tokenizer)))
    assert [e.sample_id for e in out] == ["a", "b", "2"]
    before = source_fingerprint(str(data))
    assert before == source_fingerprint(str(data))
    with gzip.open(data / "1.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "five seven"}) + "\n")
    assert source_fingerprint(str(data)) != before


def test_missing_data_is_a_clear_error(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match="no such file"):
        list(iter_examples(str(tmp_path / "nope.jsonl"), ExampleBuilder(tiny_tokenizer)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data files"):
        list(iter_examples(str(tmp_path / "empty"), ExampleBuilder(tiny_tokenizer)))
