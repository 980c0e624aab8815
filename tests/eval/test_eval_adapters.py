"""Adapters in evaluation and generation: a base with several adapters scores (and generates) exactly as each merged
model does; S2FT adapters mixed row by row in one batch generate token for token what each fused adapter does."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparseft.eval.runner import evaluate
from sparseft.eval.tasks import load_task
from sparseft.export.sparse_adapters import fuse, load_sparse_adapter, unfuse
from sparseft.infer import Sampling, generate, prompt_ids
from sparseft.infer.run import Request, run_generation

PROMPTS = ["3 + 4 =", "12 + 13 = 25\n7 + 1 =", "Sparse", "9 + 9 =", "The quick brown fox jumps"]


def _by(results, **key):
    return {r.task: r.metrics for r in results if all(getattr(r, k) == v for k, v in key.items())}


def test_adapters_in_turn_score_as_merged_models(s2ft_pair, arith_tasks):
    tasks = [load_task(p) for p in (arith_tasks.ppl, arith_tasks.em, arith_tasks.mc)]
    samples = []
    results = evaluate(s2ft_pair.base, tasks, adapters=s2ft_pair.adapters, baselines=[s2ft_pair.base],
                       samples=samples)
    assert [(r.adapter is None, r.baseline) for r in results] == [(True, True)] * 3 + [(False, False)] * 6
    base = _by(results, adapter=None)
    for adapter, merged_dir in zip(s2ft_pair.adapters, s2ft_pair.merged):
        merged_samples = []
        want = _by(evaluate(merged_dir, tasks, samples=merged_samples), model=merged_dir)
        got = _by(results, adapter=adapter)
        assert got["ppl"]["perplexity"] == pytest.approx(want["ppl"]["perplexity"], rel=1e-5)
        assert got["ppl"]["perplexity"] != pytest.approx(base["ppl"]["perplexity"], rel=1e-3)  # the adapter matters
        assert got["mc"] == want["mc"] and got["em"] == want["em"]
        gen = [s["generated"] for s in samples if s["adapter"] == adapter and s["task"] == "em"]
        assert gen == [s["generated"] for s in merged_samples if s["task"] == "em"]
    # The base model is restored after the adapters: scoring it again gives the baseline's numbers.
    again = _by(evaluate(s2ft_pair.base, tasks[:1]), adapter=None)
    assert again["ppl"]["perplexity"] == pytest.approx(base["ppl"]["perplexity"], rel=1e-6)


def test_mixed_adapter_generation_equals_each_fused(s2ft_pair):
    base = AutoModelForCausalLM.from_pretrained(s2ft_pair.base, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(s2ft_pair.base)
    adapters = [load_sparse_adapter(a, base) for a in s2ft_pair.adapters]
    ids = [prompt_ids(tok, p) for p in PROMPTS]
    which = [0, 1, -1, 1, 0]
    sampling = Sampling(max_new_tokens=8)
    mixed = generate(base, tok, ids, sampling, batch_size=5, adapters=adapters, row_adapter=which)
    for i, (p, a) in enumerate(zip(ids, which)):
        if a >= 0:
            fuse(base, adapters[a])
        alone = generate(base, tok, [p], sampling)[0]  # unpadded, the adapter fused into the weights
        if a >= 0:
            unfuse(base, adapters[a])
        assert mixed[i].token_ids == alone.token_ids, (i, a)
    assert len({tuple(g.token_ids) for g in mixed}) > 1


def test_generate_rows_name_their_adapters(s2ft_pair):
    labels = [a.rsplit("/", 1)[1] for a in s2ft_pair.adapters]  # adapter1, adapter2
    # By label, by index, "base", none (each adapter in turn), and by the path given to --adapter.
    reqs = [Request({"prompt": "3 + 4 =", "id": 7}, "r1", labels[1]), Request({"prompt": "Sparse"}, "r2", 0),
            Request({"prompt": "9 + 9 ="}, "r3", "base"), Request({"prompt": "The quick"}, "r4"),
            Request({"prompt": "1 + 1 ="}, "r5", str(s2ft_pair.adapters[1]))]
    out = run_generation(s2ft_pair.base, reqs, s2ft_pair.adapters, Sampling(max_new_tokens=6), batch_size=3)
    assert [(r["prompt"], r["adapter"]) for r in out] == [
        ("3 + 4 =", labels[1]), ("Sparse", labels[0]), ("9 + 9 =", None), ("The quick", labels[0]),
        ("The quick", labels[1]), ("1 + 1 =", labels[1])]
    assert out[0]["id"] == 7
    # Each row's text is what its merged model (or the base) generates for it.
    paths = [s2ft_pair.base if r["adapter"] is None else s2ft_pair.merged[labels.index(r["adapter"])] for r in out]
    for path in set(paths):
        mine = [r for r, p in zip(out, paths) if p == path]
        alone = run_generation(path, [Request({"prompt": r["prompt"]}, "x") for r in mine],
                               sampling=Sampling(max_new_tokens=6))
        for r, a in zip(mine, alone):
            assert (a["completion"], a["new_tokens"]) == (r["completion"], r["new_tokens"]), json.dumps(r)
