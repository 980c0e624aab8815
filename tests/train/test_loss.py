"""The chunked causal-LM loss equals the model's own loss, in value and gradients, with and without masks."""

from __future__ import annotations

import pytest
import torch

from sparseft.models import load_model
from sparseft.train.loss import causal_lm_loss


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("chunk", [3, 4096])
def test_matches_model_loss(arch, chunk, tiny_model_dir):
    model = load_model(tiny_model_dir(arch))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    labels[mask == 0] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    ref = model(**batch).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ours = causal_lm_loss(model, batch, chunk_tokens=chunk)
    ours.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_no_loss_tokens_gives_zero(tiny_model_dir):
    model = load_model(tiny_model_dir("llama"))
    ids = torch.randint(4, 100, (2, 6))
    loss = causal_lm_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                  "labels": torch.full_like(ids, -100)})
    assert float(loss.detach()) == 0.0 and loss.requires_grad
