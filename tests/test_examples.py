"""The examples the README points to still run as written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from logitcache import open_cache

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_writes_a_cache_that_verifies_and_trains(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [line.split() for line in done.stdout.splitlines() if line.strip().startswith("step")]
    assert len(steps) >= 2
    first, last = float(steps[0][3]), float(steps[-1][3])
    assert last < first  # the tiny student's total loss falls
    cache = open_cache(str(tmp_path / "out" / "cache"))
    assert len(cache) > 0
    assert cache.verify() == []
    assert any((tmp_path / "out" / "plots").iterdir())
