"""kd cache with its data and its cache on S3 (moto's server on loopback, real HTTP)."""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from moto.server import ThreadedMotoServer  # noqa: E402

from kd.models import load_model  # noqa: E402
from kd.teacher import cache_teacher  # noqa: E402
from logitcache import open_cache  # noqa: E402

from ..s3.conftest import CREDENTIALS, s3_options  # noqa: E402


@pytest.fixture(scope="module")
def s3_bucket():
    import boto3
    import s3fs

    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = "http://{}:{}".format(*server.get_host_and_port())
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"kd-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    yield bucket, s3_options(endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_data_and_cache_on_s3_equal_a_local_run(s3_bucket, tiny_llama_dir, tmp_path):
    import fsspec

    bucket, options = s3_bucket
    rows = [
        {"id": f"r{i}", "prompt": f"def f{i}(x):\n", "response": "    return x\n"} for i in range(9)
    ]
    local = tmp_path / "rows.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = f"s3://{bucket}/data/rows.jsonl"
    with fsspec.open(data, "wb", **options) as f:
        f.write(local.read_bytes())
    teacher = load_model(str(tiny_llama_dir))
    out = f"s3://{bucket}/caches/run1"
    summary = cache_teacher(
        teacher,
        data,
        out,
        k=8,
        storage_options=options,
        data_storage_options=options,
        threads=1,
        progress=False,
    )
    assert summary.records == 9
    cache_teacher(teacher, str(local), str(tmp_path / "local"), k=8, threads=1, progress=False)
    remote = open_cache(out, storage_options=options, cache_dir=str(tmp_path / "shards"))
    assert remote.manifest.metadata["kd_cache"]["data"]["url"] == data
    local_records = list(open_cache(str(tmp_path / "local")).iter_records())
    for a, b in zip(remote.iter_records(), local_records, strict=True):
        assert a.sample_id == b.sample_id
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)
