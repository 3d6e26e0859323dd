"""kd train streaming its cache and held-out cache from S3 (moto on loopback) with DataLoader
workers: the same steps as from local disk."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from kd.metrics import read_metrics  # noqa: E402
from kd.train import train  # noqa: E402

from ..s3.conftest import CREDENTIALS, _new_bucket, s3_options  # noqa: E402
from .test_train import config_for  # noqa: E402


@pytest.fixture(scope="module")
def moto_s3():
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = "http://{}:{}".format(*server.get_host_and_port())
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def upload(local, bucket: str, prefix: str, options: dict) -> str:
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    fs.put(str(local), f"{bucket}/{prefix}", recursive=True)
    return f"s3://{bucket}/{prefix}"


def test_training_from_s3_with_workers_matches_local_disk(kd_inputs, moto_s3, tmp_path):
    options = s3_options(moto_s3)
    bucket = _new_bucket(moto_s3)
    cache = upload(kd_inputs.cache, bucket, "train-cache", options)
    heldout = upload(kd_inputs.heldout_cache, bucket, "heldout-cache", options)
    common = dict(max_steps=4, batch_size=4, group_batches=2, num_workers=2, eval_every=4)
    train(
        config_for(
            kd_inputs,
            tmp_path / "s3",
            cache=cache,
            eval_data=heldout,
            storage_options=options,
            cache_dir=str(tmp_path / "shards"),
            **common,
        ),
        progress=False,
    )
    train(
        config_for(kd_inputs, tmp_path / "local", eval_data=str(kd_inputs.heldout_cache), **common),
        progress=False,
    )
    # The credentials stay out of what the run writes.
    written = (tmp_path / "s3" / "run.toml").read_text()
    for state in (tmp_path / "s3" / "checkpoints").glob("*/trainer_state.json"):
        written += state.read_text()
    assert options["secret"] == "testing" and '"testing"' not in written
    remote, local = read_metrics(str(tmp_path / "s3")), read_metrics(str(tmp_path / "local"))
    assert len(remote) == len(local) == 6  # eval at 0, steps 1-4, eval at 4
    for a, b in zip(remote, local, strict=True):
        for key in ("loss", "kd", "ce", "eval_ce", "eval_kd"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-6), key


def test_kd_eval_command_reads_a_cache_from_s3(kd_inputs, moto_s3, tmp_path):
    import json
    import subprocess
    import sys

    from .conftest import cli_env

    options = s3_options(moto_s3)
    heldout = upload(kd_inputs.heldout_cache, _new_bucket(moto_s3), "heldout", options)
    run = [sys.executable, "-m", "kd.cli", "eval", "--model", str(kd_inputs.student), "--json"]
    remote = subprocess.run(
        [*run, "--data", heldout, "--storage-options", json.dumps(options)],
        capture_output=True, text=True, env=cli_env(), timeout=300,
    )  # fmt: skip
    local = subprocess.run(
        [*run, "--data", str(kd_inputs.heldout_cache)],
        capture_output=True, text=True, env=cli_env(), timeout=300,
    )  # fmt: skip
    assert remote.returncode == 0 and local.returncode == 0, remote.stderr[-2000:]
    a, b = json.loads(remote.stdout), json.loads(local.stdout)
    assert a["targets"] == b["targets"] > 0
    for key in ("ce", "accuracy", "kl"):
        assert a[key] == pytest.approx(b[key], rel=1e-6), key
