"""A second, deliberately naive decoder written from spec/FORMAT.md alone.

It shares no code with logitcache: if it decodes the golden vectors to the same contents as
the library, the spec is complete enough to implement the format from.
"""

from __future__ import annotations

import json
import os
import struct

import xxhash
import zstandard


def _key_to_bits(key: int) -> int:
    return key & 0x7FFF if key & 0x8000 else ~key & 0xFFFF


def _bits_to_key(bits: int) -> int:
    return ~bits & 0xFFFF if bits & 0x8000 else bits | 0x8000


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"repeated member names {keys}"  # section 3
    return dict(pairs)


def _no_constants(name):
    raise AssertionError(f"{name} is not JSON")  # section 3


def strict_json(data: bytes):
    return json.loads(
        data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants
    )


def check_manifest_checksum(data: bytes, obj: dict) -> None:
    """Section 3.1: the hash of every byte before the last `"manifest_checksum"` key."""
    minor = int(obj["format_version"].split(".")[1])
    if "manifest_checksum" not in obj:
        assert minor == 0, "a 1.1 manifest must carry manifest_checksum"
        return
    at = data.rfind(b'"manifest_checksum"')
    tail = data[at:].decode("ascii")
    key, _, rest = tail.partition(":")
    value = rest.strip()
    assert value.startswith('"xxh3_64:') and value[25] == '"', "checksum is malformed"
    assert value[26:].strip() == "}", "checksum is not the last member"
    assert value[1:25] == obj["manifest_checksum"]
    assert obj["manifest_checksum"] == f"xxh3_64:{xxhash.xxh3_64_hexdigest(data[:at])}"


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            assert byte != 0 or shift == 0, "varint is not minimal"  # 6.6
            assert shift <= 28 and value < 2**32
            return value, pos
        shift += 7


def _tables(data: bytes, pos: int, alphabets: list[int]) -> tuple[list, int]:
    """Section 6.8: per context None (unused) or a list of (token, freq, cum)."""
    tables = []
    for alphabet in alphabets:
        m, pos = _varint(data, pos)
        if m == 0:
            tables.append(None)
            continue
        assert 2 <= m <= alphabet
        token, cum, entries = -1, 0, []
        for _ in range(m):
            gap, pos = _varint(data, pos)
            f, pos = _varint(data, pos)
            token, f = token + 1 + gap, f + 1
            assert token < alphabet and f <= 4095
            entries.append((token, f, cum))
            cum += f
        assert cum == 4096
        tables.append(entries)
    return tables, pos


class _Rans:
    """Section 6.8: four states read first, then 16-bit words; value i uses state i mod 4."""

    def __init__(self, data: bytes, pos: int):
        self.x = list(struct.unpack_from("<4I", data, pos))
        self.data, self.pos, self.value = data, pos + 16, 0

    def _renorm(self, j: int) -> None:
        if self.x[j] < 2**16:
            assert self.pos + 2 <= len(self.data), "stream needs a word past its end"
            self.x[j] = self.x[j] * 2**16 + struct.unpack_from("<H", self.data, self.pos)[0]
            self.pos += 2

    def token(self, table) -> int:
        assert table is not None, "a token from an unused context"
        j = self.value % 4
        slot = self.x[j] % 4096
        token, f, cum = next(e for e in table if e[2] <= slot < e[2] + e[1])
        self.x[j] = f * (self.x[j] // 4096) + slot - cum
        self._renorm(j)
        return token

    def raw(self, bits: int) -> int:
        j, value, shift = self.value % 4, 0, 0
        while bits > 0:
            piece = min(bits, 16)
            value |= (self.x[j] % 2**piece) << shift
            self.x[j] //= 2**piece
            self._renorm(j)
            shift, bits = shift + piece, bits - piece
        return value

    def hybrid(self, table) -> int:
        t = self.token(table)
        if t < 16:
            return t
        n = 4 + (t - 16) // 4
        return (4 + (t - 16) % 4) * 2 ** (n - 2) + self.raw(n - 2)

    def next_value(self) -> None:
        self.value += 1

    def finish(self) -> None:
        assert self.pos == len(self.data), "words left over"
        assert self.x == [2**16] * 4, "the stream does not end in the initial states"


def _rank_context(r: int) -> int:
    return 0 if r == 0 else min(7, r.bit_length())


def _rows(n: int, k: int):
    for start in range(0, n, k):
        yield start, min(k, n - start)


def decode_ans_uint(config: dict, data: bytes, size: int) -> bytes:
    e, k = config["elementsize"], config["row_length"]
    n = size // e
    if n == 0:
        assert not data
        return b""
    tables, pos = _tables(data, 0, [64 if e == 2 else 128] * 8)
    rans, out = _Rans(data, pos), []
    for _, width in _rows(n, k):
        for r in range(width):
            out.append(rans.hybrid(tables[_rank_context(r)]))
            rans.next_value()
    rans.finish()
    return struct.pack(f"<{n}{'H' if e == 2 else 'I'}", *out)


def decode_ans_ids(config: dict, data: bytes, size: int) -> bytes:
    k, n = config["row_length"], size // 4
    if n == 0:
        assert not data
        return b""
    d, pos = _varint(data, 0)
    assert 1 <= d <= n
    tables, pos = _tables(data, pos, [32] * 8 + [128, 32, 64])
    rans = _Rans(data, pos)
    distinct, prev = [], -1
    for _ in range(d):
        prev = prev + 1 + rans.hybrid(tables[8])
        rans.next_value()
        assert prev < 2**24
        distinct.append(prev)
    classes = d.bit_length()  # floor(log2 D) + 1
    members = [[] for _ in range(classes)]
    for ident in distinct:  # ascending, so each class's members are ascending too
        c = rans.token(tables[9])
        rans.next_value()
        assert c < classes
        members[c].append(ident)
    for c in range(classes):
        assert len(members[c]) == min(2**c, d - 2**c + 1)
    out = []
    for _, width in _rows(n, k):
        f = 0
        if k >= 2:
            f = rans.hybrid(tables[10])
            rans.next_value()
            assert f < width and (width == k or f == 0)
        row = []
        for j in range(width - f):
            c = rans.token(tables[_rank_context(j)])
            assert c < classes
            index = rans.raw(c)
            rans.next_value()
            row.append(members[c][index])
        free = (i for i in range(k) if i not in row)
        row += [next(free) for _ in range(f)]
        out += row
    rans.finish()
    return struct.pack(f"<{n}i", *out)


def decode_fp16_grid(config: dict, data: bytes, size: int) -> bytes:
    k, step = config["row_length"], config["step"]
    last = 65536 // step
    grid = [struct.unpack("<H", struct.pack("<e", -(j * step) / 1024))[0] for j in range(last + 1)]
    grid[0] = 0x8000
    grid.append(0xFBFF)
    values = struct.unpack(f"<{len(data) // 4}I", data)
    out = []
    for start, width in _rows(len(values), k):
        first = values[start]
        assert first <= 0x1FFFF
        key = first & 0xFFFF
        out.append(_key_to_bits(key))
        j = 0
        for i, d in enumerate(values[start + 1 : start + width]):
            if first >= 0x10000:
                assert d <= 0xFFFF
                key = (key - d) % 65536
                out.append(_key_to_bits(key))
            else:
                j = d if i == 0 else (j + d) % 2**32
                assert j < len(grid)
                out.append(grid[j])
    return struct.pack(f"<{len(out)}H", *out)


def encoded_size(config: dict, size: int | None) -> int | None:
    """The exact encoded size of a codec's output for an input of `size` bytes (section 5),
    or None where it depends on the data."""
    cid = config["id"]
    if size is None or cid in ("zstd", "varint", "ans_uint", "ans_ids"):
        return None
    if cid == "fp16_grid":
        return 2 * size
    if cid == "byte_bit_shuffle":
        e, planes = config["elementsize"], config["byte_planes"]
        n = size // e
        return planes * n + 8 * (e - planes) * ((n + 7) // 8)
    return size


def decode_codec(config: dict, data: bytes, raw_size: int | None) -> bytes:
    """Invert one codec; raw_size is its decoded size, None when only a bound is known."""
    cid = config["id"]
    if cid == "ans_uint":
        return decode_ans_uint(config, data, raw_size)
    if cid == "ans_ids":
        return decode_ans_ids(config, data, raw_size)
    if cid == "fp16_grid":
        return decode_fp16_grid(config, data, raw_size)
    if cid == "zstd":
        assert isinstance(config["level"], int) and -7 <= config["level"] <= 22  # 6.1
        reader = zstandard.ZstdDecompressor().decompressobj()
        out = reader.decompress(data)
        assert reader.eof and not reader.unused_data, "a block is exactly one frame"  # 6.1
        return out
    if cid == "shuffle":
        e = config["elementsize"]
        n = len(data) // e
        return bytes(data[(i % e) * n + i // e] for i in range(len(data)))
    if cid == "byte_bit_shuffle":
        e, planes = config["elementsize"], config["byte_planes"]
        n = raw_size // e
        nb = (n + 7) // 8
        out = bytearray(raw_size)
        for b in range(planes):
            for i in range(n):
                out[i * e + b] = data[b * n + i]
        for q in range((e - planes) * 8):
            bit = e * 8 - 1 - q
            for i in range(n):
                if data[planes * n + q * nb + i // 8] & (0x80 >> (i % 8)):
                    out[i * e + bit // 8] |= 1 << (bit % 8)
        return bytes(out)
    if cid == "fp16_key_delta":
        k = config["row_length"]
        deltas = struct.unpack(f"<{len(data) // 2}H", data)
        out, key = [], 0
        for i, d in enumerate(deltas):
            key = d if i % k == 0 else (key - d) % 65536
            out.append(_key_to_bits(key))
        return struct.pack(f"<{len(out)}H", *out)
    if cid == "int_delta":
        deltas = struct.unpack(f"<{len(data) // 4}i", data)
        out, acc = [], 0
        for d in deltas:
            acc = (acc + d + 2**31) % 2**32 - 2**31
            out.append(acc)
        return struct.pack(f"<{len(out)}i", *out)
    if cid == "varint":
        out, value, shift = [], 0, 0
        for byte in data:
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                assert byte != 0 or shift == 7, "varint is not minimal"  # 6.6
                out.append(value)
                value, shift = 0, 0
        return struct.pack(f"<{len(out)}I", *out)
    raise ValueError(f"unknown codec {cid}")


def _ints(fmt: str, data: bytes) -> list:
    size = struct.calcsize(fmt)
    return list(struct.unpack(f"<{len(data) // size}{fmt}", data))


def decode_cache(root: str) -> dict:
    with open(os.path.join(root, "manifest.json"), "rb") as f:
        data = f.read()
    manifest = strict_json(data)
    assert manifest["format"] == "logitcache" and manifest["format_version"].startswith("1.")
    assert manifest["checksum_algorithm"] == "xxh3_64"
    check_manifest_checksum(data, manifest)
    k = manifest["k"]
    records = []
    for entry in manifest["shards"]:
        with open(os.path.join(root, *entry["path"].split("/")), "rb") as f:
            blob = f.read()
        assert f"xxh3_64:{xxhash.xxh3_64_hexdigest(blob)}" == entry["checksum"]
        assert len(blob) == entry["bytes"]
        assert blob[:8] == b"LGCSHARD" and struct.unpack_from("<H", blob, 8)[0] == 1
        header_minor = struct.unpack_from("<H", blob, 10)[0]
        length, digest, magic = struct.unpack_from("<QQ8s", blob, len(blob) - 24)
        assert magic == b"LGCSHARD" and length <= len(blob) - 40
        footer_bytes = blob[len(blob) - 24 - length : len(blob) - 24]
        assert xxhash.xxh3_64_intdigest(footer_bytes) == digest
        if "footer_checksum" in entry:  # section 3: the entry names its file's footer
            assert entry["footer_checksum"] == f"{digest:016x}"
        footer = strict_json(footer_bytes)
        footer_minor = int(footer["format_version"].split(".")[1])
        assert footer_minor == header_minor  # section 4
        if footer_minor >= 1:  # section 4.1: the footer names its place
            assert footer["path"] == entry["path"]
        for chunk in footer["chunks"]:
            cols = {}
            for name, block in chunk["blocks"].items():
                stored = blob[block["offset"] : block["offset"] + block["length"]]
                assert xxhash.xxh3_64_hexdigest(stored) == block["checksum"]
                # byte_bit_shuffle and the ans codecs need their decoded size, which the spec
                # allows only where it is exact: the size of the stage before them (section 5).
                codecs = footer["columns"][name]["codecs"]
                sizes = [block["raw_length"]]
                for config in codecs[:-1]:
                    sizes.append(encoded_size(config, sizes[-1]))
                for config, size in zip(reversed(codecs), reversed(sizes), strict=True):
                    stored = decode_codec(config, stored, size)
                assert len(stored) == block["raw_length"]
                cols[name] = stored
            lengths = _ints("i", cols["record_lengths"])
            input_ids = _ints("i", cols["input_ids"])
            vocab = manifest["vocab_size"]  # section 4.2: ids checked on every decode
            assert all(0 <= i < vocab for i in input_ids + _ints("i", cols["topk_ids"]))
            mask = list(cols["loss_mask"])
            ids = _ints("i", cols["topk_ids"])
            bits = _ints("H", cols["topk_logprobs"])
            sid_lengths = (
                _ints("i", cols["sample_id_lengths"]) if "sample_id_lengths" in cols else None
            )
            sid_bytes = cols.get("sample_id_bytes", b"")
            tok = row = sid = 0
            for r, t in enumerate(lengths):
                rec_mask = mask[tok : tok + t]
                n = t - 1 if manifest["positions"] == "all" else sum(rec_mask)
                sample_id = None
                if sid_lengths is not None and sid_lengths[r] >= 0:
                    sample_id = sid_bytes[sid : sid + sid_lengths[r]].decode("utf-8")
                    sid += sid_lengths[r]
                records.append(
                    {
                        "input_ids": input_ids[tok : tok + t],
                        "loss_mask": rec_mask,
                        "topk_ids": [ids[(row + j) * k : (row + j + 1) * k] for j in range(n)],
                        "topk_logprobs_bits": [
                            bits[(row + j) * k : (row + j + 1) * k] for j in range(n)
                        ],
                        "sample_id": sample_id,
                    }
                )
                tok += t
                row += n
    return {
        "k": k,
        "vocab_size": manifest["vocab_size"],
        "positions": manifest["positions"],
        "records": records,
    }
