"""Batches: a deterministic, resumable training order, padding, and evaluation batches in file order.

The training stream is indexed by k, the number of examples consumed so far: epoch k // n visits every example once in
a permutation seeded from (seed, epoch). A resumed run continues at k = examples already consumed and sees exactly the
batches the uninterrupted run would have. Nothing is sorted by length, to keep the order easy to reason about.
"""

from __future__ import annotations

import random
from functools import lru_cache
from typing import Any, Iterator, Sequence

import torch

from sparseft.data.example import IGNORE, Example


@lru_cache(maxsize=4)
def epoch_permutation(n_examples: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The order of examples in one epoch."""
    order = list(range(n_examples))
    # A string seed hashes the same in every process and Python version, unlike hash() of a tuple.
    random.Random(f"sparseft-order:{seed}:{epoch}").shuffle(order)
    return tuple(order)


def sample_index(n_examples: int, seed: int, k: int) -> int:
    """Index of the k-th example (0-based) of the training stream."""
    if n_examples <= 0:
        raise ValueError("no examples to sample from")
    epoch, pos = divmod(k, n_examples)
    return epoch_permutation(n_examples, seed, epoch)[pos]


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (padding is masked out everywhere, so any id works)."""
    pad = tokenizer.pad_token_id
    return pad if pad is not None else tokenizer.eos_token_id


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded LongTensors (B, T): input_ids, attention_mask, labels (-100 on padding); and position_ids for packed
    rows, where the padding counts from 0 as one more sequence of its own (it attends to no example)."""
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if any(ex.position_ids is not None for ex in examples):
        positions = torch.arange(width, dtype=torch.long).repeat(len(examples), 1)
        for row, ex in enumerate(examples):
            n = len(ex.input_ids)
            positions[row, :n] = torch.tensor(ex.position_ids or range(n), dtype=torch.long)
            positions[row, n:] = torch.arange(width - n)
        batch["position_ids"] = positions
    return batch


def micro_batches(examples: Sequence[Example], micro_batch_size: int, seed: int, start_k: int = 0,
                  pad_id: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless training micro-batches; the i-th holds stream examples start_k + i*B ... start_k + (i+1)*B - 1.

    A batch may span an epoch boundary, so every batch is full and k advances by exactly B a batch.
    """
    n = len(examples)
    k = start_k
    while True:
        yield collate([examples[sample_index(n, seed, k + j)] for j in range(micro_batch_size)], pad_id)
        k += micro_batch_size


def eval_batches(examples: Sequence[Example], batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches in file order; the last may be smaller."""
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start:start + batch_size], pad_id)
