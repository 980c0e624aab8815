"""The training order is deterministic and resumable; padding is masked."""

from __future__ import annotations

import itertools

import torch

from sparseft.data import IGNORE, Example, collate, eval_batches, micro_batches, sample_index


def test_each_epoch_is_a_seeded_permutation():
    n = 7
    order = [sample_index(n, seed=3, k=k) for k in range(3 * n)]
    epochs = [order[i * n:(i + 1) * n] for i in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    assert order == [sample_index(n, seed=3, k=k) for k in range(3 * n)]
    assert order != [sample_index(n, seed=4, k=k) for k in range(3 * n)]


def _examples(n):
    return [Example(list(range(1, i + 2)), list(range(1, i + 2))) for i in range(n)]


def test_resuming_at_k_continues_the_same_stream():
    examples = _examples(5)
    full = list(itertools.islice(micro_batches(examples, 2, seed=1, pad_id=0), 6))
    resumed = list(itertools.islice(micro_batches(examples, 2, seed=1, start_k=6, pad_id=0), 3))
    for a, b in zip(full[3:], resumed):
        assert all(torch.equal(a[key], b[key]) for key in a)
    # Batches span epochs: 6 batches of 2 over 5 examples cover epoch 0 and most of epoch 1.
    seen = [examples.index(next(e for e in examples if len(e.input_ids) == int(mask.sum())))
            for batch in full for mask in batch["attention_mask"]]
    assert seen == [sample_index(5, 1, k) for k in range(12)]


def test_collate_right_pads_and_masks_padding():
    batch = collate([Example([5, 6, 7], [IGNORE, 6, 7]), Example([8], [8])], pad_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_eval_batches_keep_file_order():
    examples = _examples(5)
    batches = list(eval_batches(examples, 2, pad_id=0))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert [int(m.sum()) for b in batches for m in b["attention_mask"]] == [1, 2, 3, 4, 5]
