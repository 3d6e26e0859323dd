"""Start-up cost in fresh processes: `import logitcache`, the first decode, and the CLI.

numba kernels are compiled on first use and cached on disk; this measures the cold first run
(an empty numba cache directory) against later runs. Writes results/bench_startup.json.

Every case runs in a new interpreter (`python -c ...`, or the `logitcache` console script) and
the wall time of the whole process is reported, median of --repeats runs. Cold runs each get a
new empty NUMBA_CACHE_DIR; warm runs share one directory that a first run filled; "default
cache" runs leave NUMBA_CACHE_DIR alone, so numba uses the package's __pycache__ as users get.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO_ROOT, format_table, write_results

FIRST_DECODE = (
    "import sys, logitcache\n"
    "with logitcache.open_cache(sys.argv[1]) as cache:\n"
    "    record = cache[0]\n"
    "assert record.topk_ids.shape[0] > 0\n"
)
TORCH_CHECK = "import sys, logitcache; print('torch' in sys.modules)"


def _env(numba_cache_dir: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NUMBA_CACHE_DIR", None)
    if numba_cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = numba_cache_dir
    # Run from a checkout whether or not the package is installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _run(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=tempfile.gettempdir(), capture_output=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
    return elapsed


def _timed(argv: list[str], repeats: int, numba_dir: str | None, cold: bool) -> list[float]:
    """Wall seconds of `repeats` fresh processes; cold ones each start with an empty cache."""
    times = []
    for _ in range(repeats):
        if cold:
            fresh = tempfile.mkdtemp(prefix="numba-cold-")
            try:
                times.append(_run(argv, _env(fresh)))
            finally:
                shutil.rmtree(fresh, ignore_errors=True)
        else:
            times.append(_run(argv, _env(numba_dir)))
    return times


def _make_small_cache(url: str) -> None:
    from logitcache import CacheWriter
    from logitcache.synthetic import synthetic_records

    with CacheWriter(url, k=100, vocab_size=128256, overwrite=True) as writer:
        for record in synthetic_records(8, k=100, vocab_size=128256, mean_length=128):
            writer.add(**record)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 repeats, for smoke tests")
    parser.add_argument("--output", default="bench_startup", help="results/NAME.json to write")
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else args.repeats
    python = sys.executable
    cli = shutil.which("logitcache", path=str(Path(python).parent))

    work = tempfile.mkdtemp(prefix="bench-startup-")
    warm_dir = os.path.join(work, "numba-warm")
    cache_url = os.path.join(work, "cache")
    try:
        _make_small_cache(cache_url)
        decode = [python, "-c", FIRST_DECODE, cache_url]
        _run(decode, _env(warm_dir))  # fill the warm numba cache directory
        _run(decode, _env(None))  # and the default one
        cases: list[tuple[str, list[str], str | None, bool]] = [
            ("python -c pass", [python, "-c", "pass"], warm_dir, False),
            ("import numpy", [python, "-c", "import numpy"], warm_dir, False),
            ("import numba", [python, "-c", "import numba"], warm_dir, False),
            ("import logitcache", [python, "-c", "import logitcache"], warm_dir, False),
            ("import + open + first decode, cold numba cache", decode, None, True),
            ("import + open + first decode, warm numba cache", decode, warm_dir, False),
            ("import + open + first decode, default cache", decode, None, False),
        ]
        if cli is not None:
            cases.append(("logitcache --help", [cli, "--help"], warm_dir, False))
            inspect = [cli, "inspect", cache_url]
            cases.append(("logitcache inspect (small cache), default cache", inspect, None, False))
        rows, results = [], []
        for name, case_argv, numba_dir, cold in cases:
            try:
                times = _timed(case_argv, repeats, numba_dir, cold)
            except RuntimeError as exc:  # report a broken case, measure the others
                rows.append([name, None, None, None])
                results.append({"case": name, "error": str(exc)[-500:]})
                print(f"{name}: {exc}", file=sys.stderr)
                continue
            median = statistics.median(times)
            rows.append([name, median, min(times), max(times)])
            results.append(
                {"case": name, "median_s": median, "times_s": times, "argv": case_argv[:3]}
            )
        probe = subprocess.run(
            [python, "-c", TORCH_CHECK], env=_env(warm_dir), capture_output=True, text=True
        )
        torch_imported = probe.stdout.strip() == "True"
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"fresh-process wall time, {repeats} runs each")
    print(format_table(["case", "median s", "min s", "max s"], rows))
    print(f"`import logitcache` imports torch: {torch_imported}")
    if cli is None:
        print("the `logitcache` console script is not installed: CLI cases skipped")
    path = write_results(
        args.output,
        {"repeats": repeats, "cases": results, "import_logitcache_imports_torch": torch_imported},
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
