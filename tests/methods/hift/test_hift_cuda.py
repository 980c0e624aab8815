"""HiFT's offload on a GPU, the path a CPU-only machine never takes: parked state in pinned host memory, copied
without blocking, the next group's state prefetched on a side stream and handed to the optimizer. Skipped without a
CUDA device (scripts/gpu_check.sh runs it)."""

from __future__ import annotations

import pytest
import torch

from sparseft.methods import MethodContext, build_method
from sparseft.methods.hift import _MASTER
from sparseft.train.optim import Engine
from tests.methods.hift.hift_testlib import recipe

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda", 0)


class _OnGPU:
    """A HiFT run on the GPU as the trainer drives it, each step's gradients seeded by step and weight (the same in
    every run), in one of three precisions: fp32; bf16 weights with the active group's fp32 masters (bf16-mixed);
    bf16 weights and optimizer state (bf16-true)."""

    def __init__(self, load, offload: bool, precision: str, group_size: int):
        r = recipe({"name": "hift", "order": "random", "offload": offload, "group_size": group_size},
                   weight_decay=0.1)
        model = load("llama").to(torch.float32 if precision == "fp32" else torch.bfloat16).to(CUDA)
        self.method = build_method(r.method)
        ctx = MethodContext(recipe=r, log=lambda s: None, device=CUDA,
                            master_dtype=torch.float32 if precision == "bf16-mixed" else None)
        self.model = self.method.prepare(model, self.method.select(model, ctx), ctx)
        self.engine = Engine(self.model, self.method.optimizer_param_groups(self.model, 0.1), r.train)
        self.params = dict(self.model.named_parameters())

    def run_step(self, step: int) -> None:
        self.method.on_step_start(step, self.model, self.engine.optimizer)
        for i, p in enumerate(self.params.values()):
            if p.requires_grad:
                g = torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * step + i))
                p.grad = g.to(CUDA, p.dtype)
        self.engine.step()
        self.method.on_step_end(step, self.model, self.engine.optimizer)
        torch.cuda.synchronize(CUDA)


@pytest.mark.parametrize("group_size", [1, 2])  # 4 groups, or 2 (each follows the other)
@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "bf16-true"])
def test_offload_parks_pinned_prefetches_the_next_group_and_trains_the_same(load, precision, group_size):
    """With offload, every parked tensor (optimizer state, and fp32 masters under mixed precision) is in pinned host
    memory and equals what the run without offload keeps on the GPU; after each step exactly the next group's parked
    state is prefetched to the GPU (nothing stale left there); and both runs give the same weights bit for bit, step
    by step, through two cycles and into a third; a checkpoint's state holds the same, in host memory."""
    on, off = _OnGPU(load, True, precision, group_size), _OnGPU(load, False, precision, group_size)
    n = on.method.num_groups
    assert n == 4 // group_size
    parked_some = prefetched_some = False
    for step in range(2 * n + 1):
        on.run_step(step)
        off.run_step(step)
        for name, w in on.params.items():
            ref = off.params[name]
            assert w.device == CUDA and w.dtype == ref.dtype and torch.equal(w, ref), (step, name)
        assert on.method._parked.keys() == off.method._parked.keys(), step
        for name, state in on.method._parked.items():
            assert state.keys() == off.method._parked[name].keys(), (step, name)
            for key, t in state.items():
                ref = off.method._parked[name][key]
                if key == "step":  # the optimizer's CPU scalar, never moved
                    assert t.device.type == "cpu" and torch.equal(t, ref), (step, name)
                    continue
                assert t.device.type == "cpu" and t.is_pinned(), (step, name, key)
                assert ref.device == CUDA and t.dtype == ref.dtype and torch.equal(t, ref.cpu()), (step, name, key)
                parked_some = True
                if key == _MASTER:
                    assert precision == "bf16-mixed" and t.dtype == torch.float32
        nxt = set(on.method.group_names(on.method.group_at(step + 1)))
        assert set(on.method._ready) == nxt & set(on.method._parked), step
        for name, state in on.method._ready.items():
            for key, t in state.items():
                parked = on.method._parked[name][key]
                if key == "step":  # stays where the optimizer keeps it
                    assert t.device.type == "cpu", (step, name)
                else:
                    assert t.device == CUDA and t.dtype == parked.dtype and torch.equal(t, parked.to(CUDA)), \
                        (step, name, key)
                    prefetched_some = True
        assert off.method._ready == {}
    assert parked_some and prefetched_some, "the checks above were empty"
    saved = on.method.state_dict()  # waits for the parking copies; what a checkpoint writes
    for name, state in saved["optimizer_state"].items():
        for key, t in state.items():
            assert torch.equal(t.cpu(), off.method._parked[name][key].cpu()), (name, key)
    # the active group's fp32 masters, copied to host memory
    assert bool(saved.get("masters")) == (precision == "bf16-mixed")
    for name, t in saved.get("masters", {}).items():
        assert t.device.type == "cpu" and t.dtype == torch.float32 and torch.equal(t, on.params[name].cpu()), name
