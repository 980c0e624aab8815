"""Multiple choice by log-likelihood, as lm-evaluation-harness scores it: each choice is the continuation
`delimiter + choice` of the context, the best one wins.

A row is {query, choices: [text, ...], gold: index or the right choice's text}. The context is the few-shot
examples (query, delimiter, right choice, separator) and the query, as text. Context and continuation are tokenised
together and split where the context's own tokens end (white space at the end of the context moves to the
continuation first), with BOS where the tokenizer adds one, exactly as lm-eval's `_encode_pair` does; a sequence
longer than `max_length` + 1 loses context tokens from the left. Scores: the summed log-probability of the
continuation's tokens (normalize: none, lm-eval's `acc`), per token (tokens), or per character of the choice
without the delimiter (chars, lm-eval's `acc_norm`). Every row reports `acc` and `acc_norm` too, so a task compares
with the harness whatever its `normalize`.

Speed: questions run longest first; the context of a question goes through the model once and its KV cache is
shared by all its choices, whose tokens follow in one batched forward (a model without a KV cache reads each whole
sequence instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from sparseft.data import pad_token_id
from sparseft.data.example import bos_ids, get_field, get_text, tokenize
from sparseft.errors import UserError
from sparseft.eval.rows import data_where, shot_rows, task_rows
from sparseft.eval.stats import binomial_stderr
from sparseft.eval.tasks import MultipleChoiceTask
from sparseft.infer.generate import _cache_of, model_device

Scored = tuple[float, bool]  # (summed log-probability, whether greedy decoding gives the continuation)


@dataclass
class Item:
    context: list[int]
    continuations: list[list[int]]
    choices: list[str]
    gold: int
    truncated: bool = False  # context tokens were cut from the left to fit max_length


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """BOS where the tokenizer adds one (unless the text, a rendered chat say, starts with it), then the text."""
    bos = tokenizer.bos_token
    return (bos_ids(tokenizer) if not (bos and text.startswith(bos)) else []) + tokenize(tokenizer, text)


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids): the two texts tokenised together, split after the context's own tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = text_ids(tokenizer, context)
    return ctx, text_ids(tokenizer, context + continuation)[len(ctx):]


def fit(context: list[int], continuations: Sequence[Sequence[int]], max_length: int) -> list[int]:
    """The context cut from the left so that it and the longest continuation, less its last token, fit max_length."""
    keep = max_length + 1 - max(len(c) for c in continuations)
    return context[-keep:] if len(context) > keep else context


def _parse(row: dict, task: MultipleChoiceTask, where: str) -> tuple[str, list[str], int]:
    query = get_text(row, "query", task.fields, where)
    choices = get_field(row, "choices", task.fields, where)
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise UserError(f"{where}: choices must be a list of at least two texts, got {choices!r}"[:300])
    gold = get_field(row, "gold", task.fields, where)
    if isinstance(gold, str) and gold in choices:
        gold = choices.index(gold)
    elif isinstance(gold, str) and gold.strip().isdigit():  # a .csv cell holds the index as text
        gold = int(gold)
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise UserError(f"{where}: gold must be the index (0 to {len(choices) - 1}) or the text of the right choice, "
                        f"got {gold!r}")
    return query, choices, gold


def build_items(task: MultipleChoiceTask, tokenizer: Any) -> list[Item]:
    sep = task.few_shot.separator if task.few_shot else ""
    shots = ""
    for where, row in shot_rows(task):
        query, choices, gold = _parse(row, task, where)
        shots += query + task.delimiter + choices[gold] + sep
    items = []
    for number, row in task_rows(task):
        where = data_where(task, number)
        query, choices, gold = _parse(row, task, where)
        pairs = [encode_pair(tokenizer, shots + query, task.delimiter + c) for c in choices]
        context, conts = pairs[0][0], [cont for _, cont in pairs]
        if not context:
            raise UserError(f"{where}: the query is empty and the tokenizer adds no BOS, so nothing conditions the "
                            "choices")
        if min(len(c) for c in conts) == 0:
            raise UserError(f"{where}: a choice is empty (no token to score)")
        if max(len(c) for c in conts) > task.max_length:
            raise UserError(f"{where}: a choice is longer than max_length={task.max_length} tokens")
        kept = fit(context, conts, task.max_length)
        items.append(Item(kept, conts, choices, gold, truncated=len(kept) < len(context)))
    return items


def _logprobs(logp: torch.Tensor, target: Sequence[int]) -> Scored:
    """(sum of log p(target), all greedy) from log-probabilities (n, V) at the target's positions."""
    t = torch.as_tensor(list(target), device=logp.device)
    return float(logp.gather(-1, t[:, None]).sum()), bool((logp.argmax(-1) == t).all())


@torch.no_grad()
def _full_sequences(model: Any, chunk: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> list[Scored]:
    """Each (context, continuation) read as one right-padded sequence."""
    seqs = [list(c) + list(x)[:-1] for c, x in chunk]  # the last token is never read
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):  # right padding: positions are the same as unpadded
        ids[b, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[b, :len(s)] = 1
    device = model_device(model)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
    out = []
    for b, (context, cont) in enumerate(chunk):
        lo = len(context) - 1  # position t predicts token t+1
        out.append(_logprobs(torch.log_softmax(logits[b, lo:lo + len(cont)].float(), dim=-1), cont))
    return out


@torch.no_grad()
def _shared_context(model: Any, chunk: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                    pad_id: int) -> list[list[Scored]] | None:
    """Each context once (left-padded, KV cache kept), then every continuation of every context in one forward on
    the cache, repeated for each. None when the model returns no KV cache."""
    device = model_device(model)
    width = max(len(c) for c, _ in chunk)
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for b, (c, _) in enumerate(chunk):
        ids[b, width - len(c):] = torch.as_tensor(list(c), dtype=torch.long)
        mask[b, width - len(c):] = 1
    ids, mask = ids.to(device), mask.to(device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
    key, cache = _cache_of(out)
    if cache is None or not hasattr(cache, "reorder_cache"):
        return None
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V): the first token of every continuation
    owner = [b for b, (_, conts) in enumerate(chunk) for _ in conts]
    conts = [list(x) for _, cs in chunk for x in cs]
    rest = max(len(x) for x in conts) - 1  # tokens read after the context: all but each continuation's last
    later = None
    if rest > 0:
        rows = torch.as_tensor(owner, device=device)
        cache.reorder_cache(rows)  # (R, ...): each context's cache once for each of its continuations
        xids = torch.full((len(conts), rest), pad_id, dtype=torch.long)
        xmask = torch.zeros((len(conts), rest), dtype=torch.long)
        for r, x in enumerate(conts):  # right padding after the context's cache
            xids[r, :len(x) - 1] = torch.as_tensor(x[:-1], dtype=torch.long)
            xmask[r, :len(x) - 1] = 1
        xmask = xmask.to(device)
        positions = mask.sum(-1)[rows][:, None] + torch.arange(rest, device=device)  # (R, rest)
        later = model(input_ids=xids.to(device), attention_mask=torch.cat([mask[rows], xmask], dim=1),
                      position_ids=positions, use_cache=True, **{key: cache}).logits  # (R, rest, V)
    scored: list[list[Scored]] = [[] for _ in chunk]
    for r, (b, x) in enumerate(zip(owner, conts)):
        logp = first[b:b + 1]
        if len(x) > 1:
            logp = torch.cat([logp, torch.log_softmax(later[r, :len(x) - 1].float(), dim=-1)])  # (len(x), V)
        scored[b].append(_logprobs(logp, x))
    return scored


def score_choices(model: Any, groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                  batch_size: int, pad_id: int, share: bool = True, longest_first: bool = True) -> list[list[Scored]]:
    """For each (context ids, [continuation ids, ...]): the (log-likelihood, greedy) of each continuation.

    Groups run longest first, `batch_size` contexts a batch; results come back in the order given. `share=False`
    and `longest_first=False` (the plain way: every sequence whole, in the order given) are for benchmarks."""
    order = list(range(len(groups)))
    if longest_first:
        order.sort(key=lambda g: -(len(groups[g][0]) + max(len(x) for x in groups[g][1])))
    out: list[list[Scored] | None] = [None] * len(groups)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            scored = _shared_context(model, [groups[g] for g in batch], pad_id) if share else None
            if scored is None:  # no KV cache: every continuation reads its context again
                pairs = [(groups[g][0], x) for g in batch for x in groups[g][1]]
                flat = iter(s for i in range(0, len(pairs), batch_size)
                            for s in _full_sequences(model, pairs[i:i + batch_size], pad_id))
                scored = [[next(flat) for _ in groups[g][1]] for g in batch]
            for g, s in zip(batch, scored):
                out[g] = s
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def _pick(scores: Sequence[float]) -> int:
    return max(range(len(scores)), key=lambda i: (scores[i], -i))  # ties go to the first choice, as argmax


def multiple_choice(model: Any, tokenizer: Any, task: MultipleChoiceTask, items: list[Item] | None = None,
                    samples: list | None = None) -> dict:
    """{"accuracy" (by `normalize`), "acc", "acc_norm", each with its standard error, "correct", "n",
    "truncated"}."""
    items = build_items(task, tokenizer) if items is None else items
    scored = score_choices(model, [(it.context, it.continuations) for it in items], task.batch_size,
                           pad_token_id(tokenizer))
    right = {"accuracy": 0, "acc": 0, "acc_norm": 0}
    for it, choice_scores in zip(items, scored):
        raw = [s for s, _ in choice_scores]
        per = {"none": raw, "tokens": [s / len(c) for s, c in zip(raw, it.continuations)],
               "chars": [s / max(len(c), 1) for s, c in zip(raw, it.choices)]}
        picks = {"accuracy": _pick(per[task.normalize]), "acc": _pick(raw), "acc_norm": _pick(per["chars"])}
        for name, pick in picks.items():
            right[name] += pick == it.gold
        if samples is not None:
            samples.append({"scores": per[task.normalize], "loglikelihoods": raw, "prediction": picks["accuracy"],
                            "gold": it.gold, "correct": picks["accuracy"] == it.gold})
    n = len(items)
    out: dict = {}
    for name, correct in right.items():
        out[name] = correct / max(n, 1)
        out[f"{name}_stderr"] = binomial_stderr(correct, n)
    out.update(correct=right["accuracy"], n=n, truncated=sum(it.truncated for it in items))
    return out
