"""Strict JSON for the documents of a cache (manifest, partials, progress files), sealed by a
checksum so that a flipped byte anywhere in them is caught instead of silently changing a field.

A sealed document is a JSON object whose last member is `"manifest_checksum": "xxh3_64:<hex>"`:
the XXH3-64 of every byte of the file before that member's key (spec/FORMAT.md, section 3.1).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import xxhash

from .format import CHECKSUM_ALGORITHM, CorruptCacheError

SEAL_KEY = "manifest_checksum"
_SEAL_TAIL = re.compile(
    rb'"'
    + SEAL_KEY.encode()
    + rb'"[ \t\r\n]*:[ \t\r\n]*"xxh3_64:([0-9a-f]{16})"[ \t\r\n]*\}[ \t\r\n]*'
)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def strict_loads(
    data: bytes,
    *,
    source: str,
    what: str = "the manifest",
    members: Callable[[Any], int] | None = None,
) -> Any:
    """Parse UTF-8 JSON, refusing what JSON does not allow or makes ambiguous: NaN and
    Infinity, duplicate keys, and nesting too deep to parse. Errors name `source`.

    The duplicate-key check calls Python once per object, a third of the time of parsing a
    large shard footer. `members`, a count of the members of the parsed objects that never
    counts more than there are, allows a quicker proof: outside strings a colon appears in
    JSON only between a member's name and its value, so the text holds at least as many
    colons as members, and more than `members` counts once a repeated name has dropped a
    member. A plain parse whose colons equal `members` therefore had no repeated name; any
    other document is parsed again with the check."""
    try:
        text = data.decode("utf-8")
        if members is not None:
            parsed = json.loads(text, parse_constant=_reject_constant)
            if text.count(":") == members(parsed):
                return parsed
        return json.loads(
            text,
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
        )
    except RecursionError:
        problem = "nested too deeply to be a logitcache document"
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        problem = f"not valid UTF-8 JSON ({exc})"
    raise CorruptCacheError(
        f"{source}: {problem}; {what} is corrupt: re-download it or re-run the job that wrote it"
    )


def seal(obj: dict[str, Any]) -> bytes:
    """The bytes of `obj` as an indented JSON object whose last member is its checksum."""
    body = {key: value for key, value in obj.items() if key != SEAL_KEY}
    text = json.dumps(body, indent=1, ensure_ascii=False, allow_nan=False)
    prefix = (text[:-1].rstrip() + ",\n " if body else "{\n ").encode("utf-8")
    digest = xxhash.xxh3_64_hexdigest(prefix)
    return prefix + f'"{SEAL_KEY}": "{CHECKSUM_ALGORITHM}:{digest}"\n}}\n'.encode()


def check_seal(data: bytes, obj: dict[str, Any], *, source: str, required: bool) -> None:
    """Verify the seal of a parsed document; CorruptCacheError when it is missing (and
    `required`) or does not match the bytes."""
    if SEAL_KEY not in obj:
        if required:
            raise CorruptCacheError(
                f"{source}: '{SEAL_KEY}' is missing (format 1.1 documents carry one); the file "
                "is damaged or was edited: re-download it or re-run the job that wrote it"
            )
        return
    at = data.rfind(b'"' + SEAL_KEY.encode() + b'"')
    tail = _SEAL_TAIL.fullmatch(data, at) if at >= 0 else None
    if tail is None or obj.get(SEAL_KEY) != f"{CHECKSUM_ALGORITHM}:{tail.group(1).decode()}":
        raise CorruptCacheError(
            f"{source}: '{SEAL_KEY}' must be the last member, written as "
            f'"{SEAL_KEY}": "xxh3_64:<16 hex digits>"; the file is damaged or was edited'
        )
    got = xxhash.xxh3_64_hexdigest(data[:at])
    if got != tail.group(1).decode():
        raise CorruptCacheError(
            f"{source}: checksum mismatch (recorded {obj[SEAL_KEY]}, the bytes give "
            f"{CHECKSUM_ALGORITHM}:{got}); the file is damaged or was edited: re-download it or "
            "re-run the job that wrote it"
        )
