"""B freezes direction by direction and then wholly; frozen means frozen, with momentum and weight decay on."""

from __future__ import annotations

import pytest
import torch

from sparseft.methods.lamda.method import frozen_count
from tests.methods.lamda.lamda_testlib import lamda_layers, prepared, train_steps

R, STEPS = 6, 10  # freeze_b 0.2 .. 0.8 of 10 steps: direction j freezes at step 2 + j + 1 ... wholly from step 8


def test_frozen_count_schedule():
    assert [frozen_count(s, 6, 2, 8) for s in range(10)] == [0, 0, 0, 1, 2, 3, 4, 5, 6, 6]
    assert [frozen_count(s, 4, 3, 3) for s in range(5)] == [0, 0, 0, 4, 4]  # start == end: all at once
    assert [frozen_count(s, 3, 0, 10) for s in (0, 3, 4, 9, 10)] == [0, 0, 1, 2, 3]


@pytest.mark.parametrize("optimizer,order", [("adamw", "largest"), ("sgd", "smallest")])
def test_frozen_directions_never_change(load, optimizer, order):
    p = prepared(load("llama"), r=R, init="spectrum", projections=["q", "down"], max_steps=STEPS,
                 freeze_b={"start": 0.2, "end": 0.8, "order": order},
                 train={"optimizer": optimizer, "momentum": 0.9, "weight_decay": 0.1})
    model = p.model
    layers = lamda_layers(model)
    a0 = {n: m.lamda_A.clone() for n, m in layers.items()}
    s0 = {n: m.lamda_S.detach().clone() for n, m in layers.items()}
    history = []  # B of every layer after each step
    grads_checked = []

    def check(step, engine):
        history.append({n: m.lamda_B.detach().clone() for n, m in layers.items()})
        for m in layers.values():
            # A frozen column has no gradient and its optimizer state is freed at once; the others keep theirs.
            for j, col in enumerate(m.lamda_B_cols):
                assert m.frozen[j] == (not col.requires_grad)
                if m.frozen[j]:
                    assert col.grad is None and not engine.optimizer.state.get(col) and j not in m.pinned
                else:
                    assert engine.optimizer.state[col]["exp_avg" if optimizer == "adamw" else "momentum_buffer"] \
                        is not None
            if step >= 8:  # wholly frozen
                assert m.n_frozen == R
            elif m.n_frozen:
                grads_checked.append(step)

    def zero_grads(step, engine):  # after backward, before the optimizer step
        for m in layers.values():
            for j, col in enumerate(m.lamda_B_cols):
                if m.frozen[j]:
                    assert col.grad is None, "frozen directions get no gradient"

    logged = train_steps(p.method, p.recipe, model, STEPS, weight_decay=0.1, on_step=check,
                         before_step=zero_grads)

    for name, m in layers.items():
        assert torch.equal(m.lamda_A, a0[name]), "A never changes"
        assert not torch.equal(m.lamda_S.detach(), s0[name]), "S trains"
        for j in range(R):
            col = j if order == "largest" else R - 1 - j
            froze_at = 3 + j  # first step during which direction j is frozen
            assert not torch.equal(history[froze_at - 2][name][:, col], history[froze_at - 1][name][:, col]), \
                "B trains until its direction freezes"
            for later in history[froze_at:]:
                assert torch.equal(later[name][:, col], history[froze_at - 1][name][:, col]), \
                    f"direction {col} of {name} moved after it froze at step {froze_at}"
    assert grads_checked, "the gradient check ran"
    counts = [x["trainable_params"] for x in logged]
    n_s = sum(m.lamda_S.numel() for m in layers.values())
    d_out = sum(m.lamda_B.shape[0] for m in layers.values())
    assert counts == [n_s + d_out * (R - frozen_count(s, R, 2, 8)) for s in range(STEPS)]
    assert counts[-1] == n_s, "after the full freeze only S trains"
