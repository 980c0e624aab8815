"""Choosing the kv groups and FFN channels that train, per block or across blocks.

The result is a JSON-serialisable dict in the base model's own coordinates, saved in the run directory and reused on
resume and export:

    {"unit": "kv_group", "projections": ["o", "down"], "strategy": "weight", "scope": "per_layer", "order": "largest",
     "num_kv_groups": 4, "num_channels": 128,
     "heads": {"0": [1, 3], "1": [0, 2]}, "channels": {"0": [5, 17, ...], "1": [...]}}

`heads` lists kv-group indices (kv head j and q heads j*g .. j*g+g-1, g = q heads per kv head), or with unit
"q_head" q-head indices (o's columns h*head_dim .. (h+1)*head_dim - 1; the selection then also has "num_q_heads"),
`channels` FFN channel indices, both sorted within a layer and keyed by the layer index as a string. A kind whose
projections are not listed has an empty list for every layer.

Scope global ranks every layer's units together; scores are first normalised per layer (`normalize`), since raw
scores differ in scale from layer to layer (weight norms grow with depth, activations even more), and unnormalised one
layer can take the whole budget.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn as nn

from sparseft.data.packing import forward_inputs
from sparseft.errors import UserError
from sparseft.methods.s2ft.config import Budget, S2FTConfig
from sparseft.models.arch import ATTN_ROLES, COL_ROLES, MLP_ROLES, ROLES, ArchSpec, arch_of

UNIT = "kv_group"
UNITS = ("kv_group", "q_head")
_BATCH_KEYS = ("input_ids", "attention_mask", "labels", "position_ids")


def select_units(model: nn.Module, cfg: S2FTConfig, seed: int,
                 calibration_batches: Callable[[int], Iterator[dict]] | None = None) -> dict:
    """Score every unit with `cfg.strategy` and keep the budget's best (`cfg.order`) per layer or globally."""
    spec = arch_of(model)
    unit = cfg.heads.unit
    attn = [r for r in cfg.projections if r in ATTN_ROLES]
    mlp = [r for r in cfg.projections if r in MLP_ROLES]
    n_heads, n_chans = budgets(spec, cfg)  # first: a recipe error should not wait for a calibration pass

    if cfg.strategy == "random":
        g = torch.Generator().manual_seed(seed)
        # Heads are always drawn first so the channel picks do not depend on which projections are listed.
        head_scores = torch.rand(spec.num_layers, head_units(spec, unit), generator=g, dtype=torch.float64)
        chan_scores = torch.rand(spec.num_layers, spec.intermediate_size, generator=g, dtype=torch.float64)
    elif cfg.strategy == "weight":
        head_scores, chan_scores = weight_scores(model, spec, attn + mlp, unit)
    else:
        if calibration_batches is None:
            raise UserError(f"method.strategy={cfg.strategy}: needs calibration batches from the training data")
        batches = list(calibration_batches(cfg.calibration_batches))
        if not batches:
            raise UserError(f"method.strategy={cfg.strategy}: the training data gave no calibration batch")
        if cfg.strategy == "activation":
            head_scores, chan_scores = activation_scores(model, spec, batches, unit)
        else:
            head_scores, chan_scores = gradient_scores(model, spec, attn + mlp, batches, unit)

    empty = {str(layer): [] for layer in range(spec.num_layers)}
    out = {
        "unit": unit,
        "projections": list(cfg.projections),
        "strategy": cfg.strategy,
        "scope": cfg.scope,
        "order": cfg.order,
        "num_kv_groups": spec.num_kv_heads,
        "num_channels": spec.intermediate_size,
        "heads": pick(head_scores, n_heads, cfg.scope, cfg.order, cfg.normalize) if attn else empty,
        "channels": pick(chan_scores, n_chans, cfg.scope, cfg.order, cfg.normalize) if mlp else dict(empty),
    }
    if cfg.scope == "global":
        out["normalize"] = cfg.normalize
    if unit == "q_head":
        out["num_q_heads"] = spec.num_heads
    return out


def head_units(spec: ArchSpec, unit: str) -> int:
    """Attention units a layer has: kv groups, or q heads."""
    return spec.num_heads if unit == "q_head" else spec.num_kv_heads


def unit_shape(spec: ArchSpec, role: str, unit: str = UNIT) -> tuple[int, int]:
    """(units a layer has, rows / columns each owns) in a projection of this role."""
    if role in ATTN_ROLES and unit == "q_head":
        return spec.num_heads, spec.head_dim  # only o is listed with q_head: a q head's columns
    return spec.num_units(role), spec.unit_size(role)


def budgets(spec: ArchSpec, cfg: S2FTConfig) -> tuple[int, int]:
    """Units the recipe's budgets ask for on this model (kv groups, FFN channels: per layer, or in all for scope
    global); a UserError naming the key when a budget does not fit or nothing would train."""
    attn = any(r in ATTN_ROLES for r in cfg.projections)
    mlp = any(r in MLP_ROLES for r in cfg.projections)
    what = "q heads" if cfg.heads.unit == "q_head" else "kv groups"
    n_heads = _budget_units(cfg.heads, head_units(spec, cfg.heads.unit), spec.num_layers, cfg.scope, "method.heads",
                            what) if attn else 0
    n_chans = _budget_units(cfg.channels, spec.intermediate_size, spec.num_layers, cfg.scope, "method.channels",
                            "FFN channels") if mlp else 0
    if n_heads == 0 and n_chans == 0:
        raise UserError(f"method: heads ({cfg.heads}) and channels ({cfg.channels}) select nothing to train for "
                        f"projections {cfg.projections}; raise a budget")
    return n_heads, n_chans


def _budget_units(budget: Budget, per_layer: int, layers: int, scope: str, key: str, what: str) -> int:
    if scope == "per_layer":
        return budget.units(per_layer, key, f"{what} per layer")
    return budget.units(per_layer * layers, key, f"{what} in all ({per_layer} per layer x {layers} layers)")


def normalized(scores: torch.Tensor, how: str) -> torch.Tensor:
    """(L, n) scores made comparable across layers (rows): zscore, rank (scaled to [0, 1]) or none."""
    if how == "none":
        return scores
    if how == "rank":
        n = scores.shape[1]
        ranks = torch.sort(torch.sort(scores, dim=1, stable=True).indices, dim=1, stable=True).indices
        return ranks.to(torch.float64) / max(n - 1, 1)
    mean = scores.mean(dim=1, keepdim=True)
    std = scores.std(dim=1, keepdim=True, correction=0)
    # A layer whose units all score the same is 0 throughout. Tested on the values, not on std > 0: its mean can
    # round off the common score (0.7 x 3), and std then comes out as that rounding error (on one row, not on two).
    flat = (scores == scores[:, :1]).all(dim=1, keepdim=True)  # (L, 1)
    return torch.where(flat, torch.zeros_like(scores), (scores - mean) / std.clamp_min(1e-300))


def pick(scores: torch.Tensor, k: int, scope: str, order: str, normalize: str = "none") -> dict[str, list[int]]:
    """Indices of the k best scores of each row (per_layer) or of the whole (L, n) table (global, after normalising
    each row with `normalize`), sorted per layer."""
    if scope == "global":
        scores = normalized(scores.to(torch.float64), normalize)
    L, n = scores.shape
    # Stable sort: equal scores keep index order, so ties break the same way every time.
    key = -scores if order == "largest" else scores
    if scope == "per_layer":
        top = torch.sort(key, dim=1, stable=True).indices[:, :k]  # (L, k)
        return {str(layer): sorted(top[layer].tolist()) for layer in range(L)}
    flat = torch.sort(key.flatten(), stable=True).indices[:k]  # (k,) into the (L * n) table
    out: dict[str, list[int]] = {str(layer): [] for layer in range(L)}
    for i in flat.tolist():
        out[str(i // n)].append(i % n)
    return {layer: sorted(v) for layer, v in out.items()}


def _unit_sq(weight: torch.Tensor, spec: ArchSpec, role: str, unit: str = UNIT) -> torch.Tensor:
    """Squared L2 norm of each unit's rows (or columns) of a (out, in) matrix -> (num_units,)."""
    n, size = unit_shape(spec, role, unit)
    w = weight.detach().float()
    if role in COL_ROLES:
        return w.reshape(w.shape[0], n, size).pow(2).sum(dim=(0, 2))
    return w.reshape(n, size, w.shape[1]).pow(2).sum(dim=(1, 2))


def _zeros(spec: ArchSpec, unit: str = UNIT) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros(spec.num_layers, head_units(spec, unit), dtype=torch.float64),
            torch.zeros(spec.num_layers, spec.intermediate_size, dtype=torch.float64))


def weight_scores(model: nn.Module, spec: ArchSpec, roles: list[str],
                  unit: str = UNIT) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 norm of each unit's weights over the listed projections of its kind: (L, head units), (L, channels)."""
    heads, chans = _zeros(spec, unit)
    for layer in range(spec.num_layers):
        for role in roles:
            table = heads if role in ATTN_ROLES else chans
            table[layer] += _unit_sq(spec.proj(model, layer, role).weight, spec, role, unit).double().cpu()
    return heads.sqrt(), chans.sqrt()


def _device_batch(model: nn.Module, batch: dict) -> dict:
    device = next(model.parameters()).device
    b = {k: v.to(device) for k, v in batch.items() if k in _BATCH_KEYS}
    return {**forward_inputs(b), **({"labels": b["labels"]} if "labels" in b else {})}


def activation_scores(model: nn.Module, spec: ArchSpec, batches: list[dict],
                      unit: str = UNIT) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 norm over non-padding tokens of each head unit's input to o and each channel's input to down."""
    heads, chans = _zeros(spec, unit)
    mask: list[torch.Tensor | None] = [None]

    def hook_for(table: torch.Tensor, layer: int, role: str):
        def hook(_module, args):
            x = args[0].detach().double()  # (B, T, in)
            m = mask[0]
            if m is not None and m.shape == x.shape[:2]:
                x = x * m[..., None].to(x.dtype)  # padding tokens add nothing
            sq = x.pow(2).sum(dim=tuple(range(x.ndim - 1)))  # (in,)
            table[layer] += sq.reshape(*unit_shape(spec, role, unit)).sum(dim=1).cpu()
        return hook

    handles = []
    for layer in range(spec.num_layers):
        handles.append(spec.proj(model, layer, "o").register_forward_pre_hook(hook_for(heads, layer, "o")))
        handles.append(spec.proj(model, layer, "down").register_forward_pre_hook(hook_for(chans, layer, "down")))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                b = _device_batch(model, batch)
                mask[0] = batch["attention_mask"].to(b["input_ids"].device) if "attention_mask" in batch else None
                model(**{k: v for k, v in b.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return heads.sqrt(), chans.sqrt()


def gradient_scores(model: nn.Module, spec: ArchSpec, roles: list[str], batches: list[dict],
                    unit: str = UNIT) -> tuple[torch.Tensor, torch.Tensor]:
    """Each unit's loss-gradient norm in the listed projections: the root of the sum, over calibration batches, of
    the squared norm of the unit's rows (or columns) of that batch's weight gradient.

    No weight gradient is kept. Every weight stays frozen, so autograd computes input gradients only; hooks keep each
    listed linear's input x and, when its output gradient g arrives, form that linear's gradient g^T x for the one
    batch, reduce it to per-unit squared norms and drop it. The peak is one weight gradient at a time plus the listed
    linears' inputs, where building every listed weight's .grad held all of them at once.
    """
    heads, chans = _zeros(spec, unit)
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)

    def hook_for(table: torch.Tensor, layer: int, role: str):
        def forward_hook(_module, args, out):
            x = args[0].detach()  # (B, T, d_in)

            def grad_hook(g):  # (B, T, d_out)
                g2, x2 = g.reshape(-1, g.shape[-1]).float(), x.reshape(-1, x.shape[-1]).float()
                table[layer] += _unit_sq(g2.t() @ x2, spec, role, unit).double().cpu()  # (d_out, d_in), transient

            if out.requires_grad:
                out.register_hook(grad_hook)
        return forward_hook

    def graph_from_embeddings(_module, _args, out):
        out.requires_grad_(True)  # frozen embeddings: the graph must still reach the first block

    handles = [model.get_input_embeddings().register_forward_hook(graph_from_embeddings)]
    for layer in range(spec.num_layers):
        for role in roles:
            table = heads if role in ATTN_ROLES else chans
            handles.append(spec.proj(model, layer, role).register_forward_hook(hook_for(table, layer, role)))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            b = _device_batch(model, batch)
            if "labels" not in b:
                b["labels"] = b["input_ids"]
            model(**b).loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)
        model.train(was_training)
    return heads.sqrt(), chans.sqrt()


def summary(selection: dict) -> str:
    """One line a layer for logs: `layer 0: heads [1, 3] of 4, channels 6 of 128`."""
    lines = []
    for layer in sorted(selection["heads"], key=int):
        parts = []
        heads, chans = selection["heads"][layer], selection["channels"][layer]
        if any(r in ATTN_ROLES for r in selection["projections"]):
            if selection.get("unit") == "q_head":
                parts.append(f"q heads {heads} of {selection['num_q_heads']}")
            else:
                parts.append(f"heads {heads} of {selection['num_kv_groups']}")
        if any(r in MLP_ROLES for r in selection["projections"]):
            parts.append(f"channels {len(chans)} of {selection['num_channels']}")
        lines.append(f"layer {layer}: " + ", ".join(parts))
    return "\n".join(lines)


def check_selection(selection: dict, spec: ArchSpec) -> None:
    """A selection read back from a run directory must fit the model it is applied to."""
    problems = []
    unit = selection.get("unit")
    if unit not in UNITS:
        problems.append(f"unit is {unit!r}, expected one of {list(UNITS)}")
    roles = selection.get("projections")
    if not isinstance(roles, list) or not roles or any(r not in ROLES for r in roles):
        problems.append(f"projections: {roles!r} is not a list of {list(ROLES)}")
    elif unit == "q_head" and any(r in ("q", "k", "v") for r in roles):
        problems.append("unit q_head trains o only; projections list q, k or v")
    for kind, n in (("heads", head_units(spec, unit)), ("channels", spec.intermediate_size)):
        table = selection.get(kind)
        if not isinstance(table, dict):
            problems.append(f"{kind}: missing")
            continue
        for layer, idx in table.items():
            if not (isinstance(layer, str) and layer.isdigit() and int(layer) < spec.num_layers):
                problems.append(f"{kind}: layer {layer!r} is not one of the model's {spec.num_layers} layers")
            elif not isinstance(idx, list) or any(not isinstance(i, int) or not 0 <= i < n for i in idx) \
                    or len(set(idx)) != len(idx):
                problems.append(f"{kind}.{layer}: indices must be distinct integers in [0, {n})")
    if problems:
        raise UserError("s2ft selection does not fit this model", problems)
