"""Helpers for the eval tests: a character tokenizer, a bigram stub model with known logits, task and data writers,
lm-eval task files on local data."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import yaml

CHARS = list("0123456789 +=abcdefghijklmnopqrstuvwxyz?:")
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def char_tokenizer():
    """One token a character (ids 4.. in CHARS order), no BOS added, '</s>' the EOS; decoding joins characters."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {**{s: i for i, s in enumerate(SPECIAL)}, **{c: i + len(SPECIAL) for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


V = len(SPECIAL) + len(CHARS)


def cid(c: str) -> int:
    return {"</s>": 2, "<s>": 1}.get(c) or len(SPECIAL) + CHARS.index(c)


class Bigram(nn.Module):
    """logits at position t = table[input_ids[t]]: the next token depends only on the current one. No KV cache."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.clone(), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids])  # (B, T, V)


def bigram(pairs: dict[tuple[str, str], float]) -> Bigram:
    """A bigram model with logit 0 everywhere except table[a, b] = value for each (a, b) in `pairs`."""
    table = torch.zeros(V, V)
    for (a, b), value in pairs.items():
        table[cid(a), cid(b)] = value
    return Bigram(table)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_task(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def harness_yaml(path: Path, data: str, body: str) -> str:
    """An lm-eval task file named after the file, on the local jsonl `data`; `body` holds its own keys."""
    path.write_text(f"task: {path.stem}\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {data}}}}}\n"
                    f"test_split: test\n{body}")
    return str(path)


def harness_mc_yaml(path: Path, data: str, delimiter: str = " ") -> str:
    """Multiple choice on rows {query, choices, gold}, lm-eval's acc and acc_norm."""
    return harness_yaml(path, data, f"""output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: "{delimiter}"
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
""")


def harness_gen_yaml(path: Path, data: str, max_new_tokens: int = 5) -> str:
    """Generation on rows {prompt, completion}: exact match of the stripped text with the stripped completion."""
    return harness_yaml(path, data, f"""output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{completion | trim}}}}"
generation_kwargs: {{until: ["</s>"], max_gen_toks: {max_new_tokens}}}
filter_list:
  - name: strip
    filter: [{{function: regex, regex_pattern: "^\\\\s*(.*?)\\\\s*$"}}, {{function: take_first}}]
metric_list: [{{metric: exact_match}}]
""")
