"""`kd cache` as a command: help, a run and its provenance, clear errors, resume after a kill,
and several processes (torchrun, --devices) writing the same records as one."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kd.cli import build_parser, main
from kd.teacher import cache_teacher
from logitcache import open_cache

from .conftest import build_model, build_tokenizer, cli_env

K = 8


def kd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kd.cli", *args],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=timeout,
    )


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def code_rows(n: int) -> list[dict]:
    """Prompt/response rows of varied lengths, with ids."""
    return [
        {
            "id": f"fn-{i}",
            "prompt": f"def f{i}(x):\n",
            "response": "    return x * x\n" * (1 + i % 5) + f"    # {i}\n",
        }
        for i in range(n)
    ]


def records_by_id(url: str) -> dict:
    return {r.sample_id: r for r in open_cache(url).iter_records()}


def assert_same_records(a: dict, b: dict) -> None:
    """The same records, rows equal up to the rounding of differently shaped batches."""
    assert sorted(a) == sorted(b)
    for key, x in a.items():
        y = b[key]
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
        np.testing.assert_array_equal(x.loss_mask, y.loss_mask)
        np.testing.assert_allclose(
            x.topk_logprobs.astype(np.float32), y.topk_logprobs.astype(np.float32), atol=2e-3
        )
        # Ids agree except where two logprobs are within rounding of each other.
        for row in np.flatnonzero((x.topk_ids != y.topk_ids).any(axis=1)):
            lx = dict(zip(x.topk_ids[row].tolist(), x.topk_logprobs[row].tolist(), strict=True))
            ly = dict(zip(y.topk_ids[row].tolist(), y.topk_logprobs[row].tolist(), strict=True))
            kth = float(x.topk_logprobs[row, -1])
            for token in set(lx) ^ set(ly):
                assert abs(lx.get(token, ly.get(token)) - kth) < 2e-3


@pytest.fixture(scope="module")
def code_data(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("data") / "code.jsonl", code_rows(24))


@pytest.fixture(scope="module")
def one_process_cache(tiny_llama_dir, code_data, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("one") / "cache")
    cache_teacher(
        str(tiny_llama_dir), code_data, out, k=K, batch_tokens=64, threads=1, progress=False
    )
    return out


def test_help_documents_every_option():
    done = kd("--help")
    assert done.returncode == 0 and "cache" in done.stdout and "export" in done.stdout
    cache = kd("cache", "--help")
    assert cache.returncode == 0
    (sub,) = [a for a in build_parser()._actions if a.dest == "command"]
    for action in sub.choices["cache"]._actions:
        for flag in action.option_strings:
            assert flag in cache.stdout
        assert action.help, action.option_strings  # every option says what it does
    for needed in ("--teacher", "--data", "--out", "--k", "--max-length", "--resume"):
        assert needed in cache.stdout


def test_a_run_and_what_logitcache_inspect_shows(tiny_llama_dir, code_data, tmp_path):
    out = str(tmp_path / "cache")
    done = kd(
        "cache",
        "--teacher",
        str(tiny_llama_dir),
        "--data",
        code_data,
        "--out",
        out,
        "--k",
        str(K),
        "--max-length",
        "24",
        "--overflow",
        "skip",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    skipped = summary["data"]["skipped_too_long"]
    assert skipped > 0 and summary["records"] == 24 - skipped
    assert summary["scored_targets"] == summary["targets"] > 0
    inspect = subprocess.run(
        [sys.executable, "-m", "logitcache.cli", "inspect", out, "--json"],
        capture_output=True,
        text=True,
        env=cli_env(),
    )
    assert inspect.returncode == 0, inspect.stderr
    shown = json.loads(inspect.stdout)
    text = json.dumps(shown)
    for needle in ("weights_hash", "vocab_fingerprint", code_data, '"overflow": "skip"'):
        assert needle in text


def test_chunk_and_shard_sizes_change_the_layout_not_the_records(
    tiny_llama_dir, code_data, one_process_cache, tmp_path
):
    out = str(tmp_path / "small-chunks")
    common = ["--teacher", str(tiny_llama_dir), "--data", code_data, "--k", str(K)]
    common += ["--batch-tokens", "64", "--threads", "1", "--no-progress"]
    done = kd("cache", *common, "--out", out, "--chunk-bytes", "1K", "--shard-bytes", "4K")
    assert done.returncode == 0, done.stderr
    small, default = open_cache(out).manifest, open_cache(one_process_cache).manifest
    chunks = [c for shard in small.shards for c in shard.chunk_records]
    assert len(small.shards) > len(default.shards) == 1
    assert len(chunks) > sum(len(s.chunk_records) for s in default.shards)
    assert max(chunks) <= 2  # 1 KiB of raw rows is about one record of this data
    assert_same_records(records_by_id(out), records_by_id(one_process_cache))
    refused = kd("cache", *common, "--out", str(tmp_path / "x"), "--chunk-bytes", "0")
    assert refused.returncode == 2 and "--chunk-bytes" in refused.stderr
    assert "must be positive" in refused.stderr


def bert_gguf(path) -> str:
    import gguf

    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((10, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_bad_input_is_one_clear_line(tiny_llama_dir, tmp_path, capsys):
    teacher = str(tiny_llama_dir)
    rows = code_rows(3)
    bad_json = write_jsonl(tmp_path / "bad.jsonl", [rows[0], rows[1], "{not json", rows[2]])
    no_fields = write_jsonl(tmp_path / "fields.jsonl", [rows[0], {"question": "?"}])
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    )
    plain_tokenizer = build_tokenizer(chat_template=False)
    no_template = build_model(tmp_path / "no-template", tokenizer=plain_tokenizer)
    small = build_model(tmp_path / "small-vocab", vocab_rows=len(build_tokenizer()) - 5)
    cases = [
        ([teacher, bad_json], "bad.jsonl:line 3: not valid JSON"),
        ([teacher, no_fields], "fields.jsonl:line 2: no known fields"),
        ([str(no_template), chat], "chat.jsonl:line 1: 'messages' rows need a chat template"),
        ([str(small), bad_json], "the tokenizer belongs to another model"),
        ([bert_gguf(tmp_path / "encoder.gguf"), bad_json], "encoder.gguf.*decoder-only"),
        ([str(tmp_path / "missing"), bad_json], "not a model directory or a .gguf file"),
        ([teacher, str(tmp_path / "nothing.jsonl")], "nothing.jsonl: no such file"),
    ]
    for (model, data), message in cases:
        out = str(tmp_path / "out")
        status = main(["cache", "--teacher", model, "--data", data, "--out", out, "--threads", "1"])
        err = capsys.readouterr().err
        assert status == 1, (message, err)
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]  # after any loading bars of transformers
        assert last.startswith("kd cache: error: ") and re.search(message, last), (message, err)
        assert not (tmp_path / "out" / "manifest.json").exists()
    # --skip-bad-rows counts them instead; a subprocess shows the exit status and report.
    done = kd(
        "cache",
        "--teacher",
        teacher,
        "--data",
        bad_json,
        "--out",
        str(tmp_path / "skipped"),
        "--k",
        "4",
        "--skip-bad-rows",
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    assert "wrote 3 records" in done.stdout and "1 bad rows skipped" in done.stdout
    capsys.readouterr()
    again = ["cache", "--teacher", teacher, "--data", bad_json, "--out", str(tmp_path / "skipped")]
    assert main([*again, "--threads", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "a committed cache is already there" in err and "--overwrite" in err


# A child that dies (os._exit: no clean-up at all) at its 40th record, after checkpoints.
KILLED_CHILD = textwrap.dedent(
    """
    import os, sys
    from logitcache import CacheWriter
    from kd.cli import main

    add, calls = CacheWriter.add, [0]

    def add_then_die(self, **record):
        calls[0] += 1
        if calls[0] == 40:
            os._exit(9)
        add(self, **record)

    CacheWriter.add = add_then_die
    sys.exit(main(sys.argv[1:]))
    """
)


def test_a_killed_run_resumes_to_the_same_records(tiny_llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "code.jsonl", code_rows(60))
    common = ["--teacher", str(tiny_llama_dir), "--data", data, "--k", str(K), "--no-progress"]
    common += ["--batch-tokens", "48", "--sort-window", "16", "--checkpoint-batches", "3"]
    whole = str(tmp_path / "whole")
    assert main(["cache", *common, "--out", whole, "--threads", "1"]) == 0

    out = str(tmp_path / "resumed")
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_CHILD, "cache", *common, "--out", out],
        capture_output=True,
        text=True,
        env=cli_env(),
    )
    assert killed.returncode == 9, killed.stderr
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    capsys.readouterr()

    # Other options than the checkpoint's are refused, and the checkpoint survives that.
    assert main(["cache", *common, "--out", out, "--resume", "--max-length", "30"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot resume" in err and "metadata.kd_cache.options.max_length = 256" in err, err
    # Without --resume, an interrupted run is neither continued nor silently replaced.
    assert main(["cache", *common, "--out", out]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "an interrupted run left a checkpoint" in err and "resume" in err, err

    resumed = kd("cache", *common, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"resumed after [1-9]\d* committed batches", resumed.stdout)
    a, b = list(open_cache(whole).iter_records()), list(open_cache(out).iter_records())
    assert len(a) == len(b) == 60
    for x, y in zip(a, b, strict=True):  # same order, same bytes
        assert x.sample_id == y.sample_id
        for name in ("input_ids", "loss_mask", "topk_ids", "topk_logprobs"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
    open_cache(out).verify()
    assert main(["cache", *common, "--out", out, "--resume"]) == 0
    assert "already complete" in capsys.readouterr().out


# Rank 1 dies (os._exit) at its 8th record, once rank 0 has committed its share.
KILLED_RANK = textwrap.dedent(
    """
    import os, sys, time
    from logitcache import CacheWriter
    from kd.cli import main

    add, calls = CacheWriter.add, [0]
    out = sys.argv[sys.argv.index("--out") + 1]

    def add_then_die(self, **record):
        calls[0] += 1
        if os.environ["RANK"] == "1" and calls[0] == 8:
            deadline = time.monotonic() + 120
            while not os.path.exists(os.path.join(out, "_partial", "rank-00000.json")):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            os._exit(9)
        add(self, **record)

    CacheWriter.add = add_then_die
    sys.exit(main(sys.argv[1:]))
    """
)


def test_two_torchrun_ranks_killed_and_resumed_write_the_records_of_one_process(
    tiny_llama_dir, code_data, one_process_cache, tmp_path
):
    out = str(tmp_path / "ranks")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    torchrun += ["--nproc-per-node", "2"]
    args = ["cache", "--teacher", str(tiny_llama_dir), "--data", code_data, "--out", out]
    args += ["--k", str(K), "--batch-tokens", "64", "--device", "cpu"]
    args += ["--checkpoint-batches", "2", "--no-progress"]
    script = tmp_path / "killed_rank.py"
    script.write_text(KILLED_RANK)
    killed = subprocess.run(
        [*torchrun, str(script), *args], capture_output=True, text=True, env=cli_env()
    )
    assert killed.returncode != 0
    assert not (tmp_path / "ranks" / "manifest.json").exists()
    assert (tmp_path / "ranks" / "_partial" / "rank-00000.json").exists()

    done = subprocess.run(
        [*torchrun, "-m", "kd.cli", *args, "--resume"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 ranks" in done.stdout and "resumed after" in done.stdout
    cache = open_cache(out)
    assert cache.manifest.metadata["world_size"] == 2 and cache.manifest.metadata["kd_cache"]
    cache.verify()
    assert_same_records(records_by_id(out), records_by_id(one_process_cache))


def test_one_process_per_device_from_one_command(
    tiny_llama_dir, code_data, one_process_cache, tmp_path
):
    out = str(tmp_path / "devices")
    done = kd(
        "cache",
        "--teacher",
        str(tiny_llama_dir),
        "--data",
        code_data,
        "--out",
        out,
        "--k",
        str(K),
        "--batch-tokens",
        "64",
        "--devices",
        "cpu,cpu",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 ranks" in done.stdout
    assert_same_records(records_by_id(out), records_by_id(one_process_cache))
