"""Batched generation: left-padded prompts, a KV cache, greedy or nucleus sampling, and per-row S2FT adapters.

Prompts of one batch are padded on the left, so every row's next token is read at the same (last) position; position
ids count only real tokens, so a padded prompt sees the positions it would see alone. Each row samples from its own
generator, seeded from `Sampling.seed` and the row's index in the request, so a prompt gives the same text whatever
else shares its batch. With `adapters` and `row_adapter`, each decoding step is one forward in which batch row b uses
adapters[row_adapter[b]] (-1: the base), through `mixed_adapters`, without merging any.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. temperature 0 is greedy (top_p and seed are then unused)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()  # generation ends at the first of these strings, which is cut from the text

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")


@dataclass
class Generated:
    token_ids: list[int]  # the new tokens, the end-of-sequence token left out
    text: str  # decoded without special tokens, cut at the first stop string
    stop_reason: str  # "eos" | "stop" (a stop string) | "length" (max_new_tokens)


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """The tokenizer's EOS and any the model's generation config adds (chat models often end turns with another)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen if isinstance(gen, (list, tuple)) else [gen] if gen is not None else [])
    return ids


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], sampling: Sampling = Sampling(),
             batch_size: int = 8, adapters: Sequence | None = None,
             row_adapter: Sequence[int] | None = None) -> list[Generated]:
    """Continue each prompt (token ids) in batches of `batch_size`; results in prompt order.

    `adapters` (loaded S2FT adapters) with `row_adapter` (one index a prompt, -1 for the base) runs every prompt with
    its own adapter in shared batches.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if (adapters is None) != (row_adapter is None) or (row_adapter is not None and len(row_adapter) != len(prompts)):
        raise ValueError("generate: give adapters and row_adapter together, one row_adapter entry a prompt")
    from sparseft.data import pad_token_id

    pad_id, eos = pad_token_id(tokenizer), eos_token_ids(model, tokenizer)
    was_training = getattr(model, "training", False)
    model.eval()
    results: list[Generated] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = range(start, min(start + batch_size, len(prompts)))
            if adapters is not None:
                from sparseft.export.sparse_adapters import mixed_adapters

                ctx = mixed_adapters(model, list(adapters), [row_adapter[i] for i in chunk])
            else:
                ctx = contextlib.nullcontext()
            with ctx:
                results += _generate_batch(model, tokenizer, [prompts[i] for i in chunk], list(chunk), sampling,
                                           pad_id, eos)
    finally:
        model.train(was_training)
    return results


def model_device(model: Any) -> torch.device:
    """Where the model's first parameter lives (CPU for a model with none)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _generate_batch(model, tokenizer, prompts: list[Sequence[int]], rows: list[int], sampling: Sampling, pad_id: int,
                    eos: set[int]) -> list[Generated]:
    device = model_device(model)
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, p in enumerate(prompts):  # left padding: real tokens end at the last column
        ids[b, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[b, T - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): padding shares position 0, never attended to
    gens = [torch.Generator().manual_seed(sampling.seed * 1_000_003 + r) for r in rows]

    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache_key, cache = _cache_of(out)
    new: list[list[int]] = [[] for _ in range(B)]
    texts: list[str | None] = [None] * B
    reasons: list[str | None] = [None] * B
    for step in range(sampling.max_new_tokens):
        next_ids = _pick(out.logits[:, -1, :], sampling, gens)  # (B,)
        for b in range(B):
            if reasons[b] is not None:
                next_ids[b] = pad_id
                continue
            tok = int(next_ids[b])
            if tok in eos:
                reasons[b] = "eos"
                continue
            new[b].append(tok)
            if sampling.stop:
                text = tokenizer.decode(new[b], skip_special_tokens=True)
                cut = min((i for i in (text.find(s) for s in sampling.stop) if i >= 0), default=-1)
                if cut >= 0:
                    texts[b], reasons[b] = text[:cut], "stop"
        if all(r is not None for r in reasons) or step + 1 == sampling.max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
        ids = torch.cat([ids, next_ids.to(device)[:, None]], dim=1)
        if cache is not None:
            out = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                        use_cache=True, **{cache_key: cache})
            cache = _cache_of(out)[1]
        else:  # a model without a cache reads the whole sequence again
            out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    return [Generated(new[b], texts[b] if texts[b] is not None else tokenizer.decode(new[b], skip_special_tokens=True),
                      reasons[b] or "length") for b in range(B)]


def _cache_of(out) -> tuple[str | None, Any]:
    """(argument name, KV cache) of a forward's output: transformers 5 calls it `cache`, earlier versions
    `past_key_values`; (None, None) for a model that returns none."""
    for name in ("cache", "past_key_values"):
        cache = getattr(out, name, None)
        if cache is not None:
            return name, cache
    return None, None


def _pick(logits: torch.Tensor, sampling: Sampling, gens: list[torch.Generator]) -> torch.Tensor:
    """Next token a row from (B, V) logits: argmax, or a draw from the top-p nucleus at the temperature."""
    logits = logits.float().cpu()
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)  # (B, V)
    if sampling.top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        # Keep the most likely tokens until their mass reaches top_p (always at least the first).
        drop = sorted_p.cumsum(-1) - sorted_p >= sampling.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.stack([torch.multinomial(probs[b], 1, generator=g)[0] for b, g in enumerate(gens)])
