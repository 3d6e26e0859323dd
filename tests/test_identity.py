"""The tokenizer fingerprint: stable for one vocabulary, different for any change, checked."""

from __future__ import annotations

import pytest

from logitcache import CacheError
from logitcache.identity import check_tokenizer, tokenizer_identity, vocab_fingerprint


class FakeVocab:
    """Anything with get_vocab() works; real HF tokenizers are covered in test_cli."""

    def __init__(self, vocab):
        self.vocab = vocab
        self.name_or_path = "toy"

    def get_vocab(self):
        return dict(self.vocab)


def test_fingerprint_ignores_dict_order_and_sees_every_change():
    vocab = {"a": 0, "b": 1, "ĠThe": 2, "é": 3}
    same = dict(reversed(list(vocab.items())))
    assert vocab_fingerprint(vocab) == vocab_fingerprint(same)
    assert vocab_fingerprint(vocab) != vocab_fingerprint({**vocab, "c": 4})
    assert vocab_fingerprint(vocab) != vocab_fingerprint({"a": 1, "b": 0, "ĠThe": 2, "é": 3})
    assert vocab_fingerprint(vocab).startswith("xxh3_64:")


def test_check_tokenizer_accepts_the_same_and_names_a_mismatch():
    teacher = FakeVocab({f"t{i}": i for i in range(10)})
    identity = tokenizer_identity(teacher, revision="r1")
    assert identity["vocab_tokens"] == 10 and identity["name"] == "toy"
    check_tokenizer(identity, FakeVocab(teacher.vocab))
    check_tokenizer(None, teacher)  # caches without identity cannot be checked
    student = FakeVocab({f"t{i}": i for i in range(11)})
    with pytest.raises(CacheError, match="11 tokens vs 10.*teacher's tokenizer"):
        check_tokenizer(identity, student)


def test_convert_records_the_fingerprint_of_a_local_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from logitcache.convert import tokenizer_identity as identity_of_dir

    vocab = {f"w{i}": i for i in range(20)}
    PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0")), unk_token="w0"
    ).save_pretrained(tmp_path)
    identity, size = identity_of_dir(str(tmp_path))
    assert size == 20
    assert identity["vocab_fingerprint"] == vocab_fingerprint(vocab)
