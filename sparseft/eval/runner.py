"""`sparseft eval`: resolve MODEL (base model, run directory or merged model) and adapters, score each, gate for CI."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from sparseft.data import load_examples
from sparseft.errors import UserError
from sparseft.eval.perplexity import perplexity
from sparseft.export.run import is_run_dir, load_run
from sparseft.models import load_model, load_tokenizer

LOWER_IS_BETTER = {"perplexity", "loss"}


@dataclass
class EvalResult:
    model: str
    adapter: str | None
    metrics: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"model": self.model, "adapter": self.adapter, **self.metrics}


def _models(model_path: str, adapters: list[str], dtype: str) -> Iterator[tuple[str | None, object, object, str]]:
    """Yield (adapter label, model, tokenizer, default data form) for the model alone or each adapter in turn."""
    form = "text"
    if is_run_dir(model_path):
        trained = load_run(model_path)
        model, tokenizer, form = trained.model, trained.tokenizer, trained.recipe.data.format
        if adapters:
            raise UserError(f"MODEL {model_path} is a run directory; adapters apply to a base model")
    else:
        tokenizer = load_tokenizer(model_path, key="MODEL")
        model = load_model(model_path, dtype, key="MODEL")
    model.eval()
    if not adapters:
        yield None, model, tokenizer, form
        return
    from sparseft.export.apply import adapter_applied

    for adapter in adapters:
        with adapter_applied(model, adapter) as adapted:
            yield adapter, adapted, tokenizer, form


def evaluate(model_path: str, data: str, adapters: list[str] = (), form: str | None = None, max_length: int = 512,
             batch_size: int = 8, dtype: str = "float32") -> list[EvalResult]:
    results = []
    for adapter, model, tokenizer, default_form in _models(model_path, list(adapters), dtype):
        examples, _ = load_examples(data, form or default_form, tokenizer, max_length, source_key="--data")
        if not examples:
            raise UserError(f"--data {data}: no example has tokens to score")
        metrics = perplexity(model, examples, batch_size, tokenizer.pad_token_id)
        results.append(EvalResult(model_path, adapter, metrics))
    return results


def parse_gates(items: list[str], flag: str) -> dict[str, float]:
    gates = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            gates[name.strip()] = float(value)
        except ValueError:
            raise UserError(f"{flag} {item!r}: expected METRIC=NUMBER, e.g. perplexity=12.5") from None
    return gates


def check_gates(results: list[EvalResult], under: dict[str, float], over: dict[str, float]) -> list[str]:
    """Missed gates as messages: `under` are floors (higher is better), `over` are ceilings (lower is better)."""
    missed = []
    for r in results:
        who = r.adapter or r.model
        for name, floor in under.items():
            if name not in r.metrics:
                raise UserError(f"--fail-under {name}: no such metric (have: {', '.join(r.metrics)})")
            if not r.metrics[name] >= floor:
                missed.append(f"{who}: {name} {r.metrics[name]:.4f} is below {floor}")
        for name, ceiling in over.items():
            if name not in r.metrics:
                raise UserError(f"--fail-over {name}: no such metric (have: {', '.join(r.metrics)})")
            if not r.metrics[name] <= ceiling or math.isnan(r.metrics[name]):
                missed.append(f"{who}: {name} {r.metrics[name]:.4f} is above {ceiling}")
    return missed


def write_json(results: list[EvalResult], out: str | Path) -> None:
    payload = {"results": [r.as_dict() for r in results]}
    if len(results) == 1:
        payload.update(results[0].metrics)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(payload, indent=2) + "\n")
