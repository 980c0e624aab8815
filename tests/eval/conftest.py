"""Fixtures for the eval tests: two S2FT adapters trained on the tiny Llama, their merged models, small tasks."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparseft.models.arch import ROLES
from tests.eval.evallib import write_jsonl, write_task
from tests.helpers import write_arith
from tests.helpers import random_batches
from tests.methods.s2ft.s2ft_testlib import context, s2ft


def _train_adapter(base_dir: str, out, seed: int):
    """S2FT on every projection, a few large AdamW steps (so the adapters change the outputs), exported both ways."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    method = dict(projections=list(ROLES), heads={"count": 1}, channels={"count": 16}, seed=seed)
    m = s2ft(**method)
    ctx = context(model, **method)
    model = m.prepare(model, m.select(model, ctx), ctx)
    opt = torch.optim.AdamW(m.trainable_parameters(model).values(), lr=3e-2)
    model.train()
    for batch in random_batches(model.config.vocab_size, 3, seed=seed):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    m.save_adapter(model, out / f"adapter{seed}", base_dir)
    merged = m.merged(model)
    merged.save_pretrained(out / f"merged{seed}")
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out / f"merged{seed}")
    return out / f"adapter{seed}", out / f"merged{seed}"


@pytest.fixture(scope="session")
def s2ft_pair(tiny_model_dir, tmp_path_factory):
    """base_dir, adapters [a1, a2] and merged model directories [m1, m2] (mi = base with ai applied)."""
    base_dir = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("eval-adapters")
    made = [_train_adapter(base_dir, out, seed) for seed in (1, 2)]
    return SimpleNamespace(base=base_dir, adapters=[str(a) for a, _ in made], merged=[str(m) for _, m in made])


@pytest.fixture(scope="session")
def arith_tasks(tmp_path_factory):
    """Task files on small arithmetic data: perplexity, exact match (stripped), multiple choice."""
    d = tmp_path_factory.mktemp("eval-tasks")
    data = str(write_arith(d / "val.jsonl", 12, seed=3))
    rows = [json.loads(x) for x in open(data)]
    mc = write_jsonl(d / "mc.jsonl", [{"query": r["prompt"], "choices": [r["completion"].strip(), "1", "17"],
                                       "gold": 0} for r in rows])
    return SimpleNamespace(
        data=data,
        ppl=write_task(d / "ppl.yaml", metric="perplexity", data=data, form="completion"),
        em=write_task(d / "em.yaml", metric="exact_match", data=data, answer="stripped", batch_size=5,
                      generation={"max_new_tokens": 5}),
        mc=write_task(d / "mc.yaml", metric="multiple_choice", data=mc, normalize="tokens", batch_size=7),
    )
