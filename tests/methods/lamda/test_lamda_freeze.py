"""B freezes direction by direction and then wholly; frozen means frozen, with momentum and weight decay on."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sparseft.methods.lamda.layers import LamdaLinear
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


def test_columns_the_optimizer_does_not_hold_are_pinned_and_written_back():
    """One layer by hand. Where the optimizer holds a column itself, freezing it drops its state; where it does not
    (ZeRO's flat copies; no optimizer at all), the column's value is pinned and restore_frozen writes it back after a
    step moved it. Freezes add up. new_columns names exactly the columns a freeze would add (what ZeRO-3 gathers)."""
    g = torch.Generator().manual_seed(0)
    layer = LamdaLinear(nn.Linear(5, 3), torch.randn(4, 5, generator=g), torch.randn(4, 4, generator=g),
                        torch.randn(3, 4, generator=g), scale=2.0)
    cols = layer.lamda_B_cols
    opt = torch.optim.SGD([cols[0], cols[1]], lr=0.1, momentum=0.9)  # holds columns 0 and 1, not 2 and 3
    layer(torch.randn(2, 5, generator=g)).sum().backward()
    opt.step()
    assert cols[0] in opt.state and cols[1] in opt.state

    def ids(params):
        return [id(c) for c in params]

    first = torch.tensor([True, False, True, False])
    assert ids(layer.new_columns(first)) == ids([cols[0], cols[2]])
    layer.freeze_directions(first, opt)
    assert layer.frozen == [True, False, True, False] and list(layer.pinned) == [2]
    assert cols[0] not in opt.state and cols[1] in opt.state
    assert [c.requires_grad for c in cols] == [False, True, False, True] and cols[0].grad is None
    assert ids(layer.new_columns(torch.tensor([True, True, True, False]))) == [id(cols[1])]
    layer.freeze_directions(torch.tensor([False, False, False, True]), None)  # no optimizer: pinned
    assert layer.frozen == [True, False, True, True] and sorted(layer.pinned) == [2, 3]
    assert layer.trainable_count() == 4 * 4 + 3 * 1

    before = [c.detach().clone() for c in cols]
    with torch.no_grad():
        for c in cols:  # a step that moves every column, as ZeRO's flat update does
            c.add_(1.0)
    layer.restore_frozen()
    assert [torch.equal(c, b) for c, b in zip(cols, before)] == [False, False, True, True]
