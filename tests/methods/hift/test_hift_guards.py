"""The guards that keep a waiting group still, each on its own: the `.grad` of inactive weights dropped at the start
of a step, the `active` flag of the optimizer's param groups, and the real move of parked optimizer state to CPU."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import random_batches
from tests.methods.hift.hift_testlib import Driver, prepared


def test_inactive_weights_lose_their_gradient_at_step_start(load):
    """A gradient left on a weight whose group now waits (zeros from zero_grad(set_to_none=False), or a gradient from
    an earlier backward) would let any torch optimizer decay it and step its momentum. on_step_start drops it, so even
    a plain optimizer without the trainer's skip of inactive groups leaves waiting weights as they are."""
    method, model, _ = prepared(load("llama"), {"name": "hift", "order": "random"})
    model.train()
    opt = torch.optim.SGD(method.optimizer_param_groups(model, 0.1), lr=0.05, momentum=0.9)
    names = dict(model.named_parameters())
    batch = random_batches(model.config.vocab_size, 1, length=10)[0]
    for step in range(2 * method.num_groups):
        for p in names.values():  # every weight holds a gradient when the step starts
            if p.grad is None:
                p.grad = torch.ones_like(p)
        method.on_step_start(step, model, opt)
        active = set(method.group_names(method.group_at(step)))
        for n, p in names.items():
            assert (p.grad is None) == (n not in active), f"step {step}: {n}"
        before = {n: p.detach().clone() for n, p in names.items()}
        loss, _ = method.compute_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        for n, p in names.items():
            assert torch.equal(p.detach(), before[n]) == (n not in active), f"step {step}: {n}"


def test_waiting_groups_take_no_step_even_with_a_gradient(load):
    """ZeRO hands the optimizer a gradient for every group (zeros for those that did not train). Only the `active`
    flag of each param group, set by on_step_start to the step's group, keeps the others out of the step: AdamW's
    weight decay and its moments from earlier turns would move them."""
    d = Driver(load("llama"), {"name": "hift", "order": "random"}, weight_decay=0.1, lr=1e-2)
    opt = d.engine.optimizer
    for step in range(2 * d.method.num_groups):
        d.method.on_step_start(step, d.model, opt)
        g = d.method.group_at(step)
        assert [pg["active"] for pg in opt.param_groups] == [pg["hift_group"] == g for pg in opt.param_groups]
        active = d.group_names(g)
        loss, _ = d.method.compute_loss(d.model, d.batches[step])
        d.engine.backward(loss)
        for n, p in d.model.named_parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        before = d.weights()
        d.engine.step()
        d.method.on_step_end(step, d.model, opt)
        for n, w in d.weights().items():
            assert torch.equal(w, before[n]) == (n not in active), f"step {step}: {n}"


@pytest.mark.parametrize("offload", [True, False])
def test_parked_state_is_moved_to_cpu_only_with_offload(load, monkeypatch, offload):
    """The real park and fetch, not stand-ins. On a CPU-only machine a move to CPU changes no memory, so the calls
    are watched instead (Tensor.to still runs): with offload every parked tensor is what `.to("cpu")` returned, and
    without it none is; whatever comes back to the optimizer is the parked tensor moved to its weight's device."""
    real_to = torch.Tensor.to
    to_cpu: list[torch.Tensor] = []  # results of .to(<cpu>) calls during the current on_step_start

    def watch(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu":
            to_cpu.append(out)
        return out

    d = Driver(load("llama"), {"name": "hift", "offload": offload}, weight_decay=0.1)
    opt = d.engine.optimizer
    params = dict(d.model.named_parameters())
    parked_before: set[str] = set()
    for step in range(2 * d.method.num_groups):
        monkeypatch.setattr(torch.Tensor, "to", watch)
        to_cpu.clear()
        d.method.on_step_start(step, d.model, opt)
        monkeypatch.undo()
        parked = d.method._parked
        # AdamW's `step` stays where the optimizer keeps it (a CPU scalar): it is never moved, either way.
        for name in set(parked) - parked_before:  # parked in this call
            for key, t in parked[name].items():
                assert any(t is x for x in to_cpu) == (offload and key != "step"), (step, name, key)
                assert t.device.type == "cpu"
        for name in parked_before - set(parked):  # handed back in this call: fetched to the weight's device
            for key, t in opt.state[params[name]].items():
                assert any(t is x for x in to_cpu) == (key != "step"), (step, name, key)
        parked_before = set(parked)
        loss, _ = d.method.compute_loss(d.model, d.batches[step])
        d.engine.backward(loss)
        d.engine.step()
        d.method.on_step_end(step, d.model, opt)
    assert parked_before, "nothing was parked: the check above was empty"
    assert "step" in opt.state[params[next(iter(d.group_names(d.method._active)))]], "the step check was empty"


def test_optimizer_state_that_is_not_a_weights_is_left_where_it_is(load):
    """Under ZeRO the optimizer keeps its state for its own flat partitions, not for the model's weights. HiFT parks
    only what is kept per weight: a stand-in flat tensor beside the groups keeps its state in the optimizer, the same
    tensor, while every group takes its turn (also when one group follows itself: a single group)."""
    for method_cfg in ({"name": "hift"}, {"name": "hift", "group_size": 100}):
        method, model, _ = prepared(load("llama"), method_cfg)
        flat = torch.nn.Parameter(torch.zeros(4))
        opt = torch.optim.SGD(method.optimizer_param_groups(model, 0.0) + [{"params": [flat]}], lr=0.1, momentum=0.9)
        opt.state[flat]["momentum_buffer"] = buf = torch.ones(4)
        params = dict(model.named_parameters())
        watched = []
        park = method._park_tensor
        method._park_tensor = lambda t: watched.append(t) or park(t)
        for step in range(method.num_groups + 2):
            method.on_step_start(step, model, opt)
            for n in method.group_names(method.group_at(step)):
                params[n].grad = torch.ones_like(params[n])
            opt.step()
            assert opt.state[flat]["momentum_buffer"] is buf and not any(t is buf for t in watched), step
        assert set(method._parked) <= set(params)
        if method.num_groups == 1:
            assert not watched and not method._parked, "a group that follows itself parks nothing"
