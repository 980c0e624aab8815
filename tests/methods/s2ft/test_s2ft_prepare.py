"""Co-permutation keeps the function; prepare wraps exactly the listed projections of blocks with selected units."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from sparseft.methods.s2ft.layers import SliceLinear
from sparseft.methods.s2ft.permute import expand, invert, layer_orders, permute_model, unit_order, unpermuted
from sparseft.models.arch import ROLES, arch_of
from tests.methods.s2ft.s2ft_testlib import context, logits, s2ft

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.mark.parametrize("arch", ARCHS)
def test_co_permutation_keeps_logits(load, arch):
    model = load(arch)
    spec = arch_of(model)
    if arch == "qwen2":  # non-zero q/k/v biases, so a bias left behind would show
        with torch.no_grad():
            for layer in range(spec.num_layers):
                for role in ("q", "k", "v"):
                    spec.proj(model, layer, role).bias.normal_(0, 0.5)
    ids = torch.randint(4, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    before = logits(model, ids)
    original = {n: t.clone() for n, t in model.state_dict().items()}
    last = spec.num_kv_heads - 1
    selection = {"heads": {"0": [last], "1": [1, last]}, "channels": {"0": [3, 70, 127], "1": [0, 64]}}
    orders = layer_orders(selection, spec)
    permute_model(model, spec, orders)
    assert not torch.equal(spec.proj(model, 0, "q").weight, original["model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=0)
    permute_model(model, spec, orders, inverse=True)
    assert all(torch.equal(t, original[n]) for n, t in model.state_dict().items())




def test_orders_by_hand():
    """Selected units first (ascending), the rest after in base order; no entry where nothing moves; q_head units are
    never moved; a layer missing from the selection moves nothing."""
    assert unit_order([3, 1], 5) == [1, 3, 0, 2, 4]
    assert unit_order([0, 1], 4) is None and unit_order([], 3) is None and unit_order([2, 0, 1], 3) is None
    assert expand([2, 0], 3).tolist() == [6, 7, 8, 0, 1, 2]
    assert expand([1, 0], 1).tolist() == [1, 0]
    assert expand([], 3).dtype == torch.long and expand([], 3).numel() == 0  # an index, also when empty
    assert invert([1, 3, 0, 2]) == [2, 0, 3, 1]
    spec = SimpleNamespace(num_layers=3, num_kv_heads=2, intermediate_size=4)
    sel = {"heads": {"0": [1], "1": [0], "2": [0]}, "channels": {"0": [0], "1": [3], "2": [0, 1]}}
    assert layer_orders(sel, spec) == {0: ([1, 0], None), 1: (None, [3, 0, 1, 2])}
    assert layer_orders({**sel, "unit": "q_head"}, spec) == {1: (None, [3, 0, 1, 2])}
    assert layer_orders({"heads": {"2": [1]}, "channels": {}}, spec) == {2: ([1, 0], None)}


def test_unpermuted_gives_the_base_layout(load):
    """unpermuted undoes one weight's co-permutation (export reads base weights through it), in a layer where only
    heads moved and one where only channels did; a layer the permutation left alone (selected units already in
    front, or q_head units) comes back as a copy; the inverse permutation restores every weight exactly."""
    model = load("qwen3")
    spec = arch_of(model)
    base = {(layer, role): spec.proj(model, layer, role).weight.detach().clone()
            for layer in range(spec.num_layers) for role in ROLES}
    orders = layer_orders({"heads": {"0": [1], "1": [0]}, "channels": {"0": [0, 1], "1": [5, 9]}}, spec)
    assert orders == {0: ([1, 0], None), 1: (None, [5, 9, *[i for i in range(128) if i not in (5, 9)]])}
    permute_model(model, spec, orders)
    for (layer, role), w in base.items():
        live = spec.proj(model, layer, role).weight
        back = unpermuted(live, spec, orders, layer, role)
        assert torch.equal(back, w), (layer, role)
        assert back.data_ptr() != live.data_ptr()
        alone = unpermuted(live, spec, {}, layer, role)  # no entry for the layer
        assert torch.equal(alone, live) and alone.data_ptr() != live.data_ptr()
    assert not torch.equal(spec.proj(model, 0, "o").weight, base[(0, "o")])
    assert not torch.equal(spec.proj(model, 1, "down").weight, base[(1, "down")])
    permute_model(model, spec, orders, inverse=True)
    assert all(torch.equal(spec.proj(model, layer, role).weight, w) for (layer, role), w in base.items())


def _expected_trainable(spec, selection) -> int:
    n = 0
    for layer in range(spec.num_layers):
        for role in selection["projections"]:
            units = len(selection["heads" if role in ("q", "k", "v", "o") else "channels"][str(layer)])
            other = spec.hidden_size  # every projection's other side is the hidden size
            n += units * spec.unit_size(role) * other
    return n


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("projections", [["o", "down"], list(ROLES)])
def test_prepare_wraps_listed_projections(load, arch, projections):
    model = load(arch)
    spec = arch_of(model)
    method = dict(projections=projections, heads={"count": 1}, channels={"count": 8}, seed=1)
    m = s2ft(**method)
    ctx = context(model, **method)
    selection = m.select(model, ctx)
    model = m.prepare(model, selection, ctx)
    for layer in range(spec.num_layers):
        for role in ROLES:
            module = model.get_submodule(spec.proj_path(layer, role))
            if role in projections:
                assert isinstance(module, SliceLinear)
                assert module.kind == ("cols" if role in ("o", "down") else "rows")
                assert module.k == spec.unit_size(role) * (1 if role in ("q", "k", "v", "o") else 8)
            else:
                assert type(module) is nn.Linear
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(".trainable") for n in trainable)
    assert len(trainable) == spec.num_layers * len(projections)
    assert sum(p.numel() for p in trainable.values()) == _expected_trainable(spec, selection)
    assert set(m.trainable_parameters(model)) == set(trainable)


def test_prepare_skips_layers_without_units(load):
    model = load("mistral")
    spec = arch_of(model)
    selection = {"unit": "kv_group", "projections": ["q", "o", "down"], "num_kv_groups": 2, "num_channels": 128,
                 "heads": {"0": [1], "1": []}, "channels": {"0": [], "1": [4, 2]}}
    m = s2ft(projections=["q", "o", "down"])
    model = m.prepare(model, selection, context(model))
    wrapped = {(layer, role) for layer in range(2) for role in ("q", "o", "down")
               if isinstance(model.get_submodule(spec.proj_path(layer, role)), SliceLinear)}
    assert wrapped == {(0, "q"), (0, "o"), (1, "down")}


def test_prepare_rejects_a_selection_for_another_model(load):
    from sparseft.errors import UserError

    model = load("mistral")
    bad = {"unit": "kv_group", "projections": ["o"], "heads": {"0": [5], "7": [0]}, "channels": {}}
    with pytest.raises(UserError, match="selection does not fit") as e:
        s2ft().prepare(model, bad, context(model))
    assert len(e.value.problems) == 2
