"""S2FT's per-q-head unit (`heads.unit: q_head`, issue 17 item 7): o's columns of single q heads train in place, on GQA
models too; gradients match dense autograd, and the adapter and the merged model reproduce the trained model."""

from __future__ import annotations

import copy

import pytest
import torch

from sparseft.errors import UserError
from sparseft.export.apply import adapter_applied
from sparseft.methods.s2ft.layers import SliceLinear
from sparseft.models.arch import arch_of
from tests.helpers import random_batches
from tests.methods.s2ft.s2ft_testlib import context, logits, recipe, s2ft

METHOD = dict(projections=["o", "down"], heads={"count": 1, "unit": "q_head"}, channels={"count": 4},
              strategy="weight")


@pytest.mark.parametrize("arch", ["mistral", "qwen3"])
def test_q_head_trains_one_heads_o_columns_like_dense_autograd(load, arch, tmp_path):
    base = load(arch)
    spec = arch_of(base)
    assert spec.num_heads == 2 * spec.num_kv_heads  # GQA: a kv group would be 2 q heads
    batch = random_batches(base.config.vocab_size, 1, batch=2)[0]
    ids = batch["input_ids"]
    dense = copy.deepcopy(base)
    m = s2ft(**METHOD)
    ctx = context(base, **METHOD)
    sel = m.select(base, ctx)
    assert sel["unit"] == "q_head" and sel["num_q_heads"] == spec.num_heads
    assert all(len(sel["heads"][str(layer)]) == 1 for layer in range(spec.num_layers))
    model = m.prepare(base, sel, ctx)
    torch.testing.assert_close(logits(model, ids), logits(dense, ids), rtol=1e-5, atol=1e-5)

    # One backward: the o slice's gradient is the dense gradient of exactly that head's columns of o.
    dense.requires_grad_(False)
    for layer in range(spec.num_layers):
        spec.proj(dense, layer, "o").weight.requires_grad_(True)
    model.train(), dense.train()
    model(**batch).loss.backward()
    dense(**batch).loss.backward()
    for layer in range(spec.num_layers):
        o = spec.proj(model, layer, "o")
        assert isinstance(o, SliceLinear) and o.trainable.shape == (spec.hidden_size, spec.head_dim)
        h = sel["heads"][str(layer)][0]
        cols = slice(h * spec.head_dim, (h + 1) * spec.head_dim)
        torch.testing.assert_close(o.trainable.grad, spec.proj(dense, layer, "o").weight.grad[:, cols],
                                   rtol=1e-4, atol=1e-6)
        for role in ("q", "k", "v"):
            assert not any(p.requires_grad for p in spec.proj(model, layer, role).parameters())

    # A few steps, then the adapter on the untouched base and the merged model give the trained model's outputs.
    opt = torch.optim.AdamW(m.trainable_parameters(model).values(), lr=3e-2)
    for b in random_batches(base.config.vocab_size, 3, seed=1):
        opt.zero_grad()
        model(**b).loss.backward()
        opt.step()
    trained = logits(model, ids)
    m.save_adapter(model, tmp_path / "adapter", "base")
    fresh = load(arch)
    assert not torch.allclose(logits(fresh, ids), trained, atol=1e-4), "training changed the outputs"
    with adapter_applied(fresh, tmp_path / "adapter") as adapted:
        torch.testing.assert_close(logits(adapted, ids), trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(m.merged(model), ids), trained, rtol=1e-5, atol=1e-5)


def test_q_head_budgets_are_finer_and_exclude_qkv(load):
    model = load("mistral")  # 4 q heads, 2 kv heads a layer
    sel = s2ft(projections=["o"], heads={"ratio": 0.25, "unit": "q_head"}).select(model, context(model))
    assert all(len(v) == 1 for v in sel["heads"].values())  # 0.25 of 4 q heads; 0.25 of 2 kv groups selects none
    with pytest.raises(UserError, match="selects no unit of the 2 kv groups"):
        s2ft(projections=["o"], heads={"ratio": 0.25}).select(model, context(model))
    with pytest.raises(UserError) as e:
        recipe(projections=["q", "o"], heads={"count": 1, "unit": "q_head"})
    assert "q_head" in str(e.value.problems)
