"""The `logitcache` command line, run as a user runs it: a subprocess per command.

Round trips through every import/export path, verify on planted corruption, convert --k,
inspect --json / --plot / --record, merge, exit codes and one-line errors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from logitcache import CacheWriter, open_cache
from logitcache.synthetic import synthetic_records

K = 16
VOCAB = 512
N_RECORDS = 60

_SCRIPT = Path(sys.executable).with_name("logitcache")
BASE_CMD = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "logitcache.cli"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*BASE_CMD, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def write_cache(path: Path, *, n: int = N_RECORDS, seed: int = 0, **writer_kwargs) -> Path:
    options = {"chunk_bytes": 8 << 10, "shard_bytes": 24 << 10, **writer_kwargs}
    with CacheWriter(
        str(path), k=K, vocab_size=VOCAB, teacher={"name": "synthetic"}, **options
    ) as w:
        for record in synthetic_records(n, k=K, vocab_size=VOCAB, seed=seed, mean_length=40):
            w.add(**record)
    return path


def all_records(url) -> list:
    with open_cache(str(url)) as cache:
        return list(cache.iter_records())


def assert_same_records(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for name in ("input_ids", "loss_mask", "topk_ids", "topk_logprobs"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
        assert x.sample_id == y.sample_id


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return write_cache(tmp_path_factory.mktemp("cli") / "cache")


def test_help_lists_every_command():
    result = run("--help")
    assert result.returncode == 0
    for command in ("inspect", "verify", "convert", "merge"):
        assert command in result.stdout
    sub = run("convert", "--help")
    assert sub.returncode == 0 and "--vocab-size" in sub.stdout and "interop.md" in sub.stdout


def test_usage_error_exits_2_and_missing_cache_exits_1_without_traceback(tmp_path):
    assert run("inspect").returncode == 2
    assert run("convert", "a", "b", "--k", "zero").returncode == 2
    assert run("inspect", "x", "--storage-options", "{not json").returncode == 2
    missing = run("inspect", tmp_path / "nowhere")
    assert missing.returncode == 1
    assert "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    assert "nowhere" in missing.stderr


def test_cache_parquet_cache_round_trip_is_exact(cache_dir, tmp_path):
    original = all_records(cache_dir)
    for dtype in ("float32", "float16"):
        parquet = tmp_path / f"export-{dtype}.parquet"
        out = run("convert", cache_dir, parquet, "--logprob-dtype", dtype)
        assert out.returncode == 0, out.stderr
        table = pq.read_table(parquet)  # a plain Arrow/Parquet reader sees the data
        assert table.num_rows == N_RECORDS
        assert table.column("input_ids").to_pylist()[0] == original[0].input_ids.tolist()
        back = tmp_path / f"back-{dtype}"
        out = run("convert", parquet, back)
        assert out.returncode == 0, out.stderr
        assert_same_records(original, all_records(back))
        with open_cache(str(back)) as cache:
            assert cache.manifest.teacher == {"name": "synthetic"}
            assert cache.manifest.k == K and cache.manifest.vocab_size == VOCAB


def test_parquet_export_reads_in_pandas(cache_dir, tmp_path):
    pd = pytest.importorskip("pandas")
    parquet = tmp_path / "p.parquet"
    assert run("convert", cache_dir, parquet).returncode == 0
    frame = pd.read_parquet(parquet)
    assert len(frame) == N_RECORDS and list(frame.columns)[:2] == ["input_ids", "loss_mask"]


def test_convert_reencodes_with_other_codecs_and_keeps_data(cache_dir, tmp_path):
    dst = tmp_path / "recoded"
    codecs = json.dumps({"topk_logprobs": [{"id": "zstd", "level": 9}]})
    out = run(
        "convert", cache_dir, dst, "--codecs", codecs, "--chunk-bytes", "8K", "--shard-bytes", "32K"
    )
    assert out.returncode == 0, out.stderr
    assert_same_records(all_records(cache_dir), all_records(dst))
    with open_cache(str(dst)) as cache:
        assert cache.manifest.columns["topk_logprobs"]["codecs"] == [{"id": "zstd", "level": 9}]
        assert len(cache.manifest.shards) > 1


def test_convert_k_keeps_the_top_values(cache_dir, tmp_path):
    dst = tmp_path / "k4"
    out = run("convert", cache_dir, dst, "--k", "4")
    assert out.returncode == 0, out.stderr
    for full, cut in zip(all_records(cache_dir), all_records(dst), strict=True):
        assert cut.topk_ids.shape == (full.num_targets, 4)
        lp = full.topk_logprobs.astype(np.float32)
        kth = -np.sort(-lp, axis=1)[:, 3:4]
        assert (cut.topk_logprobs.astype(np.float32) >= kth).all()  # nothing better was dropped
        np.testing.assert_array_equal(cut.topk_ids, full.topk_ids[:, :4])
    too_big = run("convert", cache_dir, tmp_path / "k99", "--k", "99")
    assert too_big.returncode == 1 and "--k 99" in too_big.stderr


def test_verify_reports_every_planted_corruption(cache_dir, tmp_path):
    ok = run("verify", cache_dir)
    assert ok.returncode == 0 and "ok" in ok.stdout
    broken = tmp_path / "broken"
    shutil.copytree(cache_dir, broken)
    shards = sorted((broken / "shards").iterdir())
    assert len(shards) >= 2
    for shard in shards[:2]:
        data = bytearray(shard.read_bytes())
        data[len(data) // 3] ^= 0xFF
        shard.write_bytes(bytes(data))
    result = run("verify", broken)
    assert result.returncode == 1
    for shard in shards[:2]:
        assert f"shards/{shard.name}" in result.stdout  # both damaged shards are named
    assert "PROBLEM" in result.stdout
    as_json = run("verify", broken, "--json")
    report = json.loads(as_json.stdout)
    assert as_json.returncode == 1 and report["ok"] is False and len(report["problems"]) >= 2


def test_inspect_json_has_the_documented_fields(cache_dir):
    result = run("inspect", cache_dir, "--json", "--sample-records", "20")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for field in (
        "format_version", "k", "vocab_size", "positions", "teacher", "tokenizer", "records",
        "tokens", "targets", "bytes", "bytes_per_target", "raw_bytes", "compression_ratio",
        "shards", "teacher_stats",
    ):  # fmt: skip
        assert field in report
    assert report["records"] == N_RECORDS and report["k"] == K
    assert report["raw_bytes"] == report["tokens"] * 5 + report["targets"] * K * 6
    stats = report["teacher_stats"]
    assert stats["is_sample"] is True and 20 <= stats["records"] < N_RECORDS
    for name in ("top1_prob", "entropy_topk_nats", "tail_mass"):
        q = stats[name]
        assert q["count"] == stats["targets"]
        assert q["min"] <= q["p50"] <= q["max"]
    assert 0 < stats["top1_prob"]["p50"] <= 1
    text = run("inspect", cache_dir)
    assert (
        text.returncode == 0 and "compression" in text.stdout and f"all {N_RECORDS}" in text.stdout
    )


def test_inspect_plot_writes_png_files(cache_dir, tmp_path):
    plots = tmp_path / "plots"
    result = run("inspect", cache_dir, "--plot", plots, "--json")
    assert result.returncode == 0, result.stderr
    names = sorted(os.listdir(plots))
    assert names == ["entropy.png", "tail_mass.png", "top1_prob.png"]
    import matplotlib.image

    for name in names:
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(plots / name)
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0


def _tokenizer_dir(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(path)
    return path


def test_inspect_record_shows_candidates_and_decoded_text(cache_dir, tmp_path):
    record = all_records(cache_dir)[2]
    result = run("inspect", cache_dir, "--record", "2", "--json", "--top", "3")
    assert result.returncode == 0, result.stderr
    view = json.loads(result.stdout)
    assert view["index"] == 2 and len(view["rows"]) == record.num_targets
    first = view["rows"][0]
    p = int(np.flatnonzero(record.loss_mask)[0])
    assert first["position"] == p and first["token_id"] == int(record.input_ids[p])
    assert [c["id"] for c in first["candidates"]] == record.topk_ids[0, :3].tolist()
    assert first["candidates"][0]["prob"] == pytest.approx(
        np.exp(float(record.topk_logprobs[0, 0]))
    )
    tokenizer = _tokenizer_dir(tmp_path)
    text = run("inspect", cache_dir, "--record", "2", "--tokenizer", tokenizer)
    assert text.returncode == 0, text.stderr
    assert f"'w{int(record.input_ids[p])}'" in text.stdout
    assert run("inspect", cache_dir, "--record", str(N_RECORDS)).returncode == 1


def test_merge_joins_partial_manifests(tmp_path):
    url = tmp_path / "ranked"
    write_cache(url, n=10, seed=1, rank=0, world_size=2)
    write_cache(url, n=7, seed=2, rank=1, world_size=2)
    assert not (url / "manifest.json").exists()
    result = run("merge", url)
    assert result.returncode == 0, result.stderr
    assert "17 records" in result.stdout
    assert len(all_records(url)) == 17
    assert run("merge", tmp_path / "empty").returncode == 1


# -- imports through the command line ------------------------------------------------------


def test_import_nemo_jsonl_round_trip(tmp_path):
    from tests.test_interop import make_sequence, nemo_example, teacher_log_softmax, write_jsonl

    sequences = [make_sequence(s, 10 + s, prompt=3) for s in range(5)]
    rows = [nemo_example(ids, mask, pad_to=24, index=i) for i, (ids, mask) in enumerate(sequences)]
    source = tmp_path / "kd.jsonl"
    write_jsonl(source, rows)
    dst = tmp_path / "from-nemo"
    no_vocab = run("convert", source, dst)
    assert no_vocab.returncode == 1 and "--vocab-size" in no_vocab.stderr
    out = run("convert", source, dst, "--vocab-size", 64, "--teacher", "toy")
    assert out.returncode == 0, out.stderr
    records = all_records(dst)
    assert [r.sample_id for r in records] == [str(i) for i in range(5)]
    for record, (ids, mask) in zip(records, sequences, strict=True):
        np.testing.assert_array_equal(record.input_ids, ids)
        np.testing.assert_array_equal(record.loss_mask, mask)
        for j, p in enumerate(np.flatnonzero(mask)):
            want = teacher_log_softmax(ids[:p], int(ids[p]))
            order = np.argsort(-want, kind="stable")[: record.topk_ids.shape[1]]
            # stored in canonical order: fp16 value descending, ties by id ascending
            lps = want[order].astype(np.float16)
            canonical = np.lexsort((order, -lps.astype(np.float32)))
            np.testing.assert_array_equal(record.topk_ids[j], order[canonical])
            np.testing.assert_array_equal(record.topk_logprobs[j], lps[canonical])
    # and out again: the Parquet export of the imported cache holds the same values
    parquet = tmp_path / "nemo.parquet"
    assert run("convert", dst, parquet).returncode == 0
    assert_same_records(records, all_records_via(tmp_path, parquet))


def all_records_via(tmp_path: Path, parquet: Path) -> list:
    back = tmp_path / "via-parquet"
    result = run("convert", parquet, back, "--overwrite")
    assert result.returncode == 0, result.stderr
    return all_records(back)


def test_import_axolotl_with_tokenizer_for_vocab(tmp_path):
    from tests.test_interop import axolotl_example, make_sequence, write_jsonl

    sequences = [make_sequence(10 + s, 8 + s, prompt=2) for s in range(4)]
    rows = [
        axolotl_example(ids, mask, sample_id=f"ax{i}") for i, (ids, mask) in enumerate(sequences)
    ]
    for row in rows:
        row["target_logprobs"][0] = [-1e9] * len(row["target_logprobs"][0])  # JSON has no -inf
    source = tmp_path / "axolotl.jsonl"
    write_jsonl(source, rows)
    tokenizer = _tokenizer_dir(tmp_path)
    dst = tmp_path / "from-axolotl"
    out = run("convert", source, dst, "--tokenizer", tokenizer, "--k", "4")
    assert out.returncode == 0, out.stderr
    with open_cache(str(dst)) as cache:
        assert cache.manifest.vocab_size == VOCAB and cache.manifest.k == 4
        assert cache.manifest.tokenizer["vocab_tokens"] == VOCAB
        assert cache.manifest.tokenizer["vocab_fingerprint"].startswith("xxh3_64:")
        records = list(cache.iter_records())
    for record, (ids, mask) in zip(records, sequences, strict=True):
        np.testing.assert_array_equal(record.input_ids, ids)
        np.testing.assert_array_equal(record.topk_ids[:, 0], ids[np.flatnonzero(mask)])


def test_bad_source_names_the_file_and_line(tmp_path):
    source = tmp_path / "broken.jsonl"
    source.write_text('{"tokens": [1, 2]}\nnot json\n')
    result = run("convert", source, tmp_path / "out", "--from", "nemo", "--vocab-size", "10")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "broken.jsonl" in result.stderr
    unknown = tmp_path / "other.jsonl"
    unknown.write_text('{"text": "hello"}\n')
    result = run("convert", unknown, tmp_path / "out2")
    assert result.returncode == 1 and "--from" in result.stderr


def test_copy_to_object_storage_and_back_keeps_every_record(cache_dir, tmp_path):
    # memory:// lives inside one process, so this drives the library function behind the CLI.
    from logitcache.convert import convert

    remote = f"memory://lgc-cli-test/{tmp_path.name}"
    up = convert(str(cache_dir), remote, progress=False)
    assert up.records == N_RECORDS and up.dst_format == "cache"
    back = tmp_path / "downloaded"
    down = convert(remote, str(back), progress=False)
    assert down.src_format == "cache"
    assert_same_records(all_records(cache_dir), all_records(back))
