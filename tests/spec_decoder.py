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


def decode_codec(config: dict, data: bytes, raw_size: int) -> bytes:
    cid = config["id"]
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
                # Only byte_bit_shuffle needs its decoded size, and the spec allows it only
                # where that size is exact: first, or after codecs that keep sizes.
                for config in reversed(footer["columns"][name]["codecs"]):
                    stored = decode_codec(config, stored, block["raw_length"])
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
