"""Small models built from config with a tokenizer trained in-process: for the demo, the tests and benchmarks.

Nothing is downloaded. The tokenizer is a byte-level BPE (any text encodes) with a chat template, so every data form works.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]

_DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is 12 + 7? Answer: 19",
    "### Instruction:\nAdd the numbers.\n\n### Input:\n3 4\n\n### Response:\n7",
    "Sparse fine-tuning trains a few heads and channels of a large language model.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - * = ?",
]

ARCH_CONFIGS = {
    # Each exercises something: llama MHA, mistral GQA, qwen2 GQA + q/k/v bias, qwen3 GQA + explicit head_dim + q/k norm.
    "llama": dict(num_attention_heads=4, num_key_value_heads=4),
    "mistral": dict(num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24),
}


def train_tokenizer(corpus: list[str] | None = None, vocab_size: int = 512):
    """A byte-level BPE tokenizer (transformers' fast tokenizer) trained on `corpus` in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus or []) + _DEFAULT_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str = "llama", vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2,
                intermediate_size: int = 128, **overrides):
    """A transformers config of the given family, small enough to train on two CPU cores in seconds."""
    from transformers import AutoConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    kwargs.update(ARCH_CONFIGS[arch])
    if arch == "qwen2":
        kwargs["use_sliding_window"] = False
    kwargs.update(overrides)
    return AutoConfig.for_model(arch, **kwargs)


def build_tiny_model(out_dir: str | Path, arch: str = "llama", corpus: list[str] | None = None, seed: int = 0,
                     vocab_size: int = 512, model_vocab_size: int | None = None, **config_overrides) -> Path:
    """Write a randomly initialised causal LM and its tokenizer to `out_dir` (a plain Hugging Face directory).

    `model_vocab_size` makes the embedding table larger than the tokenizer (benchmarks of realistic shapes)."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    tokenizer = train_tokenizer(corpus, vocab_size=vocab_size)
    config = tiny_config(arch, vocab_size=max(len(tokenizer), model_vocab_size or 0), **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
