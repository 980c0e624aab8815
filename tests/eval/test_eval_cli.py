"""`sparseft eval` and `sparseft generate` through the real CLI: tables, JSON, CI gates, bad input (exit 2)."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest

from sparseft.eval.tasks import load_task
from tests.eval.evallib import write_jsonl, write_task
from tests.helpers import assert_exit, run

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "tasks").glob("*.yaml")), ids=lambda p: p.name)
def test_bundled_tasks_are_valid(path, monkeypatch):
    monkeypatch.chdir(REPO)
    task = load_task(path)
    assert task.name == path.stem and Path(task.data).is_file()
    assert Path(path).read_text().startswith("# "), "each bundled task starts with the command that runs it"


def test_gates_json_and_table(tmp_path, tiny_model_dir, arith_tasks):
    model, out = tiny_model_dir("llama"), tmp_path / "e.json"
    r = run("eval", model, "--data", arith_tasks.data, "--form", "completion", "--json", out,
            "--fail-over", "perplexity=1e9")
    assert_exit(r, 0, "perplexity")
    payload = json.loads(out.read_text())  # one result: its metrics at the top level too
    assert payload["perplexity"] > 1 and payload["results"][0]["task"] == "val"
    r = run("eval", model, "--data", arith_tasks.data, "--form", "completion", "--fail-over", "perplexity=1.5")
    assert_exit(r, 1, "gate missed", "above 1.5")
    r = run("eval", model, "--task", arith_tasks.em, "--task", arith_tasks.mc, "--json", out,
            "--fail-under", "mc.accuracy=1.01", "--fail-under", "exact_match=0")
    assert_exit(r, 1, "mc accuracy", "below 1.01")
    assert "em exact_match" not in r.output  # 0 is not below 0
    payload = json.loads(out.read_text())
    assert [x["task"] for x in payload["results"]] == ["em", "mc"] and "accuracy" not in payload
    assert_exit(run("eval", model, "--task", arith_tasks.mc, "--fail-under", "accuracy=0"), 0)


def test_cut_prompts_are_printed(tmp_path, tiny_model_dir, arith_tasks):
    em = write_task(tmp_path / "short.yaml", metric="exact_match", data=arith_tasks.data, max_length=2, limit=3,
                    generation={"max_new_tokens": 1})
    r = run("eval", tiny_model_dir("llama"), "--task", em)
    assert_exit(r, 0, "warning", "short: 3 of 3 prompts were longer than max_length=2")


def test_baseline_is_shown_not_gated(tmp_path, s2ft_pair, arith_tasks):
    out = tmp_path / "e.json"
    r = run("eval", s2ft_pair.base, "--adapter", s2ft_pair.adapters[0], "--baseline", s2ft_pair.base,
            "--task", arith_tasks.ppl, "--json", out, "--fail-over", "ppl.perplexity=1e9")
    assert_exit(r, 0, "(baseline)", "adapter1")
    payload = json.loads(out.read_text())
    assert [x["baseline"] for x in payload["results"]] == [True, False]
    assert payload["perplexity"] == payload["results"][1]["perplexity"]  # the one gated result


def test_bad_task_files(tmp_path, tiny_model_dir, arith_tasks):
    model = tiny_model_dir("llama")
    cases = {
        "typo": ({"metric": "exact_match", "data": arith_tasks.data, "answr": "stripped"}, ["answr", "unknown key"]),
        "metric": ({"metric": "bleu", "data": arith_tasks.data}, ["metric", "unknown metric 'bleu'"]),
        "no metric": ({"data": arith_tasks.data}, ["metric", "missing"]),
        "generation": ({"metric": "exact_match", "data": arith_tasks.data, "generation": {"max_new_tokens": 0}},
                       ["generation.max_new_tokens"]),
        "regex": ({"metric": "exact_match", "data": arith_tasks.data, "answer": "regex"}, ["pattern"]),
        "empty regex": ({"metric": "exact_match", "data": arith_tasks.data, "answer": "regex", "pattern": ""},
                        ["pattern", "at least 1 character"]),
        "few shot": ({"metric": "multiple_choice", "data": arith_tasks.data, "few_shot": {"n": 2}},
                     ["few_shot", "exactly one"]),
        "stride": ({"metric": "perplexity", "data": arith_tasks.data, "max_length": 8, "stride": 9},
                   ["stride=9 is more than max_length=8"]),
    }
    for name, (spec, needles) in cases.items():
        path = write_task(tmp_path / f"{name.replace(' ', '_')}.yaml", **spec)
        assert_exit(run("eval", model, "--task", path), 2, str(path), *needles)
    assert_exit(run("eval", model, "--task", tmp_path / "nope.yaml"), 2, "nope.yaml", "no such file")
    # Rows are checked when read: the message names the task, file and row.
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query": "1 + 1 =", "choices": ["2", "3"], "gold": 0},
                                               {"query": "2 + 2 =", "choices": ["4", "5"], "gold": 5}])
    path = write_task(tmp_path / "mc.yaml", metric="multiple_choice", data=bad)
    assert_exit(run("eval", model, "--task", path), 2, "task mc", "bad.jsonl row 2", "gold")
    assert_exit(run("eval", model, "--task", arith_tasks.em, "--fail-under", "accuracy=0.5"), 2, "accuracy",
                "no such metric")
    assert_exit(run("eval", model, "--task", arith_tasks.em, "--fail-under", "mc.exact_match=0.5"), 2,
                "no task named 'mc'")
    assert_exit(run("eval", model), 2, "--task")


def test_harness_missing_says_how_to_install(tiny_model_dir, monkeypatch):
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    r = run("eval", tiny_model_dir("llama"), "--harness-task", "hellaswag")
    assert_exit(r, 2, "lm-evaluation-harness", "pip install 'sparseft[harness]'")


def test_generate_cli(tmp_path, s2ft_pair):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "3 + 4 =", "adapter": 1, "id": "a"},
                                                 {"prompt": "Sparse", "adapter": "base"}])
    out = tmp_path / "out.jsonl"
    r = run("generate", s2ft_pair.base, "--prompts", prompts, *sum((["--adapter", a] for a in s2ft_pair.adapters), []),
            "--max-new-tokens", "4", "--output", "jsonl", "--out", out)
    assert_exit(r, 0)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["id"] if "id" in x else None, x["adapter"]) for x in rows] == [("a", "adapter2"), (None, None)]
    assert all(0 < x["new_tokens"] <= 4 for x in rows)
    r = run("generate", s2ft_pair.base, "--prompt", "Hello", "--chat", "--temperature", "0.7", "--top-p", "0.9",
            "--max-new-tokens", "3")
    assert_exit(r, 0)
    assert_exit(run("generate", s2ft_pair.base, "--prompts", prompts), 2, "p.jsonl row 1", "adapter 1", "'base'")
    assert_exit(run("generate", s2ft_pair.base, "--prompt", "x", "--adapter", tmp_path / "none"), 2, "none")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "hi"}])
    assert_exit(run("generate", s2ft_pair.base, "--prompts", bad), 2, "bad.jsonl row 1", "'prompt'")
    assert_exit(run("generate", s2ft_pair.base), 2, "--prompt")
