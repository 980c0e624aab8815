"""The causal-LM loss without the full logits tensor.

A model's own loss materialises (batch, seq, vocab) logits and autograd keeps them, their log-softmax and their
gradient alive: at a 32k-150k vocabulary that is often the largest activation of the step. Here the final hidden
states are taken from the decoder, only the positions that carry a label are projected, a chunk at a time, and each
chunk's logits are recomputed in backward instead of kept. The value equals the model's own mean token loss.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sparseft.data.packing import forward_inputs

IGNORE = -100


def _chunk_nll(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (n, V): only this chunk's, and only until its loss is computed
    return F.cross_entropy(logits, targets, reduction="sum")


def _parts(model: nn.Module):
    """(decoder, lm_head) for transformers causal LMs (PEFT-wrapped too); None when the model does not expose them."""
    get_decoder, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    decoder, head = get_decoder(), get_head()
    if decoder is None or head is None or getattr(model.config, "final_logit_softcapping", None):
        return None
    return decoder, head


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = 2048) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions of `batch` (labels -100 are ignored)."""
    parts = _parts(model)
    if parts is None:  # an architecture whose head does more than a linear map: use its own loss
        return model(**forward_inputs(batch), labels=batch["labels"]).loss
    decoder, head = parts
    hidden = decoder(**forward_inputs(batch)).last_hidden_state
    labels = batch["labels"][:, 1:]  # position t predicts token t+1
    keep = labels != IGNORE  # (B, T-1)
    h = hidden[:, :-1][keep]  # (N, d): the labelled positions only
    y = labels[keep]  # (N,)
    n = y.numel()
    if n == 0:
        return hidden.sum() * 0.0  # keeps the graph; a batch with no loss token contributes nothing
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_tokens):
        hc, yc = h[start:start + chunk_tokens], y[start:start + chunk_tokens]
        if torch.is_grad_enabled() and hc.requires_grad:
            total = total + checkpoint(_chunk_nll, head, hc, yc, use_reentrant=False)
        else:
            total = total + _chunk_nll(head, hc, yc)
    return total / n
