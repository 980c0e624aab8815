"""Unit scores for S2FT's calibrated strategies, computed the plain way to check sparseft's selection against.

Written from the definitions, not from sparseft's code: the Hugging Face module names and config fields of the
Llama family, explicit row / column ranges per unit, each sequence run alone without its padding (activation), and
torch.autograd.grad on a copy of the model (gradient).
"""

from __future__ import annotations

import copy

import torch

PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def unit_ranges(config, role: str, unit: str = "kv_group") -> list[tuple[int, int, int]]:
    """(dim, start, stop) a unit: kv group j owns q heads j*g .. j*g+g-1 and kv head j; FFN channel c owns row c of
    gate and up and column c of down. dim 0: rows of the (out, in) weight, 1: columns. With unit "q_head", q head h
    owns rows (q) / columns (o) h*head_dim .. (h+1)*head_dim - 1."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    g = heads // kv
    if unit == "q_head" and role in ("q", "o"):
        return [(0 if role == "q" else 1, h * hd, (h + 1) * hd) for h in range(heads)]
    if role in ("q", "o"):
        return [(0 if role == "q" else 1, j * g * hd, (j + 1) * g * hd) for j in range(kv)]
    if role in ("k", "v"):
        return [(0, j * hd, (j + 1) * hd) for j in range(kv)]
    return [(0 if role in ("gate", "up") else 1, c, c + 1) for c in range(config.intermediate_size)]


def _unit_sq(w: torch.Tensor, ranges) -> torch.Tensor:
    w = w.double()
    return torch.tensor([float((w[a:b] if dim == 0 else w[:, a:b]).pow(2).sum()) for dim, a, b in ranges],
                        dtype=torch.float64)


def activation_scores(model, batches: list[dict], unit: str = "kv_group") -> tuple[torch.Tensor, torch.Tensor]:
    """(L, kv groups or q heads), (L, channels): L2 norm of each unit's input to o / down over the real tokens, each
    row of each batch run on its own, cut to its attention mask (right padding)."""
    cfg = model.config
    layers = model.model.layers
    inputs: dict[tuple[int, str], list[torch.Tensor]] = {}
    hooks = [layer.get_submodule(PROJ[role]).register_forward_pre_hook(
        lambda mod, args, key=(i, role): inputs.setdefault(key, []).append(args[0].detach()[0]))
        for i, layer in enumerate(layers) for role in ("o", "down")]
    model.eval()
    with torch.no_grad():
        for b in batches:
            for row, mask in zip(b["input_ids"], b["attention_mask"]):
                n = int(mask.sum())
                assert bool(mask[:n].all()), "right padding expected"
                model(input_ids=row[None, :n])
    for h in hooks:
        h.remove()
    out = []
    for role in ("o", "down"):
        # Columns of o / down: the unit ranges of the input side of that weight.
        ranges = unit_ranges(cfg, role, unit)
        out.append(torch.stack([_unit_sq(torch.cat(inputs[(i, role)]), [(1, a, b) for _, a, b in ranges]).sqrt()
                                for i in range(len(layers))]))
    return out[0], out[1]


def gradient_scores(model, roles: list[str], batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, kv groups), (L, channels): over the listed projections, the root of the sum over batches of each unit's
    squared L2 norm of that batch's loss gradient (each batch's mean token loss), as the selection defines it (no
    full weight gradient outlives its batch)."""
    model = copy.deepcopy(model).eval()
    cfg = model.config
    weights = [(i, role, layer.get_submodule(PROJ[role]).weight)
               for i, layer in enumerate(model.model.layers) for role in roles]
    heads = torch.zeros(cfg.num_hidden_layers, cfg.num_key_value_heads, dtype=torch.float64)
    chans = torch.zeros(cfg.num_hidden_layers, cfg.intermediate_size, dtype=torch.float64)
    for b in batches:
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        for (i, role, _), g in zip(weights, torch.autograd.grad(loss, [w for _, _, w in weights])):
            (heads if role in ("q", "k", "v", "o") else chans)[i] += _unit_sq(g.double(), unit_ranges(cfg, role))
    return heads.sqrt(), chans.sqrt()


def strategy_scores(model, strategy: str, roles: list[str], batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference scores of a calibrated strategy: activation_scores or gradient_scores (over `roles`)."""
    if strategy == "activation":
        return activation_scores(model, batches)
    return gradient_scores(model, roles, batches)


def top(scores: torch.Tensor, k: int) -> dict[str, list[int]]:
    """The k largest of each layer's scores, as a selection's {layer: sorted indices}."""
    return {str(i): sorted(torch.topk(row, k).indices.tolist()) for i, row in enumerate(scores)}


def padded_batches(vocab: int, n: int, seed: int = 0) -> list[dict]:
    """n batches of 3 rows of 12 random tokens; row 1 ends with padding (out of the mask and the loss) of a width that
    changes by batch, and the first 3 tokens of every row are out of the loss (a prompt)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(4, vocab, (3, 12), generator=g)
        mask = torch.ones_like(ids)
        labels = ids.clone()
        labels[:, :3] = -100
        cut = 4 + 2 * i
        ids[1, -cut:], mask[1, -cut:], labels[1, -cut:] = 0, 0, -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out
