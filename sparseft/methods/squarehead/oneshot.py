"""One-shot pruning of a whole model: which linears, magnitude, and SparseGPT block by block on calibration data.

SparseGPT runs the blocks in order on the calibration batches. For each block it gathers H = 2 X X^T / n of every
pruned linear's inputs (non-padding tokens only) from the block's current inputs, prunes those linears, then runs the
pruned block again: its outputs are the next block's inputs, so later blocks are pruned against what the pruned
earlier blocks really produce. All linears of one block see inputs from that block before it is pruned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from sparseft.errors import UserError
from sparseft.methods.squarehead.config import SquareHeadConfig, parse_pattern
from sparseft.methods.squarehead.prune import magnitude_keep, sparsegpt
from sparseft.data.packing import forward_inputs
from sparseft.models.arch import ArchSpec, arch_of

_FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids")


@dataclass(frozen=True)
class Target:
    layer: int
    role: str
    path: str  # module path of the linear; its weight is `<path>.weight`


def target_linears(model: nn.Module, cfg: SquareHeadConfig) -> list[Target]:
    """The block linears the recipe prunes, in block order; a UserError for blocks or shapes that do not fit."""
    spec = arch_of(model)
    layers = range(spec.num_layers) if cfg.layers is None else sorted(set(cfg.layers))
    bad = [i for i in layers if not 0 <= i < spec.num_layers]
    if bad:
        raise UserError(f"method.layers={cfg.layers}: the model has blocks 0..{spec.num_layers - 1}")
    targets = [Target(i, r, spec.proj_path(i, r)) for i in layers for r in cfg.roles]
    nm = parse_pattern(cfg.pattern)
    if nm is not None:
        odd = [t.path for t in targets if spec.proj(model, t.layer, t.role).weight.shape[1] % nm[1]]
        if odd:
            raise UserError(f"method.pattern={cfg.pattern}: the input size of {odd[0]} is not a multiple of {nm[1]}")
    return targets


def prune_magnitude(model: nn.Module, targets: list[Target], sparsity: float,
                    nm: tuple[int, int] | None) -> dict[str, torch.Tensor]:
    """Zero the smallest weights of each target in place; keep masks by weight name."""
    masks = {}
    with torch.no_grad():
        for t in targets:
            w = model.get_submodule(t.path).weight
            keep = magnitude_keep(w, sparsity, nm)
            w.masked_fill_(~keep, 0.0)
            masks[f"{t.path}.weight"] = keep
    return masks


def _batch_inputs(model: nn.Module, batch: dict) -> tuple[dict, torch.Tensor]:
    device = next(model.parameters()).device
    b = {k: v.to(device) for k, v in batch.items() if k in _FORWARD_KEYS}
    tokens = b.get("attention_mask", torch.ones_like(b["input_ids"])).bool()  # (B, T)
    return forward_inputs({"attention_mask": tokens.long(), **b}), tokens


class _Stop(Exception):
    pass


def _block_inputs(model: nn.Module, spec: ArchSpec, batches: list[dict]):
    """Per batch: block 0's hidden input, every block's other call arguments (mask, rotary embeddings ...) and the
    non-padding token mask. One dense forward a batch, stopped after the last block."""
    blocks = spec.blocks(model)
    calls: list[list[tuple[tuple, dict]]] = []
    current: list[tuple[tuple, dict]] = []

    def record(index):
        def hook(_module, args, kwargs):
            current.append((args, kwargs))
            if index == len(blocks) - 1:
                raise _Stop  # nothing after the last block is needed
        return hook

    handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
    hidden, tokens = [], []
    try:
        for batch in batches:
            b, tok = _batch_inputs(model, batch)
            current = []
            try:
                model(**b)
            except _Stop:
                pass
            first_args, first_kwargs = current[0]
            hidden.append(first_args[0] if first_args else first_kwargs["hidden_states"])
            calls.append([(args[1:], {k: v for k, v in kw.items() if k != "hidden_states"}) for args, kw in current])
            tokens.append(tok)
    finally:
        for h in handles:
            h.remove()
    return hidden, calls, tokens


def _out(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


def layer_hessians(block: nn.Module, linears: dict[str, nn.Linear], hidden: list[torch.Tensor], calls: list,
                   tokens: list[torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """H = 2 X X^T / n of each linear's inputs over the non-padding tokens of every batch, running `block`."""
    hess = {name: torch.zeros(lin.in_features, lin.in_features, device=lin.weight.device, dtype=torch.float32)
            for name, lin in linears.items()}
    count = dict.fromkeys(linears, 0)
    mask: list[torch.Tensor] = []
    last: dict = {}  # q, k and v (and up, gate) read the same tensor: multiply it once

    def hook_for(name):
        def hook(_module, args):
            x = args[0]
            if last.get("x") is not x:
                flat = x[mask[0]].float() if x.shape[:2] == mask[0].shape else x.reshape(-1, x.shape[-1]).float()
                last.update(x=x, xtx=flat.T @ flat, n=flat.shape[0])
            hess[name] += last["xtx"]
            count[name] += last["n"]
        return hook

    handles = [lin.register_forward_pre_hook(hook_for(name)) for name, lin in linears.items()]
    try:
        for x, call, tok in zip(hidden, calls, tokens):
            mask[:] = [tok]
            last.clear()
            args, kwargs = call[layer]
            block(x, *args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {name: 2 * h / max(count[name], 1) for name, h in hess.items()}


@torch.no_grad()
def prune_sparsegpt(model: nn.Module, targets: list[Target], cfg: SquareHeadConfig, sparsity: float,
                    batches: list[dict]) -> dict[str, torch.Tensor]:
    """SparseGPT over the model, block by block; updates the weights in place and returns keep masks by weight name."""
    spec = arch_of(model)
    nm = parse_pattern(cfg.pattern)
    by_layer: dict[int, list[Target]] = {}
    for t in targets:
        by_layer.setdefault(t.layer, []).append(t)
    was_training = model.training
    model.eval()
    masks = {}
    try:
        hidden, calls, tokens = _block_inputs(model, spec, batches)
        blocks = spec.blocks(model)
        for layer in range(max(by_layer) + 1 if by_layer else 0):
            block = blocks[layer]
            if layer in by_layer:
                linears = {t.path: model.get_submodule(t.path) for t in by_layer[layer]}
                hessians = layer_hessians(block, linears, hidden, calls, tokens, layer)
                for path, lin in linears.items():
                    new, keep = sparsegpt(lin.weight, hessians.pop(path), sparsity, nm, cfg.block_size,
                                          cfg.dampening)
                    lin.weight.copy_(new)
                    masks[f"{path}.weight"] = keep
            # The pruned block's outputs feed the next block.
            hidden = [_out(block(x, *call[layer][0], **call[layer][1])) for x, call in zip(hidden, calls)]
    finally:
        model.train(was_training)
    return masks
