"""Stages of a kd train run: a general phase, then a domain-alignment phase with a mixture, each
with its own schedule; checkpoints record the stage and a resume anywhere continues exactly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from kd.config import ConfigError, load_config, write_config
from kd.metrics import read_metrics
from kd.stages import plan_stages
from kd.train import train

from .conftest import build_model, build_tokenizer, cli_env
from .kd_helpers import build_kd_cache, sft_rows
from .test_train import config_for, train_losses, weights

REQUIRED = ["student=s", "output_dir=o"]


def two_stages(kd_inputs, domain_cache) -> list[dict]:
    """The recipe in miniature: a general phase on one cache, then a domain phase on a mixture
    whose domain source has its own loss settings."""
    return [
        {"name": "general", "max_steps": 5, "lr": 3e-3, "lr_schedule": "constant"},
        {
            "name": "domain",
            "max_steps": 6,
            "lr": 1e-3,
            "warmup_steps": 2,
            "sources": [
                {"name": "general", "cache": str(kd_inputs.cache), "weight": 0.3},
                {
                    "name": "domain",
                    "cache": str(domain_cache),
                    "weight": 0.7,
                    "temperature": 2.0,
                    "sft_weight": 1.0,
                },
            ],
        },
    ]


def assert_same_sources(got: dict, want: dict) -> None:
    assert got["sources"].keys() == want["sources"].keys()
    for name, values in want["sources"].items():
        for key, value in values.items():  # None: the source had no rows in those steps
            expected = value if value is None else pytest.approx(value, rel=1e-6)
            assert got["sources"][name][key] == expected, (name, key)


def test_a_resumed_staged_run_equals_the_uninterrupted_one(kd_inputs, domain, tmp_path):
    settings = dict(
        stages=two_stages(kd_inputs, domain["cache"]),
        batch_size=4,
        grad_accum=2,
        group_batches=2,
        save_every=2,
        keep_checkpoints=0,
        eval_data=str(kd_inputs.heldout_cache),
    )
    whole = tmp_path / "whole"
    result = train(config_for(kd_inputs, whole, **settings), progress=False)
    assert result.steps == 11
    records = read_metrics(str(whole))
    steps = {r["step"]: r for r in records if r["kind"] == "train"}
    assert [steps[s]["stage"] for s in range(1, 12)] == ["general"] * 5 + ["domain"] * 6
    assert all("sources" not in steps[s] for s in range(1, 6))
    for s in range(6, 12):
        sources = steps[s]["sources"]
        assert set(sources) == {"general", "domain"} and sources["domain"]["kd"] is not None
    # Each stage has its own schedule: constant 3e-3, then warmup to 1e-3 and cosine decay.
    assert [steps[s]["lr"] for s in range(1, 6)] == [3e-3] * 5
    assert steps[6]["lr"] == pytest.approx(0.5e-3) and steps[7]["lr"] == pytest.approx(1e-3)
    assert steps[8]["lr"] == pytest.approx(1e-3) and steps[11]["lr"] < steps[9]["lr"] < 1e-3
    evals = [(r["step"], r["stage"]) for r in records if r["kind"] == "eval"]
    assert evals == [(0, "general"), (5, "general"), (11, "domain")]  # stage ends are evaluated
    for name in ("general", "domain"):
        assert (whole / "stages" / name / "model.safetensors").is_file()
    state = json.loads((whole / "checkpoints/step-0000008/trainer_state.json").read_text())
    assert state["stage"] == {"index": 1, "name": "domain", "step": 3}
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["stages"]["general"]["steps"] == 5

    # Resume inside the first stage, at the stage boundary, and inside the mixture stage.
    for cut in (4, 5, 8):
        resumed = tmp_path / f"resumed-{cut}"
        shutil.copytree(whole, resumed)
        for later in resumed.glob("checkpoints/step-*"):
            if int(later.name.split("-")[1]) > cut:
                shutil.rmtree(later)
        for leftover in ("model", "stages", "summary.json"):
            path = resumed / leftover
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        train(config_for(kd_inputs, resumed, **settings), resume="latest", progress=False)
        first, second = train_losses(whole), train_losses(resumed)
        assert sorted(second) == list(range(1, 12))
        for step in range(cut + 1, 12):
            for key in ("loss", "kd", "ce", "grad_norm", "lr"):
                assert second[step][key] == pytest.approx(first[step][key], rel=1e-6), (cut, step)
            if step > 5:
                assert_same_sources(second[step], first[step])
        a, b = weights(whole / "model"), weights(resumed / "model")
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7, msg=(cut, name))
        assert (resumed / "stages" / "domain" / "model.safetensors").is_file()


def test_a_source_with_another_tokenizer_is_refused_naming_it(kd_inputs, tmp_path):
    other = build_model(tmp_path / "other", tokenizer=build_tokenizer(vocab_size=380), seed=9)
    cache = build_kd_cache(tmp_path / "other-cache", other, sft_rows(4, seed=3), k=4)
    sources = [
        {"name": "general", "cache": str(kd_inputs.cache), "weight": 0.5},
        {"name": "code", "cache": str(cache), "weight": 0.5},
    ]
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"source 'code' \(cache .*other-cache\) was written with"):
        train(config_for(kd_inputs, out, cache="", sources=sources, max_steps=1), progress=False)
    assert not (out / "metrics.jsonl").exists()
    stages = [{"max_steps": 1}, {"max_steps": 1, "cache": str(tmp_path / "missing")}]
    with pytest.raises(ValueError, match=r"stage 'stage-2' cache .*missing: .*manifest"):
        train(config_for(kd_inputs, out, stages=stages), progress=False)


BAD_TABLES = [
    (
        ['sources=[{"cache": "a", "wieght": 1}]'],
        r"sources\[0\]: unknown key 'wieght' \(did you mean 'weight'\?\)",
    ),
    (['sources=[{"cache": "a", "weight": 0}]'], "source 'a': weight is 0; it must be a finite"),
    (['sources=[{"weight": 1}]'], "every source needs cache = URL"),
    (['sources=[{"cache": "x/a"}, {"cache": "y/a"}]'], "the run: two sources are named 'a'"),
    (
        ['sources=[{"cache": "a", "temperature": 2, "mode": "tail"}]'],
        "source 'a': mode 'tail' is defined at temperature 1",
    ),
    (['sources=[{"cache": "a", "kd_weight": "high"}]'], "source 'a': key 'kd_weight' must be a"),
    (['sources=[{"cache": "a"}]', "cache=c"], "give either cache .* or sources"),
    (['stages=[{"name": "one", "lr": 1e-3}]', "cache=c"], "stage 'one': set max_steps"),
    (['stages=[{"max_steps": 2}]', "cache=c", "max_steps=5"], "remove the top-level max_steps"),
    (['stages=[{"max_steps": 2, "lr": -1}]', "cache=c"], "stage 'stage-1': key 'lr' is -1.0"),
    (
        ['stages=[{"max_steps": 2, "batch_size": 3}]', "cache=c"],
        r"stages\[0\]: unknown key 'batch_",
    ),
    (['stages=[{"max_steps": 2}]'], "stage 'stage-1': no training data"),
    (["stages=[3]", "cache=c"], r"stages\[0\] must be a table"),
    (['stages={"a": 1}', "cache=c"], "key 'stages' must be a list of tables"),
]


@pytest.mark.parametrize(("args", "message"), BAD_TABLES)
def test_bad_tables_are_clear_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*REQUIRED, *args])


def test_stages_resolve_and_round_trip_through_run_toml(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        """
student = "s"
output_dir = "o"
cache = "caches/general"
lr = 2e-4
kd_weight = 1.0

[[stages]]
name = "general"
max_steps = 100

[[stages]]
name = "domain"
max_steps = 20
lr = 5e-5
warmup_steps = 2

[[stages.sources]]
cache = "caches/code-expert"
weight = 7
temperature = 2.0

[[stages.sources]]
name = "general"
cache = "caches/general"
weight = 3
"""
    )
    config = load_config(str(toml))
    general, domain = plan_stages(config)
    assert (general.name, general.config.max_steps, general.config.lr) == ("general", 100, 2e-4)
    assert general.config.cache == "caches/general" and not general.mixture
    assert (domain.config.max_steps, domain.config.lr, domain.config.warmup_steps) == (20, 5e-5, 2)
    code, gen = domain.sources
    assert (code.name, code.weight, code.config.temperature) == ("code-expert", 0.7, 2.0)
    assert (gen.name, gen.weight, gen.config.temperature) == ("general", 0.3, 1.0)
    assert code.config.lr == 5e-5 and code.config.kd_weight == 1.0  # stage keys inherited
    write_config(config, str(tmp_path / "again.toml"))
    assert load_config(str(tmp_path / "again.toml")) == config


def test_cli_trains_stages_from_toml_and_resumes_inside_the_mixture(kd_inputs, domain, tmp_path):
    out = tmp_path / "run"
    toml = tmp_path / "run.toml"
    toml.write_text(
        f"""
student = "{kd_inputs.student}"
cache = "{kd_inputs.cache}"
output_dir = "{out}"
batch_size = 4
num_workers = 2
lr = 3e-3
log_every = 1
save_every = 3
keep_checkpoints = 0
plot = false
threads = 1

[[stages]]
name = "general"
max_steps = 2

[[stages]]
name = "domain"
max_steps = 4
lr = 1e-3

[[stages.sources]]
cache = "{kd_inputs.cache}"
name = "general"
weight = 1

[[stages.sources]]
cache = "{domain["cache"]}"
name = "domain"
weight = 3
"""
    )
    kd = [sys.executable, "-m", "kd.cli", "train", "--config", str(toml), "--quiet"]
    done = subprocess.run(kd, capture_output=True, text=True, env=cli_env())
    assert done.returncode == 0, done.stderr[-3000:]
    first = train_losses(out)
    assert sorted(first) == [1, 2, 3, 4, 5, 6] and first[3]["stage"] == "domain"
    shutil.rmtree(out / "checkpoints" / "step-0000006")
    done = subprocess.run([*kd, "--resume"], capture_output=True, text=True, env=cli_env())
    assert done.returncode == 0, done.stderr[-3000:]
    second = train_losses(out)
    for step in (4, 5, 6):  # after the checkpoint at step 3, one step into the domain stage
        assert second[step]["loss"] == pytest.approx(first[step]["loss"], rel=1e-6)
        assert_same_sources(second[step], first[step])
