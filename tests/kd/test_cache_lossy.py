"""`kd cache --lossy-kl`: the teacher pass writes a lossy cache whose every row is within the
budget of the lossless pass over the same data, and the manifest records mode and budget."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kd.teacher import cache_teacher
from logitcache import open_cache

from ..test_lossy import row_error
from .conftest import cli_env

K = 8
BUDGET = 0.02


def kd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kd.cli", *args],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
    )


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(12):
            text = f"def f{i}(x):\n" + "    return x * x + 1\n" * (1 + i % 4)
            f.write(json.dumps({"id": f"t{i}", "text": text}) + "\n")
    return str(path)


def test_kd_cache_lossy_rows_are_within_budget_of_the_lossless_pass(
    tiny_llama_dir, text_data, tmp_path
):
    lossless, lossy = str(tmp_path / "lossless"), str(tmp_path / "lossy")
    common = dict(k=K, positions="all", device="cpu", threads=1, progress=False)
    cache_teacher(str(tiny_llama_dir), text_data, lossless, **common)
    run = kd(
        "cache",
        *("--teacher", str(tiny_llama_dir), "--data", text_data, "--out", lossy),
        *("--k", str(K), "--positions", "all", "--device", "cpu", "--threads", "1"),
        *("--lossy-kl", str(BUDGET), "--no-progress"),
    )
    assert run.returncode == 0, run.stderr
    exact = {r.sample_id: r for r in open_cache(lossless).iter_records()}
    with open_cache(lossy) as cache:
        assert cache.manifest.lossy["mode"] == "kl"
        assert cache.manifest.lossy["kl_budget"] == BUDGET
        assert cache.manifest.lossy["measured"]["max_row_kl"] <= BUDGET
        records = list(cache.iter_records())
    assert sorted(r.sample_id for r in records) == sorted(exact)
    for record in records:
        original = exact[record.sample_id]
        assert record.topk_ids.shape == original.topk_ids.shape
        for j in range(record.num_targets):
            error = row_error(
                original.topk_ids[j],
                original.topk_logprobs[j],
                record.topk_ids[j],
                record.topk_logprobs[j],
            )
            assert error["max"] <= BUDGET * (1 + 1e-9)


def test_kd_cache_refuses_a_bad_budget(tiny_llama_dir, text_data, tmp_path):
    run = kd(
        "cache",
        *("--teacher", str(tiny_llama_dir), "--data", text_data, "--out", str(tmp_path / "c")),
        "--lossy-kl",
        "-1",
    )
    assert run.returncode != 0
    assert "--lossy-kl" in run.stderr and "positive" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    ("truncation", "mode", "kd_weight", "warns"),
    [
        (True, "renorm", 1.0, True),
        (True, "jsd", 1.0, True),
        (True, "tail", 1.0, False),
        (True, "renorm", 0.0, False),  # plain SFT never reads the teacher columns
        (False, "renorm", 1.0, False),
    ],
)
def test_training_on_truncated_lossy_rows_warns_unless_tail(
    tmp_path, truncation, mode, kd_weight, warns
):
    import warnings

    from kd.config import TrainConfig
    from kd.train import warn_if_truncated_lossy
    from logitcache import CacheWriter
    from logitcache.synthetic import synthetic_records

    url = str(tmp_path / "lossy")
    with CacheWriter(url, k=8, vocab_size=500, lossy_kl=0.02, lossy_truncate=truncation) as w:
        for record in synthetic_records(3, k=8, vocab_size=500, seed=1):
            w.add(**record)
    config = TrainConfig(
        student="student", cache=url, output_dir="out", mode=mode, kd_weight=kd_weight
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_truncated_lossy(open_cache(url).manifest, config)
    messages = [str(w.message) for w in caught]
    assert bool(messages) == warns, messages
    if warns:
        assert "mode='tail'" in messages[0] and "--lossy-no-truncation" in messages[0]


def test_train_on_a_truncated_lossy_cache_warns_and_trains(kd_inputs, tmp_path):
    """The warning fires from `train` itself, naming the cache, and the run still completes."""
    import warnings

    from kd.config import TrainConfig, validate
    from kd.train import train
    from logitcache.convert import convert

    lossy = str(tmp_path / "lossy")
    convert(str(kd_inputs.cache), lossy, lossy_kl=0.05)
    config = TrainConfig(
        student=str(kd_inputs.student), cache=lossy, output_dir=str(tmp_path / "run"),
        max_steps=2, batch_size=4, num_workers=0, plot=False, threads=1, mode="renorm",
    )  # fmt: skip
    validate(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(config)
    messages = [str(w.message) for w in caught if "lossy" in str(w.message)]
    assert len(messages) == 1 and f"cache {lossy} is lossy" in messages[0], messages
    assert result.steps == 2
