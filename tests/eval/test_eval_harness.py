"""The lm-evaluation-harness bridge (lm-eval is in the `test` extra, so this always runs): on local task files the
harness, driving sparseft's in-memory model, gives the native scores and standard errors, and both drop when the
answers are wrong; the CLI passes its harness flags through and checks gate names before loading a model."""

from __future__ import annotations

import json
import math

import lm_eval  # noqa: F401  (a missing lm-eval is a failure here, never a skip)
import pytest
from typer.testing import CliRunner

from sparseft.cli import app
from sparseft.eval.harness import HarnessOptions, make_lm, run_harness
from sparseft.eval.runner import evaluate, run_task
from sparseft.eval.tasks import load_task, validate_task
from tests.eval.evallib import bigram, char_tokenizer, cid, harness_gen_yaml, harness_mc_yaml, write_jsonl
from tests.eval.test_eval_metrics import ARITH, SAYS_7


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _both(tmp_path, name, rows, model, tok, native_spec, harness_yaml):
    """(native metrics, harness metrics) of one data set."""
    data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    native = run_task(validate_task({"data": data, **native_spec}, name), model, tok)
    [(task, bridged)] = run_harness(model, tok, [harness_yaml(tmp_path / f"h_{name}.yaml", data)])
    assert task == f"h_{name}"
    return native, bridged


def test_bridge_exact_match_equals_native_and_drops_when_wrong(tmp_path):
    tok, model = char_tokenizer(), bigram(SAYS_7)  # says " 7" to every sum: right on 2 of 4
    spec = {"metric": "exact_match", "answer": "stripped", "generation": {"max_new_tokens": 5}}
    native, bridged = _both(tmp_path, "right", ARITH, model, tok, spec, harness_gen_yaml)
    assert (native["correct"], native["n"]) == (2, 4) and bridged["n"] == 4
    assert bridged["exact_match:strip"] == native["exact_match"] == 0.5
    assert bridged["exact_match_stderr:strip"] == pytest.approx(native["exact_match_stderr"]) \
        == pytest.approx(math.sqrt(0.5 * 0.5 / 3))
    wrong = [dict(r, completion=" 8") if r["completion"] == " 7" else r for r in ARITH]  # the two it got right
    native, bridged = _both(tmp_path, "wrong", wrong, model, tok, spec, harness_gen_yaml)
    assert bridged["exact_match:strip"] == native["exact_match"] == 0.0


def test_bridge_multiple_choice_equals_native_and_drops_when_wrong(tmp_path):
    tok = char_tokenizer()
    # After "q " the stub prefers "a", then "b", then the rest; per character the long "bbb" beats "a": by sum the
    # picks are a, a, a, a (right on 2), per character bbb, bbb, a, bbb (right on 3).
    model = bigram({(" ", "a"): 3.0, (" ", "b"): 2.6, ("b", "b"): 3.0})
    rows = [{"query": "q", "choices": ["a", "bbb"], "gold": 0}, {"query": "q", "choices": ["bbb", "a"], "gold": 0},
            {"query": "q", "choices": ["c", "a"], "gold": 1}, {"query": "q", "choices": ["a", "c", "bbb"], "gold": 2}]
    spec = {"metric": "multiple_choice", "normalize": "chars"}
    native, bridged = _both(tmp_path, "right", rows, model, tok, spec, harness_mc_yaml)
    assert (native["acc"], native["acc_norm"]) == (0.5, 0.75)
    assert native["accuracy"] == native["acc_norm"]  # normalize: chars is lm-eval's acc_norm
    for metric in ("acc", "acc_norm"):
        assert bridged[metric] == native[metric]
        assert bridged[f"{metric}_stderr"] == pytest.approx(native[f"{metric}_stderr"])
    # The right answer becomes "c", which neither score ever picks.
    wrong = [dict(r, choices=[("c" if i == r["gold"] else c) for i, c in enumerate(r["choices"])]) for r in rows]
    native, bridged = _both(tmp_path, "wrong", wrong, model, tok, spec, harness_mc_yaml)
    assert bridged["acc"] == native["acc"] == 0.0 and bridged["acc_norm"] == native["acc_norm"] == 0.0


def test_bridge_rolling_loglikelihood_by_hand(tmp_path):
    tok = char_tokenizer()
    model = bigram({("a", "b"): 2.0, ("b", "a"): 1.0})
    lm = make_lm(model, tok, batch_size=2, max_length=3)  # windows of 3: "abab a" spans three
    import torch
    from lm_eval.api.instance import Instance

    logp = torch.log_softmax(model.table, dim=-1)
    text = "abab a"
    ids = [cid("<s>")] + [cid(c) for c in text]  # BOS, else EOS, starts the document
    by_hand = sum(float(logp[a, b]) for a, b in zip(ids, ids[1:]))
    [got] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert got == pytest.approx(by_hand, abs=1e-5)


def test_bridge_on_a_loaded_model_with_an_adapter(tmp_path, s2ft_pair, arith_tasks):
    """The wiring of `evaluate`: harness tasks scored with the adapter in effect agree with native ones."""
    mc = load_task(arith_tasks.mc)
    choice = harness_mc_yaml(tmp_path / "h_mc.yaml", mc.data)
    results = evaluate(s2ft_pair.base, [mc], adapters=s2ft_pair.adapters[:1], harness_tasks=[choice])
    by_task = {r.task: r.metrics for r in results}
    assert by_task["h_mc"]["n"] == by_task["mc"]["n"] == 12
    assert by_task["h_mc"]["acc"] == by_task["mc"]["acc"] and by_task["h_mc"]["acc_norm"] == by_task["mc"]["acc_norm"]
    model_config_length = json.loads(open(f"{s2ft_pair.base}/config.json").read())["max_position_embeddings"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert make_lm(AutoModelForCausalLM.from_pretrained(s2ft_pair.base),
                   AutoTokenizer.from_pretrained(s2ft_pair.base)).max_length == model_config_length


def test_cli_passes_harness_flags_and_checks_gates_first(tmp_path, tiny_model_dir, arith_tasks, monkeypatch):
    runner = CliRunner()
    model = tiny_model_dir("llama")
    gen = harness_gen_yaml(tmp_path / "h_gen.yaml", arith_tasks.data)
    seen = {}

    def fake_simple_evaluate(**kwargs):
        seen.update(kwargs)
        return {"results": {"h_gen": {"exact_match,strip": 0.25, "exact_match_stderr,strip": 0.1, "sample_len": 3}}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_simple_evaluate)
    out = tmp_path / "e.json"
    r = runner.invoke(app, ["eval", model, "--task", str(arith_tasks.em), "--harness-task", gen, "--limit", "3",
                            "--num-fewshot", "2", "--apply-chat-template", "--batch-size", "5", "--json", str(out),
                            "--fail-under", "h_gen.exact_match:strip=0.5"])
    assert r.exit_code == 1 and "h_gen exact_match:strip 0.2500 is below 0.5" in r.output, r.output
    assert (seen["limit"], seen["num_fewshot"], seen["apply_chat_template"]) == (3, 2, True)
    assert seen["model"].batch_size == 5
    assert seen["model"].max_length == json.loads(open(f"{model}/config.json").read())["max_position_embeddings"]
    results = {x["task"]: x for x in json.loads(out.read_text())["results"]}
    assert results["em"]["n"] == 3  # --limit cuts native tasks too
    assert results["h_gen"]["exact_match_stderr:strip"] == 0.1
    assert "±" in r.output
    # A gate on a native task is checked before any model loads (the model path here does not exist), harness
    # tasks or not.
    r = runner.invoke(app, ["eval", str(tmp_path / "no-model"), "--task", str(arith_tasks.em), "--harness-task", gen,
                            "--fail-under", "em.accuracy=0.5"])
    assert r.exit_code == 2 and "em.accuracy: no such metric" in r.output, r.output
