"""`kd demo` end to end at its smoke scale, run as a user runs it: the `kd` command.

The smoke scale goes through every step of the real demo (prune the real teacher, cache its
top-K, inspect, three training runs, evaluation of five models on two held-out sets) with a
handful of functions and steps, so the numbers are not the demo's result; the test checks the
pipeline, its outputs and that training moved every student away from its initial state.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

from kd.demo import SCALES, ModelResult, demo_runs, format_table

from .conftest import cli_env

RESULT_KEYS = {"name", "objective", "steps", "stdlib_ce", "stdlib_acc", "humaneval_ce"}


def kd_demo(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kd.cli", "demo", *args],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=timeout,
    )


def test_smoke_demo_runs_every_step_and_writes_its_outputs(tmp_path, real_teacher_dir):
    out = tmp_path / "demo"
    done = kd_demo(
        "--out", str(out), "--scale", "smoke", "--teacher", str(real_teacher_dir),
        "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    # Each step printed the command a user would type, in pipeline order.
    commands = [line[2:] for line in done.stdout.splitlines() if line.startswith("$ ")]
    steps = [" ".join(c.split()[:2]) for c in commands]
    assert steps[:3] == ["kd prune", "kd cache", "logitcache inspect"]
    assert steps[3:6] == ["kd train"] * 3
    assert steps[6:] == ["kd eval"] * 10

    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results] == [
        "teacher", "initial student", "sft", "kd+sft-70", "kd+sft",
    ]  # fmt: skip
    assert [r["objective"] for r in results] == ["teacher", "initial", "sft", "kd+sft", "kd+sft"]
    smoke = SCALES["smoke"]
    assert [r["steps"] for r in results] == [0, 0, smoke.steps, round(smoke.steps * 0.7), 6]
    for r in results:
        assert set(r) >= RESULT_KEYS
        for key in ("stdlib_ce", "stdlib_acc", "humaneval_ce", "humaneval_acc"):
            assert math.isfinite(r[key]), (r["name"], key)
    by_name = {r["name"]: r for r in results}
    initial = by_name["initial student"]
    # The teacher is a real instruction-tuned model: far better than its pruned student.
    assert by_name["teacher"]["stdlib_ce"] < initial["stdlib_ce"] - 2
    for name in ("sft", "kd+sft"):
        assert by_name[name]["stdlib_ce"] < initial["stdlib_ce"], name
    # Every student has the pruned shape; the teacher has all 134.5M parameters.
    assert by_name["teacher"]["parameters"] == 134_515_008
    assert len({r["parameters"] for r in results[1:]}) == 1

    stats = json.loads((out / "cache_stats.json").read_text())
    assert stats["records"] == smoke.train_functions
    assert (out / "eval_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(p.suffix == ".png" for p in (out / "cache-plots").iterdir())
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(results)  # the header and one row per model
    for run in demo_runs(smoke):
        metrics = (out / "runs" / run.name / "metrics.jsonl").read_text().splitlines()
        assert any(json.loads(m).get("kind") == "eval" for m in metrics), run.name


def test_demo_stops_with_the_failing_command_named(tmp_path):
    not_a_model = tmp_path / "teacher"
    not_a_model.mkdir()
    done = kd_demo(
        "--out", str(tmp_path / "demo"), "--scale", "smoke", "--teacher", str(not_a_model),
        "--no-progress",
    )  # fmt: skip
    assert done.returncode == 1
    assert "kd prune: error:" in done.stderr
    assert "kd demo: stopped: `kd prune` failed" in done.stderr


def test_table_has_the_published_shape():
    results = [
        ModelResult("sft", "sft", 100, "-", 1.5, 0.6, 1.2, 0.7, parameters=50_000_000),
        ModelResult("kd+sft-70", "kd+sft", 70, "-", 1.4, 0.61, 1.1, 0.71, 0.125, 50_000_000),
    ]
    table = format_table(results, SCALES["small"])
    assert "| sft | sft | 100 (100%) | 50.0M | 1.500 | 60.0% | 1.200 | 70.0% | |" in table
    assert "| kd+sft-70 | kd+sft | 70 (70%) | 50.0M | 1.400 | 61.0% | 1.100 | 71.0% | 12.5% |" in (
        table
    )
