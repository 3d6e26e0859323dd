"""Logit caches for the kd tests, written from a tiny teacher model's real forward pass.

The teacher's top-K log-softmax rows are what `kd cache` stores; building them here from a real
(tiny, random) transformers model keeps "the loss falls" and "KL to the teacher" meaningful.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NAMES = ["add", "greet", "scale", "point", "square", "total", "fox", "lazy", "hello", "value"]


def sft_rows(n: int, *, seed: int = 0) -> list[dict]:
    """Prompt/response rows of code-like text of varied lengths (deterministic)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        name = rng.choice(NAMES)
        args = ", ".join(rng.sample(["a", "b", "x", "y", "name", "self"], rng.randint(1, 3)))
        body_lines = [
            f"    {rng.choice(['x', 'y', 'total'])} = {rng.choice(['a', 'b', 'x'])} "
            f"{rng.choice(['+', '*', '-'])} {rng.randint(1, 99)}"
            for _ in range(rng.randint(1, 6))
        ]
        prompt = f'def {name}_{i}({args}):\n    """{rng.choice(["Say hello.", "Add them."])}"""\n'
        rows.append({"id": f"row-{i}", "prompt": prompt, "response": "\n".join(body_lines) + "\n"})
    return rows


def build_teacher(
    out: Path, tokenizer, rows: list[dict], *, steps: int = 40, seed: int = 5
) -> Path:
    """A tiny Llama trained briefly on `rows`, so its next-token distributions are peaked and
    carry what the data teaches (a random teacher's are nearly uniform)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kd.data import DataStats, ExampleBuilder

    from .conftest import build_model

    build_model(out, tokenizer=tokenizer, seed=seed, hidden_size=64, intermediate_size=128)
    model = AutoModelForCausalLM.from_pretrained(out)
    builder = ExampleBuilder(tokenizer, max_length=256)
    stats = DataStats()
    examples = [builder.build(r, f"rows:{i}", i, stats) for i, r in enumerate(rows)]
    width = max(len(e.input_ids) for e in examples)
    ids = torch.zeros((len(examples), width), dtype=torch.long)
    attention = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, e in enumerate(examples):
        t = len(e.input_ids)
        ids[b, :t] = torch.from_numpy(e.input_ids.astype(np.int64))
        attention[b, :t] = 1
        labels[b, :t] = torch.where(torch.from_numpy(e.loss_mask), ids[b, :t], -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        picked = torch.randperm(len(examples), generator=gen)[:16]
        loss = model(input_ids=ids[picked], attention_mask=attention[picked], labels=labels[picked])
        loss.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out, safe_serialization=True)
    return out


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_kd_cache(
    out: Path, teacher_dir: Path, rows: list[dict], *, k: int = 8, positions: str = "supervised"
) -> Path:
    """Run the teacher over `rows` and write its top-K log-softmax at every target."""
    import torch

    from kd.data import DataStats, ExampleBuilder
    from kd.models import load_model
    from logitcache import CacheWriter
    from logitcache.identity import tokenizer_identity

    teacher = load_model(str(teacher_dir))
    builder = ExampleBuilder(teacher.tokenizer, max_length=256)
    stats = DataStats()
    with CacheWriter(
        str(out),
        k=k,
        vocab_size=int(teacher.model.get_output_embeddings().weight.shape[0]),
        positions=positions,
        teacher={"name": teacher_dir.name, "revision": "test"},
        tokenizer=tokenizer_identity(teacher.tokenizer),
        chunk_bytes=16 << 10,
        shard_bytes=64 << 10,
    ) as writer:
        for i, row in enumerate(rows):
            example = builder.build(row, f"rows:{i}", i, stats)
            ids = torch.from_numpy(example.input_ids.astype(np.int64))[None]
            with torch.no_grad():
                logprobs = torch.log_softmax(teacher.model(input_ids=ids).logits[0].float(), -1)
            # The row for target token p is the distribution predicted at position p - 1.
            if positions == "all":
                at = np.arange(1, len(example.input_ids))
            else:
                at = np.flatnonzero(example.loss_mask)
            top = logprobs[torch.from_numpy(at - 1)].topk(k, dim=1)
            writer.add(
                input_ids=example.input_ids,
                loss_mask=example.loss_mask,
                topk_ids=top.indices.numpy().astype(np.int32),
                topk_logprobs=top.values.numpy(),
                sample_id=example.sample_id,
            )
    return out


@dataclass
class KDInputs:
    """Everything a training test needs, built once per session."""

    tokenizer: object
    teacher: Path  # a tiny Llama trained on the rows
    student: Path  # a smaller, untrained Llama with the same tokenizer
    cache: Path  # the teacher's top-8 over TRAIN_ROWS records
    heldout_cache: Path  # ... over HELDOUT_ROWS other records
    heldout_jsonl: Path  # the same held-out rows as prompt/response jsonl


TRAIN_ROWS, HELDOUT_ROWS = 96, 24


def make_kd_inputs(base: Path, tokenizer) -> KDInputs:
    import torch

    from .conftest import build_model

    train_rows = sft_rows(TRAIN_ROWS, seed=0)
    heldout_rows = sft_rows(HELDOUT_ROWS, seed=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and steady on a busy machine
    try:
        teacher = build_teacher(base / "teacher", tokenizer, train_rows)
        return KDInputs(
            tokenizer=tokenizer,
            teacher=teacher,
            student=build_model(base / "student", tokenizer=tokenizer, seed=7),
            cache=build_kd_cache(base / "cache", teacher, train_rows),
            heldout_cache=build_kd_cache(base / "heldout-cache", teacher, heldout_rows),
            heldout_jsonl=write_jsonl(heldout_rows, base / "heldout.jsonl"),
        )
    finally:
        torch.set_num_threads(threads)
