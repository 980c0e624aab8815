"""S2FT with the model on a GPU and its calibration batches in host memory, as the loader yields them: what a
CPU-only machine cannot show, where every tensor is already on the model's device. Skipped without a CUDA device
(scripts/gpu_check.sh runs it)."""

from __future__ import annotations

import pytest
import torch
from tests.methods.s2ft import s2ft_reference as reference
from tests.methods.s2ft.s2ft_testlib import context, logits, s2ft

import sparseft.methods.s2ft.select as select_module
from sparseft.methods.s2ft.permute import layer_orders, permute_model, unpermuted
from sparseft.models.arch import ROLES, arch_of

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("strategy", ["activation", "gradient"])
def test_calibration_on_the_gpu_picks_the_reference_units(load, strategy):
    """The calibrated strategies on a GPU model, fed CPU batches with padding, pick the units that the plain
    computation on the CPU picks (tests/methods/s2ft/s2ft_reference.py), with the same scores."""
    cpu = load("qwen3")
    batches = reference.padded_batches(cpu.config.vocab_size, 2)
    roles = ["v", "o", "gate", "down"]
    ref_heads, ref_chans = reference.strategy_scores(cpu, strategy, roles, batches)
    model = load("qwen3").to(CUDA)
    method = dict(strategy=strategy, projections=roles, heads={"count": 1}, channels={"count": 16},
                  calibration_batches=2)
    ctx = context(model, **method)
    ctx.device = CUDA
    ctx.calibration_batches = lambda n: iter(batches[:n])
    sel = s2ft(**method).select(model, ctx)
    assert sel["heads"] == reference.top(ref_heads, 1) and sel["channels"] == reference.top(ref_chans, 16)
    assert all(p.device == CUDA and p.grad is None for p in model.parameters())
    spec = arch_of(model)
    heads, chans = (select_module.activation_scores(model, spec, batches) if strategy == "activation"
                    else select_module.gradient_scores(model, spec, roles, batches))
    torch.testing.assert_close(heads, ref_heads, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(chans, ref_chans, rtol=1e-4, atol=1e-6)


def test_co_permutation_on_the_gpu_keeps_logits_and_unpermutes(load):
    """Permuting a GPU model's heads and channels (the index built on the CPU) keeps its logits; unpermuted gives
    each weight back in the base layout on the GPU, and the inverse permutation restores every weight exactly."""
    model = load("qwen2").to(CUDA)
    spec = arch_of(model)
    with torch.no_grad():  # non-zero q/k/v biases, so a bias left behind would show
        for layer in range(spec.num_layers):
            for role in ("q", "k", "v"):
                spec.proj(model, layer, role).bias.normal_(0, 0.5)
    ids = torch.randint(4, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0)).to(CUDA)
    before = logits(model, ids)
    base = {(layer, role): spec.proj(model, layer, role).weight.detach().clone()
            for layer in range(spec.num_layers) for role in ROLES}
    last = spec.num_kv_heads - 1
    orders = layer_orders({"heads": {"0": [last], "1": [1, last]}, "channels": {"0": [3, 70, 127], "1": [0, 64]}},
                          spec)
    permute_model(model, spec, orders)
    assert not torch.equal(spec.proj(model, 0, "o").weight, base[(0, "o")])
    torch.testing.assert_close(logits(model, ids), before, atol=1e-4, rtol=0)
    for (layer, role), w in base.items():
        back = unpermuted(spec.proj(model, layer, role).weight, spec, orders, layer, role)
        assert back.device == CUDA and torch.equal(back, w), (layer, role)
    permute_model(model, spec, orders, inverse=True)
    assert all(torch.equal(spec.proj(model, layer, role).weight, w) for (layer, role), w in base.items())
