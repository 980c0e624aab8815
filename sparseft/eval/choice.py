"""Multiple choice by log-likelihood: score every choice as a continuation of the query, pick the best.

A row is {query, choices: [text, ...], gold: index or the right choice's text}. The context is BOS (where the tokenizer
adds one), the few-shot examples (query, delimiter, right choice, separator) and the query; each continuation is the
delimiter and the choice, tokenised on their own, as training tokenises a completion. Scores: the summed
log-probability of the continuation's tokens (normalize: none), per token (tokens) or per character of the choice
(chars).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from sparseft.data import pad_token_id
from sparseft.data.example import bos_ids, get_field, get_text, tokenize
from sparseft.errors import UserError
from sparseft.eval.rows import data_where, shot_rows, task_rows
from sparseft.eval.tasks import MultipleChoiceTask
from sparseft.infer.generate import model_device


@dataclass
class Item:
    context: list[int]
    continuations: list[list[int]]
    choices: list[str]
    gold: int


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
    prefix: list[int] = []
    sep = task.few_shot.separator if task.few_shot else ""
    for where, row in shot_rows(task):
        query, choices, gold = _parse(row, task, where)
        prefix += tokenize(tokenizer, query) + tokenize(tokenizer, task.delimiter + choices[gold]) \
            + tokenize(tokenizer, sep)
    items = []
    for number, row in task_rows(task):
        where = data_where(task, number)
        query, choices, gold = _parse(row, task, where)
        conts = [tokenize(tokenizer, task.delimiter + c) for c in choices]
        room = task.max_length - max(len(c) for c in conts)
        if room < 1:
            raise UserError(f"{where}: a choice is longer than max_length={task.max_length} tokens")
        context = bos_ids(tokenizer) + prefix + tokenize(tokenizer, query)
        if not context:
            raise UserError(f"{where}: the query is empty and the tokenizer adds no BOS, so nothing conditions the "
                            "choices")
        items.append(Item(context[-room:], conts, choices, gold))
    return items


@torch.no_grad()
def continuation_logprobs(model: Any, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int,
                          pad_id: int) -> list[tuple[float, bool]]:
    """(summed log-probability of `cont` after `context`, whether greedy decoding would give `cont`) for each pair."""
    out: list[tuple[float, bool]] = []
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            seqs = [list(c) + list(x) for c, x in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for b, s in enumerate(seqs):  # right padding: positions are the same as unpadded
                ids[b, :len(s)] = torch.as_tensor(s, dtype=torch.long)
                mask[b, :len(s)] = 1
            device = model_device(model)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
            for b, (context, cont) in enumerate(chunk):
                # Position t predicts token t+1: the continuation's tokens are read from len(context)-1 on.
                lo = len(context) - 1
                logp = torch.log_softmax(logits[b, lo:lo + len(cont)].float(), dim=-1)  # (n, V)
                target = torch.as_tensor(list(cont), device=logp.device)
                out.append((float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())))
    finally:
        model.train(was_training)
    return out


def multiple_choice(model: Any, tokenizer: Any, task: MultipleChoiceTask, items: list[Item] | None = None,
                    samples: list | None = None) -> dict:
    """{"accuracy": fraction right, "correct", "n"}; ties go to the first choice."""
    items = build_items(task, tokenizer) if items is None else items
    pairs = [(it.context, cont) for it in items for cont in it.continuations]
    scores = iter(continuation_logprobs(model, pairs, task.batch_size, pad_token_id(tokenizer)))
    correct = 0
    for it in items:
        raw = [next(scores)[0] for _ in it.continuations]
        if task.normalize == "tokens":
            norm = [s / max(len(c), 1) for s, c in zip(raw, it.continuations)]
        elif task.normalize == "chars":
            norm = [s / max(len(c), 1) for s, c in zip(raw, it.choices)]
        else:
            norm = raw
        pick = max(range(len(norm)), key=lambda i: (norm[i], -i))
        correct += pick == it.gold
        if samples is not None:
            samples.append({"scores": norm, "prediction": pick, "gold": it.gold, "correct": pick == it.gold})
    return {"accuracy": correct / max(len(items), 1), "correct": correct, "n": len(items)}
