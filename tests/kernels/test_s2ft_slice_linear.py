"""SliceLinear: a fresh wrapper is the base linear; only its slice trains; merge, unwrap and state dict."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sparseft.kernels import leading_slice
from sparseft.methods.s2ft.layers import SliceLinear


def make(kind: str, k: int, bias: bool = True, seed: int = 0) -> tuple[SliceLinear, nn.Linear]:
    """(wrapper, untouched copy of the base linear)."""
    torch.manual_seed(seed)
    base = nn.Linear(12, 20, bias=bias)
    ref = nn.Linear(12, 20, bias=bias)
    ref.load_state_dict(base.state_dict())
    return SliceLinear(base, kind, k), ref


def mask(kind: str, k: int, shape) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.bool)
    leading_slice(m, kind, k).fill_(True)
    return m


@pytest.mark.parametrize("kind,k", [("rows", 3), ("cols", 5)])
def test_fresh_wrapper_is_the_base_linear(kind, k):
    layer, ref = make(kind, k)
    x = torch.randn(2, 7, 12)
    assert torch.equal(layer(x), ref(x))
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["trainable"]
    assert torch.equal(layer.delta(), torch.zeros_like(layer.trainable))
    assert torch.equal(layer.merged_weight(), ref.weight)


@pytest.mark.parametrize("kind,k", [("rows", 3), ("cols", 5)])
def test_step_changes_only_the_slice(kind, k):
    layer, ref = make(kind, k)
    opt = torch.optim.SGD([layer.trainable], lr=0.1)
    layer(torch.randn(4, 12)).square().sum().backward()
    opt.step()

    merged = layer.merged_weight()
    inside = mask(kind, k, merged.shape)
    assert torch.equal(merged[~inside], ref.weight[~inside])
    assert not torch.equal(merged[inside], ref.weight[inside])
    # An exported delta applied to the base weights gives the same bits.
    applied = ref.weight.detach().clone()
    leading_slice(applied, kind, k).add_(layer.delta())
    assert torch.equal(applied, merged)

    x = torch.randn(3, 12)
    y = layer(x)
    assert torch.allclose(y, nn.functional.linear(x, merged, ref.bias), rtol=1e-6, atol=1e-6)
    base = layer.unwrap()
    assert isinstance(base, nn.Linear) and torch.equal(base.weight, merged)
    assert torch.allclose(base(x), y, rtol=1e-6, atol=1e-6)


def test_adamw_trains():
    torch.manual_seed(0)
    layer, _ = make("rows", 4)
    x = torch.randn(64, 12)
    target = x @ torch.randn(12, 4)  # reachable by the 4 trainable output rows
    opt = torch.optim.AdamW([layer.trainable], lr=0.05)
    losses = []
    for _ in range(30):
        loss = (layer(x)[:, :4] - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert layer.base_layer.weight.grad is None


def test_state_dict_and_repr():
    layer, _ = make("cols", 5)
    model = nn.Sequential(nn.Identity(), layer)
    keys = set(model.state_dict())
    assert keys == {"1.trainable", "1.base_layer.weight", "1.base_layer.bias"}  # base_slice is not persistent
    assert model.state_dict()["1.trainable"].shape == (20, 5)
    assert "kind=cols, k=5, trainable=(20, 5) of (20, 12)" in repr(layer)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kind="):
        SliceLinear(nn.Linear(4, 6), "heads", 1)
    with pytest.raises(ValueError, match=r"k=0: must be in \[1, 6\]"):
        SliceLinear(nn.Linear(4, 6), "rows", 0)
    with pytest.raises(ValueError, match=r"k=5: must be in \[1, 4\]"):
        SliceLinear(nn.Linear(4, 6), "cols", 5)
