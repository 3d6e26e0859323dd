"""The student of a training run: loaded or freshly initialised, checked against the cache, and
wrapped in the module that DDP / FSDP see (the decoder body plus a loss head on the lm_head).

The fused loss works on hidden states and the lm_head weight, never on [tokens, vocab] logits,
so the student's own forward (which would materialise them) is not called; models that change
logits after the lm_head (soft-capping, logit scales) are refused, since the loss would not see
that change.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from logitcache.format import CacheError
from logitcache.identity import check_tokenizer

from .models import ModelLoadError, check_vocab, embedding_rows, load_model, load_tokenizer

# Config fields of transformers models that rescale logits after the lm_head.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class Student:
    model: Any  # transformers PreTrainedModel, float32, in train mode
    tokenizer: Any
    source: str

    @property
    def vocab_rows(self) -> int:
        return embedding_rows(self.model)


def load_student(
    path: str, *, init: str = "pretrained", tokenizer: str = "", seed: int = 0
) -> Student:
    """The student from a model directory: its weights, or fresh ones from its config.json.

    Weights load as float32 on the CPU (autocast handles lower precision); a random student is
    initialised from `seed`, identically on every rank.
    """
    if init == "pretrained":
        loaded = load_model(path, device="cpu", dtype="float32", tokenizer=tokenizer or None)
        model, tok = loaded.model, loaded.tokenizer
    else:
        model = _random_model(path, seed)
        tok = load_tokenizer(tokenizer or path)
        check_vocab(model, tok, where=path)
    _check_head(model, path)
    model.train()
    return Student(model=model, tokenizer=tok, source=path)


def _random_model(path: str, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelLoadError(
            f"{path}: no config.json; student_init=random needs a directory holding the "
            "model's config.json and its tokenizer"
        )
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    torch.manual_seed(seed)
    try:
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except ValueError as exc:
        raise ModelLoadError(
            f"{path}: {type(config).__name__} is not a causal language model ({exc})"
        ) from None


def _check_head(model, where: str) -> None:
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ModelLoadError(
            f"{where}: the output layer is {type(head).__name__}, not a linear lm_head; the "
            "fused KD loss needs hidden states and an lm_head weight"
        )
    for name in _LOGIT_TRANSFORMS:
        value = getattr(model.config, name, None)
        if value not in (None, 1, 1.0):
            raise ModelLoadError(
                f"{where}: config.{name} = {value} changes the logits after the lm_head, which "
                "the fused loss does not apply; this architecture is not supported"
            )


def check_against_cache(
    manifest,
    student: Student,
    *,
    vocab_size: int = 0,
    ignore_tokenizer_mismatch: bool = False,
    ignore_vocab_mismatch: bool = False,
    where: str = "cache",
) -> int:
    """Check the student can learn from a cache; returns the columns the loss uses.

    The manifest's tokenizer fingerprint must match the student's tokenizer. The student must
    score every id of the teacher's vocabulary: more rows (a padded embedding, 152064 for
    151936) is fine, and the padding columns are kept out of the softmax; fewer is an error
    unless overridden. Raises ValueError naming both sides and the fix.
    """
    if not (manifest.tokenizer or {}).get("vocab_fingerprint"):
        warnings.warn(
            f"the {where} records no tokenizer fingerprint, so the student's tokenizer cannot be "
            "checked against the teacher's; token ids are assumed to mean the same tokens",
            stacklevel=2,
        )
    elif not ignore_tokenizer_mismatch:
        try:
            check_tokenizer(manifest.tokenizer, student.tokenizer, what=where)
        except CacheError as exc:
            raise ValueError(
                f"{exc}; or set ignore_tokenizer_mismatch=true if the ids are known to agree"
            ) from None
    rows, teacher_vocab = student.vocab_rows, int(manifest.vocab_size)
    if rows < teacher_vocab and not ignore_vocab_mismatch:
        raise ValueError(
            f"the student {student.source} scores {rows} tokens but the {where} was written for "
            f"a teacher vocabulary of {teacher_vocab}: teacher ids >= {rows} could not be "
            "learned; use a student with the teacher's tokenizer and vocabulary (or set "
            "ignore_vocab_mismatch=true: a teacher row naming such an id then stops training "
            "with an error)"
        )
    columns = vocab_size or min(rows, teacher_vocab)
    if columns > rows:
        raise ValueError(
            f"vocab_size = {columns} exceeds the student's {rows} output columns "
            f"({student.source}); leave it 0 to use the cache's vocab_size"
        )
    if len(student.tokenizer) > columns:
        raise ValueError(
            f"vocab_size = {columns} leaves out tokens of the student's tokenizer "
            f"({len(student.tokenizer)} entries); leave it 0 to use the cache's vocab_size"
        )
    return columns


# Head functions get (hidden [B, L, D], lm_head weight, lm_head bias, batch) and return what
# the caller needs (a loss, or evaluation sums).
Head = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, dict], Any]


class StudentWithHead(torch.nn.Module):
    """The module DDP and FSDP wrap: runs the decoder body, then a head on the lm_head weight.

    Going through this module's forward is what lets DDP hook the backward and FSDP gather the
    sharded lm_head, so every use of the student (training and evaluation) calls it.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], head: Head):
        body = self.model.base_model
        out = body(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            use_cache=False,
        )
        lm_head = self.model.get_output_embeddings()
        return head(out.last_hidden_state, lm_head.weight, lm_head.bias, batch)
