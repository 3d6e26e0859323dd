"""The read path's kernels compiled ahead of time: numba's speed without loading numba.

Loading numba costs a process about 0.25 s, so the read path decodes with numpy, at about half
numba's speed, until it has decoded codecs.JIT_AFTER_BYTES: random reads and first batches
never reach the fast kernels, and a long scan pays the load. `logitcache kernels build`
compiles the decoders of _kernels.py (DECODERS, the same source) once per machine with
numba.pycc into a native module for this CPU. That module imports only numpy and loads in
well under a millisecond, and codecs.read_kernels uses it from a process's first byte.
Output is bit-identical to both other kernel sets (tests/test_decode_kernels.py), and like
numba's kernels they release the GIL, so read-ahead threads decode in parallel.

The module lives in $LOGITCACHE_KERNELS_DIR, else $XDG_CACHE_HOME/logitcache/kernels, else
~/.cache/logitcache/kernels. Its file name carries a key over the kernels' source, the
signatures below, the Python and numpy ABIs and this CPU (model and feature flags). An edited
kernel, another interpreter, or another machine sharing the home directory therefore never
loads a module built for something else: code built for one CPU's instructions can crash
another.
LOGITCACHE_COMPILED_KERNELS=0 turns the module off for a process.

Compiled functions check nothing about their arguments: a wrong dtype or a strided view reads
the wrong memory. So each is called through a guard that checks every argument's type, dtype,
rank and layout (about a microsecond), on top of the callers' checks of lengths and offsets.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ENV_DIR = "LOGITCACHE_KERNELS_DIR"
ENV_SWITCH = "LOGITCACHE_COMPILED_KERNELS"

# Each decoder's return type and arguments: a 1-D C-contiguous array of that dtype, or int
# (int64) or bool. pycc needs the types up front; the guards check calls against them.
_U1, _U2, _U4, _I4, _I8 = np.uint8, np.uint16, np.uint32, np.int32, np.int64
DECODERS: dict[str, tuple[str, tuple]] = {
    "byte_unshuffle": ("void", (_U1, int, _U1)),
    "byte_bit_unshuffle": ("i8", (_U1, int, int, _U1)),
    "unshuffle_ids_auto": ("i8", (_U1, int, _U4)),
    "unshuffle_ids_span": ("i8", (_U1, int, int, _U4)),
    "fp16_key_delta_decode": ("void", (_U2, int, _U2)),
    "fp16_key_delta_planes": ("void", (_U1, _U1, int, _U2)),
    "record_starts": ("i8", (_I4, _U1, bool, _I8, _I8)),
    "int32_delta_decode": ("void", (_I4, _I4)),
    "varint_decode": ("i8", (_U1, _U4)),
    "fp16_grid_decode": ("i8", (_U4, int, _U2, _U2)),
    # buf, blocks, checksums, verified, C functions, k, all positions, teacher rows, then what
    # it fills
    "decode_default_chunk": (
        "i8",
        (_U1, _I8, _I8, _U1, _I8, int, bool, bool, _I4, _U1, _U1, _U1, _U1, _I4, _U1)
        + (_U4, _U4, _U2, _I8, _I8),
    ),
}

# How _pycc_options compiles them (part of the key: a module built otherwise is not loaded).
BUILD_OPTIONS = "host features, nogil"

# Lines of /proc/cpuinfo that name the CPU and the instructions it has (x86 and ARM).
_CPU_FIELDS = (
    "vendor_id",
    "cpu family",
    "model",
    "model name",
    "flags",
    "Features",
    "CPU implementer",
    "CPU architecture",
    "CPU variant",
    "CPU part",
)


class CompiledKernelsError(RuntimeError):
    """The compiled kernels could not be built (no C compiler, say)."""


def kernels_dir() -> Path:
    """Where compiled modules are kept (see the module docstring)."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "logitcache" / "kernels"


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def cpu_identity() -> str:
    """This CPU's model and feature flags: what code compiled for "host" depends on."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            first = f.read(1 << 14).split("\n\n", 1)[0]  # the first processor's block
    except OSError:
        first = ""
    lines = [ln for ln in first.splitlines() if ln.split(":", 1)[0].strip() in _CPU_FIELDS]
    if lines:
        return "\n".join(sorted(lines))
    import llvmlite.binding as llvm  # elsewhere, ask LLVM itself (about 20 ms, no numba)

    return f"{llvm.get_host_cpu_name()}\n{llvm.get_host_cpu_features().flatten()}"


def module_key() -> str:
    """A digest of everything the compiled module depends on."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for source in ("_kernels.py", "_numpy_kernels.py"):  # kernels and their constants
        h.update((here / source).read_bytes())
    h.update(
        repr(
            sorted((n, r, [_type_code(a) for a in args]) for n, (r, args) in DECODERS.items())
        ).encode()
    )
    h.update(BUILD_OPTIONS.encode())
    h.update(sys.implementation.cache_tag.encode())
    h.update(np.__version__.split(".")[0].encode())  # numpy's C ABI changes with its major
    h.update(platform.machine().encode())
    h.update(cpu_identity().encode())
    return h.hexdigest()[:16]


def module_path(directory: Path | None = None) -> Path:
    key = module_key()
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    return (directory or kernels_dir()) / f"_logitcache_decoders_{key}{suffix}"


def _module_name(path: Path) -> str:
    return path.name.split(".", 1)[0]


def _type_code(arg) -> str:
    if arg is int:
        return "i8"
    if arg is bool:
        return "b1"
    return f"{np.dtype(arg).str[1:]}[::1]"  # e.g. u1[::1]


def _signature(name: str) -> str:
    ret, args = DECODERS[name]
    return f"{ret}({', '.join(_type_code(a) for a in args)})"


def _guard(name: str, raw: Callable, args: tuple) -> Callable:
    """`raw` behind a check of each argument against `args` (see the module docstring)."""
    wants = [a if a in (int, bool) else np.dtype(a) for a in args]
    ndarray, integers = np.ndarray, (int, np.integer, np.bool_)

    def call(*values):
        if len(values) != len(wants):
            raise TypeError(f"{name} takes {len(wants)} arguments, got {len(values)}")
        for value, want in zip(values, wants, strict=True):
            if want is int or want is bool:
                if not isinstance(value, integers):
                    raise _refused(name, values, wants)
            elif (
                type(value) is not ndarray
                or (value.dtype is not want and value.dtype != want)
                or value.ndim != 1
                or not value.flags.c_contiguous
            ):
                raise _refused(name, values, wants)
        return raw(*values)

    call.__name__ = name
    call.__doc__ = f"The compiled {name}, arguments {_signature(name)}."
    return call


def _refused(name: str, values: tuple, wants: list) -> TypeError:
    """The error for the first argument of `values` that does not match `wants`."""
    for i, (value, want) in enumerate(zip(values, wants, strict=True)):
        if want is int or want is bool:
            if not isinstance(value, (int, np.integer, np.bool_)):
                return TypeError(f"{name}: argument {i} must be an integer, got {value!r}")
        elif not (
            isinstance(value, np.ndarray)
            and value.dtype == want
            and value.ndim == 1
            and value.flags.c_contiguous
        ):
            got = (
                f"a {value.ndim}-D {value.dtype} array"
                + ("" if value.flags.c_contiguous else " (strided)")
                if isinstance(value, np.ndarray)
                else type(value).__name__
            )
            return TypeError(
                f"{name}: argument {i} must be a 1-D C-contiguous {want} array, got {got}"
            )
    return TypeError(f"{name}: arguments refused")


def _load_file(path: Path) -> SimpleNamespace:
    """The guarded kernels of the module at `path`."""
    spec = importlib.util.spec_from_file_location(_module_name(path), path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path}: not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kernels = {}
    for name, (_, args) in DECODERS.items():
        raw = getattr(module, name, None)
        if raw is None:
            raise ImportError(f"{path}: has no kernel {name}")
        kernels[name] = _guard(name, raw, args)
    return SimpleNamespace(path=path, **kernels)


def load(directory: Path | None = None) -> SimpleNamespace | None:
    """This machine's compiled kernels, or None when they are turned off or not built (the
    caller then decodes with numpy or numba). A file that will not load is reported once as
    a warning naming it and the fix, then left alone."""
    if not enabled():
        return None
    path = module_path(directory)
    if not path.exists():
        return None
    try:
        return _load_file(path)
    except (ImportError, OSError) as e:
        warnings.warn(
            f"compiled kernels at {path} do not load ({e}); decoding with numpy or numba "
            "instead. Rebuild them with `logitcache kernels build --force`.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def build(directory: Path | None = None, *, force: bool = False) -> Path:
    """Compile DECODERS for this machine into `directory` (default kernels_dir()) and return
    the module's path; an existing module for the same key is kept unless `force`.

    The module is compiled in a temporary directory beside its final place, loaded there and
    checked against the numpy kernels, then renamed into place: a build that fails or is
    killed leaves no file that later processes would load."""
    path = module_path(directory)
    if path.exists() and not force:
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CompiledKernelsError(
            f"cannot create {path.parent} ({e.strerror}); choose a writable directory with "
            f"--dir or ${ENV_DIR}"
        ) from e
    _remove_abandoned_builds(path.parent)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pycc is pending deprecation, with no successor yet
            from numba.pycc import CC
    except ImportError as e:  # a numba without its ahead-of-time compiler
        raise CompiledKernelsError(
            f"numba.pycc is not available ({e}); reads fall back to numpy and numba"
        ) from e
    from . import _kernels

    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as tmp:
        cc = CC(_module_name(path))
        cc.output_dir = tmp
        cc.output_file = path.name
        cc.target_cpu = "host"  # 3x faster id decoding than a generic x86-64 build
        cc.verbose = False
        for name in DECODERS:
            cc.export(name, _signature(name))(getattr(_kernels, name).py_func)
        try:
            with warnings.catch_warnings(), _pycc_options():
                warnings.simplefilter("ignore")
                cc.compile()
        except Exception as e:  # compiler or linker missing or failing
            raise CompiledKernelsError(
                f"compiling the kernels failed ({type(e).__name__}: {e}); reads fall back to "
                "numpy and numba. A C compiler (cc) is needed to build them."
            ) from e
        built = Path(tmp) / path.name
        self_check(_load_file(built))
        os.replace(built, path)
    return path


# A build takes seconds: a build directory this old belongs to a build that was killed.
ABANDONED_BUILD_S = 3600


def _remove_abandoned_builds(directory: Path) -> None:
    """Delete the temporary directories of killed builds (never loaded: harmless, but litter)."""
    now = time.time()
    for old in directory.glob(".build-*"):
        try:
            if now - old.stat().st_mtime > ABANDONED_BUILD_S:
                shutil.rmtree(old)
        except OSError:
            pass  # another process removed it first, or it is not ours to remove


@contextmanager
def _pycc_options():
    """While entered, pycc compiles as numba's JIT does for the kernels (_kernels._JIT):

    - for the instruction set this CPU reports: pycc's "host" names the CPU's model and lets
      the model imply its instructions, but a virtual machine can hide some of them;
    - releasing the GIL inside each kernel (nogil), so that read-ahead threads decode in
      parallel (readahead.py).
    """
    from numba.core import codegen
    from numba.pycc import compiler

    aot = codegen.AOTCPUCodegen
    original_features = getattr(aot, "_customize_tm_features", None)
    original_flags = getattr(compiler, "Flags", None)
    if original_features is None or original_flags is None:  # another numba: do not guess
        raise CompiledKernelsError(
            f"numba {numba_version()} compiles ahead of time in a way this logitcache does "
            "not know; reads fall back to numpy and numba"
        )

    class NoGilFlags(original_flags):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.release_gil = True

    aot._customize_tm_features = lambda self: codegen.get_host_cpu_features()
    compiler.Flags = NoGilFlags
    try:
        yield
    finally:
        aot._customize_tm_features = original_features
        compiler.Flags = original_flags


def numba_version() -> str:
    import numba

    return numba.__version__


def self_check(kernels: SimpleNamespace) -> None:
    """Decode a few blocks with `kernels` and with the numpy kernels and compare: a module
    that a CPU or compiler got wrong is refused before any read uses it."""
    from . import _numpy_kernels as npk

    rng = np.random.default_rng(0)
    n = 1003
    ids = rng.integers(0, 1 << 17, n, dtype=np.int64).astype(np.uint32)
    nb = (n + 7) // 8
    planes = np.zeros(2 * n + 16 * nb, dtype=np.uint8)  # byte_bit_shuffle(4, 2) of the ids
    planes[:n] = ids & 0xFF
    planes[n : 2 * n] = (ids >> 8) & 0xFF
    planes[2 * n + 15 * nb :] = np.packbits(((ids >> 16) & 1).astype(np.uint8))  # bit 16
    words = np.empty(n, dtype=np.uint32)
    want = np.empty(4 * n, dtype=np.uint8)
    problems = []
    if kernels.unshuffle_ids_auto(planes, n, words) != 0 or npk.unshuffle_ids(planes, want):
        problems.append("unshuffle_ids_auto status")
    elif not np.array_equal(words, ids) or not np.array_equal(want.view(np.uint32), ids):
        problems.append("unshuffle_ids_auto values")
    span = np.empty(500, dtype=np.uint32)  # ids 200..699: a random read's rows
    if kernels.unshuffle_ids_span(planes, n, 200, span) or not np.array_equal(span, ids[200:700]):
        problems.append("unshuffle_ids_span")
    deltas = rng.integers(0, 1 << 16, 10 * 100, dtype=np.int64).astype(np.uint16)
    keys = np.empty_like(deltas)
    kernels.fp16_key_delta_decode(deltas, 100, keys)
    want_keys = npk.fp16_key_delta_decode(deltas, 100)
    if not np.array_equal(keys, want_keys):
        problems.append("fp16_key_delta_decode")
    gaps = deltas.view(np.uint8).reshape(-1, 2)
    low, high = np.ascontiguousarray(gaps[:, 0]), np.ascontiguousarray(gaps[:, 1])
    kernels.fp16_key_delta_planes(low, high, 100, keys)
    if not np.array_equal(keys, want_keys):
        problems.append("fp16_key_delta_planes")
    shuffled = rng.integers(0, 256, 2 * n, dtype=np.int64).astype(np.uint8)
    out = np.empty_like(shuffled)
    kernels.byte_unshuffle(shuffled, 2, out)
    if not np.array_equal(out, npk.byte_unshuffle(shuffled, 2)):
        problems.append("byte_unshuffle")
    from . import native

    one_call = native.self_check(kernels)
    if one_call:
        problems.append(one_call)
    if problems:
        raise CompiledKernelsError(
            f"the compiled kernels disagree with the numpy kernels ({', '.join(problems)}); "
            "they were not installed"
        )
