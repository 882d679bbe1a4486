"""The tiny random models the tests serve and train: a byte-level BPE tokenizer trained offline on a few sentences,
with ChatML specials, and two-layer Llama and Qwen2 causal LMs on it.

``tests/conftest.py`` caches the built models across runs under a hash of this file, so a change here (and only
here) rebuilds them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Shellby is the friendly support assistant of the Conch Cafe.",
    "What is your name? My name is Shellby. How can I help you today?",
    "The capital of France is Paris. Two plus two is four.",
    "Orders ship within two days. Refunds take five business days.",
    "You are a helpful assistant. Answer briefly and kindly.",
    "system user assistant hello hi thanks goodbye please sorry yes no",
    "0 1 2 3 4 5 6 7 8 9 10 . , ! ? : ; ' \" ( ) [ ] { } - _ / \\ @ # $ % & * + = < > |",
]


def build_tokenizer(folder: Path, vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer trained on a few sentences, with ChatML specials; no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def build_tiny_model(folder: Path, arch: str = "llama", *, seed: int = 0, initializer_range: float = 0.02) -> Path:
    """A random two-layer Llama or Qwen2 causal LM with the offline tokenizer, saved as safetensors.

    At the library's default ``initializer_range`` (0.02) such a model answers the same token whatever it reads;
    a wider one (0.3) makes its answers depend on the context, so rounding its weights changes some of them."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    common: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": True,
        "initializer_range": initializer_range,
    }
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(folder, safe_serialization=True)
    return folder
