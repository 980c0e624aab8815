"""Exact match: generate an answer to each prompt and compare it with the reference, both read by the task's rule.

Prompts are built the way training built them (BOS where the tokenizer adds one, then the prompt tokenised on its own);
few-shot examples come first, each as its prompt, its answer and the separator. Rules: `stripped` (surrounding white
space removed), `first_line`, `first_number` / `last_number` (commas dropped, "25.0" reads as "25"), `regex` (the
first group of the first match, or the whole match). A prediction the rule finds nothing in never matches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sparseft.data.chat import get_messages
from sparseft.data.example import bos_ids, get_text, tokenize
from sparseft.data.forms import check_form, instruction_prompt
from sparseft.errors import UserError
from sparseft.eval.rows import data_where, shot_rows, task_rows
from sparseft.eval.stats import binomial_stderr
from sparseft.eval.tasks import ExactMatchTask
from sparseft.infer.generate import Sampling, generate
from sparseft.infer.prompts import chat_prompt_ids

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str, rule: str, pattern: str | None = None) -> str | None:
    """The answer in `text` by `rule`; None when there is none."""
    if rule == "stripped":
        return text.strip()
    if rule == "first_line":
        lines = text.strip().splitlines()
        return lines[0].strip() if lines else ""
    if rule in ("first_number", "last_number"):
        found = _NUMBER.findall(text)
        if not found:
            return None
        number = found[0 if rule == "first_number" else -1].replace(",", "")
        return number.rstrip("0").rstrip(".") if "." in number else number
    if rule == "regex":
        m = re.search(pattern, text)  # the task schema requires a non-empty pattern here
        if m is None:
            return None
        return m.group(1) if m.re.groups else m.group(0)
    raise ValueError(f"unknown answer rule {rule!r}")


@dataclass
class Item:
    prompt_ids: list[int]
    reference: str  # the extracted reference answer
    truncated: bool = False  # the prompt was cut from the left to max_length


def _split(row: dict, task: ExactMatchTask, where: str) -> tuple[Any, str]:
    """(prompt text, or the chat context as messages; reference text) of one row."""
    f = task.fields
    if task.form == "completion":
        return get_text(row, "prompt", f, where), get_text(row, "completion", f, where)
    if task.form == "instruction":
        prompt = instruction_prompt(get_text(row, "instruction", f, where),
                                    get_text(row, "input", f, where, required=False), task.prompt_template)
        return prompt, get_text(row, "output", f, where)
    messages = get_messages(row, f, where)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def build_items(task: ExactMatchTask, tokenizer: Any) -> list[Item]:
    check_form(task.form, task.fields, task.prompt_template, tokenizer, form_key=f"task {task.name}: form")
    shots = [_split(row, task, where) for where, row in shot_rows(task)]
    sep = task.few_shot.separator if task.few_shot else ""
    prefix: list[int] = []
    shot_messages: list[dict] = []
    for context, answer in shots:
        if task.form == "chat":
            shot_messages += context + [{"role": "assistant", "content": answer}]
        else:
            prefix += tokenize(tokenizer, context) + tokenize(tokenizer, answer) + tokenize(tokenizer, sep)
    items = []
    for number, row in task_rows(task):
        where = data_where(task, number)
        context, reference = _split(row, task, where)
        ref = extract_answer(reference, task.answer, task.pattern)
        if ref is None:
            raise UserError(f"{where}: the reference {reference!r} has no answer by the rule {task.answer!r}")
        if task.form == "chat":
            ids = chat_prompt_ids(tokenizer, shot_messages + context, where)
        else:
            ids = bos_ids(tokenizer) + prefix + tokenize(tokenizer, context)
        if not ids:
            raise UserError(f"{where}: the prompt is empty and the tokenizer adds no BOS token, so there is nothing "
                            "to generate from")
        items.append(Item(ids[-task.max_length:], ref, len(ids) > task.max_length))
    return items


def exact_match(model: Any, tokenizer: Any, task: ExactMatchTask, items: list[Item] | None = None,
                samples: list | None = None) -> dict:
    """{"exact_match": fraction correct, its standard error, "correct", "n", "truncated"}; `samples`, if given,
    receives one dict a row."""
    items = build_items(task, tokenizer) if items is None else items
    g = task.generation
    sampling = Sampling(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, seed=g.seed,
                        stop=tuple(g.stop))
    # Longest prompts first, so a batch holds prompts of about one length (little padding); each prompt has its own
    # generator, so the order changes no text.
    order = sorted(range(len(items)), key=lambda i: -len(items[i].prompt_ids))
    done = generate(model, tokenizer, [items[i].prompt_ids for i in order], sampling, batch_size=task.batch_size)
    outputs = [None] * len(items)
    for i, out in zip(order, done):
        outputs[i] = out
    correct = 0
    for it, out in zip(items, outputs):
        pred = extract_answer(out.text, task.answer, task.pattern)
        ok = pred is not None and pred == it.reference
        correct += ok
        if samples is not None:
            samples.append({"generated": out.text, "prediction": pred, "reference": it.reference, "correct": ok})
    return {"exact_match": correct / max(len(items), 1), "exact_match_stderr": binomial_stderr(correct, len(items)),
            "correct": correct, "n": len(items), "truncated": sum(it.truncated for it in items)}
