"""A real S3-compatible server (moto) on loopback, plus a fault-injecting proxy in front of it.

Each test gets its own bucket and storage_options; s3fs's instance cache is cleared so that no
client (or its listing cache) leaks from one test into the next.
"""

from __future__ import annotations

import os
import uuid

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from moto.server import ThreadedMotoServer  # noqa: E402

from .fault_proxy import FaultProxy  # noqa: E402

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@pytest.fixture(scope="session")
def moto_endpoint():
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield (host, port)
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def fault_proxy(moto_endpoint):
    proxy = FaultProxy(moto_endpoint).start()
    yield proxy
    proxy.stop()


def s3_options(endpoint_url: str, *, client_retries: int = 1) -> dict:
    """storage_options for s3fs against a loopback endpoint with dummy credentials.

    botocore's and s3fs's own retries are turned down so tests exercise logitcache's retries.
    """
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint_url, "region_name": "us-east-1"},
        "config_kwargs": {"retries": {"max_attempts": client_retries, "mode": "standard"}},
        "skip_instance_cache": True,
    }


def _new_bucket(endpoint_url: str) -> str:
    import boto3
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    name = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_bucket(moto_endpoint):
    """(bucket name, storage_options) talking to moto directly."""
    endpoint = "http://{}:{}".format(*moto_endpoint)
    yield _new_bucket(endpoint), s3_options(endpoint)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def faulty_s3_bucket(fault_proxy):
    """(bucket name, storage_options, fault plan) talking to moto through the fault proxy."""
    fault_proxy.plan.clear()
    bucket = _new_bucket(fault_proxy.endpoint_url)
    yield bucket, s3_options(fault_proxy.endpoint_url), fault_proxy.plan
    fault_proxy.plan.clear()
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
