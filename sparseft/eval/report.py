"""The results table: one row a task metric, one column a model (alone or with an adapter), so models compare
side by side however many tasks there are. The JSON holds every metric; the table shows each task's headline ones,
each with its standard error (±) where the task reports one and the count it is taken over."""

from __future__ import annotations

import math
from typing import Sequence

from rich.table import Table

from sparseft.eval.runner import EvalResult

# Shown per task type; other tasks (harness) show every number they report.
HEADLINE = {"perplexity": ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "loss"),
            "exact_match": ("exact_match",), "accuracy": ("accuracy",)}
# The count a figure is taken over, shown beside it.
COUNTS = {"perplexity": "tokens", "word_perplexity": "words", "byte_perplexity": "bytes", "bits_per_byte": "bytes"}
COUNTS_ONLY = ("n", "correct", "truncated", "tokens", "words", "bytes", "documents")


def _headline(metrics: dict) -> tuple[str, ...]:
    for key, shown in HEADLINE.items():
        if key in metrics:
            return shown
    return tuple(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                 and k not in COUNTS_ONLY and not k.split(":")[0].endswith("_stderr"))


def _stderr(metric: str, metrics: dict) -> float | None:
    name, colon, filt = metric.partition(":")  # a harness metric keeps its filter after the stderr suffix
    err = metrics.get(f"{name}_stderr{colon}{filt}")
    return err if isinstance(err, (int, float)) and not math.isnan(err) else None


def _cell(metric: str, metrics: dict) -> str:
    v = metrics.get(metric)
    if v is None:
        return "-"
    digits = 4 if metric == "loss" else 3
    text = f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    err = _stderr(metric, metrics)
    if err is not None:
        text += f" ± {err:.{digits}f}"
    if metric in ("exact_match", "accuracy") and "correct" in metrics:
        text += f" ({metrics['correct']}/{metrics['n']})"
    elif metric in COUNTS and COUNTS[metric] in metrics and metric != "bits_per_byte":
        text += f" ({metrics[COUNTS[metric]]} {COUNTS[metric]})"
    return text


def results_table(results: Sequence[EvalResult], title: str | None = None) -> Table:
    variants: dict[tuple[str, str | None, bool], dict[str, dict]] = {}  # column -> task -> metrics
    rows: list[tuple[str, str]] = []  # (task, metric) in first-seen order
    for r in results:
        variants.setdefault((r.model, r.adapter, r.baseline), {})[r.task] = r.metrics
        rows += [(r.task, m) for m in _headline(r.metrics) if (r.task, m) not in rows]
    table = Table("task", "metric", title=title)
    for model, adapter, baseline in variants:
        head = model + (f"\n+ {adapter}" if adapter else "") + ("\n(baseline)" if baseline else "")
        table.add_column(head, justify="right", overflow="fold")
    for task, metric in rows:
        table.add_row(task, metric, *(_cell(metric, by_task.get(task, {})) for by_task in variants.values()))
    return table
