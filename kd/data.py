"""SFT examples in, token ids and loss masks out: the rows a teacher scores and a student learns.

Rows come from JSON lines or Parquet files (a local path, a directory, a glob or any fsspec
URL) in one of four shapes, chosen per row (or forced with `row_format`):

- ``messages``: a chat, ``[{"role", "content"}, ...]``, rendered by the tokenizer's chat
  template. Targets are exactly the tokens the model generates for each assistant turn: the
  template renders the conversation before the turn with the generation prompt, and the
  conversation through the turn; the text between the two (less trailing whitespace after the
  end-of-turn token) is the turn. Both renderings must be prefixes of the whole conversation's
  rendering, else the template cannot be split exactly and the row is refused.
- ``prompt`` + ``response`` (or ``completion``): the response tokens and an end-of-sequence
  token are targets. With ``chat_template`` the pair becomes a two-turn chat.
- ``text``: every token after the first is a target.
- ``input_ids`` with ``loss_mask`` (0/1 or booleans) or HF-style ``labels`` (unshifted copies of
  ``input_ids``, -100 where not a target); with neither, every token after the first.

Text is cut at the exact boundaries between targets and context and each piece is tokenized on
its own, which is how an inference server sees a prompt and the tokens the model then writes.
"""

from __future__ import annotations

import glob as globlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

IGNORE_INDEX = -100
ROW_FORMATS = ("auto", "messages", "prompt_response", "text", "tokens")
OVERFLOW_POLICIES = ("truncate", "skip")
DATA_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".parquet", ".pq")
_ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A row that cannot become an example; the message names the file, line and field."""


@dataclass
class Example:
    """One training sequence: what a teacher scores and a student learns from."""

    sample_id: str
    input_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # bool [T], False at position 0

    @property
    def num_targets(self) -> int:
        return int(self.loss_mask.sum())


@dataclass
class DataStats:
    """What happened to the rows: examples made, and rows truncated or skipped, with why."""

    rows: int = 0
    examples: int = 0
    targets: int = 0
    truncated: int = 0
    skipped_too_long: int = 0
    skipped_no_target: int = 0
    skipped_bad: int = 0
    first_bad: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [
            f"{self.examples:,} examples ({self.targets:,} target tokens) from {self.rows:,} rows"
        ]
        if self.truncated:
            parts.append(f"{self.truncated:,} truncated to --max-length")
        if self.skipped_too_long:
            parts.append(f"{self.skipped_too_long:,} skipped as longer than --max-length")
        if self.skipped_no_target:
            parts.append(f"{self.skipped_no_target:,} skipped without a target token")
        if self.skipped_bad:
            parts.append(f"{self.skipped_bad:,} bad rows skipped (first: {self.first_bad[0]})")
        return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# Files and rows


def data_files(url: str, storage_options: dict | None = None) -> list[str]:
    """The data files behind `url`: one file, a directory of them, or a glob (sorted)."""
    if "://" not in url or url.startswith("file://"):
        path = url.removeprefix("file://")
        if os.path.isdir(path):
            files = sorted(
                os.path.join(path, name)
                for name in os.listdir(path)
                if name.lower().endswith(DATA_SUFFIXES)
            )
        elif any(ch in path for ch in "*?["):
            files = sorted(globlib.glob(path))
        elif os.path.isfile(path):
            files = [path]
        else:
            raise DataError(f"{url}: no such file or directory")
    else:
        import fsspec

        fs, _, paths = fsspec.get_fs_token_paths(url, storage_options=storage_options or {})
        protocol = url.split("://", 1)[0]
        files = []
        for p in paths:
            if fs.isdir(p):
                files += [f for f in fs.ls(p, detail=False) if f.lower().endswith(DATA_SUFFIXES)]
            elif fs.exists(p):
                files.append(p)
        files = sorted(f if "://" in f else f"{protocol}://{f}" for f in files)
    if not files:
        raise DataError(
            f"{url}: no data files (JSON lines or Parquet: {', '.join(DATA_SUFFIXES)}) found"
        )
    return files


def _is_parquet(path: str) -> bool:
    return path.lower().endswith((".parquet", ".pq"))


def iter_rows(
    url: str, storage_options: dict | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (where, row) for every row of every file; `where` is "file:line N" or "file:row N".

    A line that is not a JSON object raises DataError naming the file and line; blank lines are
    not rows.
    """
    for where, row in _raw_rows(url, storage_options):
        if isinstance(row, DataError):
            raise row
        yield where, row


def _raw_rows(url: str, storage_options: dict | None) -> Iterator[tuple[str, Any]]:
    """Rows, with a DataError in place of each line that is not a JSON object."""
    import fsspec

    for path in data_files(url, storage_options):
        if _is_parquet(path):
            import pyarrow.parquet as pq

            with fsspec.open(path, "rb", **(storage_options or {})) as f:
                try:
                    table = pq.ParquetFile(f)
                except Exception as exc:  # pyarrow raises ArrowInvalid and OSError alike
                    raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
                number = 0
                for batch in table.iter_batches(batch_size=1024):
                    for row in batch.to_pylist():
                        number += 1
                        yield f"{path}:row {number}", row
            continue
        with fsspec.open(path, "rb", compression="infer", **(storage_options or {})) as raw:
            for number, line in enumerate(raw, start=1):
                where = f"{path}:line {number}"
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(
                        f"{where}: not UTF-8 text ({exc.reason}); is this a JSON lines file?"
                    ) from None
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as exc:
                    yield (
                        where,
                        DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})"),
                    )
                    continue
                if not isinstance(row, dict):
                    row = DataError(
                        f"{where}: a row must be a JSON object, got {type(row).__name__}"
                    )
                yield where, row


def source_fingerprint(url: str, storage_options: dict | None = None) -> str:
    """XXH3-64 over the names and bytes of the data files: changes whenever the data does."""
    import fsspec

    h = xxhash.xxh3_64()
    for path in data_files(url, storage_options):
        h.update(os.path.basename(path).encode() + b"\0")
        with fsspec.open(path, "rb", **(storage_options or {})) as f:
            while block := f.read(8 << 20):
                h.update(block)
        h.update(b"\0")
    return "xxh3_64:" + h.hexdigest()


def count_rows(url: str, storage_options: dict | None = None) -> int:
    """How many rows `url` holds (non-blank lines of JSON lines files, rows of Parquet files),
    read without parsing, to size a progress bar."""
    import fsspec

    rows = 0
    for path in data_files(url, storage_options):
        if _is_parquet(path):
            import pyarrow.parquet as pq

            with fsspec.open(path, "rb", **(storage_options or {})) as f:
                try:
                    rows += pq.ParquetFile(f).metadata.num_rows
                except Exception as exc:  # pyarrow raises ArrowInvalid and OSError alike
                    raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
            continue
        with fsspec.open(path, "rb", compression="infer", **(storage_options or {})) as raw:
            rows += sum(1 for line in raw if line.strip())
    return rows


# --------------------------------------------------------------------------------------------
# Rows to examples


class ExampleBuilder:
    """Turns rows into `Example`s with one tokenizer and one set of options.

    `vocab_size` bounds pre-tokenized ids (default: the tokenizer's length). `max_length`
    caps T: longer examples are truncated (keeping the beginning) or skipped, per `overflow`.
    `add_eos` appends the end-of-sequence token to prompt/response examples, so the student
    learns to stop.
    """

    def __init__(
        self,
        tokenizer,
        *,
        max_length: int | None = None,
        overflow: str = "truncate",
        chat_template: bool = False,
        row_format: str = "auto",
        add_eos: bool = True,
        vocab_size: int | None = None,
    ):
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow {overflow!r}: choose one of {OVERFLOW_POLICIES}")
        if row_format not in ROW_FORMATS:
            raise ValueError(f"row format {row_format!r}: choose one of {ROW_FORMATS}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length {max_length}: must be at least 2 (context and target)")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.overflow = overflow
        self.chat_template = chat_template
        self.row_format = row_format
        self.add_eos = add_eos
        self.vocab_size = int(vocab_size if vocab_size is not None else len(tokenizer))

    # -- the public entry --------------------------------------------------------------------
    def build(self, row: dict, where: str, index: int, stats: DataStats) -> Example | None:
        """The example of one row, or None when it is skipped (counted in `stats`)."""
        kind = self._kind(row, where)
        if kind == "messages":
            ids, mask = self._from_messages(row["messages"], where)
        elif kind == "prompt_response":
            ids, mask = self._from_prompt_response(row, where)
        elif kind == "text":
            ids, mask = self._from_text(row.get("text"), where)
        else:
            ids, mask = self._from_tokens(row, where)
        if self.max_length is not None and len(ids) > self.max_length:
            if self.overflow == "skip":
                stats.skipped_too_long += 1
                return None
            ids, mask = ids[: self.max_length], mask[: self.max_length]
            stats.truncated += 1
        mask[0] = False
        if not mask.any():
            stats.skipped_no_target += 1
            return None
        return Example(sample_id=_sample_id(row, index), input_ids=ids, loss_mask=mask)

    def _kind(self, row: dict, where: str) -> str:
        if self.row_format != "auto":
            return self.row_format
        if "messages" in row:
            return "messages"
        if "prompt" in row and ("response" in row or "completion" in row):
            return "prompt_response"
        if "input_ids" in row:
            return "tokens"
        if "text" in row:
            return "text"
        raise DataError(
            f"{where}: no known fields (has {sorted(row)[:8]}); a row needs 'messages', "
            "'prompt' + 'response', 'text', or 'input_ids' (+ 'loss_mask' or 'labels')"
        )

    # -- the four shapes ---------------------------------------------------------------------
    def _from_messages(self, messages: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
        _check_messages(messages, where)
        if not getattr(self.tokenizer, "chat_template", None):
            raise DataError(
                f"{where}: 'messages' rows need a chat template, and this tokenizer has none; "
                "pass a tokenizer with one (--tokenizer) or use 'prompt' + 'response' rows"
            )
        full = self._render(messages, False, where)
        cuts: list[tuple[int, int]] = []  # character spans of the assistant turns
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], True, where) if i else ""
            through = self._render(messages[: i + 1], False, where).rstrip()
            if not (full.startswith(before) and full.startswith(through)) or len(through) < len(
                before
            ):
                raise DataError(
                    f"{where}: messages[{i}]: the chat template does not render the conversation "
                    "before this turn as a prefix of the whole conversation, so the assistant "
                    "tokens cannot be found exactly; use a template that renders turns in order"
                )
            if cuts and len(before) < cuts[-1][1]:
                raise DataError(f"{where}: messages[{i}]: assistant turns overlap in the template")
            cuts.append((len(before), len(through)))
        pieces: list[tuple[str, bool]] = []
        position = 0
        for start, end in cuts:
            pieces.append((full[position:start], False))
            pieces.append((full[start:end], True))
            position = end
        pieces.append((full[position:], False))
        return self._tokenize_pieces(pieces, first_special=False)

    def _render(self, messages: list, generation_prompt: bool, where: str) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as exc:  # jinja raises its own errors from inside templates
            raise DataError(f"{where}: the chat template failed on this row: {exc}") from None

    def _from_prompt_response(self, row: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
        key = "response" if "response" in row else "completion"
        prompt, response = row.get("prompt"), row.get(key)
        for name, value in (("prompt", prompt), (key, response)):
            if not isinstance(value, str):
                raise DataError(f"{where}: '{name}' must be a string, got {type(value).__name__}")
        if not response:
            raise DataError(f"{where}: '{key}' is empty; there is nothing to learn from this row")
        if self.chat_template:
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": response},
            ]
            return self._from_messages(messages, where)
        ids, mask = self._tokenize_pieces([(prompt, False), (response, True)], first_special=True)
        eos = self.tokenizer.eos_token_id
        if self.add_eos and eos is not None:
            ids = np.append(ids, np.int32(eos))
            mask = np.append(mask, True)
        return ids, mask

    def _from_text(self, text: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(text, str) or not text:
            raise DataError(f"{where}: 'text' must be a non-empty string")
        ids, mask = self._tokenize_pieces([(text, True)], first_special=True)
        return ids, mask

    def _from_tokens(self, row: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
        ids = _int_list(row.get("input_ids"), "input_ids", where)
        if not ids.size:
            raise DataError(f"{where}: 'input_ids' is empty")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            p = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{where}: input_ids[{p}] = {int(ids[p])} is outside "
                f"the vocabulary [0, {self.vocab_size}); the row was tokenized for another model"
            )
        if row.get("loss_mask") is not None:
            mask = _int_list(row["loss_mask"], "loss_mask", where, booleans=True)
            if mask.shape != ids.shape or ((mask != 0) & (mask != 1)).any():
                raise DataError(
                    f"{where}: 'loss_mask' must be {ids.size} values of 0/1 (or booleans), one "
                    "per input id"
                )
            mask = mask.astype(bool)
        elif row.get("labels") is not None:
            labels = _int_list(row["labels"], "labels", where)
            if labels.shape != ids.shape:
                raise DataError(f"{where}: 'labels' has {labels.size} values, input_ids {ids.size}")
            mask = labels != IGNORE_INDEX
            wrong = mask & (labels != ids)
            if wrong.any():
                p = int(np.flatnonzero(wrong)[0])
                raise DataError(
                    f"{where}: labels[{p}] = {int(labels[p])} but input_ids[{p}] = {int(ids[p])}; "
                    "HF-style labels are unshifted copies of input_ids with -100 where a token "
                    "is not a target (shifted labels would train on the wrong token)"
                )
        else:
            mask = np.ones(ids.shape, dtype=bool)
        return ids.astype(np.int32), mask

    def _tokenize_pieces(
        self, pieces: list[tuple[str, bool]], *, first_special: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        ids: list[int] = []
        mask: list[bool] = []
        for i, (text, is_target) in enumerate(pieces):
            if not text:
                continue
            special = first_special and i == 0
            piece = self.tokenizer(text, add_special_tokens=special)["input_ids"]
            ids += piece
            mask += [is_target] * len(piece)
        return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        if message.get("role") not in _ROLES:
            raise DataError(
                f"{where}: messages[{i}].role is {message.get('role')!r}; use one of {_ROLES}"
            )
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: messages[{i}].content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: 'messages' has no assistant turn, so no target tokens")


def _int_list(value: Any, name: str, where: str, *, booleans: bool = False) -> np.ndarray:
    if not isinstance(value, list | tuple | np.ndarray):
        raise DataError(f"{where}: '{name}' must be a list of integers")
    for i, v in enumerate(value):
        ok = isinstance(v, int | np.integer) and (booleans or not isinstance(v, bool))
        if not ok:
            raise DataError(
                f"{where}: {name}[{i}] = {v!r} is not an integer; token ids and masks must be "
                "whole numbers"
            )
    return np.asarray([int(v) for v in value], dtype=np.int64)


def _sample_id(row: dict, index: int) -> str:
    value = row.get("id")
    if isinstance(value, str | int) and not isinstance(value, bool):
        return str(value)
    return str(index)


def iter_examples(
    url: str,
    builder: ExampleBuilder,
    *,
    storage_options: dict | None = None,
    skip_bad_rows: bool = False,
    stats: DataStats | None = None,
    limit: int | None = None,
    max_rows: int | None = None,
    part: tuple[int, int] | None = None,
) -> Iterator[Example]:
    """Examples of every row of `url` in file order; `stats` counts what was skipped and why.

    A bad row raises DataError (naming the file and line) unless `skip_bad_rows`, which counts
    it instead. `limit` stops after that many examples; `max_rows` reads only the first that
    many rows. `part=(index, count)` keeps the rows whose number is `index` modulo `count`, so
    `count` processes each take a disjoint share; the others are parsed but not tokenized, and
    sample ids (row numbers) stay those of the whole data.
    """
    stats = stats if stats is not None else DataStats()
    if part is not None and not (0 <= part[0] < part[1]):
        raise ValueError(f"part={part!r}: need (index, count) with 0 <= index < count")
    for index, (where, row) in enumerate(_raw_rows(url, storage_options)):
        if max_rows is not None and index >= max_rows:
            return
        if part is not None and index % part[1] != part[0]:
            continue
        if limit is not None and stats.examples >= limit:
            return
        stats.rows += 1
        try:
            if isinstance(row, DataError):
                raise row
            example = builder.build(row, where, index, stats)
        except DataError as exc:
            if not skip_bad_rows:
                raise
            stats.skipped_bad += 1
            if len(stats.first_bad) < 5:
                stats.first_bad.append(str(exc))
            continue
        if example is not None:
            stats.examples += 1
            stats.targets += example.num_targets
            yield example
