"""The decoders compiled ahead of time (logitcache.compiled): bit-identical to numba's, behind
guards that refuse what would read the wrong memory, found only on the machine and source they
were built for, built atomically, and loaded by a fresh process without numba."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from logitcache import _kernels as jit
from logitcache import _numpy_kernels as npk
from logitcache import codecs, compiled, open_cache, shard
from logitcache.codecs import (
    ByteBitShuffle,
    CodecError,
    Fp16Grid,
    Fp16KeyDelta,
    Int32Delta,
    KeyDeltaPlanes,
    Shuffle,
    Varint,
    default_pipelines,
)
from logitcache.synthetic import synthetic_records
from tests.conftest import write_cache

RNG = np.random.default_rng(21)


@pytest.fixture
def decode_compiled(compiled_decoders, monkeypatch):
    """Every codec decodes through the compiled kernels; returns the calls they got."""
    calls: list[str] = []
    spied = {}
    for name in compiled.DECODERS:
        kernel = getattr(compiled_decoders, name)

        def spy(*args, _kernel=kernel, _name=name):
            calls.append(_name)
            return _kernel(*args)

        spied[name] = spy
    spy_set = type(compiled_decoders)(path=compiled_decoders.path, **spied)
    monkeypatch.setattr(codecs, "read_kernels", lambda nbytes: spy_set)
    monkeypatch.setattr(codecs, "decode_kernels", lambda: spy_set)
    monkeypatch.setattr(shard, "read_kernels", lambda nbytes: spy_set)
    return calls


def _ids(n: int, high: int) -> np.ndarray:
    return RNG.integers(0, high, n, dtype=np.int64).astype(np.uint32)


def _grid_rows(n: int) -> np.ndarray:
    """fp16 bits in rows of 10: on Fp16Grid(step 8)'s grid, but every third row off it
    (stored exactly): both branches of the decoder."""
    grid_bits, _ = codecs.grid_tables(8)
    bits = grid_bits[RNG.integers(0, 2000, n)]
    for start in range(0, n, 30):
        bits[start : start + 10] = RNG.integers(0, 1 << 16, len(bits[start : start + 10]))
    return bits.astype(np.uint16)


# (codec, data of n values, the compiled kernel its decoding must go through)
ROUND_TRIPS = [
    (Shuffle(1), lambda n: RNG.integers(0, 256, n, dtype=np.uint8), "byte_unshuffle"),
    (Shuffle(2), lambda n: _ids(n, 1 << 16).astype(np.uint16), "byte_unshuffle"),
    (Shuffle(4), lambda n: _ids(n, 1 << 32), "byte_unshuffle"),
    (Shuffle(8), lambda n: _ids(n, 1 << 32).astype(np.uint64), "byte_unshuffle"),
    (ByteBitShuffle(4, 2), lambda n: _ids(n, 1 << 17), "unshuffle_ids_auto"),
    (ByteBitShuffle(4, 2), lambda n: _ids(n, 1 << 24), "byte_bit_unshuffle"),
    (ByteBitShuffle(4, 1), lambda n: _ids(n, 1 << 20), "byte_bit_unshuffle"),
    (Fp16KeyDelta(100), lambda n: _ids(n, 1 << 16).astype(np.uint16), "fp16_key_delta_decode"),
    (
        KeyDeltaPlanes(Fp16KeyDelta(100)),
        lambda n: _ids(n, 1 << 16).astype(np.uint16),
        "fp16_key_delta_planes",
    ),
    (Int32Delta(), lambda n: _ids(n, 1 << 32).view(np.int32), "int32_delta_decode"),
    (Varint(), lambda n: _ids(n, 1 << 32), "varint_decode"),
    (Fp16Grid(10, 8), _grid_rows, "fp16_grid_decode"),
]


@pytest.mark.parametrize("n", [0, 1, 9, 1000])
@pytest.mark.parametrize("codec, data, kernel", ROUND_TRIPS)
def test_compiled_decoders_give_back_what_was_encoded(codec, data, kernel, n, decode_compiled):
    raw = np.ascontiguousarray(data(n)).view(np.uint8)
    encoded = codec.encode(raw)
    got = codec.decode(encoded, raw.size)
    assert np.array_equal(got, raw)
    if n:
        assert kernel in decode_compiled  # the compiled kernel did the work
    decode_compiled.clear()


# (pipeline, rows of k values, the compiled kernel a range of rows must decode through)
RANGE_ROUND_TRIPS = [
    (default_pipelines(7)["topk_ids"], lambda n: _ids(n * 7, 1 << 17), "unshuffle_ids_span"),
    (
        default_pipelines(7)["topk_logprobs"],
        lambda n: _ids(n * 7, 1 << 16).astype(np.uint16),
        "fp16_key_delta_planes",
    ),
]


@pytest.mark.parametrize("n", [1, 9, 301])
@pytest.mark.parametrize("pipeline, rows, kernel", RANGE_ROUND_TRIPS)
def test_compiled_decoders_give_back_ranges_of_rows(pipeline, rows, kernel, n, decode_compiled):
    raw = np.ascontiguousarray(rows(n)).view(np.uint8)
    width = raw.size // n
    staged = pipeline.stage(np.frombuffer(pipeline.encode(raw), np.uint8), raw.size, width)
    for lo, hi in [(0, n), (n - 1, n), (n // 3, n // 3 + 1), (n // 2, n)]:
        decode_compiled.clear()
        got = staged.decode_range(lo * width, hi * width)
        assert got.tobytes() == raw[lo * width : hi * width].tobytes(), (lo, hi)
        assert kernel in decode_compiled


def test_every_decoder_is_covered_by_the_round_trips():
    # record_starts: test_record_starts_of_all_three_kernel_sets, and every cache read;
    # decode_default_chunk: test_native_decode.py, compiled and numba's.
    kernels = {kernel for _, _, kernel in ROUND_TRIPS + RANGE_ROUND_TRIPS}
    assert kernels | {"record_starts", "decode_default_chunk"} == set(compiled.DECODERS)


@pytest.mark.parametrize("all_positions", [False, True])
def test_record_starts_of_all_three_kernel_sets(all_positions, compiled_decoders):
    lengths = RNG.integers(1, 60, 37).astype(np.int32)
    mask = (RNG.random(int(lengths.sum())) < 0.6).astype(np.uint8)
    mask[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = 0
    results = []
    for kernels in (npk, jit, compiled_decoders):
        token_starts = np.empty(38, dtype=np.int64)
        target_starts = np.empty(38, dtype=np.int64)
        status = kernels.record_starts(lengths, mask, all_positions, token_starts, target_starts)
        results.append((status, token_starts.tolist(), target_starts.tolist()))
    assert results[0] == results[1] == results[2]
    broken = mask.copy()
    broken[5] = 2
    assert compiled_decoders.record_starts(
        lengths, broken, all_positions, np.empty(38, np.int64), np.empty(38, np.int64)
    ) == npk.record_starts(
        lengths, broken, all_positions, np.empty(38, np.int64), np.empty(38, np.int64)
    )


def test_corrupt_input_is_refused_the_same_way(decode_compiled):
    with pytest.raises(CodecError, match="padding bit"):
        encoded = ByteBitShuffle(4, 2).encode(np.arange(13, dtype=np.uint32).view(np.uint8))
        encoded[2 * 13 + 15 * 2 + 1] |= 1
        ByteBitShuffle(4, 2).decode(encoded, 52)
    with pytest.raises(CodecError, match="varint"):
        Varint().decode(np.array([0x80, 0x80], dtype=np.uint8), 8)
    with pytest.raises(CodecError, match="out of range"):
        Fp16Grid(10, 8).decode(np.full(10, 0xFFFFFFFF, dtype=np.uint32).view(np.uint8), 20)


@pytest.mark.parametrize(
    "args, message",
    [
        ((np.zeros(10, np.int16), 2, np.empty(10, np.uint8)), "argument 0 .* uint8 array, got a "),
        ((np.zeros(20, np.uint8)[::2], 2, np.empty(10, np.uint8)), r"\(strided\)"),
        ((np.zeros((2, 5), np.uint8), 2, np.empty(10, np.uint8)), "got a 2-D uint8"),
        ((np.zeros(10, np.uint8), 2.5, np.empty(10, np.uint8)), "argument 1 must be an integer"),
        (([0] * 10, 2, np.empty(10, np.uint8)), "got list"),
        ((np.zeros(10, np.uint8), 2, None), "argument 2 .* got NoneType"),
        ((np.zeros(10, np.uint8), 2), "takes 3 arguments, got 2"),
    ],
)
def test_the_guard_refuses_arguments_the_compiled_code_would_misread(
    args, message, compiled_decoders
):
    # Unguarded, each of these crashes the process or reads the wrong memory.
    with pytest.raises(TypeError, match="byte_unshuffle"):
        compiled_decoders.byte_unshuffle(*args)
    with pytest.raises(TypeError, match=message):
        compiled_decoders.byte_unshuffle(*args)


def test_the_module_is_found_only_for_its_cpu_source_and_signatures(compiled_decoders, monkeypatch):
    directory = compiled_decoders.path.parent
    monkeypatch.setenv(compiled.ENV_SWITCH, "1")
    assert compiled.module_path(directory) == compiled_decoders.path
    assert compiled.load(directory).path == compiled_decoders.path
    with monkeypatch.context() as m:  # another CPU sharing the directory
        m.setattr(compiled, "cpu_identity", lambda: "model name: other\nflags: sse2")
        assert compiled.module_path(directory) != compiled_decoders.path
        assert compiled.load(directory) is None
    with monkeypatch.context() as m:  # numpy of another C ABI
        m.setattr(np, "__version__", "99.0.0")
        assert compiled.load(directory) is None
    with monkeypatch.context() as m:  # a kernel's signature changed
        m.setitem(compiled.DECODERS, "varint_decode", ("i8", (np.uint8, np.uint64)))
        assert compiled.load(directory) is None
    monkeypatch.setenv(compiled.ENV_SWITCH, "0")
    assert compiled.load(directory) is None


def test_the_key_covers_the_kernel_source(tmp_path, monkeypatch):
    package = tmp_path / "logitcache"
    package.mkdir()
    here = Path(compiled.__file__).parent
    for name in ("_kernels.py", "_numpy_kernels.py"):
        (package / name).write_bytes((here / name).read_bytes())
    monkeypatch.setattr(compiled, "__file__", str(package / "compiled.py"))
    before = compiled.module_key()
    with open(package / "_kernels.py", "a") as f:
        f.write("\n# edited\n")
    assert compiled.module_key() != before


def test_cpu_identity_names_the_model_and_flags():
    identity = compiled.cpu_identity()
    assert identity
    if Path("/proc/cpuinfo").exists() and sys.platform == "linux":
        assert "MHz" not in identity and "bogomips" not in identity.lower()


def test_a_module_that_does_not_load_is_reported_and_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv(compiled.ENV_SWITCH, "1")
    path = compiled.module_path(tmp_path)
    path.write_bytes(b"not a shared object")
    with pytest.warns(RuntimeWarning, match="do not load.*kernels build --force") as caught:
        assert compiled.load(tmp_path) is None
    assert str(path) in str(caught[0].message)


def test_a_failed_build_leaves_nothing_to_load(tmp_path, monkeypatch):
    def disagree(kernels):
        raise compiled.CompiledKernelsError("the compiled kernels disagree (test)")

    monkeypatch.setattr(compiled, "self_check", disagree)
    with pytest.raises(compiled.CompiledKernelsError, match="disagree"):
        compiled.build(tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the module nor the build directory

    from numba.pycc import CC

    def no_compiler(self):
        raise OSError("cc: not found")

    monkeypatch.setattr(CC, "compile", no_compiler)
    with pytest.raises(compiled.CompiledKernelsError, match="C compiler"):
        compiled.build(tmp_path, force=True)
    assert list(tmp_path.iterdir()) == []


def test_the_build_compiles_for_the_features_this_cpu_reports(tmp_path, monkeypatch):
    # pycc alone compiles for what the CPU's model name implies, which a VM can hide.
    from numba.core import codegen

    asked = []
    real = codegen.get_host_cpu_features

    def spy():
        asked.append(True)
        return real()

    monkeypatch.setattr(codegen, "get_host_cpu_features", spy)
    compiled.build(tmp_path)
    assert asked
    assert codegen.AOTCPUCodegen._customize_tm_features(None) == ""  # pycc's own, restored


def test_a_killed_builds_directory_is_removed_by_the_next_build(tmp_path, monkeypatch):
    killed, live = tmp_path / ".build-killed", tmp_path / ".build-live"
    killed.mkdir()
    (killed / "half.o").write_bytes(b"\0")
    live.mkdir()  # a build running now in another process
    hour_ago = time.time() - compiled.ABANDONED_BUILD_S - 60
    os.utime(killed, (hour_ago, hour_ago))
    monkeypatch.setattr(compiled, "self_check", lambda kernels: None)
    path = compiled.build(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".build-live", path.name]


def test_a_directory_that_cannot_be_made_is_named_with_the_fix(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(compiled.CompiledKernelsError, match=f"cannot create {blocker}.*--dir"):
        compiled.build(blocker / "kernels")


def test_self_check_refuses_kernels_that_disagree(compiled_decoders):
    def wrong(src, elementsize, out):
        compiled_decoders.byte_unshuffle(src, elementsize, out)
        out[0] ^= 1

    broken = type(compiled_decoders)(**{**vars(compiled_decoders), "byte_unshuffle": wrong})
    compiled.self_check(compiled_decoders)
    with pytest.raises(compiled.CompiledKernelsError, match="byte_unshuffle"):
        compiled.self_check(broken)


def test_self_check_decodes_a_chunk_in_one_call(compiled_decoders):
    def wrong(*args):
        status = compiled_decoders.decode_default_chunk(*args)
        args[-4][0] ^= 1  # the first top-k id
        return status

    one_call = {**vars(compiled_decoders), "decode_default_chunk": wrong}
    with pytest.raises(compiled.CompiledKernelsError, match="topk_ids wrong"):
        compiled.self_check(type(compiled_decoders)(**one_call))


@pytest.fixture(scope="module")
def wide_cache(tmp_path_factory) -> str:
    """A cache whose ids need the id decoder's fast path and its generic kernel."""
    url = str(tmp_path_factory.mktemp("compiled") / "cache")
    records = list(synthetic_records(40, k=8, vocab_size=300_000, mean_length=40, seed=5))
    write_cache(url, records, k=8, vocab_size=300_000, chunk_bytes=4096)
    return url


def _fresh_read(url: str, env: dict) -> tuple[bool, str]:
    code = (
        "import sys, hashlib\n"
        "from logitcache import codecs, open_cache\n"
        "codecs.JIT_AFTER_BYTES = 1\n"  # would load numba at once without compiled kernels
        f"cache = open_cache({url!r})\n"
        "h = hashlib.sha256()\n"
        "records = list(cache.iter_records()) + [cache[i] for i in (7, 3, 39)]\n"
        "for r in records:\n"
        "    h.update(r.topk_ids.tobytes() + r.topk_logprobs.tobytes() + r.input_ids.tobytes())\n"
        "print(json.dumps(['numba' in sys.modules, h.hexdigest()]))\n"
    ).replace("import sys,", "import json, sys,")
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    )
    loaded, digest = json.loads(out.stdout)
    return loaded, digest


def test_a_fresh_process_reads_with_them_and_never_loads_numba(wide_cache, compiled_decoders):
    directory = str(compiled_decoders.path.parent)
    on = {compiled.ENV_SWITCH: "1", compiled.ENV_DIR: directory}
    loaded, digest = _fresh_read(wide_cache, on)
    assert loaded is False
    loaded_off, digest_off = _fresh_read(wide_cache, {**on, compiled.ENV_SWITCH: "0"})
    assert loaded_off is True and digest_off == digest
    with open_cache(wide_cache) as cache:  # numpy in this process: the same bytes again
        h = hashlib.sha256()
        for r in list(cache.iter_records()) + [cache[i] for i in (7, 3, 39)]:
            h.update(r.topk_ids.tobytes() + r.topk_logprobs.tobytes() + r.input_ids.tobytes())
    assert h.hexdigest() == digest


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "logitcache.cli", "kernels", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )


def test_kernels_command_builds(tmp_path):
    built = _cli("build", "--dir", str(tmp_path), env={compiled.ENV_SWITCH: "1"})
    assert built.returncode == 0, built.stderr
    assert "built in" in built.stdout
    (module,) = tmp_path.iterdir()  # the module alone: no build directory left behind
    assert module.name in built.stdout and module.name.startswith("_logitcache_decoders_")


def test_kernels_command_reports(compiled_decoders, tmp_path):
    directory = str(compiled_decoders.path.parent)
    on = {compiled.ENV_SWITCH: "1"}
    status = _cli("status", "--dir", directory, "--json", env=on)
    assert status.returncode == 0
    assert json.loads(status.stdout) == {
        "path": str(compiled_decoders.path),
        "built": True,
        "enabled": True,
    }
    again = _cli("build", "--dir", directory, env=on)
    assert again.returncode == 0 and "already built" in again.stdout
    empty = _cli("status", "--dir", str(tmp_path), env=on)
    assert empty.returncode == 1 and "not built (run `logitcache kernels build`)" in empty.stdout
    off = _cli("status", "--dir", directory, env={compiled.ENV_SWITCH: "0"})
    assert off.returncode == 1 and "turned off by LOGITCACHE_COMPILED_KERNELS" in off.stdout


def test_compiled_kernels_release_the_gil(compiled_decoders):
    # Read-ahead threads decode in parallel only if a kernel lets other threads run. With the
    # GIL held, another thread could run at most one switch interval (5 ms) after the call
    # starts or before it ends; so it must also run in the middle of a ~40 ms call.
    deltas = np.zeros(80_000_000, dtype=np.uint16)
    out = np.empty_like(deltas)
    stamps: list[float] = []
    started, done = threading.Event(), threading.Event()

    def count():
        started.set()
        while not done.is_set():
            stamps.append(time.perf_counter())

    counter = threading.Thread(target=count)
    counter.start()
    started.wait()
    t0 = time.perf_counter()
    compiled_decoders.fp16_key_delta_decode(deltas, 100, out)
    t1 = time.perf_counter()
    done.set()
    counter.join()
    assert t1 - t0 > 0.02, "the call was too short to tell"
    middle = [t for t in stamps if t0 + 0.4 * (t1 - t0) < t < t0 + 0.6 * (t1 - t0)]
    assert middle
