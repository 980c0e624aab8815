"""Co-permutation: move each block's selected kv groups and FFN channels to the front of every weight they couple.

A kv group's rows of q, k, v (and their biases) and its columns of o move together, as do a channel's rows of up and
gate and its column of down. Reordering both sides of a coupled pair by the same order leaves the block's function
unchanged, and because whole heads move, RoPE and per-head q/k norms (Qwen3) see the same head vectors as before.
The selected units then sit in the first rows / columns, where one dense slice can train them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from sparseft.models.arch import ArchSpec

# role -> which side of its weight a unit owns: 0 = output rows (and bias), 1 = input columns
_ATTN_DIMS = {"q": 0, "k": 0, "v": 0, "o": 1}
_MLP_DIMS = {"up": 0, "gate": 0, "down": 1}

# layer -> (kv-group order, channel order); order[i] is the base index of the unit now at position i; None = unchanged
Orders = dict[int, tuple[list[int] | None, list[int] | None]]


def unit_order(selected: list[int], n: int) -> list[int] | None:
    """Selected units first (ascending), then the rest in their original order; None when that is the identity."""
    chosen = set(selected)
    order = sorted(chosen) + [i for i in range(n) if i not in chosen]
    return None if order == list(range(n)) else order


def layer_orders(selection: dict, spec: ArchSpec) -> Orders:
    out: Orders = {}
    for layer in range(spec.num_layers):
        # q_head units train o's columns where they are: moving single q heads would break GQA's q->kv pairing.
        heads = None if selection.get("unit") == "q_head" else \
            unit_order(selection["heads"].get(str(layer), []), spec.num_kv_heads)
        chans = unit_order(selection["channels"].get(str(layer), []), spec.intermediate_size)
        if heads is not None or chans is not None:
            out[layer] = (heads, chans)
    return out


def expand(order: list[int], size: int) -> torch.Tensor:
    """Row / column indices of whole units in `order`, each unit `size` consecutive indices -> (len(order) * size,)."""
    o = torch.as_tensor(order, dtype=torch.long)
    return (o[:, None] * size + torch.arange(size)).flatten()


def invert(order: list[int]) -> list[int]:
    return torch.argsort(torch.as_tensor(order)).tolist()


def _reorder(linear: nn.Linear, dim: int, idx: torch.Tensor) -> None:
    # Copy into the existing storage: anything holding the parameter (an optimizer, a tied module) stays valid.
    with torch.no_grad():
        w = linear.weight
        w.copy_(w.index_select(dim, idx.to(w.device)))
        if dim == 0 and linear.bias is not None:
            linear.bias.copy_(linear.bias.index_select(0, idx.to(w.device)))


def permute_block(model: nn.Module, spec: ArchSpec, layer: int, heads: list[int] | None,
                  chans: list[int] | None) -> None:
    """Reorder one block's coupled weights in place so that position i holds base unit order[i]."""
    if heads is not None:
        for role, dim in _ATTN_DIMS.items():
            _reorder(spec.proj(model, layer, role), dim, expand(heads, spec.unit_size(role)))
    if chans is not None:
        for role, dim in _MLP_DIMS.items():
            _reorder(spec.proj(model, layer, role), dim, expand(chans, 1))


def permute_model(model: nn.Module, spec: ArchSpec, orders: Orders, inverse: bool = False) -> None:
    """Apply the co-permutation (or, with inverse=True, undo it). The projections must be plain nn.Linear."""
    for layer, (heads, chans) in orders.items():
        if inverse:
            heads = invert(heads) if heads is not None else None
            chans = invert(chans) if chans is not None else None
        permute_block(model, spec, layer, heads, chans)


def unpermuted(weight: torch.Tensor, spec: ArchSpec, orders: Orders, layer: int, role: str) -> torch.Tensor:
    """A copy of one permuted projection's weight in the base layout (its layer's co-permutation undone)."""
    heads, chans = orders.get(layer, (None, None))
    order = heads if role in _ATTN_DIMS else chans
    if order is None:
        return weight.clone()
    dim = _ATTN_DIMS[role] if role in _ATTN_DIMS else _MLP_DIMS[role]
    return weight.index_select(dim, expand(invert(order), spec.unit_size(role)).to(weight.device))
