"""Tiny registered targets for CLI tests: a random Llama with a byte-level tokenizer, saved as a local model
directory with its target card in an `--include` directory. Needs no hub and covers any prompt, so `run`, `submit`
and friends can be driven end to end on real task data in seconds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer() -> Any:
    """A byte-level tokenizer with no merges (256 byte tokens + 2 chat tokens): covers any prompt, needs no hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"])


def write_byte_target(root: Path, name: str, layers: int = 2, tree: dict[str, int] | None = None,
                      model_dir: str = "model", vocab: int | None = None, pin_checkpoint: bool = False) -> Any:
    """Save a random Llama of width 32 with `layers` layers and the byte tokenizer under `root/model_dir`, and its
    card `root/targets/NAME.yaml` (tree 4/1/2 unless given; `pin_checkpoint`: the card records the weights'
    sha256, as registered targets do). `vocab` overrides the vocabulary size (a model only its config matters
    for). Seeded, so every call with the same arguments writes the same weights. Returns the model's config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from taps_bench.models.targets import _weights_digest

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab or len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=False, initializer_range=0.5,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(root / model_dir)
    tokenizer.save_pretrained(root / model_dir)
    card: dict[str, Any] = {
        "name": name, "description": f"a random {layers}-layer Llama with a byte tokenizer (tests only)",
        "family": "llama", "source": {"path": str(root / model_dir)}, "chat_template": CHAT,
        "tree": tree or {"total_tokens": 4, "depth": 1, "top_k": 2}}
    if pin_checkpoint:
        card["checkpoint_sha256"] = _weights_digest(model)
    (root / "targets").mkdir(exist_ok=True)
    (root / "targets" / f"{name}.yaml").write_text(json.dumps(card))
    return config
