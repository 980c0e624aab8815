"""Data: files to rows, rows to token ids and label masks in one of four forms, and batches in a resumable order.

    rows = read_rows("data/train.jsonl")
    bundle = build_datasets(recipe.data, tokenizer, seed=recipe.train.seed)
    print(bundle.summary())
    for batch in micro_batches(bundle.train, 8, seed, start_k=examples_done, pad_id=pad_token_id(tokenizer)): ...
"""

from sparseft.data.batching import collate, epoch_permutation, eval_batches, micro_batches, pad_token_id, sample_index
from sparseft.data.bundle import DataBundle, DataStats, build_datasets, encode_rows, load_examples, split_rows
from sparseft.data.example import IGNORE, Example
from sparseft.data.files import read_numbered_rows, read_rows
from sparseft.data.forms import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, FORMS, check_form, encode_example

__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "FORMS", "IGNORE", "DataBundle", "DataStats", "Example",
    "build_datasets", "check_form", "collate", "encode_example", "encode_rows", "epoch_permutation", "eval_batches",
    "load_examples", "micro_batches", "pad_token_id", "read_numbered_rows", "read_rows", "sample_index", "split_rows",
]
