"""Weight decay never moves a LaMDA adapter away from its start: S and B take no decay (issue 17, item 1)."""

from __future__ import annotations

import pytest
import torch

from sparseft.train.optim import Engine
from tests.methods.lamda.lamda_testlib import batch, lamda_layers, logits, prepared


@pytest.mark.parametrize("init", ["spectrum", "zero"])
def test_decay_with_a_zero_loss_leaves_the_model_unchanged(load, init):
    p = prepared(load("llama"), r=4, init=init, projections=["q", "o", "down"], max_steps=50,
                 freeze_b={"start": 1.0, "end": 1.0}, train={"weight_decay": 0.1})
    model = p.model
    ids = batch(model.config.vocab_size)["input_ids"]
    before = logits(model, ids)
    b0 = {n: m.lamda_B.detach().clone() for n, m in lamda_layers(model).items()}
    groups = p.method.optimizer_param_groups(model, 0.1)
    assert all(g["weight_decay"] == 0.0 for g in groups)
    model.train()
    engine = Engine(model, groups, p.recipe.train)
    for step in range(50):
        p.method.on_step_start(step, model, engine.optimizer)
        loss, _ = p.method.compute_loss(model, batch(model.config.vocab_size, seed=step))
        engine.backward(loss * 0.0)
        engine.step()
        p.method.on_step_end(step, model, engine.optimizer)
    assert torch.equal(logits(model, ids), before), "decay moved the adapter (it pulls S and B toward zero)"
    for n, m in lamda_layers(model).items():
        assert torch.equal(m.lamda_B.detach(), b0[n])
