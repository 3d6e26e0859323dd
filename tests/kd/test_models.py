"""Loading teachers and students: safetensors directories, the real GGUF teacher, refusals."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from kd.models import ModelLoadError, load_model, packaged_gguf, save_hf

from .conftest import build_model, build_tokenizer, cli_env


def test_tiny_models_load_with_identity(tiny_llama_dir, tiny_qwen2_dir):
    for directory, arch in (
        (tiny_llama_dir, "LlamaForCausalLM"),
        (tiny_qwen2_dir, "Qwen2ForCausalLM"),
    ):
        loaded = load_model(str(directory))
        assert loaded.identity["architecture"] == arch
        assert loaded.identity["weights_hash"].startswith("xxh3_64:")
        assert loaded.identity["dtype"] == "float32"
        assert not loaded.model.training


def test_pickled_weights_are_refused(tmp_path, tiny_llama_dir):
    directory = tmp_path / "pickled"
    shutil.copytree(tiny_llama_dir, directory)
    for f in directory.glob("*.safetensors"):
        f.unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="pickled weights"):
        load_model(str(directory))


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path):
    tokenizer = build_tokenizer()
    directory = build_model(tmp_path / "m", tokenizer=tokenizer, vocab_rows=len(tokenizer) - 5)
    with pytest.raises(ModelLoadError, match="belongs to another model"):
        load_model(str(directory))
    padded = build_model(tmp_path / "p", tokenizer=tokenizer, vocab_rows=len(tokenizer) + 13)
    assert load_model(str(padded)).identity["vocab_rows"] == len(tokenizer) + 13


def test_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="not a model directory"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF but not really")
    with pytest.raises(ModelLoadError, match="bogus.gguf"):
        load_model(str(bogus))


def test_a_gguf_that_is_not_a_causal_lm_is_refused(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "encoder.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((10, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="encoder.gguf.*bert.*decoder-only"):
        load_model(str(path))


def test_save_hf_round_trip_is_exact_and_replaces_atomically(tmp_path, tiny_qwen2_dir):
    loaded = load_model(str(tiny_qwen2_dir))
    out = tmp_path / "copy"
    save_hf(loaded.model, loaded.tokenizer, str(out))
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_hf(loaded.model, loaded.tokenizer, str(out))
    again = load_model(str(out))
    x = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x).logits, again.model(x).logits, rtol=0, atol=0)
    save_hf(loaded.model, loaded.tokenizer, str(out), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def test_real_teacher_from_gguf_exports_to_the_same_model(real_teacher, real_teacher_dir):
    """The GGUF teacher and its safetensors export give identical logits; ties stay tied."""
    gguf = load_model(packaged_gguf())
    assert gguf.identity["parameters"] == 134_515_008
    assert gguf.identity["vocab_rows"] == len(gguf.tokenizer) == 49152
    model = real_teacher.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = real_teacher.tokenizer("def add(a, b):\n    return", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(gguf.model(ids).logits, model(ids).logits, rtol=0, atol=0)
        # A pretrained model: after "return" in an add function, " a" is the likely next token.
        top = model(ids).logits[0, -1].argmax()
    assert real_teacher.tokenizer.decode(top) == " a"


def test_kd_export_command(tmp_path, tiny_llama_dir):
    out = tmp_path / "exported"
    cmd = [sys.executable, "-m", "kd.cli", "export", "--model", str(tiny_llama_dir)]
    done = subprocess.run(
        [*cmd, "--out", str(out), "--dtype", "bfloat16"],
        capture_output=True,
        text=True,
        env=cli_env(),
    )
    assert done.returncode == 0, done.stderr
    assert "saved LlamaForCausalLM" in done.stdout
    assert load_model(str(out), dtype="bfloat16").model.dtype == torch.bfloat16
    again = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, env=cli_env())
    assert again.returncode == 1
    assert again.stderr.startswith("kd export: error:") and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr
