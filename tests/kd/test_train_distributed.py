"""kd train under torchrun: two CPU processes (gloo) with DDP and with FSDP2.

Each run records the sample ids every rank trained on (by wrapping the micro-batch stream in
the launched script), so the test can check that ranks read disjoint records; the saved model
must load with from_pretrained and evaluate. The FSDP run is resumed from its mid-run
checkpoint in a second launch, which must reproduce the steps after it.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from kd.evaluate import evaluate_model
from kd.metrics import read_metrics

from .conftest import cli_env

LAUNCHED = textwrap.dedent(
    """
    import json, os, sys

    import kd.batching as batching
    from kd.cli import main

    seen = []
    original = batching.MicroBatchStream.__next__

    def recording(self):
        batch = original(self)
        seen.append(list(batch["sample_ids"]))
        return batch

    batching.MicroBatchStream.__next__ = recording
    code = main(sys.argv[1:])
    out = os.path.join(os.environ["SAMPLES_DIR"], f"samples-rank{os.environ['RANK']}.json")
    with open(out, "w") as f:
        json.dump(seen, f)
    sys.exit(code)
    """
)


def torchrun(script, args, samples_dir, timeout=300):
    env = cli_env()
    env["SAMPLES_DIR"] = str(samples_dir)
    samples_dir.mkdir(parents=True, exist_ok=True)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return [json.loads((samples_dir / f"samples-rank{r}.json").read_text()) for r in range(2)]


def train_args(kd_inputs, out, strategy, *extra):
    return [
        "train",
        f"student={kd_inputs.student}",
        f"cache={kd_inputs.cache}",
        f"output_dir={out}",
        f"distributed={strategy}",
        f"eval_data={kd_inputs.heldout_cache}",
        "eval_every=3",
        "max_steps=6",
        "batch_size=4",
        "lr=3e-3",
        "log_every=1",
        "save_every=3",
        "keep_checkpoints=0",
        "num_workers=1",
        "plot=false",
        "--quiet",
        *extra,
    ]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_train_on_disjoint_data_and_save_a_loadable_model(kd_inputs, tmp_path, strategy):
    script = tmp_path / "launched.py"
    script.write_text(LAUNCHED)
    out = tmp_path / "run"
    per_rank = torchrun(script, train_args(kd_inputs, out, strategy), tmp_path / "samples")

    # Each rank took 6 micro-batches of 4 records; no record went to both ranks.
    ids = [[i for batch in batches for i in batch] for batches in per_rank]
    assert [len(x) for x in ids] == [24, 24]
    assert not set(ids[0]) & set(ids[1])
    assert len(set(ids[0]) | set(ids[1])) == 48

    records = read_metrics(str(out))
    steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in steps)
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert evals[-1]["eval_kd"] < evals[0]["eval_kd"]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert sum(p.numel() for p in model.parameters()) > 0
    scored = evaluate_model(str(out / "model"), str(kd_inputs.heldout_cache))
    untrained = evaluate_model(str(kd_inputs.student), str(kd_inputs.heldout_cache))
    assert scored.kl < untrained.kl and scored.ce < untrained.ce
    # What rank 0 evaluated during the run (over both ranks' halves) is what the saved model gets.
    assert scored.kl == pytest.approx(evals[-1]["eval_kd"], rel=1e-4)

    if strategy != "fsdp":
        return
    # Resume the sharded run from its step-3 checkpoint: steps 4-6 come out the same.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-0000006")
    torchrun(
        script,
        [*train_args(kd_inputs, resumed, strategy), "--resume", "latest"],
        tmp_path / "samples-resumed",
    )
    again = {r["step"]: r for r in read_metrics(str(resumed)) if r["kind"] == "train"}
    for r in steps:
        assert again[r["step"]]["loss"] == pytest.approx(r["loss"], rel=1e-5), r["step"]
    a = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed / "model").state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
