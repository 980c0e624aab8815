"""`sparseft eval`: load MODEL (base model, run directory or merged model) once, score every task with the model alone
or with each adapter in turn (and any baselines), gate the results for CI, write them as JSON.

Results are flat records {model, adapter, task, baseline, <metrics>}. The JSON is {"results": [...]} and, when there
is exactly one non-baseline result, that result's metrics at the top level too (so `jq .perplexity` keeps working).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from sparseft.data import pad_token_id
from sparseft.errors import UserError
from sparseft.eval.perplexity import build_documents, rolling_perplexity
from sparseft.eval.tasks import ExactMatchTask, MultipleChoiceTask, PerplexityTask, Task
from sparseft.infer.loading import LoadedModel, load_for_inference

# The metrics each task type reports; gates naming anything else are refused before a model loads.
_PPL = ("perplexity", "loss", "word_perplexity", "byte_perplexity", "bits_per_byte")
TASK_METRICS = {
    "perplexity": _PPL + tuple(f"{m}_stderr" for m in _PPL) + ("tokens", "words", "bytes", "documents"),
    "exact_match": ("exact_match", "exact_match_stderr", "correct", "n", "truncated"),
    "multiple_choice": ("accuracy", "acc", "acc_norm", "accuracy_stderr", "acc_stderr", "acc_norm_stderr", "correct",
                        "n", "truncated"),
}


@dataclass
class EvalResult:
    model: str
    adapter: str | None
    task: str
    metrics: dict[str, float] = field(default_factory=dict)
    baseline: bool = False

    def as_dict(self) -> dict:
        return {"model": self.model, "adapter": self.adapter, "task": self.task, "baseline": self.baseline,
                **self.metrics}


def task_inputs(task: Task, tokenizer: Any, default_form: str = "text"):
    """What a task scores, tokenised once per tokenizer and reused across adapters."""
    if isinstance(task, PerplexityTask):
        return build_documents(task, tokenizer, default_form)
    if isinstance(task, ExactMatchTask):
        from sparseft.eval.exact_match import build_items

        return build_items(task, tokenizer)
    from sparseft.eval.choice import build_items

    return build_items(task, tokenizer)


def run_task(task: Task, model: Any, tokenizer: Any, inputs=None, default_form: str = "text",
             samples: list | None = None) -> dict[str, float]:
    """Score one task on an in-memory model (with any adapter already in effect)."""
    inputs = task_inputs(task, tokenizer, default_form) if inputs is None else inputs
    if isinstance(task, PerplexityTask):
        return rolling_perplexity(model, inputs, task.max_length, task.batch_size, pad_token_id(tokenizer), task.stride)
    if isinstance(task, ExactMatchTask):
        from sparseft.eval.exact_match import exact_match

        return exact_match(model, tokenizer, task, inputs, samples)
    if isinstance(task, MultipleChoiceTask):
        from sparseft.eval.choice import multiple_choice

        return multiple_choice(model, tokenizer, task, inputs, samples)
    raise TypeError(f"unknown task type {type(task).__name__}")


def _variants(loaded: LoadedModel, adapters: Sequence[str], bare: bool,
              force: bool = False) -> Iterator[tuple[str | None, Any]]:
    """(adapter, model) pairs: the model alone if `bare`, then with each adapter in turn (the base restored after)."""
    if adapters and loaded.is_run:
        raise UserError(f"MODEL {loaded.path} is a run directory; adapters apply to a base model")
    if bare:
        yield None, loaded.model
    from sparseft.export.apply import adapter_applied

    for adapter in adapters:
        with adapter_applied(loaded.model, adapter, force) as adapted:
            adapted.eval()
            yield adapter, adapted


def evaluate(model_path: str, tasks: Sequence[Task], adapters: Sequence[str] = (), baselines: Sequence[str] = (),
             harness_tasks: Sequence[str] = (), dtype: str = "float32", samples: list | None = None,
             log=lambda s: None, device: str = "auto", harness_options=None, warn=None,
             force: bool = False) -> list[EvalResult]:
    """Every task for each baseline (alone), then for MODEL alone or with each adapter. A baseline that is MODEL
    itself shares its load. `samples`, if given, receives per-row records of generation and choice tasks;
    `harness_options` (a harness.HarnessOptions) is passed to lm-eval with the harness tasks. `warn` (default `log`)
    receives what was cut to fit max_length."""
    warn = warn or log
    if not tasks and not harness_tasks:
        raise UserError("eval: give --data FILE, --task FILE or --harness-task NAME")
    names = [t.name for t in tasks] + list(harness_tasks)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"eval: two tasks are named {twice[0]!r}; give one of them another `name`")
    from sparseft.export.apply import adapter_method

    for adapter in adapters:  # a missing or malformed adapter fails before any model loads
        adapter_method(adapter)
    plan: list[tuple[str, bool]] = [(b, True) for b in baselines if b != model_path] + [(model_path, False)]
    results: list[EvalResult] = []
    for path, is_baseline in plan:
        loaded = load_for_inference(path, dtype, device=device)
        inputs = {t.name: task_inputs(t, loaded.tokenizer, loaded.form) for t in tasks}
        bare = is_baseline or not adapters or model_path in baselines
        for adapter, model in _variants(loaded, [] if is_baseline else list(adapters), bare, force):
            base_flag = is_baseline or (adapter is None and bool(adapters))
            for task in tasks:
                log(f"{path}{' + ' + adapter if adapter else ''}: {task.name}")
                rows: list | None = [] if samples is not None else None
                metrics = run_task(task, model, loaded.tokenizer, inputs[task.name], loaded.form, rows)
                if metrics.get("truncated"):
                    warn(f"{task.name}: {metrics['truncated']} of {metrics['n']} prompts were longer than "
                         f"max_length={task.max_length} tokens and lost tokens from the left")
                results.append(EvalResult(path, adapter, task.name, metrics, base_flag))
                if rows:
                    samples += [{"model": path, "adapter": adapter, "task": task.name, **r} for r in rows]
            if harness_tasks:
                from sparseft.eval.harness import HarnessOptions, run_harness

                for name, metrics in run_harness(model, loaded.tokenizer, harness_tasks,
                                                 harness_options or HarnessOptions()):
                    results.append(EvalResult(path, adapter, name, metrics, base_flag))
    return results


# --- CI gates and JSON ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gate:
    task: str | None  # None: every task that reports the metric
    metric: str
    value: float

    @property
    def key(self) -> str:
        return f"{self.task}.{self.metric}" if self.task else self.metric


def parse_gates(items: Sequence[str], flag: str) -> list[Gate]:
    """METRIC=VALUE or TASK.METRIC=VALUE (the task's name: its file name without .yaml, or the --data file's)."""
    gates = []
    for item in items:
        name, _, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            raise UserError(f"{flag} {item!r}: expected METRIC=NUMBER or TASK.METRIC=NUMBER, e.g. perplexity=12.5 "
                            "or arith_em.exact_match=0.5") from None
        task, _, metric = name.strip().rpartition(".")
        gates.append(Gate(task or None, metric, number))
    return gates


def check_gate_names(tasks: Sequence[Task], gates: dict[str, list[Gate]], harness: bool = False) -> None:
    """Refuse, before any model loads, a gate that no task can satisfy. With `harness` tasks too, a gate naming no
    task of ours (or a metric none of ours reports) is left for after the run, when the harness's results are known."""
    for flag, items in gates.items():
        for g in items:
            named = [t for t in tasks if g.task is None or t.name == g.task]
            if g.task is not None and not named:
                if harness:
                    continue
                raise UserError(f"{flag} {g.key}: no task named {g.task!r} (tasks: "
                                f"{', '.join(t.name for t in tasks) or 'none'})")
            if not any(g.metric in TASK_METRICS[t.metric] for t in named) and not (harness and g.task is None):
                have = sorted({m for t in named for m in TASK_METRICS[t.metric]})
                raise UserError(f"{flag} {g.key}: no such metric (have: {', '.join(have) or 'none'})")


def check_gates(results: Sequence[EvalResult], under: Sequence[Gate], over: Sequence[Gate]) -> list[str]:
    """Missed gates as messages: `under` are floors (higher is better), `over` ceilings (lower is better).
    Baselines are reported, never gated."""
    missed = []
    gated = [r for r in results if not r.baseline]
    for gates, flag in ((under, "--fail-under"), (over, "--fail-over")):
        for g in gates:
            hits = [r for r in gated if g.metric in r.metrics and (g.task is None or r.task == g.task)]
            if not hits:
                have = sorted({m for r in gated for m in r.metrics})
                raise UserError(f"{flag} {g.key}: no result has it (have: {', '.join(have)})")
            for r in hits:
                v = r.metrics[g.metric]
                low = flag == "--fail-under"
                if math.isnan(v) or (v < g.value if low else v > g.value):
                    who = r.model + (f" + {r.adapter}" if r.adapter else "")
                    missed.append(f"{who}: {r.task} {g.metric} {v:.4f} is {'below' if low else 'above'} {g.value}")
    return missed


def _json_value(v):
    return None if isinstance(v, float) and math.isnan(v) else v  # a standard error of fewer than two rows: null


def results_payload(results: Sequence[EvalResult]) -> dict:
    payload: dict = {"results": [{k: _json_value(v) for k, v in r.as_dict().items()} for r in results]}
    gated = [r for r in results if not r.baseline]
    if len(gated) == 1:
        payload.update({k: _json_value(v) for k, v in gated[0].metrics.items()})
    return payload


def write_json(results: Sequence[EvalResult], out: str | Path) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results_payload(results), indent=2) + "\n")
