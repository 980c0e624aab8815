"""Perplexity: token-weighted mean negative log-likelihood over the loss tokens of a data file, exponentiated."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sparseft.data import eval_batches
from sparseft.infer.generate import model_device


@torch.no_grad()
def perplexity(model, examples, batch_size: int, pad_id: int, max_batches: int | None = None) -> dict:
    total_nll, total_tokens = 0.0, 0
    device = model_device(model)
    for i, batch in enumerate(eval_batches(examples, batch_size, pad_id)):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # Position t predicts token t+1: (B, T-1, V) against (B, T-1).
        labels = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="sum")
        total_nll += float(nll)
        total_tokens += int((labels != -100).sum())
    loss = total_nll / max(total_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": total_tokens}
