"""Evaluation tasks: small YAML files naming a data file, how to read it, the metric and its settings.

    # recipes/tasks/arith_em.yaml
    metric: exact_match          # perplexity | exact_match | multiple_choice
    data: recipes/data/arith_val.jsonl
    form: completion             # the prompt is `prompt`, the answer `completion`
    answer: last_number          # compare the last number of the generated text with the last number of the answer
    generation: {max_new_tokens: 6}

A task is validated once by pydantic (unknown keys are errors) and passed around typed. Paths are relative to the
working directory, like a recipe's. `load_task` turns every problem into one UserError naming the file and key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from sparseft.errors import UserError

ANSWER_RULES = ("stripped", "first_line", "first_number", "last_number", "regex")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Generation(_Strict):
    max_new_tokens: int = Field(32, gt=0, description="Tokens generated at most per prompt.")
    temperature: float = Field(0.0, ge=0, description="0 is greedy decoding; above 0 samples.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the most likely tokens up to this mass.")
    seed: int = Field(0, description="Seeds sampling (each prompt has its own generator).")
    stop: list[str] = Field(default_factory=list, description="Generation ends at the first of these strings.")


class FewShot(_Strict):
    """Worked examples put before every prompt, each rendered like a scored row followed by its answer."""

    examples: list[dict] | None = Field(None, description="Rows in the task's own fields.")
    path: str | None = Field(None, description="Or a data file whose first `n` rows are the examples.")
    n: int | None = Field(None, gt=0, description="How many examples (default: all of `examples`; 3 from `path`).")
    separator: str = Field("\n", description="Text after each example.")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.examples is None) == (self.path is None):
            raise ValueError("give exactly one of few_shot.examples or few_shot.path")
        return self


class _TaskBase(_Strict):
    name: str | None = Field(None, description="Name in tables and JSON (default: the file name without .yaml).")
    data: str = Field(description="A .jsonl, .json, .csv or .parquet file, relative to the working directory.")
    fields: dict[str, str] = Field(default_factory=dict, description="Rename columns: {field: column_in_file}.")
    limit: int | None = Field(None, gt=0, description="Score only the first N rows.")
    batch_size: int = Field(8, gt=0, description="Rows per forward pass.")
    max_length: int = Field(512, gt=0, description="Tokens per scored sequence: perplexity's window; prompts of "
                                                   "other tasks are cut from the left (counted in `truncated`).")


class PerplexityTask(_TaskBase):
    metric: Literal["perplexity"]
    stride: int | None = Field(None, gt=0, description="Rolling windows of max_length tokens: each window after the "
                               "first scores this many new tokens, with max_length - stride tokens of context "
                               "(default max_length: disjoint windows, as lm-eval's loglikelihood_rolling).")
    form: Literal["text", "instruction", "completion", "chat"] | None = Field(
        None, description="Data form (default: a run directory's data.format, else text); loss tokens as in training.")
    prompt_template: str | None = Field(None, description="instruction form: prompt template.")

    @model_validator(mode="after")
    def _stride(self):
        if self.stride is not None and self.stride > self.max_length:
            raise ValueError(f"stride={self.stride} is more than max_length={self.max_length}; a window scores at "
                             "most max_length tokens")
        return self


class ExactMatchTask(_TaskBase):
    metric: Literal["exact_match"]
    form: Literal["completion", "instruction", "chat"] = Field(
        "completion", description="completion: prompt -> completion; instruction: Alpaca prompt -> output; chat: "
                                  "the conversation up to its last assistant turn -> that turn.")
    prompt_template: str | None = Field(None, description="instruction form: prompt template.")
    answer: Literal["stripped", "first_line", "first_number", "last_number", "regex"] = Field(
        "stripped", description="How the answer is read from both the generated text and the reference before "
                                "they are compared.")
    pattern: str | None = Field(None, min_length=1, description="answer: regex: the answer is the first group (or the match).")
    few_shot: FewShot | None = None
    generation: Generation = Field(default_factory=Generation)

    @model_validator(mode="after")
    def _pattern(self):
        if (self.answer == "regex") != (self.pattern is not None):
            raise ValueError("answer: regex needs `pattern`, and `pattern` is only used with answer: regex")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"pattern {self.pattern!r}: not a valid regular expression ({e})") from None
        return self


class MultipleChoiceTask(_TaskBase):
    metric: Literal["multiple_choice"]
    normalize: Literal["none", "tokens", "chars"] = Field(
        "none", description="Score each choice by its summed log-likelihood (none), per token (tokens) or per "
                            "character of the choice (chars); the highest score is the answer.")
    delimiter: str = Field(" ", description="Text between the query and a choice.")
    few_shot: FewShot | None = None


Task = Annotated[Union[PerplexityTask, ExactMatchTask, MultipleChoiceTask], Field(discriminator="metric")]
_ADAPTER = TypeAdapter(Task)
METRICS = ("perplexity", "exact_match", "multiple_choice")


def _problems(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        loc = list(e["loc"])
        if len(loc) > 0 and loc[0] in METRICS:  # the union's tag; the user's key starts after it
            loc = loc[1:]
        key = ".".join(str(p) for p in loc) or "<task>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; the task keys are listed in the README)"
        elif e["type"] == "union_tag_invalid":
            key, msg = "metric", f"unknown metric {e['input'].get('metric')!r} (known: {', '.join(METRICS)})"
        elif e["type"] == "union_tag_not_found":
            key, msg = "metric", f"missing: every task names its metric ({', '.join(METRICS)})"
        elif "input" in e and e["type"] != "missing" and not isinstance(e["input"], (dict, list)):
            msg = f"{msg} (got {e['input']!r})"
        out.append(f"{key}: {msg}")
    return out


def validate_task(data: object, name: str, source: str = "task") -> Task:
    """A task from a mapping; every problem at once in one UserError naming `source` and each key."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: must be a mapping of task keys (metric, data, ...)")
    try:
        task = _ADAPTER.validate_python(data)
    except ValidationError as e:
        problems = _problems(e)
        raise UserError(f"{source}: {len(problems)} problem(s)", problems) from None
    return task if task.name else task.model_copy(update={"name": name})


def is_task_file(path: str | Path) -> bool:
    """A YAML mapping with a `metric` and no `model` section is an eval task, not a recipe (for `sparseft validate`)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False  # the recipe loader reports what is wrong with it
    return isinstance(data, dict) and "metric" in data and "model" not in data


def load_task(path: str | Path, key: str = "--task") -> Task:
    """Read and validate a task file; its name defaults to the file name."""
    p = Path(path)
    where = f"{key} {p}"
    if not p.is_file():
        raise UserError(f"{where}: no such file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{where}: not valid YAML: {e}") from None
    return validate_task(data, p.stem.removesuffix(".yaml"), where)


def data_task(path: str, form: str | None, max_length: int, batch_size: int) -> PerplexityTask:
    """The task behind `sparseft eval --data FILE`: perplexity of the file, named after it."""
    return PerplexityTask(metric="perplexity", name=Path(path).stem, data=str(path), form=form, max_length=max_length,
                          batch_size=batch_size)
