"""Identity of the tokenizer a cache was written with, so a mismatched student is caught.

Token ids only mean something under one vocabulary; a fingerprint of the id -> token mapping
travels in the manifest and is compared before training, instead of failing silently later.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import xxhash

from .format import CacheError


def vocab_fingerprint(vocab: Mapping[str, int]) -> str:
    """XXH3-64 of the vocabulary as a JSON list of [id, token] pairs sorted by id."""
    pairs = sorted((int(i), str(t)) for t, i in vocab.items())
    data = json.dumps(pairs, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return f"xxh3_64:{xxhash.xxh3_64_hexdigest(data)}"


def tokenizer_identity(
    tokenizer, *, name: str | None = None, revision: str | None = None
) -> dict[str, Any]:
    """The manifest's `tokenizer` object for a tokenizer with `get_vocab()` (any HF tokenizer):
    name, revision, number of tokens and the vocabulary fingerprint."""
    vocab = tokenizer.get_vocab()
    return {
        "name": name or getattr(tokenizer, "name_or_path", None) or None,
        "revision": revision,
        "vocab_tokens": len(vocab),
        "vocab_fingerprint": vocab_fingerprint(vocab),
    }


def check_tokenizer(expected: Mapping[str, Any] | None, tokenizer, *, what: str = "cache") -> None:
    """Raise CacheError when `tokenizer` is not the one recorded in `expected` (a manifest's
    `tokenizer` object). Caches without a fingerprint cannot be checked and pass."""
    if not expected or not expected.get("vocab_fingerprint"):
        return
    got = tokenizer_identity(tokenizer)
    if got["vocab_fingerprint"] != expected["vocab_fingerprint"]:
        sizes = f"{got['vocab_tokens']} tokens vs {expected.get('vocab_tokens', '?')}"
        raise CacheError(
            f"the tokenizer {got['name'] or ''} differs from the one the {what} was written "
            f"with ({expected.get('name') or 'unnamed'}; {sizes}; fingerprint "
            f"{got['vocab_fingerprint']} vs {expected['vocab_fingerprint']}): token ids would "
            "mean different tokens; use the teacher's tokenizer, or re-run the teacher"
        )
