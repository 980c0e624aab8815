"""Spectra of pretrained weights: the SVD start of a LaMDA adapter, and LaMDA++'s per-linear ranks.

LaMDA++ rank rule. For a weight W with singular values sigma_i, the normalised energy spectrum is
p_i = sigma_i^2 / sum_j sigma_j^2 and its effective rank is erank(W) = exp(-sum_i p_i log p_i), the exponential of the
spectrum's entropy: 1 when one direction holds all the energy, min(d_out, d_in) when the spectrum is flat. It counts
the directions that carry the weight's energy, so a linear whose energy is spread over many directions is given a
larger share of the budget: r_l = budget * erank_l / sum_k erank_k, rounded by largest remainder so the ranks sum to
the budget exactly, each at least 1 and at most min(d_out, d_in). The score needs no choice of threshold (unlike "the
rank that reaches 90% of the energy") and is invariant to the weight's scale.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """sigma of a (d_out, d_in) weight, descending, in float32 (computed on the weight's device)."""
    return torch.linalg.svdvals(weight.detach().float())


def effective_rank(sigma: torch.Tensor) -> float:
    """exp(entropy of sigma^2 / sum sigma^2); 1.0 for an all-zero weight (nothing to spread)."""
    energy = sigma.detach().double() ** 2
    total = energy.sum()
    if total <= 0:
        return 1.0
    p = energy / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def allocate_ranks(scores: list[float], budget: int, caps: list[int]) -> list[int]:
    """Integer ranks proportional to `scores` that sum to `budget` exactly, each in [1, cap] (largest remainder).

    Quotas q_l = budget * s_l / sum(s). Start from floor(q_l) clipped to [1, cap_l]; while the sum is short, add one
    to the linear with the largest remainder q_l - r_l that is below its cap; while it is over (the minimum of 1
    pushed it), take one from the linear with the smallest remainder that is above 1. Ties go to the earlier linear.
    The caller checks len(scores) <= budget <= sum(caps).
    """
    n = len(scores)
    if not len(scores) <= budget <= sum(caps):
        raise ValueError(f"budget {budget} outside [{n}, {sum(caps)}]")
    total = sum(scores)
    quota = [budget * s / total for s in scores] if total > 0 else [budget / n] * n
    ranks = [min(cap, max(1, math.floor(q))) for q, cap in zip(quota, caps)]
    while sum(ranks) < budget:
        i = max((i for i in range(n) if ranks[i] < caps[i]), key=lambda i: (quota[i] - ranks[i], -i))
        ranks[i] += 1
    while sum(ranks) > budget:
        i = min((i for i in range(n) if ranks[i] > 1), key=lambda i: (quota[i] - ranks[i], i))
        ranks[i] -= 1
    return ranks


@torch.no_grad()
def top_svd(weight: torch.Tensor, rank: int, how: str = "full") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U[:, :rank], sigma[:rank], V^T[:rank]) of a (d_out, d_in) weight in float32, descending.

    how "full": torch.linalg.svd (exact; every singular value is computed). "lowrank": torch.svd_lowrank, a randomised
    range finder with rank + 8 columns and 4 power iterations, seeded (0) and without touching the global RNG: far
    cheaper when rank is much below min(d_out, d_in), and close to the top singular triplets of real weights, whose
    spectra decay.
    """
    w = weight.detach().float()
    if how == "full":
        u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :rank], sigma[:rank], vh[:rank]
    q = min(rank + 8, *w.shape)
    with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
        torch.manual_seed(0)
        u, sigma, v = torch.svd_lowrank(w, q=q, niter=4)
    return u[:, :rank], sigma[:rank], v[:, :rank].T


@torch.no_grad()
def svd_start(weight: torch.Tensor, rank: int, init: str, scale: float, how: str = "full",
              factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The start of one adapter from W = U diag(sigma) V^T (float32 SVD, cast back to the weight's dtype):

    lamda_A = V^T[:r] (r, d_in), lamda_B = U[:, :r] (d_out, r), and lamda_S (r, r) = 0 for init "zero" or
    diag(sigma[:r]) / scale for init "spectrum". For "spectrum", lamda_start = B0 S0 (d_out, r) is the frozen term the
    layer subtracts, so scale * (B S - B0 S0) A is exactly zero at the start. `factors`: top singular triplets
    computed already (at least `rank` of them; LaMDA++ computes them with the spectrum), else `how` computes them.
    """
    u, sigma, vh = factors if factors is not None else top_svd(weight, rank, how)
    u, sigma, vh = u[:, :rank], sigma[:rank], vh[:rank]
    dtype = weight.dtype
    out = {"lamda_A": vh.to(dtype).contiguous(), "lamda_B": u.to(dtype).contiguous()}
    if init == "spectrum":
        out["lamda_S"] = torch.diag(sigma / scale).to(dtype)
        out["lamda_start"] = out["lamda_B"] @ out["lamda_S"]  # the same product the layer computes from B and S
    else:
        out["lamda_S"] = torch.zeros(rank, rank, dtype=dtype, device=weight.device)
    return out
