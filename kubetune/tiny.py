"""A tiny model of a real architecture (Qwen2, 2 layers) and a byte-level tokenizer, made locally.

Tests and the local demo use it in place of a hub model: it is saved with ``save_pretrained`` and loaded by the
same code that loads a 7B model. The byte-level BPE handles any Unicode text, Chinese included.
"""

from __future__ import annotations

import json
from pathlib import Path

from kubetune.storage import atomic_dir

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def _training_text() -> list[str]:
    from importlib import resources

    sample = resources.files("kubetune.sample_data").joinpath("tcm_demo.jsonl")
    lines: list[str] = []
    if sample.is_file():
        for line in sample.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            lines.extend(str(row.get(k, "")) for k in ("instruction", "input", "output"))
    lines.append("### Instruction:\n### Input:\n### Response:\nYou are an expert.")
    return lines


def make_tokenizer(vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained on the bundled sample data, with a chat template."""
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
    tokenizer.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        bos_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


TINY_MARK = "kubetune_tiny_random"
"""The config attribute that marks kubetune's generated tiny model, whose weights are random."""
TINY_NOTE = (
    "The base model is kubetune's generated tiny model (2 layers, random weights), made so the pipeline runs "
    "anywhere in minutes: its answers are noise, after tuning at best fragments of the training answers. The "
    "held-out loss is the signal here: "
    "it falls when fine-tuning works. Set base_model to a real model for answers worth reading."
)


def is_tiny_random(config) -> bool:
    """Is this (a copy of) the generated tiny model? ``config``: a transformers config or its dict."""
    return bool(config.get(TINY_MARK) if isinstance(config, dict) else getattr(config, TINY_MARK, False))


def is_tiny_model_dir(path: str | Path) -> bool:
    """Does ``path`` hold (a copy of) the generated tiny model?"""
    import json

    try:
        return is_tiny_random(json.loads((Path(path) / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return False


DEMO_INIT_RANGE = 0.2
"""The demo model's weight scale: wide enough that a LoRA on it learns a peaked next-token distribution within the
demo's minute of training, so its answers visibly move toward the training answers. At transformers' default
(0.02) the logits of a 64-wide model stay within about ±1 and the loss near ln(vocab) however long it trains."""


def make_tiny_model(path: str | Path, *, layers: int = 2, hidden: int = 64, seed: int = 0,
                    init_range: float = 0.02) -> str:
    """Write a randomly initialised Qwen2 model (bf16 safetensors) and its tokenizer to ``path``; ``init_range``
    is the standard deviation of its random weights."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    path = Path(path)
    tokenizer = make_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        initializer_range=init_range,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # travels with the model (quantized copies keep their config): reports say its answers are noise
        **{TINY_MARK: True},
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a two-layer model needs no progress bar
    with atomic_dir(path) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return str(path)


def ensure_tiny_model(path: str | Path) -> str:
    """Make the tiny model at ``path`` unless a complete one is already there (a local cache)."""
    path = Path(path)
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return str(path)
    return make_tiny_model(path, init_range=DEMO_INIT_RANGE)
