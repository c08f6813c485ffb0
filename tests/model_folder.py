"""Loadable mlx-lm model folders (weights, config, tokenizer, chat template), offline.

``make_model_folder(tmp_path)`` writes what ``mlx_lm.load`` reads from the Hub: a tiny
random model of any ``tiny_models`` architecture and a small BPE tokenizer trained here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

import mlx.core as mx  # noqa: E402
import mlx_lm  # noqa: E402
from mlx_lm.utils import quantize_model, save_config, save_model  # noqa: E402
from tiny_models import CONFIGS, build  # noqa: E402

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]

# Enough text for a 128-token BPE vocabulary.
TEXT = [
    "Once upon a time there was a little girl named Lily.",
    "She loved to play outside in the park with her dog.",
    "One day the sun was bright and the birds were singing.",
    "The movie was wonderful, warm and full of joy.",
    "The film was dull, slow and a waste of time.",
    "Tom and his friend built a small boat and sailed across the lake.",
    "What a great day! Everyone was happy and smiling.",
    "It was a terrible, boring story with no good parts at all.",
    "Hello, how are you? I am fine, thank you very much.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
]

# A minimal chat template, so chat flows (generate, server) have one to apply.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def write_tokenizer(folder: Path, vocab_size: int = 128) -> int:
    """Train a small BPE tokenizer (Metaspace, BOS-prefixed) into ``folder``; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tok.train_from_iterator(TEXT * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 256,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(folder / "tokenizer_config.json", "w") as f:
        json.dump(tokenizer_config, f, indent=2)
    return tok.get_vocab_size()


def make_model_folder(
    tmp_path: str | Path,
    arch: str = "llama",
    quantize: bool = False,
    name: str | None = None,
    **overrides,
) -> Path:
    """Write a tiny random ``arch`` model as an mlx-lm folder; 4-bit when ``quantize``.

    ``overrides`` change the model config (e.g. ``hidden_size=32``). Returns the folder.
    """
    folder = Path(tmp_path) / (name or f"{arch}{'-4bit' if quantize else ''}")
    vocab_size = write_tokenizer(folder)
    config = dict(CONFIGS[arch], vocab_size=vocab_size, **overrides)
    config["eos_token_id"] = SPECIAL_TOKENS.index("</s>")
    config["bos_token_id"] = SPECIAL_TOKENS.index("<s>")
    model = build(arch, vocab_size=vocab_size, **overrides)
    if quantize:
        model, config = quantize_model(model, config, group_size=32, bits=4)
    save_model(folder, model)
    save_config(config, folder / "config.json")
    return folder


def make_adapter(
    folder: Path, adapter_path: str | Path, attributes: bool = True
) -> Path:
    """Save a rank-4 braces adapter for ``folder`` whose gates (and, with
    ``attributes``, steering toward "positive"/"negative") visibly change the output."""
    from mlx_braces import apply_braces, braced_layers, save_adapter
    from mlx_braces.steering import add_attributes

    model, tokenizer = mlx_lm.load(str(folder))
    apply_braces(model, rank=4, seed=0)
    for _, m in braced_layers(model):
        m.gate = mx.array([2.0])
    if attributes:
        words = {"positive": ["good"], "negative": ["bad"]}
        add_attributes(model, tokenizer, words, seed=0)
        for i, (_, m) in enumerate(braced_layers(model)):  # trained-like, nonzero h_c
            shape = m.cond.out.weight.shape
            m.cond.out.weight = 0.5 * mx.random.normal(shape, key=mx.random.key(i))
    return save_adapter(model, adapter_path, model=str(folder))
