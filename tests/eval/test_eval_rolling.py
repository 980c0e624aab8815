"""Perplexity over whole documents and the standard errors: a long document scored in rolling windows equals the
same windows computed with plain transformers; nothing is cut; the errors equal their formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparseft.eval.perplexity import perplexity_metrics
from sparseft.eval.runner import run_task
from sparseft.eval.stats import binomial_stderr
from sparseft.eval.tasks import validate_task
from tests.eval.evallib import write_jsonl

LONG = ("Sparse fine tuning picks a few heads and channels in every block and trains them as one dense slice, "
        "while the frozen rest still passes gradients through to the layers below. ") * 2


@torch.no_grad()
def _by_hand(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """Summed NLL and count of targets 1..T-1, in windows written out here: the first feeds ids[0:L] and scores
    ids[1:L+1]; each next one scores the next `stride` targets from the L tokens before them."""
    nll, scored, end = 0.0, 0, 0
    while end < len(ids) - 1:
        new = max_length if end == 0 else stride
        targets = list(range(end + 1, min(end + 1 + new, len(ids))))
        feed = ids[max(0, targets[-1] - max_length):targets[-1]]
        logp = torch.log_softmax(model(input_ids=torch.tensor([feed])).logits[0].float(), dim=-1)
        for j in targets:  # feed[k] is ids[targets[-1] - len(feed) + k]; the logits at k predict the token after it
            k = j - 1 - (targets[-1] - len(feed))
            nll -= float(logp[k, ids[j]])
        scored += len(targets)
        end = targets[-1]
    return nll, scored


@pytest.mark.slow
def test_long_document_equals_windows_by_hand(tmp_path, tiny_model_dir):
    path = tiny_model_dir("llama")  # windows are plain forwards: no architecture enters (GQA: test_eval_lmeval)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    short = "Two plus two is four."
    data = write_jsonl(tmp_path / "long.jsonl", [{"text": LONG}, {"text": short}])
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in (LONG, short)]
    assert len(ids[0]) > 3 * 24  # several windows
    for stride in (24, 9):
        task = validate_task({"metric": "perplexity", "data": data, "max_length": 24, "stride": stride,
                              "batch_size": 3}, "long")
        m = run_task(task, model, tok)
        hand = [_by_hand(model, x, 24, stride) for x in ids]
        nll, tokens = sum(h[0] for h in hand), sum(h[1] for h in hand)
        assert m["tokens"] == tokens == len(ids[0]) - 1 + len(ids[1]) - 1  # every token but the first of each row
        assert m["loss"] * m["tokens"] == pytest.approx(nll, rel=1e-5)
        words, nbytes = len(LONG.split()) + len(short.split()), len(LONG.encode()) + len(short.encode())
        assert (m["words"], m["bytes"], m["documents"]) == (words, nbytes, 2)
        assert m["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
        assert m["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-5)
        assert m["byte_perplexity"] == pytest.approx(math.exp(nll / nbytes), rel=1e-5)
        assert m["bits_per_byte"] == pytest.approx(nll / nbytes / math.log(2), rel=1e-5)
    # A window as long as the document is one plain forward.
    whole = validate_task({"metric": "perplexity", "data": data, "max_length": 4096, "limit": 1}, "long")
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids[0]])).logits[0], dim=-1)
    nll = -float(logp[torch.arange(len(ids[0]) - 1), torch.tensor(ids[0][1:])].sum())
    assert run_task(whole, model, tok)["loss"] * (len(ids[0]) - 1) == pytest.approx(nll, rel=1e-5)


def test_completion_form_scores_only_the_answer_however_long_the_prompt(tmp_path, tiny_model_dir):
    path = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    data = write_jsonl(tmp_path / "c.jsonl", [{"prompt": LONG + " 3 + 4 =", "completion": " 7"}])
    m = run_task(validate_task({"metric": "perplexity", "data": data, "form": "completion", "max_length": 16},
                               "c"), model, tok)
    prompt = tok(LONG + " 3 + 4 =", add_special_tokens=False)["input_ids"]
    answer = tok(" 7", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = prompt + answer
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids[len(ids) - 1 - 16:-1]])).logits[0], dim=-1)
    nll = -sum(float(logp[16 - len(answer) + k, t]) for k, t in enumerate(answer))  # the last window, 16 tokens
    assert m["tokens"] == len(answer) and m["loss"] * len(answer) == pytest.approx(nll, rel=1e-5)
    assert (m["words"], m["bytes"]) == (1, 2)


def test_binomial_stderr_formula(tmp_path):
    assert binomial_stderr(2, 4) == pytest.approx(math.sqrt(0.5 * 0.5 / 3))
    assert binomial_stderr(3, 10) == pytest.approx(float(np.std([1] * 3 + [0] * 7, ddof=1) / math.sqrt(10)))
    assert binomial_stderr(0, 5) == 0.0 and math.isnan(binomial_stderr(1, 1))


def test_bootstrap_stderr_of_a_fixed_sample():
    # Equal token, word and byte counts: the loss is the mean of the per-document losses, whose bootstrap standard
    # error is the plug-in standard deviation over sqrt(n); the perplexity's follows by the delta method.
    per_doc = np.array([2.0, 2.2, 1.9, 2.1, 2.4, 1.8, 2.0, 2.3, 2.2, 1.7, 2.1, 1.9])
    n, tokens = len(per_doc), np.full(len(per_doc), 50)
    m = perplexity_metrics(per_doc * 50, tokens, np.full(n, 10), np.full(n, 40), iters=20000)
    se_loss = per_doc.std(ddof=0) / math.sqrt(n)
    assert m["loss"] == pytest.approx(per_doc.mean())
    assert m["loss_stderr"] == pytest.approx(se_loss, rel=0.03)
    assert m["perplexity_stderr"] == pytest.approx(math.exp(per_doc.mean()) * se_loss, rel=0.05)
    assert m["bits_per_byte_stderr"] == pytest.approx(se_loss * 50 / 40 / math.log(2), rel=0.03)
    assert m["word_perplexity_stderr"] > m["perplexity_stderr"]
    again = perplexity_metrics(per_doc * 50, tokens, np.full(n, 10), np.full(n, 40), iters=20000)
    assert again == m  # seeded
    same = perplexity_metrics(np.full(n, 100.0), tokens, np.full(n, 10), np.full(n, 40))
    assert same["loss_stderr"] == pytest.approx(0, abs=1e-12)
    assert same["perplexity_stderr"] == pytest.approx(0, abs=1e-9)
    assert math.isnan(perplexity_metrics(np.array([5.0]), np.array([3]), np.array([1]), np.array([4]))["loss_stderr"])
