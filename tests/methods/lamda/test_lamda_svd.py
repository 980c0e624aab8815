"""LaMDA's start costs one SVD a linear (LaMDA++ too), and `svd: lowrank` gives the same top directions cheaply
(issue 17, item 3)."""

from __future__ import annotations

import pytest
import torch

from sparseft.methods.lamda.layers import lamda_delta
from sparseft.methods.lamda.spectrum import top_svd
from tests.methods.lamda.lamda_testlib import lamda_layers, logits, prepared


@pytest.mark.parametrize("allocation", ["uniform", "spectrum"])
def test_one_decomposition_a_linear(load, monkeypatch, allocation):
    calls = []
    for name in ("svd", "svdvals"):
        real = getattr(torch.linalg, name)
        monkeypatch.setattr(torch.linalg, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k))
    p = prepared(load("llama"), r=4, rank_allocation=allocation, init="spectrum")
    n = len(lamda_layers(p.model))
    assert calls == ["svd"] * n, f"{len(calls)} decompositions for {n} linears: {calls[:4]} ..."
    monkeypatch.undo()
    for path, layer in lamda_layers(p.model).items():  # the kept factors are those of the base weight
        u, sigma, vh = torch.linalg.svd(layer.base_layer.weight.detach().float(), full_matrices=False)
        r = layer.rank
        torch.testing.assert_close(layer.lamda_A.abs(), vh[:r].abs(), atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.diagonal(layer.lamda_S.detach()), sigma[:r], atol=1e-5, rtol=1e-5)


def test_lowrank_finds_the_top_directions_of_a_decaying_spectrum():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(300, 300, generator=g))
    v, _ = torch.linalg.qr(torch.randn(200, 200, generator=g))
    sigma = 10.0 * 0.8 ** torch.arange(200, dtype=torch.float32)
    w = (u[:, :200] * sigma) @ v.T  # (300, 200), known SVD
    uu, ss, vh = top_svd(w, 8, "lowrank")
    torch.testing.assert_close(ss, sigma[:8], rtol=1e-3, atol=0)
    # Each direction matches up to sign: |<found, true>| = 1.
    torch.testing.assert_close((vh * v[:, :8].T).sum(1).abs(), torch.ones(8), atol=1e-3, rtol=0)
    torch.testing.assert_close((uu * u[:, :8]).sum(0).abs(), torch.ones(8), atol=1e-3, rtol=0)
    state = torch.get_rng_state()
    again = top_svd(w, 8, "lowrank")
    assert torch.equal(again[1], ss) and torch.equal(torch.get_rng_state(), state), "seeded, global RNG untouched"


@pytest.mark.parametrize("allocation", ["uniform", "spectrum"])
def test_lowrank_start_leaves_the_model_unchanged(load, allocation):
    base = load("qwen3")
    ids = torch.randint(4, base.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    expected = logits(base, ids)
    p = prepared(load("qwen3"), r=4, init="spectrum", svd="lowrank", rank_allocation=allocation)
    assert p.selection["svd"] == "lowrank"
    torch.testing.assert_close(logits(p.model, ids), expected, rtol=0, atol=1e-5)
    for layer in lamda_layers(p.model).values():
        assert torch.count_nonzero(lamda_delta(layer.scale, **layer.adapter_tensors())) == 0
        a = layer.lamda_A.float()
        torch.testing.assert_close(a @ a.T, torch.eye(layer.rank), atol=1e-4, rtol=0)  # orthonormal directions
