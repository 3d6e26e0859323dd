"""kd train on a tiny student and a cache written from a tiny trained teacher's real forward:
the loss falls, SFT-only equals a plain cross-entropy loop, resume is exact, checkpoints are
atomic, and a student that does not fit the cache is refused before any step."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import kd.checkpoint
import kd.packing
from kd.config import TrainConfig, validate
from kd.losses import reference_kd_sft_loss
from kd.metrics import read_metrics
from kd.train import train

from .conftest import build_model, build_tokenizer, cli_env
from .kd_helpers import build_kd_cache, sft_rows


def config_for(kd_inputs, out, **overrides) -> TrainConfig:
    values = dict(
        student=str(kd_inputs.student),
        cache=str(kd_inputs.cache),
        output_dir=str(out),
        batch_size=8,
        lr=3e-3,
        num_workers=0,
        log_every=1,
        plot=False,
        seed=3,
        threads=1,
    )
    values.update(overrides)
    config = TrainConfig(**values)
    validate(config)
    return config


def train_losses(out) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(str(out)) if r["kind"] == "train"}


def weights(model_dir) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def test_loss_falls_and_the_run_reports_it(kd_inputs, tmp_path):
    out = tmp_path / "run"
    result = train(
        config_for(
            kd_inputs,
            out,
            max_steps=40,
            eval_data=str(kd_inputs.heldout_cache),
            eval_every=20,
            log_every=5,
            warmup_steps=4,
            plot=True,
        ),
        progress=False,
    )
    records = read_metrics(str(out))
    steps = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in steps] == [5, 10, 15, 20, 25, 30, 35, 40]
    for r in steps:
        assert {"step", "loss", "kd", "ce", "lr", "grad_norm", "tokens_per_s"} <= set(r)
        assert r["loss"] == pytest.approx(r["kd"] + 0.4 * r["ce"], rel=1e-9)
    assert steps[-1]["loss"] < 0.7 * steps[0]["loss"]
    assert steps[-1]["kd"] < 0.7 * steps[0]["kd"]
    assert [r["step"] for r in evals] == [0, 20, 40]
    # Held out: closer to the teacher and better at the data than the untrained student.
    assert evals[-1]["eval_kd"] < 0.7 * evals[0]["eval_kd"]
    assert evals[-1]["eval_ce"] < evals[0]["eval_ce"]
    assert evals[-1]["eval_accuracy"] > evals[0]["eval_accuracy"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["eval"]["step"] == 40
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "run.toml").is_file()
    # The final model is a transformers directory: from_pretrained loads it.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert model.config.vocab_size == len(kd_inputs.tokenizer)
    torch.testing.assert_close(
        model.lm_head.weight, weights(out / "model")["lm_head.weight"], rtol=0, atol=0
    )


def test_kd_weight_0_is_a_plain_cross_entropy_loop(kd_inputs, tmp_path, monkeypatch):
    def no_teacher_columns(*args, **kwargs):
        raise AssertionError("plain SFT collated the teacher columns")

    monkeypatch.setattr(kd.packing, "collate_kd", no_teacher_columns)
    steps, lr = 6, 2e-3
    out = tmp_path / "sft"
    train(
        config_for(
            kd_inputs,
            out,
            kd_weight=0.0,
            sft_weight=1.0,
            max_steps=steps,
            lr=lr,
            lr_schedule="constant",
            group_by_length=False,
            max_grad_norm=1.0,
        ),
        progress=False,
    )
    logged = train_losses(out)
    assert all(logged[s]["kd"] is None for s in logged)

    # The same steps written out plainly: HF logits, torch's cross-entropy, AdamW, clipping.
    from transformers import AutoModelForCausalLM

    from logitcache.loader import LogitCacheDataset, LogitCacheLoader

    model = AutoModelForCausalLM.from_pretrained(kd_inputs.student, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    loader = LogitCacheLoader(LogitCacheDataset(str(kd_inputs.cache), seed=3), batch_size=8)
    plain = []
    for batch, _ in zip(loader, range(steps), strict=False):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
        )
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        plain.append(float(loss.detach()))
    np.testing.assert_allclose([logged[s]["ce"] for s in range(1, steps + 1)], plain, rtol=1e-5)
    np.testing.assert_allclose([logged[s]["loss"] for s in range(1, steps + 1)], plain, rtol=1e-5)
    trained = weights(out / "model")
    for name, param in model.state_dict().items():
        torch.testing.assert_close(trained[name], param, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("workers", [0, 2])
def test_n_steps_plus_resume_n_equals_2n(kd_inputs, tmp_path, workers):
    # Steps of 2 micro-batches of 4 records from length groups of 3 micro-batches: the
    # checkpoint at step 7 falls inside a group, and an epoch (96 records) ends at step 12.
    settings = dict(
        max_steps=14,
        batch_size=4,
        grad_accum=2,
        group_batches=3,
        num_workers=workers,
        save_every=7,
        keep_checkpoints=0,
        warmup_steps=3,
        eval_data=str(kd_inputs.heldout_cache),
        eval_every=6,
    )
    whole = tmp_path / "whole"
    train(config_for(kd_inputs, whole, **settings), progress=False)

    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    for leftover in ("checkpoints/step-0000014", "model", "summary.json"):
        path = resumed / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    train(config_for(kd_inputs, resumed, **settings), resume="latest", progress=False)

    first, second = train_losses(whole), train_losses(resumed)
    assert sorted(second) == list(range(1, 15))  # steps after the checkpoint replaced, not added
    for step in range(1, 15):
        for key in ("loss", "kd", "ce", "grad_norm", "lr"):
            assert second[step][key] == pytest.approx(first[step][key], rel=1e-6, abs=1e-9), (
                step,
                key,
            )
    evals = [r for r in read_metrics(str(resumed)) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 6, 12, 14]
    a, b = weights(whole / "model"), weights(resumed / "model")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7, msg=name)


def test_a_failed_checkpoint_write_leaves_the_previous_one(kd_inputs, tmp_path, monkeypatch):
    out = tmp_path / "crash"
    real_write_json = kd.checkpoint._write_json
    calls = []

    def crash_on_second_save(path, document):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real_write_json(path, document)

    monkeypatch.setattr(kd.checkpoint, "_write_json", crash_on_second_save)
    config = config_for(kd_inputs, out, max_steps=6, save_every=3)
    with pytest.raises(OSError, match="simulated"):
        train(config, progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000003"]
    monkeypatch.setattr(kd.checkpoint, "_write_json", real_write_json)
    result = train(config, resume="latest", progress=False)
    assert result.steps == 6
    assert sorted(train_losses(out)) == [1, 2, 3, 4, 5, 6]


def test_packed_training_gives_the_unpacked_losses(kd_inputs, tmp_path):
    common = dict(max_steps=3, batch_size=8, group_by_length=False)
    train(config_for(kd_inputs, tmp_path / "padded", **common), progress=False)
    train(
        config_for(kd_inputs, tmp_path / "packed", packing=True, pack_length=160, **common),
        progress=False,
    )
    padded, packed = train_losses(tmp_path / "padded"), train_losses(tmp_path / "packed")
    for step in (1, 2, 3):
        for key in ("loss", "kd", "ce"):
            assert packed[step][key] == pytest.approx(padded[step][key], rel=1e-5)
        assert packed[step]["pad_fraction"] < padded[step]["pad_fraction"]


# --------------------------------------------------------------------------------------------
# Refused before any step


def assert_nothing_trained(out) -> None:
    assert not (out / "metrics.jsonl").exists()
    assert not (out / "checkpoints").exists()


def test_missing_cache_and_eval_data_are_clear_errors(kd_inputs, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"cache .*no-such-cache: .*manifest"):
        train(config_for(kd_inputs, out, cache=str(tmp_path / "no-such-cache")), progress=False)
    assert_nothing_trained(out)
    with pytest.raises(ValueError, match="held-out.jsonl: no such file"):
        train(
            config_for(kd_inputs, out, eval_data=str(tmp_path / "held-out.jsonl")),
            progress=False,
        )
    assert_nothing_trained(out)


def test_a_student_with_another_tokenizer_is_refused(kd_inputs, tmp_path):
    other = build_model(tmp_path / "other", tokenizer=build_tokenizer(vocab_size=380), seed=9)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="differs from the one the cache .* was written with"):
        train(config_for(kd_inputs, out, student=str(other)), progress=False)
    assert_nothing_trained(out)


@pytest.fixture(scope="module")
def padded_teacher_cache(tmp_path_factory, kd_inputs):
    """A cache whose teacher scores 448 columns for the 383-token tokenizer (padded)."""
    base = tmp_path_factory.mktemp("padded-teacher")
    teacher = build_model(base / "teacher", tokenizer=kd_inputs.tokenizer, vocab_rows=448)
    return build_kd_cache(base / "cache", teacher, sft_rows(12, seed=4))


def test_a_student_vocabulary_smaller_than_the_teachers_is_refused(
    kd_inputs, padded_teacher_cache, tmp_path
):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"scores 383 tokens but the cache .* vocabulary of 448"):
        train(config_for(kd_inputs, out, cache=str(padded_teacher_cache)), progress=False)
    assert_nothing_trained(out)


def test_a_padded_student_trains_and_its_padding_columns_stay_out(
    kd_inputs, padded_teacher_cache, tmp_path
):
    student = build_model(tmp_path / "padded", tokenizer=kd_inputs.tokenizer, vocab_rows=512)
    before = weights(student)["lm_head.weight"]
    out = tmp_path / "out"
    train(
        config_for(kd_inputs, out, student=str(student), cache=str(padded_teacher_cache)),
        progress=False,
    )
    after = weights(out / "model")["lm_head.weight"]
    assert not torch.equal(after[:448], before[:448])
    assert torch.equal(after[448:], before[448:])  # no gradient reached the padding columns


def test_an_existing_run_needs_resume_or_overwrite(kd_inputs, tmp_path):
    out = tmp_path / "out"
    train(config_for(kd_inputs, out, max_steps=1), progress=False)
    with pytest.raises(ValueError, match="already holds a run .* pass --resume"):
        train(config_for(kd_inputs, out, max_steps=1), progress=False)
    with pytest.raises(ValueError, match=r"these keys differ .*lr \(0.003 -> 0.001\)"):
        train(config_for(kd_inputs, out, max_steps=1, lr=1e-3), resume="latest", progress=False)
    train(config_for(kd_inputs, out, max_steps=2, overwrite=True), progress=False)
    assert sorted(train_losses(out)) == [1, 2]


# --------------------------------------------------------------------------------------------
# The command line


def test_cli_run_toml_reproduces_the_run(kd_inputs, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        f'student = "{kd_inputs.student}"\ncache = "{kd_inputs.cache}"\n'
        f'output_dir = "{tmp_path / "first"}"\nmax_steps = 3\nbatch_size = 8\nlr = 3e-3\n'
        "log_every = 1\nnum_workers = 0\nplot = false\n"
    )
    kd = [sys.executable, "-m", "kd.cli"]
    first = subprocess.run(
        [*kd, "train", "--config", str(config), "seed=5", "--quiet"],
        capture_output=True,
        text=True,
        env=cli_env(),
    )
    assert first.returncode == 0, first.stderr
    again = subprocess.run(
        [
            *kd,
            "train",
            "--config",
            str(tmp_path / "first" / "run.toml"),
            f"output_dir={tmp_path / 'again'}",
        ],
        capture_output=True,
        text=True,
        env=cli_env(),
    )
    assert again.returncode == 0, again.stderr
    assert "trained 3 steps" in again.stdout
    a, b = train_losses(tmp_path / "first"), train_losses(tmp_path / "again")
    assert [a[s]["loss"] for s in (1, 2, 3)] == [b[s]["loss"] for s in (1, 2, 3)]


def test_accumulation_checkpointing_and_bf16_keep_the_step_losses(kd_inputs, tmp_path):
    # One step = the same 8 records either way; the loss is the mean over all of their targets.
    common = dict(max_steps=3, group_by_length=False)
    runs = {
        "plain": dict(batch_size=8),
        "accumulated": dict(batch_size=4, grad_accum=2),
        "checkpointed": dict(batch_size=8, gradient_checkpointing=True),
        "bf16": dict(batch_size=8, precision="bf16"),
    }
    losses = {}
    for name, options in runs.items():
        train(config_for(kd_inputs, tmp_path / name, **common, **options), progress=False)
        losses[name] = train_losses(tmp_path / name)
    for step in (1, 2, 3):
        want = losses["plain"][step]
        for name, rel in (("accumulated", 1e-5), ("checkpointed", 1e-5), ("bf16", 3e-2)):
            for key in ("loss", "kd", "ce"):
                assert losses[name][step][key] == pytest.approx(want[key], rel=rel), (name, key)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_rows_give_each_record_its_unpacked_losses(kd_inputs, tmp_path, arch):
    from kd.packing import check_packing_support, collate_micro_batch
    from kd.student import StudentWithHead
    from logitcache import open_cache

    path = build_model(tmp_path / arch, arch=arch, tokenizer=kd_inputs.tokenizer, seed=2)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    check_packing_support(model, vocab_rows=len(kd_inputs.tokenizer))
    with open_cache(str(kd_inputs.cache)) as cache:
        records = [cache[i] for i in range(7)]

    def per_record(hidden, weight, bias, batch):
        """Each record's summed CE and renormalised top-K KL, from full logits."""
        out = []
        width = batch["input_ids"].shape[1]
        logits = (hidden @ weight.t()).double()
        kd_at = {int(p): j for j, p in enumerate(batch["kd_index"])}
        for row, start, length in batch["segments"].tolist():
            positions = [
                p for p in range(start + 1, start + length) if batch["labels"][row, p] >= 0
            ]
            z = torch.stack([logits[row, p - 1] for p in positions])
            y = torch.stack([batch["labels"][row, p] for p in positions])
            rows = [kd_at[row * width + p] for p in positions]
            loss = reference_kd_sft_loss(
                z, y, batch["kd_ids"][rows], batch["kd_logprobs"][rows].double(), reduction="sum"
            )
            out.append((float(loss.ce), float(loss.kd)))
        return out

    wrapped = StudentWithHead(model)
    with torch.no_grad():
        padded = wrapped(collate_micro_batch(records, positions="supervised"), per_record)
        packed_batch = collate_micro_batch(
            records, positions="supervised", packing=True, pack_length=120
        )
        packed = wrapped(packed_batch, per_record)
    assert packed_batch["input_ids"].shape[0] < len(records)  # several records share rows
    np.testing.assert_allclose(packed, padded, rtol=1e-5)

    # A model whose attention ignores restarting positions is refused before training.
    body = model.base_model
    forward = body.forward
    body.forward = lambda *args, position_ids=None, **kwargs: forward(*args, **kwargs)
    with pytest.raises(ValueError, match="does not keep packed records apart"):
        check_packing_support(model, vocab_rows=len(kd_inputs.tokenizer))


def test_epochs_set_the_number_of_steps(kd_inputs, tmp_path):
    # 96 records in micro-batches of 16: 6 per epoch.
    result = train(
        config_for(kd_inputs, tmp_path / "half", epochs=0.5, batch_size=16), progress=False
    )
    assert result.steps == 3 and result.summary["records"] == 48
    result = train(
        config_for(kd_inputs, tmp_path / "more", epochs=1.5, batch_size=16, grad_accum=2),
        progress=False,
    )
    assert result.steps == 5  # ceil(1.5 * 6 / 2), the last step in the second epoch
    assert result.summary["records"] == 5 * 2 * 16


def test_a_random_student_from_a_config_is_seeded(kd_inputs, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in kd_inputs.student.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, bare / f.name)
    first = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        out = tmp_path / name
        train(
            config_for(
                kd_inputs, out, student=str(bare), student_init="random", seed=seed, max_steps=1
            ),
            progress=False,
        )
        first[name] = train_losses(out)[1]["loss"]
    assert first["a"] == first["b"] != first["c"]
    with pytest.raises(ValueError, match="no \\*.safetensors weights"):
        train(config_for(kd_inputs, tmp_path / "d", student=str(bare)), progress=False)
