"""Replacing and writing destinations from the command line without losing anything: a
convert onto its own source, a failed import over an old cache, files that are not the
writer's, destinations that are not regular files, and the messages a user sees."""

from __future__ import annotations

import os
import stat

import numpy as np

from logitcache import open_cache
from tests.test_cli import all_records, run, write_cache


def listed_and_on_disk(root) -> tuple[set[str], set[str]]:
    with open_cache(str(root)) as cache:
        listed = {s.path for s in cache.manifest.shards}
    return listed, {f"shards/{p.name}" for p in (root / "shards").iterdir()}


def test_convert_onto_its_own_source_replaces_it(tmp_path):
    cache = write_cache(tmp_path / "c", n=12)
    before = all_records(cache)
    out = run("convert", cache, cache, "--k", "4", "--overwrite", "--no-progress")
    assert out.returncode == 0, out.stderr
    after = all_records(cache)
    assert len(after) == len(before) == 12
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(new.topk_ids, old.topk_ids[:, :4])
        np.testing.assert_array_equal(new.input_ids, old.input_ids)
    listed, on_disk = listed_and_on_disk(cache)
    assert on_disk == listed  # the old shards went, after the commit


def test_a_failed_import_keeps_the_cache_it_would_have_replaced(tmp_path):
    from tests.test_interop import axolotl_example, make_sequence

    cache = write_cache(tmp_path / "c", n=9)
    before = all_records(cache)
    lines = []
    for s in range(70):
        row = axolotl_example(*make_sequence(s, 6, prompt=2), sample_id=f"a{s}")
        row["target_logprobs"][0] = [-1e9] * len(row["target_logprobs"][0])
        lines.append(__import__("json").dumps(row))
    lines[60] = lines[60][:-20]  # line 61 is cut short
    source = tmp_path / "kd.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = run("convert", source, cache, "--vocab-size", "64", "--overwrite", "--no-progress")
    assert out.returncode == 1
    assert "kd.jsonl line 61" in out.stderr and "Traceback" not in out.stderr
    after = all_records(cache)
    assert len(after) == len(before)
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(new.topk_logprobs, old.topk_logprobs)
    listed, on_disk = listed_and_on_disk(cache)
    assert on_disk == listed


def test_files_the_writer_did_not_create_are_kept(tmp_path):
    root = tmp_path / "model"
    (root / "shards").mkdir(parents=True)
    (root / "shards" / "model-00001.safetensors").write_bytes(b"weights")
    (root / "shards" / "00000.lgc").write_bytes(b"a file named like a format 1.0 shard")
    out = run("convert", write_cache(tmp_path / "src", n=5), root, "--no-progress")
    assert out.returncode == 0, out.stderr
    assert (root / "shards" / "model-00001.safetensors").read_bytes() == b"weights"
    assert (root / "shards" / "00000.lgc").exists()
    assert len(all_records(root)) == 5


def test_destinations_that_are_not_regular_files_are_refused(tmp_path):
    cache = write_cache(tmp_path / "c", n=3)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    out = run("convert", cache, fifo, "--to", "parquet", "--overwrite", "--no-progress")
    assert out.returncode == 1 and "not a regular file" in out.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    # A cache whose manifest.json is a pipe.
    dst = tmp_path / "d"
    dst.mkdir()
    os.mkfifo(dst / "manifest.json")
    out = run("convert", cache, dst, "--overwrite", "--no-progress")
    assert out.returncode == 1 and "not a regular file" in out.stderr
    assert stat.S_ISFIFO(os.lstat(dst / "manifest.json").st_mode)
    # A file given where a cache directory belongs.
    afile = tmp_path / "afile"
    afile.write_bytes(b"x")
    out = run("inspect", afile)
    assert out.returncode == 1 and "is a file, not a cache directory" in out.stderr


def test_parquet_into_a_directory_writes_a_file_inside_it(tmp_path):
    cache = write_cache(tmp_path / "c", n=4)
    pqdir = tmp_path / "pqdir"
    pqdir.mkdir()
    out = run("convert", cache, f"{pqdir}/", "--to", "parquet", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert pqdir.is_dir() and (pqdir / "part-00000.parquet").is_file()
    back = tmp_path / "back"
    assert run("convert", pqdir, back, "--no-progress").returncode == 0
    assert len(all_records(back)) == 4


def test_messages_name_the_flag_and_the_record_once(tmp_path):
    cache = write_cache(tmp_path / "c", n=3)
    out = run("convert", write_cache(tmp_path / "s", n=2), cache, "--no-progress")
    assert out.returncode == 1 and "--overwrite" in out.stderr
    # A Parquet file with an id outside the vocabulary: the error names its record once.
    pq = tmp_path / "x.parquet"
    assert run("convert", cache, pq, "--no-progress").returncode == 0
    out = run("convert", pq, tmp_path / "y", "--vocab-size", "100", "--no-progress")
    assert out.returncode == 1
    assert "x.parquet record 0: " in out.stderr and "record 0: record 0" not in out.stderr


def test_oversized_or_infinite_sizes_are_usage_errors(tmp_path):
    cache = write_cache(tmp_path / "c", n=2)
    for size in ("inf", "nan", "1e400"):
        out = run("convert", cache, tmp_path / "d", "--chunk-bytes", size)
        assert out.returncode == 2 and "Traceback" not in out.stderr, size


def test_inspect_refuses_a_tokenizer_of_another_vocabulary_unless_forced(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.test_cli import VOCAB

    def tokenizer_dir(name: str, prefix: str):
        vocab = {f"{prefix}{i}": i for i in range(VOCAB)}
        tok = Tokenizer(models.WordLevel(vocab, unk_token=f"{prefix}0"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        path = tmp_path / name
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=f"{prefix}0").save_pretrained(path)
        return path

    teacher_tok, other_tok = tokenizer_dir("teacher", "w"), tokenizer_dir("other", "v")
    src = write_cache(tmp_path / "src", n=3)
    cache = tmp_path / "c"
    assert run("convert", src, cache, "--tokenizer", teacher_tok).returncode == 0
    assert run("inspect", cache, "--record", "0", "--tokenizer", teacher_tok).returncode == 0
    out = run("inspect", cache, "--record", "0", "--tokenizer", other_tok)
    assert out.returncode == 1 and "fingerprint" in out.stderr and "--force" in out.stderr
    forced = run("inspect", cache, "--record", "0", "--tokenizer", other_tok, "--force")
    assert forced.returncode == 0 and "'v" in forced.stdout


def test_negative_record_index_out_of_range_names_the_index(tmp_path):
    cache = write_cache(tmp_path / "c", n=20)
    with open_cache(str(cache)) as c:
        with __import__("pytest").raises(IndexError, match=r"record -21 is out of range"):
            c[-21]
        assert c[-20].sample_id == c[0].sample_id


def test_a_full_disk_is_reported_with_the_path(tmp_path):
    """Writes that fail for lack of space name the file: the child may write at most 64 KiB
    per file (RLIMIT_FSIZE), and a shard larger than that fails as a full disk would."""
    import resource
    import signal
    import subprocess

    from tests.test_cli import BASE_CMD

    src = write_cache(tmp_path / "src", n=600)
    dst = tmp_path / "dst"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    out = subprocess.run(
        [*BASE_CMD, "convert", str(src), str(dst), "--shard-bytes", "1M", "--no-progress"],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=120,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "File too large" in out.stderr and str(dst / "shards") in out.stderr
    assert not (dst / "manifest.json").exists()
