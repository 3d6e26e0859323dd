"""kd prune on tiny Llama, Qwen2 and Mistral models: the saved directory loads and runs with
exactly the requested shape, importance follows its definition, calibration comes from data or
a cache, and the command line reports errors in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kd.data import DataStats, ExampleBuilder
from kd.models import load_model
from kd.prune import (
    REPORT_NAME,
    Shape,
    ShapeError,
    collect_importance,
    count_parameters,
    heldout_loss,
    layer_loss_importance,
    load_calibration,
    prune_model,
    shape_of,
)

from .conftest import CORPUS, build_model, cli_env

HELDOUT = [
    "def scale(point, factor):\n    return Point(point.x * factor, point.y * factor)\n",
    'for name in names:\n    print(f"hello {name}")\n',
]


def examples(tokenizer, texts):
    builder = ExampleBuilder(tokenizer)
    return [builder.build({"text": t}, "test", i, DataStats()) for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def calib(tiny_tokenizer):
    return examples(tiny_tokenizer, CORPUS)


@pytest.fixture(scope="module")
def heldout(tiny_tokenizer):
    return examples(tiny_tokenizer, HELDOUT)


@pytest.fixture(scope="module")
def tiny_tied_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return build_model(
        tmp_path_factory.mktemp("models") / "tied-llama",
        arch="llama",
        tokenizer=tiny_tokenizer,
        tie_word_embeddings=True,
        num_hidden_layers=3,
        seed=2,
    )


@pytest.fixture(scope="module")
def tiny_mistral_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return build_model(
        tmp_path_factory.mktemp("models") / "mistral",
        arch="mistral",
        tokenizer=tiny_tokenizer,
        num_attention_heads=8,
        num_key_value_heads=4,
        seed=3,
    )


def logits(model, tokenizer, text=HELDOUT[0]):
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.inference_mode():
        return model(ids).logits


TARGETS = {
    "width": dict(hidden_size=16, intermediate_size=40, num_heads=2, num_kv_heads=1),
    "depth": dict(num_layers=1),
    "both": dict(num_layers=1, hidden_size=24, num_heads=2),
}


@pytest.mark.parametrize("method", sorted(TARGETS))
@pytest.mark.parametrize("arch_dir", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_pruned_model_loads_with_the_requested_shape(
    request, arch_dir, method, calib, heldout, tiny_tokenizer, tmp_path
):
    teacher_dir = request.getfixturevalue(arch_dir)
    target = dict(TARGETS[method])
    if "qwen2" in arch_dir and "hidden_size" in target:
        target["hidden_size"] = target["num_heads"] * 8  # Qwen2: hidden = heads x head_dim
    out = tmp_path / "student"
    result = prune_model(str(teacher_dir), calib, str(out), method=method, progress=False, **target)

    model = AutoModelForCausalLM.from_pretrained(out)
    teacher = shape_of(AutoModelForCausalLM.from_pretrained(teacher_dir).config)
    want = teacher.as_dict() | target
    if "num_heads" in target and "num_kv_heads" not in target:
        want["num_kv_heads"] = 2  # two heads keep both kv heads (groups of one)
    assert shape_of(model.config).as_dict() == want
    assert model.config.model_type == result.report["architecture"]
    params = sum(p.numel() for p in model.parameters())
    assert params == count_parameters(model.config).total
    assert params == result.report["parameters"]["pruned"]["total"]
    assert params == sum(p.numel() for p in result.model.parameters())
    out_logits = logits(model, tiny_tokenizer)
    assert torch.isfinite(out_logits).all()
    torch.testing.assert_close(out_logits, logits(result.model, tiny_tokenizer))
    assert np.isfinite(heldout_loss(model, heldout))
    # The teacher's tokenizer travels with the student.
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tiny_tokenizer.get_vocab()
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["method"] == method
    assert report["shapes"]["pruned"] == want
    kept = report["kept"]
    assert len(kept["layers"]) == want["num_layers"] == len(kept["neurons"])
    assert len(kept["channels"]) == want["hidden_size"]
    assert all(len(h) == want["num_heads"] for h in kept["heads"])
    assert all(len(n) == want["intermediate_size"] for n in kept["neurons"])
    assert len(report["importance"]["heads"]) == teacher.num_layers
    assert report["calibration"]["samples"] == len(calib)


def test_mistral_prunes_to_any_hidden_size(tiny_mistral_dir, calib, tmp_path, tiny_tokenizer):
    out = tmp_path / "student"
    prune_model(str(tiny_mistral_dir), calib, str(out), hidden_size=20, num_heads=4, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    # hidden / heads = 5, but head_dim stays the teacher's 4: explicit in the config.
    assert (model.config.hidden_size, model.config.num_attention_heads) == (20, 4)
    assert model.config.head_dim == 4 and model.config.num_key_value_heads == 4
    assert torch.isfinite(logits(model, tiny_tokenizer)).all()


def test_tied_embeddings_stay_tied(tiny_tied_llama_dir, calib, tmp_path, tiny_tokenizer):
    out = tmp_path / "student"
    result = prune_model(str(tiny_tied_llama_dir), calib, str(out), params="60%", progress=False)
    assert result.model.lm_head.weight is result.model.model.embed_tokens.weight
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (
        count_parameters(model.config).total
        <= 0.6
        * count_parameters(AutoModelForCausalLM.from_pretrained(tiny_tied_llama_dir).config).total
    )
    assert torch.isfinite(logits(model, tiny_tokenizer)).all()


@pytest.mark.parametrize("arch_dir", ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_tied_llama_dir"])
def test_pruning_to_the_teachers_shape_changes_nothing(
    request, arch_dir, calib, tiny_tokenizer, tmp_path
):
    teacher_dir = request.getfixturevalue(arch_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    shape = shape_of(teacher.config)
    out = tmp_path / "same"
    result = prune_model(
        str(teacher_dir),
        calib,
        str(out),
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_heads=shape.num_heads,
        progress=False,
    )
    assert result.shape == shape
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    expected = logits(teacher, tiny_tokenizer)
    torch.testing.assert_close(logits(reloaded, tiny_tokenizer), expected, rtol=0, atol=0)
    for name, tensor in teacher.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_quantisation_settings_of_a_gguf_teacher_are_dropped(tiny_llama_dir):
    from kd.prune import make_plan, random_importance
    from kd.prune.slicing import pruned_config

    config = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).config
    config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load leaves
    teacher = shape_of(config)
    target = Shape(**(teacher.as_dict() | {"num_layers": 1}))
    plan = make_plan(random_importance(teacher, 0), teacher, target)
    pruned = json.loads(pruned_config(config, plan).to_json_string(use_diff=False))
    assert "quantization_config" not in pruned and pruned["num_hidden_layers"] == 1


def reference_importance(model, examples):
    """The definition, one sequence at a time with whole activations kept (tests only)."""
    layers = model.model.layers
    config = model.config
    heads, head_dim = config.num_attention_heads, config.head_dim
    seen = {}

    def keep(key, from_output):
        def hook(module, args, *rest):
            seen[key] = (rest[-1] if from_output else args[0])[0].clone()

        return hook

    hooks = [model.model.norm.register_forward_hook(keep("final", True))]
    for i, layer in enumerate(layers):
        hooks += [
            layer.register_forward_pre_hook(keep(("in", i), False)),
            layer.register_forward_hook(keep(("out", i), True)),
            layer.self_attn.o_proj.register_forward_pre_hook(keep(("o", i), False)),
            layer.mlp.down_proj.register_forward_pre_hook(keep(("down", i), False)),
            layer.input_layernorm.register_forward_hook(keep(("n1", i), True)),
            layer.post_attention_layernorm.register_forward_hook(keep(("n2", i), True)),
        ]
    per_seq = {"heads": [], "neurons": [], "channels": [], "final": [], "cos": []}
    n = len(layers)
    for example in examples:
        with torch.inference_mode():
            model(torch.from_numpy(example.input_ids).long()[None])
        o = [seen[("o", i)].view(-1, heads, head_dim).norm(dim=-1) for i in range(n)]  # [S, H]
        per_seq["heads"].append(torch.stack([x.pow(2).sum(0).sqrt() for x in o]))
        per_seq["neurons"].append(torch.stack([seen[("down", i)].norm(dim=0) for i in range(n)]))
        per_seq["channels"].append(
            torch.stack(
                [seen[("n1", i)].norm(dim=0) + seen[("n2", i)].norm(dim=0) for i in range(n)]
            )
        )
        per_seq["final"].append(seen["final"].norm(dim=0))
        cos = torch.nn.functional.cosine_similarity
        per_seq["cos"].append(
            torch.stack([cos(seen[("in", i)], seen[("out", i)], dim=-1) for i in range(n)])
        )  # [L, S]
    for h in hooks:
        h.remove()
    cosines = per_seq.pop("cos")
    mean = {k: torch.stack(v).mean(0).double().numpy() for k, v in per_seq.items()}
    mean["layers"] = (1 - torch.cat(cosines, dim=1)).mean(1).double().numpy()
    return mean


def test_importance_is_the_documented_aggregation(tiny_llama_dir, calib):
    model = load_model(str(tiny_llama_dir)).model
    want = reference_importance(model, calib)
    # Batches of many padded sequences, and one sequence per batch, give the same scores.
    for batch_tokens in (10_000, 1):
        got = collect_importance(model, calib, batch_tokens=batch_tokens, progress=False)
        np.testing.assert_allclose(got.heads, want["heads"], rtol=1e-4)
        np.testing.assert_allclose(got.neurons, want["neurons"], rtol=1e-4)
        np.testing.assert_allclose(got.channels, want["channels"], rtol=1e-4)
        np.testing.assert_allclose(got.final_channels, want["final"], rtol=1e-4)
        np.testing.assert_allclose(got.layers, want["layers"], rtol=1e-4, atol=1e-6)
        assert got.sequences == len(calib)
        assert got.tokens == sum(len(e.input_ids) for e in calib)


def test_layer_loss_importance_is_the_loss_increase(tiny_llama_dir, calib):
    model = load_model(str(tiny_llama_dir)).model
    base = heldout_loss(model, calib)
    scores = layer_loss_importance(model, calib, progress=False)
    assert scores.shape == (2,)
    # Dropping layer 0 by hand (a one-layer model of layer 1) gives the same loss increase.
    result = prune_model(
        load_model(str(tiny_llama_dir)), None, num_layers=1, selection="random", progress=False
    )
    kept = result.plan.layers[0]
    assert scores[1 - kept] == pytest.approx(heldout_loss(result.model, calib) - base, rel=1e-5)
    # The model is unchanged afterwards (the skip is undone).
    assert heldout_loss(model, calib) == pytest.approx(base, rel=1e-6)


def test_random_selection_depends_on_the_seed(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    plans = [
        prune_model(
            loaded,
            None,
            hidden_size=16,
            intermediate_size=32,
            selection="random",
            seed=seed,
            progress=False,
        ).plan
        for seed in (0, 0, 1)
    ]
    assert plans[0].channels == plans[1].channels and plans[0].neurons == plans[1].neurons
    assert plans[0].channels != plans[2].channels


def test_calibration_from_a_logit_cache(tiny_llama_dir, calib, tiny_tokenizer, tmp_path):
    from logitcache import CacheWriter
    from logitcache.identity import tokenizer_identity

    loaded = load_model(str(tiny_llama_dir))
    url = str(tmp_path / "cache")
    k = 8
    with CacheWriter(
        url, k=k, vocab_size=len(tiny_tokenizer), tokenizer=tokenizer_identity(tiny_tokenizer)
    ) as writer:
        for example in calib:
            ids = torch.from_numpy(example.input_ids).long()[None]
            with torch.inference_mode():
                logprobs = loaded.model(ids).logits[0].log_softmax(-1)
            targets = np.flatnonzero(example.loss_mask)
            top = logprobs[targets - 1].topk(k)
            writer.add(
                input_ids=example.input_ids,
                loss_mask=example.loss_mask,
                topk_ids=top.indices.numpy(),
                topk_logprobs=top.values.numpy(),
                sample_id=example.sample_id,
            )
    from_cache = load_calibration(url, tiny_tokenizer, samples=3)
    assert from_cache.kind == "cache" and len(from_cache.examples) == 3
    for got, want in zip(from_cache.examples, calib[:3], strict=True):
        np.testing.assert_array_equal(got.input_ids, want.input_ids)
    a = prune_model(loaded, url, None, hidden_size=16, calib_samples=3, progress=False)
    b = prune_model(loaded, calib[:3], None, hidden_size=16, progress=False)
    assert a.plan.channels == b.plan.channels
    np.testing.assert_allclose(a.importance.neurons, b.importance.neurons, rtol=1e-6)
    # A cache written with another tokenizer is refused before any work.
    from .conftest import build_tokenizer

    other = build_tokenizer(vocab_size=320)
    with pytest.raises(Exception, match="differs from the one the cache"):
        load_calibration(url, other)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_kd(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kd.cli", "prune", *map(str, args)],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
    )


def test_cli_prunes_and_reports(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "calib.jsonl", [{"text": t} for t in CORPUS])
    out = tmp_path / "student"
    done = run_kd(
        "--model",
        tiny_llama_dir,
        "--calib",
        data,
        "--out",
        out,
        "--params",
        "60%",
        "--calib-samples",
        3,
        "--quiet",
    )
    assert done.returncode == 0, done.stderr
    assert "calibration: 3 sequences" in done.stdout
    assert f"saved to {out}" in done.stdout
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["method"] == "width"
    assert report["parameters"]["pruned"]["total"] <= 0.6 * report["parameters"]["teacher"]["total"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]["pruned"]["total"]

    # An existing directory is not replaced without --overwrite.
    again = run_kd("--model", tiny_llama_dir, "--calib", data, "--out", out, "--layers", 1)
    assert again.returncode == 1
    assert "already exists; pass --overwrite" in again.stderr
    again = run_kd(
        "--model",
        tiny_llama_dir,
        "--calib",
        data,
        "--out",
        out,
        "--layers",
        1,
        "--overwrite",
        "--depth-metric",
        "loss",
        "--quiet",
    )
    assert again.returncode == 0, again.stderr
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["method"] == "depth" and report["importance"]["layer_metric"] == "loss"
    assert not list(tmp_path.glob(".student*")), "no staging directory is left behind"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--num-heads", 8], "--num-heads 8: the teacher has only 4"),
        (["--num-heads", 3], "--num-kv-heads 2 does not divide --num-heads 3"),
    ],
)
def test_cli_bad_shapes_are_one_line_errors(tiny_llama_dir, tmp_path, options, message):
    data = write_jsonl(tmp_path / "calib.jsonl", [{"text": t} for t in CORPUS])
    done = run_kd("--model", tiny_llama_dir, "--calib", data, "--out", tmp_path / "o", *options)
    assert done.returncode == 1
    assert done.stderr.startswith("kd prune: error: ") and message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_is_refused(tmp_path, tiny_tokenizer, calib):
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=4)
    ).save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    with pytest.raises(ShapeError, match="pruning gpt2 models is not supported; supported"):
        prune_model(str(directory), calib, None, num_layers=1, progress=False)


def test_bad_calibration_data_names_the_line(tiny_llama_dir, tmp_path):
    data = tmp_path / "calib.jsonl"
    data.write_text('{"text": "def f(x):\\n    return x\\n"}\n{"txt": "oops"}\n')
    done = run_kd(
        "--model", tiny_llama_dir, "--calib", data, "--out", tmp_path / "o", "--layers", 1
    )
    assert done.returncode == 1
    assert f"{data}:line 2" in done.stderr and "no known fields" in done.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prunes_on_gpu(tiny_llama_dir, calib, heldout, tmp_path):
    cpu = prune_model(
        str(tiny_llama_dir), calib, None, hidden_size=16, num_layers=1, progress=False
    )
    gpu = prune_model(
        str(tiny_llama_dir),
        calib,
        str(tmp_path / "g"),
        hidden_size=16,
        num_layers=1,
        device="cuda",
        progress=False,
    )
    assert next(gpu.model.parameters()).device.type == "cuda"
    assert gpu.shape == cpu.shape == Shape(1, 16, 64, 4, 2, 8)
    np.testing.assert_allclose(gpu.importance.neurons, cpu.importance.neurons, rtol=1e-3)
    assert gpu.plan.layers == cpu.plan.layers
    assert heldout_loss(gpu.model, heldout) == pytest.approx(
        heldout_loss(cpu.model, heldout), rel=1e-3
    )
