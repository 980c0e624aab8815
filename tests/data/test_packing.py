"""Sequence packing: examples in one row never see each other, so each one's loss equals its loss alone (unpadded)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from sparseft.data import IGNORE, Example, collate, micro_batches
from sparseft.data.packing import forward_inputs, join, pack_examples
from sparseft.models import load_model
from sparseft.train.loss import causal_lm_loss


def _examples(n: int, vocab: int, seed: int = 0, lo: int = 2, hi: int = 14) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(4, vocab) for _ in range(rng.randint(lo, hi))]
        prompt = rng.randint(0, len(ids) // 2)
        out.append(Example(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(T,) next-token losses of one row, 0 where no label."""
    nll = F.cross_entropy(logits[:-1].float(), labels[1:].clamp(min=0), reduction="none")
    return torch.cat([nll * (labels[1:] != IGNORE), nll.new_zeros(1)])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_packed_losses_equal_unpadded(arch, tiny_model_dir):
    model = load_model(tiny_model_dir(arch)).eval()
    assert model.config._attn_implementation == "sdpa"
    examples = _examples(7, model.config.vocab_size)
    rows, stats = pack_examples(examples, max_length=32)
    assert stats.rows < len(examples) and max(len(r.input_ids) for r in rows) <= 32
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        logits = model(**forward_inputs(batch)).logits  # (B, T, V)
        packed = {}
        for b, row in enumerate(rows):
            losses = _token_losses(logits[b], batch["labels"][b])
            starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
            for s, e in zip(starts, starts[1:]):
                packed[tuple(row.input_ids[s:e])] = losses[s:e]
        assert len(packed) == len(examples)
        total = 0.0
        for ex in examples:
            ids = torch.tensor([ex.input_ids])
            alone = _token_losses(model(input_ids=ids).logits[0], torch.tensor(ex.labels))
            torch.testing.assert_close(packed[tuple(ex.input_ids)], alone, rtol=0, atol=1e-5)
            total += float(alone.sum())
        # The trainer's loss on the packed batch: the mean over every example's loss tokens.
        n_loss = sum(ex.n_loss_tokens for ex in examples)
        assert abs(float(causal_lm_loss(model, batch)) - total / n_loss) < 1e-5


def test_attending_across_would_differ(tiny_model_dir):
    """The check above can fail: the same packed batch with the plain 2-D mask lets later examples see earlier ones."""
    model = load_model(tiny_model_dir("llama")).eval()
    rows, _ = pack_examples(_examples(7, model.config.vocab_size), max_length=32)
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        a = model(**forward_inputs(batch)).logits
        b = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (a - b).abs().max() > 1e-3


def test_rows_and_labels():
    examples = [Example([5, 6, 7], [IGNORE, 6, 7]), Example([8, 9], [8, 9]), Example([10, 11, 12, 13], [10] * 4)]
    row = join(examples)
    assert row.input_ids == [5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert row.position_ids == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    # The first token of each example is never a target: it would be predicted from the example before.
    assert row.labels == [IGNORE, 6, 7, IGNORE, 9, IGNORE, 10, 10, 10]
    assert row.n_loss_tokens == sum(ex.n_loss_tokens for ex in examples)

    rows, stats = pack_examples(examples, max_length=6)
    assert sorted(len(r.input_ids) for r in rows) == [3, 6] and stats.rows == 2
    batch = collate(rows, pad_id=0)
    # Padding counts from 0 as a sequence of its own, so it never joins the last example.
    short = min(range(2), key=lambda i: len(rows[i].input_ids))
    assert batch["position_ids"][short].tolist() == [0, 1, 2, 0, 1, 2]
    assert batch["attention_mask"][short].tolist() == [1, 1, 1, 0, 0, 0]


def test_every_example_once_and_deterministic():
    examples = _examples(200, 500, seed=3, lo=1, hi=60)
    rows, stats = pack_examples(examples, max_length=64)
    again, _ = pack_examples(examples, max_length=64)
    assert [r.input_ids for r in rows] == [r.input_ids for r in again]
    assert sum(len(r.input_ids) for r in rows) == sum(len(e.input_ids) for e in examples) == stats.tokens
    assert max(len(r.input_ids) for r in rows) <= 64
    assert stats.rows <= 1.1 * stats.tokens / 64 + 1  # best-fit decreasing leaves little room unused
    # Resume: the stream from k equals the uninterrupted stream's tail.
    full = micro_batches(rows, 4, seed=1, start_k=0)
    for _ in range(5):
        next(full)
    resumed = next(micro_batches(rows, 4, seed=1, start_k=20))
    expected = next(full)
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_packed_training_resumes_exactly(tmp_path, tiny_model_dir):
    import json
    import shutil

    from safetensors.torch import load_file

    from tests.helpers import cli, write_recipe

    model = tiny_model_dir("qwen3")
    train = {"max_steps": 4, "save_every": 2, "micro_batch_size": 2}
    data = {"packing": True, "max_length": 40}
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        recipe = write_recipe(tmp_path / name, model, train=train, data=data)
        out = cli("train", recipe)
        runs.append((recipe, tmp_path / name / "run"))
    assert "packing: 64 examples in" in out.output
    recipe_b, b = runs[1]
    shutil.rmtree(b / "final")  # killed after the step-2 checkpoint
    cli("train", recipe_b, "--resume")
    wa, wb = load_file(str(runs[0][1] / "final" / "trainable.safetensors")), load_file(str(b / "final" /
                                                                                           "trainable.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 5))
