"""Fixed masks: pruned weights are exactly zero after every optimizer step (AdamW with weight decay, SGD with
momentum, gradient accumulation), their optimizer state stays zero, gradual pruning only grows the masks, and the
masks travel with the method state."""

from __future__ import annotations

import pytest
import torch

from sparseft.methods import MethodContext, build_method
from sparseft.methods.squarehead.masks import MaskSet
from sparseft.methods.squarehead.prune import prune_count
from tests.methods.squarehead.sq_testlib import copy_batch, prepared, recipe_for, tiny_llama, train_steps


def _pruned(method) -> dict[str, torch.Tensor]:
    return {n: pr.clone() for n, pr in method._masks.pruned.items()}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_pruned_weights_stay_zero_through_every_step(optimizer):
    batches = [copy_batch(8, i, pad_last=2) for i in range(3)]
    model = tiny_llama(seed=1)
    method, model, engine = prepared(model, {"pruner": "magnitude", "sparsity": 0.6}, batches, steps=5, lr=1e-2,
                                     optimizer=optimizer, weight_decay=0.1)
    params = dict(model.named_parameters())
    masks = _pruned(method)
    assert masks and all(int(pr.sum()) == prune_count(pr.numel(), 0.6) for pr in masks.values())
    start = {n: params[n].detach().clone() for n in masks}

    def check(step):
        for name, pr in masks.items():
            p = params[name]
            assert int(torch.count_nonzero(p.detach()[pr])) == 0, f"step {step}: {name} has non-zero pruned weights"
            for key, value in engine.optimizer.state[p].items():
                if torch.is_tensor(value) and value.shape == p.shape:
                    assert int(torch.count_nonzero(value[pr])) == 0, f"step {step}: {name} {key} non-zero"

    train_steps(method, model, engine, batches, steps=5, accum=2, each_step=check)
    for name, pr in masks.items():
        assert not torch.equal(params[name].detach()[~pr], start[name][~pr]), f"{name}: kept weights did not train"
    assert torch.equal(_pruned(method)[name], masks[name])  # fixed


def test_gradual_masks_grow_to_the_target_and_clear_optimizer_state():
    batches = [copy_batch(8, i) for i in range(2)]
    model = tiny_llama(seed=2)
    gradual = {"initial_sparsity": 0.0, "start_step": 1, "end_step": 5, "every": 2}
    method, model, engine = prepared(model, {"pruner": "magnitude", "sparsity": 0.7, "gradual": gradual}, batches,
                                     steps=7, lr=1e-2, weight_decay=0.1)
    params = dict(model.named_parameters())
    assert method._masks.sparsity() == 0.0  # starts dense
    history = [_pruned(method)]

    def check(step):
        now = _pruned(method)
        for name, pr in now.items():
            assert not (history[-1][name] & ~pr).any(), f"step {step}: {name} un-pruned a weight"
            assert int(torch.count_nonzero(params[name].detach()[pr])) == 0
            state = engine.optimizer.state[params[name]]
            assert int(torch.count_nonzero(state["exp_avg"][pr])) == 0
        history.append(now)

    logs = train_steps(method, model, engine, batches, steps=7, each_step=check)
    events = [(i, log["sparsity"]) for i, log in enumerate(logs) if "sparsity" in log]
    assert [i for i, _ in events] == [1, 3, 5]
    assert [s for _, s in events] == sorted(s for _, s in events) and events[0][1] == 0.0
    for name, pr in history[-1].items():
        assert int(pr.sum()) == prune_count(pr.numel(), 0.7)


def test_masks_travel_with_the_method_state():
    batches = [copy_batch(8, 0)]
    dense = tiny_llama(seed=3)
    method, model, engine = prepared(tiny_llama(seed=3), {"pruner": "magnitude"}, batches)
    train_steps(method, model, engine, batches, steps=1)
    state = method.state_dict()
    # A resumed run: the dense base is prepared without select, gets the checkpoint's weights, then the method state.
    recipe = recipe_for({"pruner": "magnitude"}, 1, 1e-3)
    again = build_method(recipe.method)
    selection = {"linears": {n: 0.5 for n in state["masks"]}}
    resumed = again.prepare(dense, selection, MethodContext(recipe=None, log=lambda s: None))
    with pytest.raises(RuntimeError, match="no masks"):
        again.on_step_start(0, resumed, None)
    again.load_state_dict(state)
    for name, pr in method._masks.pruned.items():
        assert torch.equal(again._masks.pruned[name], pr)
        assert int(torch.count_nonzero(dict(resumed.named_parameters())[name].detach()[pr])) == 0


def test_masks_are_reapplied_after_every_optimizer_step():
    """The second guard alone: optimizer moments left non-zero at pruned positions (as after pruning that did not clear
    them, or in a DeepSpeed master copy the hook cannot reach) move pruned weights in the step; on_step_end must put
    them back to exactly zero and leave every kept weight as the step left it."""
    batches = [copy_batch(8, i) for i in range(2)]
    method, model, engine = prepared(tiny_llama(seed=4), {"pruner": "magnitude", "sparsity": 0.5}, batches, steps=3,
                                     lr=1e-2)
    params = dict(model.named_parameters())
    masks = _pruned(method)
    for step in range(3):
        method.on_step_start(step, model, engine.optimizer)
        loss, _ = method.compute_loss(model, batches[step % 2])
        engine.backward(loss)
        for name, pr in masks.items():
            state = engine.optimizer.state.get(params[name])
            if state:  # from the second step on: stale first moments at the pruned positions
                state["exp_avg"].masked_fill_(pr, 1e-3)
        engine.step()
        stepped = {n: params[n].detach().clone() for n in masks}
        if step:
            assert all(int(torch.count_nonzero(stepped[n][pr])) > 0 for n, pr in masks.items()), "nothing to undo"
        method.on_step_end(step, model, engine.optimizer)
        for name, pr in masks.items():
            p = params[name].detach()
            assert int(torch.count_nonzero(p[pr])) == 0, f"step {step}: {name} has non-zero pruned weights"
            assert torch.equal(p[~pr], stepped[name][~pr]), f"step {step}: {name}: kept weights were touched"


def test_mask_set_by_hand():
    """sparsity() is the pruned fraction of all masked weights; zero_optimizer_state clears the state of pruned
    positions only, skips weights the optimizer holds no state for, and accepts no optimizer."""
    a, b = torch.nn.Parameter(torch.ones(2, 4)), torch.nn.Parameter(torch.ones(3, 2))
    masks = MaskSet({"a": a, "b": b})
    keep_a = torch.tensor([[1, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    masks.set({"a": keep_a, "b": torch.ones(3, 2, dtype=torch.bool)})
    assert masks.sparsity() == pytest.approx(2 / 14)
    assert torch.equal(a.detach(), keep_a.float())
    opt = torch.optim.SGD([a, b], lr=0.1, momentum=0.9)
    opt.state[a]["momentum_buffer"] = torch.full((2, 4), 3.0)  # b has no state yet
    masks.zero_optimizer_state(opt)
    assert torch.equal(opt.state[a]["momentum_buffer"], 3.0 * keep_a.float())
    masks.zero_optimizer_state(None)
    with pytest.raises(ValueError, match=r"checkpoint masks for \['c'\]"):
        masks.load_state_dict({**masks.state_dict(), "c": masks.state_dict()["a"]})



def test_mask_state_reloads_the_same_bool_masks():
    """A MaskSet's state (bit-packed keep masks) reloads to the same pruned positions, as bool masks; and one pruned
    weight alone is a sparsity of 1."""
    keep = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1]], dtype=torch.bool)  # 11 weights: not a whole byte
    masks = MaskSet({"w": torch.nn.Parameter(torch.ones(1, 11))})
    again = MaskSet({"w": torch.nn.Parameter(torch.ones(1, 11))})
    masks.set({"w": keep})
    again.load_state_dict(masks.state_dict())
    assert again.pruned["w"].dtype == torch.bool and torch.equal(again.pruned["w"], ~keep)
    assert torch.equal(again.params["w"].detach(), keep.float())
    one = MaskSet({"x": torch.nn.Parameter(torch.ones(1))})
    one.set({"x": torch.zeros(1, dtype=torch.bool)})
    assert one.sparsity() == 1.0


def test_masks_follow_their_weights_and_unmasked_gradients_pass():
    """A mask is kept on its weight's device (a GPU weight with a CPU mask fails; the meta device stands in for the
    GPU here), and the gradient hook passes the gradient of a weight that has no mask yet through unchanged."""
    w = torch.nn.Parameter(torch.ones(2, 3, device="meta"))
    masks = MaskSet({"w": w})
    masks.set({"w": torch.ones(2, 3, dtype=torch.bool)})
    assert masks.pruned["w"].device == w.device
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    masks = MaskSet({"a": a, "b": b})
    masks.hook_gradients()
    masks.set({"a": torch.tensor([True, False])})
    (a * torch.tensor([2.0, 3.0]) + b * torch.tensor([4.0, 5.0])).sum().backward()
    assert torch.equal(a.grad, torch.tensor([2.0, 0.0])) and torch.equal(b.grad, torch.tensor([4.0, 5.0]))
    masks.remove_hooks()
