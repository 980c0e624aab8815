"""LaMDA++: ranks follow each weight's spectrum (flatter -> higher) and sum to the budget exactly."""

from __future__ import annotations

import json
import random

import pytest
import torch

from sparseft.methods.lamda.spectrum import allocate_ranks, effective_rank
from tests.methods.lamda.lamda_testlib import lamda_layers, prepared


def test_effective_rank_of_known_spectra():
    assert effective_rank(torch.ones(16)) == pytest.approx(16)
    assert effective_rank(torch.tensor([3.0, 0, 0, 0])) == pytest.approx(1)
    assert effective_rank(torch.tensor([1.0, 1.0, 0, 0])) == pytest.approx(2)
    assert effective_rank(5 * torch.ones(8)) == pytest.approx(effective_rank(torch.ones(8)))  # scale-free
    assert effective_rank(torch.zeros(4)) == 1.0


def test_allocation_sums_to_the_budget():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 12)
        scores = [rng.random() * 10 for _ in range(n)]
        caps = [rng.randint(1, 40) for _ in range(n)]
        budget = rng.randint(n, sum(caps))
        ranks = allocate_ranks(scores, budget, caps)
        assert sum(ranks) == budget and all(1 <= r <= c for r, c in zip(ranks, caps))
    assert allocate_ranks([1.0, 1.0, 2.0], 8, [64] * 3) == [2, 2, 4]
    assert allocate_ranks([1.0, 1.0, 1.0], 10, [64] * 3) == [4, 3, 3]  # largest remainder, ties to the first
    assert allocate_ranks([100.0, 0.0, 0.0], 12, [64] * 3) == [10, 1, 1]  # min 1 each
    assert allocate_ranks([100.0, 1.0], 12, [5, 64]) == [5, 7]  # a capped linear's share goes to the others


def _with_spectrum(weight: torch.Tensor, decay: float, seed: int) -> None:
    """Overwrite a square weight with Q1 diag(exp(-decay * i)) Q2: a known spectrum, flatter for smaller decay."""
    n = weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    with torch.no_grad():
        weight.copy_(q1 @ torch.diag(torch.exp(-decay * torch.arange(n, dtype=torch.float32))) @ q2)


@pytest.mark.parametrize("budget", [None, 50])
def test_flatter_spectrum_gets_higher_rank(load, budget):
    model = load("llama")  # hidden 64, two layers: q and k of each are 64 x 64
    decays = {"model.layers.0.self_attn.q_proj": 0.0, "model.layers.0.self_attn.k_proj": 0.03,
              "model.layers.1.self_attn.q_proj": 0.1, "model.layers.1.self_attn.k_proj": 0.5}
    for i, (path, decay) in enumerate(decays.items()):
        _with_spectrum(model.get_submodule(path).weight, decay, seed=i)
    logs = []
    extra = {"rank_budget": budget} if budget else {}
    p = prepared(model, logs, r=8, rank_allocation="spectrum", projections=["q", "k"], **extra)
    layers = lamda_layers(p.model)
    ranks = [layers[p].rank for p in decays]
    assert sum(ranks) == (budget or 8 * 4)
    assert ranks == sorted(ranks, reverse=True) and ranks[0] > ranks[-1] >= 1, ranks
    assert "lamda++" in logs[0] and "effective rank" in logs[0]
    # The selection (selection.json in a run) holds the ranks and the scores they came from.
    sel = json.loads(json.dumps(p.selection))
    assert sel["ranks"] == dict(zip(decays, ranks)) and sel["budget"] == (budget or 32)
    eranks = [sel["effective_rank"][path] for path in decays]
    assert eranks == sorted(eranks, reverse=True) and eranks[0] == pytest.approx(64, rel=1e-3)


def test_flat_spectrum_gets_the_full_share(load):
    """Effective ranks 64 vs ~1: the flat weight takes nearly all of a budget of 40, the spiky one keeps 1."""
    model = load("llama")
    _with_spectrum(model.model.layers[0].self_attn.q_proj.weight, 0.0, seed=0)
    _with_spectrum(model.model.layers[1].self_attn.q_proj.weight, 5.0, seed=1)
    p = prepared(model, r=20, rank_allocation="spectrum", projections=["q"])
    assert [m.rank for m in lamda_layers(p.model).values()] == [39, 1]
