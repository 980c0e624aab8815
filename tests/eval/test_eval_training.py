"""Evaluation during training: the recipe's eval section is scored every N steps and after the last, written to
eval.json in the run directory and shown in the output."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from sparseft.cli import app
from tests.helpers import write_recipe

runner = CliRunner()


def test_eval_tasks_during_and_after_training(tmp_path, tiny_model_dir, arith_tasks):
    recipe = write_recipe(tmp_path, tiny_model_dir("llama"), train={"max_steps": 4, "log_every": 4},
                          eval={"tasks": [str(arith_tasks.em), str(arith_tasks.mc)], "every": 3,
                                "data": arith_tasks.data})
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    run = tmp_path / "run"
    payload = json.loads((run / "eval.json").read_text())
    assert payload["step"] == 4
    assert [r["task"] for r in payload["results"]] == ["val", "em", "mc"]
    assert payload["results"][0]["perplexity"] > 1 and payload["results"][2]["n"] == 12
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "em.exact_match" in r]
    assert [r["step"] for r in scored] == [3, 4]
    assert {"val.perplexity", "val.loss", "mc.accuracy"} <= set(scored[0])
    assert "eval after step 4" in result.output and "mc" in result.output


def test_bad_eval_task_stops_the_run_early(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir("llama"), train={"max_steps": 50},
                          eval={"tasks": [str(tmp_path / "missing.yaml")]})
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "eval.tasks[0]" in result.output and "missing.yaml" in result.output
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 1  # stopped after its first step, not at the end
