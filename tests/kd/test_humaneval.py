"""HumanEval pass@1: completions cut at stop sequences, tests run sandboxed with limits."""

from __future__ import annotations

from kd.codedata import humaneval_problems
from kd.humaneval import pass_at_1, run_tests, truncate_completion
from kd.models import load_model


def test_canonical_solutions_pass_and_wrong_ones_fail():
    problems = humaneval_problems()[:4]
    for problem in problems:
        assert run_tests(problem, problem["canonical_solution"]) == "passed", problem["task_id"]
    outcome = run_tests(problems[0], "    return None\n")
    assert outcome.startswith("failed: AssertionError") or outcome.startswith("failed:")


def test_a_completion_that_never_ends_times_out():
    problem = humaneval_problems()[0]
    assert run_tests(problem, "    while True:\n        pass\n", timeout_s=1.0) == "timed out"


def test_the_sandbox_has_no_environment_and_an_empty_directory():
    problem = {
        "prompt": "import os\n",
        "test": (
            "def check(f):\n    assert os.listdir('.') == []\n    assert 'HOME' not in os.environ\n"
        ),
        "entry_point": "print",
    }
    assert run_tests(problem, "") == "passed"


def test_truncation_at_stop_sequences():
    assert truncate_completion("    return 1\n\ndef other():\n    pass") == "    return 1\n"
    assert truncate_completion("    x = 1\n    return x\nprint(f(2))") == "    x = 1\n    return x"
    assert truncate_completion("    return 2") == "    return 2"


def test_pass_at_1_runs_a_model_end_to_end(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    score, results = pass_at_1(
        loaded.model, loaded.tokenizer, limit=2, max_new_tokens=8, progress=False
    )
    assert [r.task_id for r in results] == ["HumanEval/0", "HumanEval/1"]
    assert score == sum(r.passed for r in results) / 2
    assert all(r.outcome for r in results)
