"""Pruning one weight matrix: magnitude (unstructured or N:M), SparseGPT, and the cubic gradual schedule.

Every function takes a (out, in) weight and returns the weights to keep as a bool tensor of that shape. Unstructured
pruning zeroes exactly round(sparsity * numel) weights, so a layer's exported sparsity is its target; N:M keeps at
most N non-zeros in every M consecutive weights of a row (groups run along the input dimension).
"""

from __future__ import annotations

import torch

from sparseft.methods.squarehead.config import Gradual


def prune_count(numel: int, sparsity: float) -> int:
    """How many of `numel` weights a sparsity zeroes (the epsilon keeps 0.3 * 10 from rounding through float error)."""
    return int(round(sparsity * numel + 1e-9))


def smallest(scores: torch.Tensor, k: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Keep mask that drops the k smallest scores (ties broken by position, so the choice is reproducible).
    Weights already dropped (`keep` False) count first, so masks only grow."""
    flat = scores.detach().flatten().float()
    if keep is not None:
        flat = flat.masked_fill(~keep.flatten(), float("-inf"))
    out = torch.ones(flat.numel(), dtype=torch.bool, device=scores.device)
    out[torch.sort(flat, stable=True).indices[:k]] = False
    return out.view(scores.shape)


def nm_keep(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask with the n largest scores of every m consecutive entries of a row: (out, in) -> (out, in)."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} input columns are not a multiple of M={m}")
    groups = scores.detach().float().reshape(rows, cols // m, m)
    top = torch.topk(groups, n, dim=-1).indices  # (out, in/m, n)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(rows, cols)


def magnitude_keep(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
                   keep: torch.Tensor | None = None) -> torch.Tensor:
    """Drop the smallest |w|: `sparsity` of the matrix (unstructured, growing `keep` if given) or per N:M group."""
    if nm is not None:
        return nm_keep(weight.abs(), *nm)
    return smallest(weight.abs(), prune_count(weight.numel(), sparsity), keep)


def _inverse_cholesky(h: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (so U^T U is the inverse). Damping grows tenfold
    until the factorisations succeed: a Hessian from few tokens is often singular."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    scale = h.diagonal().mean().clamp_min(1e-8)
    for _ in range(6):
        low, info = torch.linalg.cholesky_ex(h + dampening * scale * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
            if int(info) == 0:
                return upper
        dampening *= 10
    raise RuntimeError("SparseGPT: the Hessian stays singular after dampening; raise method.dampening")


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
              block_size: int = 128, dampening: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh, 2023) on one linear: (new weight, keep mask).

    `hessian` is H = 2 X X^T / n of the layer's inputs X (in, n). Columns are pruned left to right; pruning a weight
    leaves an error that the optimal-brain-surgeon update spreads over the not-yet-pruned columns of its row through
    the upper Cholesky factor of H^-1. Updates inside a block of `block_size` columns are immediate, and the block's
    accumulated error reaches the columns to its right in one matmul (the lazy batch update). Which weights to drop is
    decided per block (unstructured: the block's share of the layer's count, by w^2 / [H^-1]_jj^2) or, for N:M, per
    group of M columns as it is reached.
    """
    w = weight.detach().float().clone()  # (out, in)
    rows, cols = w.shape
    h = hessian.detach().float().clone()  # (in, in)
    # Inputs that were always zero: their weights cost nothing to prune, so they are pruned first (their score is 0).
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    hinv = _inverse_cholesky(h, dampening)  # (in, in), upper triangular
    keep = torch.ones_like(w, dtype=torch.bool)
    if nm is not None and cols % nm[1]:
        raise ValueError(f"{cols} input columns are not a multiple of M={nm[1]}")

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()  # (out, b)
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = hinv1.diagonal()  # (b,)
        if nm is None:
            # This block's share of the exact layer count: the shares telescope to prune_count(rows * cols).
            k = prune_count(rows * i2, sparsity) - prune_count(rows * i1, sparsity)
            prune1 = ~smallest((w1.pow(2) / d.pow(2)).masked_fill(dead[i1:i2], 0.0), k)
        else:
            prune1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                j = slice(i, i + nm[1])
                group = (w1[:, j].pow(2) / d[j].pow(2)).masked_fill(dead[i1:i2][j], 0.0)  # (out, m)
                prune1[:, i:i + nm[1]] = ~nm_keep(group, *nm)
            col = w1[:, i]
            q = col.masked_fill(prune1[:, i], 0.0)
            q1[:, i] = q
            e = (col - q) / d[i]  # (out,)
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i1:i2] = q1
        keep[:, i1:i2] = ~prune1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    w.masked_fill_(~keep, 0.0)  # exact zeros whatever the float error of the updates
    return w.to(weight.dtype), keep


def cubic_sparsity(step: int, gradual: Gradual, final: float) -> float:
    """Sparsity of the cubic schedule at optimizer step `step` (initial before start_step, final from end_step)."""
    s0, t0, t1 = gradual.initial_sparsity, gradual.start_step, gradual.end_step
    progress = min(1.0, max(0.0, (step - t0) / (t1 - t0)))
    return final + (s0 - final) * (1.0 - progress) ** 3


def is_prune_step(step: int, gradual: Gradual) -> bool:
    """Pruning events: start_step, every `every` steps after it, and end_step."""
    if step < gradual.start_step or step > gradual.end_step:
        return False
    return step == gradual.end_step or (step - gradual.start_step) % gradual.every == 0
