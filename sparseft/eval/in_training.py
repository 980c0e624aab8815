"""Evaluation during training: the recipe's `eval` section, scored every `eval.every` steps and after the last one.

The training loop calls `eval_step` after every optimizer step; it does nothing unless a score is due. Each score is
one metrics.jsonl record ({"step", "<task>.<metric>": value, ...}, headline metrics only); the last is also written
in full to `eval.json` in the run directory and shown as a table. Tasks are read and tokenised at the first call (so
a bad task file stops the run after its first step) and reused after.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparseft.eval.runner import EvalResult, results_payload, run_task, task_inputs
from sparseft.eval.tasks import PerplexityTask, load_task

EVAL_FILE = "eval.json"
_HEADLINE = ("perplexity", "loss", "exact_match", "accuracy")
# The run being scored: (recipe, tokenizer, tasks, their tokenised inputs). Holding the objects (not their ids) means
# a later run in the same process can never be mistaken for this one.
_cache: list = []


def recipe_tasks(recipe) -> list:
    """The eval section's tasks: `eval.data` (perplexity in the training data's form) and each `eval.tasks` file."""
    ev, d = recipe.eval, recipe.data
    tasks = []
    if ev.data is not None:
        tasks.append(PerplexityTask(metric="perplexity", name=Path(ev.data).stem, data=ev.data, form=d.format,
                                    fields=d.fields, prompt_template=d.prompt_template, max_length=d.max_length,
                                    batch_size=recipe.train.micro_batch_size))
    tasks += [load_task(path, key=f"eval.tasks[{i}]") for i, path in enumerate(ev.tasks)]
    return tasks


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def eval_step(recipe, model: Any, tokenizer: Any, step: int, reporter) -> list[EvalResult] | None:
    """Score the recipe's eval tasks if due at `step` (1-based, after the step); returns the results when it did."""
    ev = recipe.eval
    if ev is None or (ev.data is None and not ev.tasks):
        return None
    last = step == recipe.train.max_steps
    if not _cache or _cache[0] is not recipe or _cache[1] is not tokenizer:
        # First call of this run: read and tokenise every task now, so a bad one fails early.
        tasks = recipe_tasks(recipe)
        _cache[:] = [recipe, tokenizer, tasks, {t.name: task_inputs(t, tokenizer, recipe.data.format) for t in tasks}]
    if not last and not (ev.every and step % ev.every == 0):
        return None
    tasks, inputs = _cache[2], _cache[3]
    was_training = model.training
    model.eval()
    try:
        results = [EvalResult(recipe.train.output_dir, None, t.name,
                              run_task(t, model, tokenizer, inputs[t.name], recipe.data.format)) for t in tasks]
    finally:
        model.train(was_training)
    reporter.log({"step": step, **{f"{r.task}.{m}": v for r in results for m, v in r.metrics.items()
                                   if m in _HEADLINE}})
    if last and _is_main_process():
        from sparseft.eval.report import results_table

        path = Path(recipe.train.output_dir) / EVAL_FILE
        payload = {"step": step, **results_payload(results)}
        path.write_text(json.dumps(payload, indent=2) + "\n")
        reporter.results(payload)
        reporter.console.print(results_table(results, title=f"eval after step {step} ({path})"))
    return results
