"""Shared fixtures for the format-core tests: small synthetic caches in temporary directories.

Also registers the hypothesis profiles (modest example counts, no deadline on a shared machine).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from logitcache import CacheWriter, Record
from logitcache.manifest import Manifest
from logitcache.synthetic import synthetic_records

# "logitcache" keeps the whole suite fast; "logitcache-thorough" is for a long local run:
# HYPOTHESIS_PROFILE=logitcache-thorough python -m pytest tests/test_roundtrip.py
settings.register_profile(
    "logitcache",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "logitcache-thorough",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "logitcache"))

# Tests choose which kernels decode: the compiled decoders this machine may have built
# (logitcache.compiled) stay off, in subprocesses too, unless a test builds its own.
os.environ["LOGITCACHE_COMPILED_KERNELS"] = "0"

# The small cache most tests read: several chunks per shard and several shards.
SMALL_K = 8
SMALL_VOCAB = 1000


def make_records(
    n_records: int,
    *,
    k: int = SMALL_K,
    vocab_size: int = SMALL_VOCAB,
    seed: int = 0,
    mean_length: int = 24,
    positions: str = "supervised",
    with_sample_id: bool = True,
) -> list[dict[str, Any]]:
    """Synthetic teacher records (CacheWriter.add keyword dicts, rows already canonical)."""
    return list(
        synthetic_records(
            n_records,
            k=k,
            vocab_size=vocab_size,
            seed=seed,
            mean_length=mean_length,
            positions=positions,
            with_sample_id=with_sample_id,
        )
    )


def write_cache(
    url: str | Path, records: Iterable[dict[str, Any]], *, k: int, vocab_size: int, **kwargs
) -> Manifest:
    """Write `records` with one CacheWriter and return the committed manifest."""
    with CacheWriter(str(url), k=k, vocab_size=vocab_size, **kwargs) as writer:
        for record in records:
            writer.add(**record)
    return writer.manifest


def assert_record_equal(got: Record, want: dict[str, Any], where: str = "") -> None:
    """Bit-exact comparison of a read Record with the dict it was written from.

    `want` must already be in canonical row order; logprobs are compared as fp16 bit
    patterns, so -0.0 vs 0.0 and subnormals count.
    """
    prefix = f"{where}: " if where else ""
    assert got.input_ids.dtype == np.int32, f"{prefix}input_ids dtype {got.input_ids.dtype}"
    assert got.loss_mask.dtype == np.bool_, f"{prefix}loss_mask dtype {got.loss_mask.dtype}"
    assert got.topk_ids.dtype == np.int32, f"{prefix}topk_ids dtype {got.topk_ids.dtype}"
    assert got.topk_logprobs.dtype == np.float16, f"{prefix}topk_logprobs dtype"
    np.testing.assert_array_equal(got.input_ids, want["input_ids"], err_msg=f"{prefix}input_ids")
    np.testing.assert_array_equal(
        got.loss_mask, np.asarray(want["loss_mask"], dtype=bool), err_msg=f"{prefix}loss_mask"
    )
    want_ids = np.asarray(want["topk_ids"])
    want_lp = np.asarray(want["topk_logprobs"], dtype=np.float16)
    assert got.topk_ids.shape == want_ids.shape, f"{prefix}topk_ids shape"
    np.testing.assert_array_equal(got.topk_ids, want_ids, err_msg=f"{prefix}topk_ids")
    np.testing.assert_array_equal(
        got.topk_logprobs.view(np.uint16), want_lp.view(np.uint16), err_msg=f"{prefix}logprobs"
    )
    assert got.sample_id == want.get("sample_id"), f"{prefix}sample_id"


@dataclass(frozen=True)
class SmallCache:
    """A committed cache on disk and the records it was written from, in order."""

    path: Path
    records: list[dict[str, Any]]
    manifest: Manifest
    k: int = SMALL_K
    vocab_size: int = SMALL_VOCAB

    def shard_path(self, index: int = 0) -> Path:
        return self.path / self.manifest.shards[index].path


def _small_cache(path: Path, *, positions: str = "supervised") -> SmallCache:
    records = make_records(30, positions=positions)
    # ~1.5 KB chunks and ~6 KB shards: 3+ shards of several chunks each.
    manifest = write_cache(
        path,
        records,
        k=SMALL_K,
        vocab_size=SMALL_VOCAB,
        positions=positions,
        chunk_bytes=1500,
        shard_bytes=6000,
    )
    assert len(manifest.shards) >= 3
    assert all(len(s.chunk_records) >= 2 for s in manifest.shards[:-1])
    return SmallCache(path, records, manifest)


@pytest.fixture
def small_cache(tmp_path: Path) -> SmallCache:
    """A fresh multi-shard, multi-chunk cache (positions 'supervised', with sample_ids)."""
    return _small_cache(tmp_path / "cache")


@pytest.fixture(scope="module")
def shared_small_cache(tmp_path_factory: pytest.TempPathFactory) -> SmallCache:
    """The same cache, written once per module, for tests that only read it."""
    return _small_cache(tmp_path_factory.mktemp("shared") / "cache")


@pytest.fixture
def records_factory() -> Callable[..., list[dict[str, Any]]]:
    return make_records


@pytest.fixture(scope="session")
def compiled_decoders(tmp_path_factory: pytest.TempPathFactory):
    """The decoders compiled ahead of time for this machine, built once per session into a
    temporary directory (a few seconds), loaded whatever LOGITCACHE_COMPILED_KERNELS says."""
    from logitcache import compiled

    path = compiled.build(tmp_path_factory.mktemp("compiled-kernels"))
    return compiled._load_file(path)
