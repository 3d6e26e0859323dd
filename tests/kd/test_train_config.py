"""kd train's configuration: TOML plus key=value overrides, strict keys and types, run.toml."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kd.config import KEYS, ConfigError, TrainConfig, dumps_config, load_config, write_config

from .conftest import cli_env

REQUIRED = ["student=s", "cache=c", "output_dir=o"]


def test_toml_then_overrides_and_types(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'student = "models/student"\ncache = "s3://bucket/run1"\noutput_dir = "out"\n'
        "lr = 2e-4\nmax_steps = 100\nkd_weight = 1\ngroup_by_length = false\n"
        'storage_options = { endpoint_url = "http://127.0.0.1:5555", anon = false }\n'
    )
    config = load_config(str(path), ["lr=3e-4", "mode=jsd", "beta=0.3", "packing=true"])
    assert config.student == "models/student"
    assert config.cache == "s3://bucket/run1"
    assert config.lr == 3e-4  # the command line wins
    assert config.max_steps == 100 and isinstance(config.max_steps, int)
    assert config.kd_weight == 1.0 and isinstance(config.kd_weight, float)
    assert config.group_by_length is False and config.packing is True
    assert config.mode == "jsd" and config.beta == 0.3
    assert config.storage_options == {"endpoint_url": "http://127.0.0.1:5555", "anon": False}
    # Tables on the command line: JSON or a TOML inline table; quoted strings lose the quotes.
    config = load_config(None, [*REQUIRED, 'storage_options={"anon": true}', 'tokenizer="tok dir"'])
    assert config.storage_options == {"anon": True} and config.tokenizer == "tok dir"


def test_run_toml_round_trips_every_key(tmp_path):
    config = load_config(
        None,
        [*REQUIRED, "lr=1.5e-05", "eval_data=held out.jsonl", 'storage_options={"a": {"b": 1}}'],
    )
    write_config(config, str(tmp_path / "run.toml"))
    again = load_config(str(tmp_path / "run.toml"))
    assert again == config
    text = dumps_config(config)
    assert all(f"\n{name} = " in text for name in KEYS)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["learning_rate=1e-3"], "unknown key 'learning_rate' \\(did you mean 'lr'\\?\\)"),
        (["max_steps=ten"], "cannot read 'ten'"),
        (["max_steps=1.5"], "'max_steps' must be an integer"),
        (["packing=maybe"], "'packing' must be true or false"),
        (["mode=forward"], "'mode' is 'forward'; choose one of renorm"),
        (["batch_size=0"], "'batch_size' is 0; it must be >= 1"),
        (["beta=1.5"], "'beta' is 1.5; it must be in \\[0, 1\\]"),
        (["mode=tail", "temperature=2"], "mode 'tail' is defined at temperature 1 only"),
        (["kd_weight=0", "sft_weight=0"], "nothing to learn"),
        (["noequals"], "'noequals' is not key=value"),
    ],
)
def test_bad_overrides_are_clear_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*REQUIRED, *args])


def test_missing_required_keys_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="key 'student' is required"):
        load_config(None, ["cache=c", "output_dir=o"])
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = [1, 2\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(str(bad))
    typed = tmp_path / "typed.toml"
    typed.write_text('student = "s"\ncache = "c"\noutput_dir = "o"\nmax_steps = "10"\n')
    with pytest.raises(ConfigError, match="typed.toml: key 'max_steps' must be an integer"):
        load_config(str(typed))
    nested = tmp_path / "nested.toml"
    nested.write_text("[optim]\nlr = 1e-3\n")
    with pytest.raises(ConfigError, match="nested.toml: unknown key 'optim'"):
        load_config(str(nested))
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(str(tmp_path / "absent.toml"))


def test_cli_help_lists_every_key_and_unknown_keys_fail_before_anything(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "kd.cli", "train", "--help"],
        capture_output=True,
        text=True,
        env=cli_env(),
        check=True,
    )
    for name, f in KEYS.items():
        assert f"  {name} = " in run.stdout, name
        assert f.metadata["help"][:30] in run.stdout
    assert "lr = 0.0001" in run.stdout and "student = (required)" in run.stdout
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "kd.cli", "train", *REQUIRED[:2], f"output_dir={out}", "sedd=1"],
        capture_output=True,
        text=True,
        env=cli_env(),
    )
    assert run.returncode == 1
    assert run.stderr.strip() == (
        "kd train: error: command line: unknown key 'sedd' (did you mean 'seed'?); "
        "`kd train --help` lists every key"
    )
    assert not out.exists()


def test_defaults_are_valid_once_required_keys_are_set():
    config = load_config(None, REQUIRED)
    assert config == TrainConfig(student="s", cache="c", output_dir="o")


def test_credentials_never_reach_run_toml(tmp_path):
    options = (
        'storage_options={"key": "AKIAEXAMPLE", "secret": "s3cr3t", "anon": false, '
        '"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", '
        '"aws_session_token": "t0k3n"}}'
    )
    config = load_config(None, [*REQUIRED, options])
    write_config(config, str(tmp_path / "run.toml"))
    text = (tmp_path / "run.toml").read_text()
    for secret in ("AKIAEXAMPLE", "s3cr3t", "t0k3n"):
        assert secret not in text
    assert "key, secret, client_kwargs.aws_session_token left out" in text
    again = load_config(str(tmp_path / "run.toml"))
    assert again.storage_options == {
        "anon": False,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"},
    }
