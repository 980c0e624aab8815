"""The results table: one row a task metric, one column a model (alone or with an adapter), so models compare
side by side however many tasks there are. The JSON holds every metric; the table shows each task's headline ones."""

from __future__ import annotations

from typing import Sequence

from rich.table import Table

from sparseft.eval.runner import EvalResult

# Shown per task type; other tasks (harness) show every number they report.
HEADLINE = {"perplexity": ("perplexity", "loss"), "exact_match": ("exact_match",), "accuracy": ("accuracy",)}


def _headline(metrics: dict) -> tuple[str, ...]:
    for key, shown in HEADLINE.items():
        if key in metrics:
            return shown
    return tuple(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n")


def _cell(metric: str, metrics: dict) -> str:
    v = metrics.get(metric)
    if v is None:
        return "-"
    if metric in ("exact_match", "accuracy") and "correct" in metrics:
        return f"{v:.3f} ({metrics['correct']}/{metrics['n']})"
    if metric == "loss":
        return f"{v:.4f}"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


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
