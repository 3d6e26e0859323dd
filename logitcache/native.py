"""A chunk of the default pipelines decoded in one call, with zstd and xxh3 called from it.

Decoding codec by codec takes the GIL back some twenty times a chunk (each zstd frame, each
checksum, each kernel) and runs Python between them. On 2 cores a scan's two read-ahead threads
then spent up to 1.5x the CPU time of one thread on the same work, and one thread paid about
35 µs a chunk in Python. _kernels.decode_default_chunk does the whole chunk in one GIL-free
call instead; this module gives it the C functions it calls and the buffers it fills, and
says when it applies: when every column uses the default pipeline (any zstd level).

zstd and xxh3 come from the libraries the zstandard and xxhash packages already load (their
extension modules export the C API), else from the system's libzstd and libxxhash; each is
checked against its Python binding on a test block before use. Without them, or with
LOGITCACHE_NATIVE_DECODE=0, chunks decode codec by codec as before. The output is the same
bytes either way. A chunk the one call cannot decode (a bad checksum, a frame of the wrong
size, ids wider than two bit planes) is decoded codec by codec too, which raises the error
that names it or decodes it through the generic kernels.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import xxhash
import zstandard

from ._numpy_kernels import DEFAULT_CHUNK_WIDE_IDS
from .codecs import default_pipeline_configs
from .directory import COLUMN_ORDER

ENV_SWITCH = "LOGITCACHE_NATIVE_DECODE"
NOT_TRIED = -1  # decode_default_chunk did not call the kernel
WIDE_IDS = DEFAULT_CHUNK_WIDE_IDS  # the chunk's ids need more bit planes than it decodes

_ZSTD_SYMBOLS = (
    "ZSTD_createDCtx",
    "ZSTD_freeDCtx",
    "ZSTD_decompressDCtx",
    "ZSTD_getFrameContentSize",
    "ZSTD_findFrameCompressedSize",
)
_TEST_BLOCK = bytes(range(256)) * 64 + b"logitcache"


@dataclass(frozen=True)
class CFunctions:
    """The C functions decode_default_chunk calls, as addresses, and the two that make and
    free a thread's zstd context."""

    create_dctx: Callable[[], int]
    free_dctx: Callable[[int], int]
    decompress: int
    content_size: int
    frame_size: int
    xxh3: int


def _package_libraries(module, pattern: str) -> list[str]:
    return sorted(glob.glob(os.path.join(os.path.dirname(module.__file__), pattern)))


def _open(paths: list[str], symbols: tuple[str, ...]) -> ctypes.CDLL | None:
    """The first of `paths` (shared libraries) that loads and exports all `symbols`."""
    for path in paths:
        if not path:
            continue
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        if all(hasattr(library, name) for name in symbols):
            return library
    return None


def _typed(library: ctypes.CDLL, name: str, restype, *argtypes):
    function = getattr(library, name)
    function.restype, function.argtypes = restype, list(argtypes)
    return function


def _load() -> CFunctions | None:
    size_t, ptr = ctypes.c_size_t, ctypes.c_void_p
    zstd = _open(
        [*_package_libraries(zstandard, "*.so"), ctypes.util.find_library("zstd")], _ZSTD_SYMBOLS
    )
    xxh = _open(
        [*_package_libraries(xxhash, "*.so"), ctypes.util.find_library("xxhash")],
        ("XXH3_64bits",),
    )
    if zstd is None or xxh is None:
        return None
    create = _typed(zstd, "ZSTD_createDCtx", ptr)
    free = _typed(zstd, "ZSTD_freeDCtx", size_t, ptr)
    decompress = _typed(zstd, "ZSTD_decompressDCtx", size_t, ptr, ptr, size_t, ptr, size_t)
    content_size = _typed(zstd, "ZSTD_getFrameContentSize", ctypes.c_ulonglong, ptr, size_t)
    frame_size = _typed(zstd, "ZSTD_findFrameCompressedSize", size_t, ptr, size_t)
    xxh3 = _typed(xxh, "XXH3_64bits", ctypes.c_uint64, ptr, size_t)
    # The same answers as the Python bindings on a test block, or not used at all.
    frame = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(_TEST_BLOCK)
    out = ctypes.create_string_buffer(len(_TEST_BLOCK))
    dctx = create()
    if not dctx:
        return None
    try:
        ok = (
            xxh3(_TEST_BLOCK, len(_TEST_BLOCK)) == xxhash.xxh3_64_intdigest(_TEST_BLOCK)
            and content_size(frame, len(frame)) == len(_TEST_BLOCK)
            and frame_size(frame + b"\0", len(frame) + 1) == len(frame)
            and decompress(dctx, out, len(out), frame, len(frame)) == len(_TEST_BLOCK)
            and out.raw == _TEST_BLOCK
        )
    finally:
        free(dctx)
    if not ok:
        return None

    def address(function) -> int:
        return ctypes.cast(function, ctypes.c_void_p).value

    return CFunctions(
        create,
        free,
        address(decompress),
        address(content_size),
        address(frame_size),
        address(xxh3),
    )


_UNSET = object()
_functions: CFunctions | None | object = _UNSET
_load_lock = threading.Lock()


def c_functions() -> CFunctions | None:
    """zstd's and xxh3's functions, found and checked once a process; None when either is
    missing or LOGITCACHE_NATIVE_DECODE=0."""
    global _functions
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if _functions is _UNSET:
        with _load_lock:
            if _functions is _UNSET:
                _functions = _load()
    return _functions  # type: ignore[return-value]


class _ThreadContext:
    """A zstd decompression context of one thread (contexts are not shared between threads),
    freed with the thread, and the address table decode_default_chunk takes."""

    def __init__(self, functions: CFunctions):
        self._free = functions.free_dctx
        self._dctx = functions.create_dctx()
        if not self._dctx:
            raise MemoryError("zstd could not allocate a decompression context")
        self.table = np.array(
            [
                self._dctx,
                functions.decompress,
                functions.content_size,
                functions.frame_size,
                functions.xxh3,
            ],
            dtype=np.int64,
        )

    def __del__(self):
        if getattr(self, "_dctx", None):
            self._free(self._dctx)
            self._dctx = None


_local = threading.local()


def _thread_table(functions: CFunctions) -> np.ndarray:
    context = getattr(_local, "context", None)
    if context is None:
        context = _local.context = _ThreadContext(functions)
    return context.table


def fits(pipeline_configs: dict[str, list[dict]], k: int) -> bool:
    """Whether a shard's pipelines are the defaults for rows of `k`, zstd levels aside (the
    level changes how a frame was made, not how it decodes)."""

    def decoding(configs: list[dict]) -> list[dict]:
        return [{**c, "level": None} if c.get("id") == "zstd" else c for c in configs]

    defaults = default_pipeline_configs(k)
    return set(pipeline_configs) <= set(COLUMN_ORDER) and all(
        decoding(pipeline_configs.get(name, [])) == decoding(defaults[name])
        for name in COLUMN_ORDER
        if name in pipeline_configs
    )


@dataclass
class DefaultChunk:
    """What decode_default_chunk fills: the columns as COLUMN_DTYPES and the offsets, or for
    the teacher columns their planes."""

    lengths: np.ndarray  # int32 [R]
    input_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # uint8 [T]
    topk_ids: np.ndarray | None  # int32 [n * K], or None with the planes
    topk_logprobs: np.ndarray | None  # float16 [n * K], or None with the planes
    sample_id_lengths: np.ndarray | None  # int32 [R]
    sample_id_bytes: np.ndarray | None
    token_starts: np.ndarray  # int64 [R + 1]
    target_starts: np.ndarray  # int64 [R + 1]
    topk_planes: np.ndarray | None = None  # zstd undone, without teacher_rows
    logprob_planes: np.ndarray | None = None


def _planes(n: int) -> np.ndarray:
    """A buffer for byte_bit_shuffle(4, 2) of n ids: two byte planes and 16 bit planes."""
    return np.empty(2 * n + 16 * ((n + 7) // 8), dtype=np.uint8)


def decode_default_chunk(
    kernels,
    buf: np.ndarray,
    blocks: np.ndarray,
    checksums: np.ndarray,
    verified: np.ndarray,
    counts: tuple[int, int, int],
    k: int,
    all_positions: bool,
    teacher_rows: bool = True,
) -> DefaultChunk | int:
    """One chunk of default pipelines through kernels.decode_default_chunk, or why it was not
    decoded so, for the caller to decode it codec by codec: NOT_TRIED (no C functions, or a
    size that does not match the counts), WIDE_IDS, or another of the kernel's codes.

    `blocks` is the chunk's [7, 3] directory rows (offsets already checked against the file),
    `checksums` [7] uint64, `verified` [7] bool, `counts` its (R, T, n). Without
    `teacher_rows` the teacher columns are left as their planes (zstd undone: topk_planes and
    logprob_planes), for Pipeline.stage_unzipped."""
    functions = c_functions()
    decode = getattr(kernels, "decode_default_chunk", None)
    if functions is None or decode is None:
        return NOT_TRIED
    r, t, n = counts
    raw = blocks[:, 2].tolist()
    present = (blocks[:, 0] >= 0).tolist()
    expected = (4 * r, 4 * t, t, 4 * n * k, 2 * n * k)
    if not all(present[:5]) or tuple(raw[:5]) != expected:
        return NOT_TRIED
    if present[5] != present[6] or (present[5] and raw[5] != 4 * r):
        return NOT_TRIED
    lengths = np.empty(r, dtype=np.int32)
    mask = np.empty(t, dtype=np.uint8)
    input_planes, topk_planes = _planes(t), _planes(n * k)
    logprob_planes = np.empty(2 * n * k, dtype=np.uint8)
    sid_lengths = np.empty(r if present[5] else 0, dtype=np.int32)
    sid_bytes = np.empty(raw[6] if present[6] else 0, dtype=np.uint8)
    input_ids = np.empty(t, dtype=np.uint32)
    rows = n * k if teacher_rows else 0
    topk_ids = np.empty(rows, dtype=np.uint32)
    logprobs = np.empty(rows, dtype=np.uint16)
    token_starts = np.empty(r + 1, dtype=np.int64)
    target_starts = np.empty(r + 1, dtype=np.int64)
    status = decode(
        buf,
        blocks.reshape(-1),
        checksums.view(np.int64),
        verified.view(np.uint8),
        _thread_table(functions),
        k,
        all_positions,
        teacher_rows,
        lengths,
        input_planes,
        mask,
        topk_planes,
        logprob_planes,
        sid_lengths,
        sid_bytes,
        input_ids,
        topk_ids,
        logprobs,
        token_starts,
        target_starts,
    )
    if status != 0:
        return status
    return DefaultChunk(
        lengths,
        input_ids.view(np.int32),
        mask,
        topk_ids.view(np.int32) if teacher_rows else None,
        logprobs.view(np.float16) if teacher_rows else None,
        sid_lengths if present[5] else None,
        sid_bytes if present[6] else None,
        token_starts,
        target_starts,
        None if teacher_rows else topk_planes,
        None if teacher_rows else logprob_planes,
    )


def self_check(kernels) -> str | None:
    """Decode a chunk made here through `kernels`' decode_default_chunk and compare it with
    what was encoded: what is wrong, or None (also None when there are no C functions, and so
    no one-call path to check). compiled.self_check runs it on a freshly built module."""
    from .codecs import default_pipelines

    if c_functions() is None:
        return None
    rng = np.random.default_rng(0)
    k, lengths = 5, np.array([3, 9, 4], dtype=np.int32)
    r, t = lengths.size, int(lengths.sum())
    mask = (rng.random(t) < 0.7).astype(np.uint8)
    mask[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = 0
    n = int(mask.sum())
    columns = {
        "record_lengths": lengths,
        "input_ids": rng.integers(0, 1 << 17, t).astype(np.int32),
        "loss_mask": mask,
        "topk_ids": rng.integers(0, 1 << 17, n * k).astype(np.int32),
        "topk_logprobs": rng.integers(0, 1 << 16, n * k).astype(np.uint16).view(np.float16),
    }
    pipelines = default_pipelines(k)
    buf, blocks = bytearray(b"\0" * 8), np.full((len(COLUMN_ORDER), 3), -1, dtype=np.int64)
    checksums = np.zeros(len(COLUMN_ORDER), dtype=np.uint64)
    for column, name in enumerate(COLUMN_ORDER):
        if name in columns:
            block = pipelines[name].encode(columns[name])
            blocks[column] = (len(buf), len(block), columns[name].nbytes)
            checksums[column] = xxhash.xxh3_64_intdigest(block)
            buf += block
    verified = blocks[:, 0] < 0
    decoded = decode_default_chunk(
        kernels,
        np.frombuffer(bytes(buf), dtype=np.uint8),
        blocks,
        checksums,
        verified,
        (r, t, n),
        k,
        False,
    )
    if not isinstance(decoded, DefaultChunk):
        return f"decode_default_chunk refused a chunk it should decode (status {decoded})"
    got = {
        "record_lengths": decoded.lengths,
        "input_ids": decoded.input_ids,
        "loss_mask": decoded.loss_mask,
        "topk_ids": decoded.topk_ids,
        "topk_logprobs": decoded.topk_logprobs,
    }
    wrong = [
        name
        for name, values in columns.items()
        if got[name].view(np.uint8).tobytes() != values.view(np.uint8).tobytes()
    ]
    if wrong or decoded.target_starts[-1] != n:
        return f"decode_default_chunk decoded {', '.join(wrong) or 'the offsets'} wrong"
    return None
