"""One group a step: which weights change, where gradients stop, where the optimizer state lives, and the one-group
case against full fine-tuning. The driver makes the trainer's calls (tests/methods/hift/hift_testlib.py)."""

from __future__ import annotations

import pytest
import torch

from sparseft.methods.hift import HiFT
from tests.helpers import random_batches
from tests.methods.hift.hift_testlib import Driver, prepared


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_each_step_changes_only_the_active_group(load, optimizer):
    # Weight decay and momentum would move a frozen weight if the optimizer touched it: torch optimizers skip
    # parameters whose .grad is None, and HiFT leaves every inactive .grad None. Three cycles, so inactive groups
    # already have momentum / Adam state when they wait.
    d = Driver(load("llama"), {"name": "hift", "order": "random"}, optimizer=optimizer, weight_decay=0.1,
               grad_accum_steps=2, lr=1e-2)
    seen = []
    for _ in range(3 * d.method.num_groups):
        before = d.weights()
        stats = d.run_step()
        after = d.weights()
        active = d.group_names(stats["group"])
        seen.append(stats["group"])
        for name in before:
            if name in active:
                assert not torch.equal(before[name], after[name]), f"step {d.step}: active {name} did not change"
            else:
                assert torch.equal(before[name], after[name]), f"step {d.step}: inactive {name} changed"
    assert sorted(set(seen)) == list(range(d.method.num_groups))


@pytest.mark.parametrize("group, trained_blocks", [(3, []), (2, [1]), (1, [0, 1])])
def test_backward_stops_below_the_lowest_active_unit(load, group, trained_blocks):
    # group 3 = the head, 2 = block 1, 1 = block 0 (bottom_up, one unit a group)
    method, model, _ = prepared(load("llama"), {"name": "hift"})
    method.on_step_start(group, model, torch.optim.SGD(model.parameters(), lr=0.1))
    graph = {}
    hooks = [blk.register_forward_hook(lambda mod, inp, out, i=i: graph.__setitem__(i, out[0].requires_grad
                                       if isinstance(out, tuple) else out.requires_grad))
             for i, blk in enumerate(model.model.layers)]
    batch = random_batches(model.config.vocab_size, 1, length=10)[0]
    loss, _ = method.compute_loss(model, batch)
    for h in hooks:
        h.remove()
    # A block's output is in the autograd graph only if the block or one below it trains: below the active
    # group nothing is recorded, so backward has nowhere to go there.
    assert [i for i, g in graph.items() if g] == trained_blocks
    loss.backward()
    active = set(method.group_names(group))
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in active), name


def _parked_and_live(d: Driver):
    opt = d.engine.optimizer
    names = {id(p): n for n, p in d.model.named_parameters()}
    live = {names[id(p)]: s for p, s in opt.state.items() if s}
    return d.method._parked, live


def test_optimizer_state_exists_only_for_trained_groups_and_waits_off_the_device(load, monkeypatch):
    """The bookkeeping of parking, with stand-ins for the move: the park/fetch functions are replaced by ones that
    store state as float64 (a visible "offload location") and bring it back as float32. (The real functions' move to
    CPU is checked in test_hift_guards.py.) What is checked: which tensors are parked when, that only the active group's state is in the
    optimizer, that a parked tensor is never used by the optimizer in its parked form, that the round trip loses
    nothing, and that AdamW's per-parameter step counts each parameter's own updates."""
    monkeypatch.setattr(HiFT, "_park_tensor", lambda self, t: t.to(torch.float64))
    monkeypatch.setattr(HiFT, "_fetch_tensor", lambda self, t: t.to(torch.float32))
    d = Driver(load("llama"), {"name": "hift", "order": "top_down"}, weight_decay=0.1)
    trained: dict[str, int] = {}
    for _ in range(2 * d.method.num_groups + 1):
        active = d.group_names(d.run_step()["group"])
        for n in active:
            trained[n] = trained.get(n, 0) + 1
        parked, live = _parked_and_live(d)
        assert set(live) == active  # the optimizer holds the active group's state only
        assert set(parked) == set(trained) - active  # state exists only for weights that have trained
        for n, s in live.items():
            assert s["exp_avg"].dtype == torch.float32 and int(s["step"]) == trained[n]
        for n, s in parked.items():
            assert s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float64, n
            assert int(s["step"]) == trained[n]
    # The same run with the real (on CPU: no-op) offload gives the same weights: the round trip loses nothing.
    monkeypatch.undo()
    ref = Driver(load("llama"), {"name": "hift", "order": "top_down"}, weight_decay=0.1)
    for _ in range(d.step):
        ref.run_step()
    for n, w in ref.weights().items():
        torch.testing.assert_close(d.weights()[n], w, rtol=0, atol=0)


def test_parking_on_cpu_copies_nothing(load):
    d = Driver(load("llama"), {"name": "hift"}, optimizer="sgd")
    d.run_step()
    (p0,) = [p for n, p in d.model.named_parameters() if n == "model.embed_tokens.weight"]
    ptr = d.engine.optimizer.state[p0]["momentum_buffer"].data_ptr()
    d.run_step()  # the embeddings' group waits: its momentum moves to the method's store, not to new memory
    assert p0 not in d.engine.optimizer.state or not d.engine.optimizer.state[p0]
    assert d.method._parked["model.embed_tokens.weight"]["momentum_buffer"].data_ptr() == ptr
    for _ in range(d.method.num_groups - 1):
        d.run_step()  # its turn again: the same buffer is handed back
    assert d.engine.optimizer.state[p0]["momentum_buffer"].data_ptr() == ptr


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_one_group_of_everything_is_full_fine_tuning(load, optimizer):
    train = dict(optimizer=optimizer, weight_decay=0.05, grad_accum_steps=2, schedule="cosine", warmup_steps=2,
                 max_steps=6, max_grad_norm=0.5)
    hift = Driver(load("llama"), {"name": "hift", "group_size": 100}, **train)
    full = Driver(load("llama"), {"name": "full"}, **train)
    assert hift.method.num_groups == 1
    for _ in range(6):
        a, b = hift.run_step(), full.run_step()
        assert a["lr"] == b["lr"]
        wa, wb = hift.weights(), full.weights()
        for n in wb:
            torch.testing.assert_close(wa[n], wb[n], rtol=0, atol=1e-6)
    assert {k: hift.method.state_dict()[k] for k in ("next_step", "cycle", "position")} == \
        {"next_step": 6, "cycle": 6, "position": 0}, "one group: every step is a cycle"
